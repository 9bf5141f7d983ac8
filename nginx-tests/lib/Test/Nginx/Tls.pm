package Test::Nginx::Tls;

# A throw-away PKI for TLS tests, made with the openssl command line in the
# test directory: a CA, a server certificate for 127.0.0.1 / localhost /
# registry.test signed by it, a client certificate signed by it (for mutual
# TLS), and a second, unrelated CA.

use strict;
use warnings;

use Test::Nginx ();

sub _run {
	my ($dir, @cmd) = @_;
	my $out = `cd '$dir' && @cmd 2>&1`;
	die "openssl failed: @cmd\n$out" if $?;
}

sub available { defined Test::Nginx::which('openssl') }

# make($t): writes ca.pem, server.pem/server.key, client.pem/client.key,
# other-ca.pem into the test directory; returns a hash of their paths.
sub make {
	my ($class, $t) = @_;
	my $d = $t->testdir;
	my $key = '-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes';
	for my $ca (qw/ca other-ca/) {
		_run($d, "openssl req -x509 $key -keyout $ca.key -out $ca.pem -days 2"
			. " -subj '/CN=upsync test $ca' -addext basicConstraints=critical,CA:TRUE"
			. " -addext keyUsage=critical,keyCertSign,cRLSign");
	}
	my %san = (
		server => 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:registry.test',
		client => 'extendedKeyUsage=clientAuth',
	);
	for my $who (qw/server client/) {
		_run($d, "openssl req -new $key -keyout $who.key -out $who.csr"
			. " -subj '/CN=upsync test $who' -addext '$san{$who}'");
		_run($d, "openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca.key"
			. " -CAcreateserial -days 2 -copy_extensions copy -out $who.pem");
	}
	return { map { $_ => "$d/$_" }
		qw/ca.pem other-ca.pem server.pem server.key client.pem client.key/ };
}

1;
