#!/usr/bin/perl

# upsync_type=kubernetes against an API server emulator that requires a client
# certificate (mutual TLS, k8s_emulator.py --tls-client-ca):
# - with ssl_certificate=/ssl_certificate_key= (signed by the CA it trusts) the
#   upstream lists, watches and follows a change, and traffic goes there;
# - without them the server refuses the connection: an error line with OpenSSL's
#   reason (tlsv13 alert certificate required), and the configured server keeps
#   serving.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;

use Test::Nginx qw/ :DEFAULT port wait_for show_section /;
use Test::Nginx::Backend;
use Test::Nginx::Kubernetes;
use Test::Nginx::Stream;
use Test::Nginx::Tls;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 2)->has(qw/stream upsync/);
plan(skip_all => 'no python3 for the Kubernetes emulator') unless Test::Nginx::which('python3');
plan(skip_all => 'no openssl command') unless Test::Nginx::Tls->available;
plan(skip_all => 'needs the emulator (client CA)') if Test::Nginx::Kubernetes::want_real();
$t->plan(9);

my $pki = Test::Nginx::Tls->make($t);
my $k = Test::Nginx::Kubernetes->start($t, port => port(8600), control_port => port(8601),
	tls => { cert => $pki->{'server.pem'}, key => $pki->{'server.key'}, ca => $pki->{'ca.pem'},
		client_ca => $pki->{'ca.pem'} },
	bookmark_interval => 0.5);
my ($p1, $p2, $pc) = (port(8081), port(8082), port(8089));
my @b = map { Test::Nginx::Backend->tcp($t, port => $_->[0], id => $_->[1]) }
	([$p1, 'b1'], [$p2, 'b2'], [$pc, 'configured']);

my $client = "ssl_certificate=$pki->{'client.pem'} ssl_certificate_key=$pki->{'client.key'}";
my $mtls = $k->upsync('web', "$client upsync_interval=500ms");
my $nocert = $k->upsync('web', 'upsync_interval=500ms');

$t->write_file_expand('nginx.conf', <<"EOF");
%%TEST_GLOBALS%%
events { }
stream {
    upstream mtls {
        $mtls;
        upsync_dump_path %%TESTDIR%%/servers_mtls.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
    upstream nocert {
        $nocert;
        upsync_dump_path %%TESTDIR%%/servers_nocert.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
    server { listen 127.0.0.1:%%PORT_8080%%; proxy_pass mtls; proxy_connect_timeout 2s; }
    server { listen 127.0.0.1:%%PORT_8090%%; proxy_pass nocert; proxy_connect_timeout 2s; }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF

$k->put_endpoint('web', $p1, 'ready');
$t->run();

my $show = sub { show_section(port(8088), $_[0]) };
my $greeting = sub {
	my $s = Test::Nginx::Stream->new(port => $_[0]);
	my $l = $s->readline(timeout => 3) // '';
	$s->close;
	return $l;
};

###############################################################################
# with a client certificate

ok(wait_for(sub { $show->('mtls') =~ /count: 1\n.*:$p1 /s }, timeout => 5),
	'client certificate: listed, synced');
is($greeting->(port(8080)), "b1\n", 'client certificate: connections go to the listed server');
$k->put_endpoint('web', $p2, 'ready');
ok(wait_for(sub { $show->('mtls') =~ /count: 2\n/ }, timeout => 5),
	'client certificate: a change arrives over the watch');
ok(wait_for(sub { ($t->read_file('servers_mtls.conf') // '') =~ /:$p2 / }, timeout => 5),
	'client certificate: the dump has it');

###############################################################################
# without one

# (TLS 1.3: the client's handshake ends before the server has looked at its
# certificate, so the refusal is an alert read with the response. A try can also
# end as "SSL_write() failed (104: Connection reset by peer)", when the server's
# close resets the connection before the alert is read; the next try reads it.)
ok($t->wait_for_log(qr/\[error\].*upstream "nocert".*reading the response from 127\.0\.0\.1:${\ port(8600)} failed: SSL_read\(\) failed .*(?:certificate required|bad certificate).*; keeping the current servers/, 10),
	'no client certificate: refused, one error line with the OpenSSL reason');
like($show->('nocert'), qr/count: 1\n.*:$pc /s, 'no client certificate: the configured server kept');
is($greeting->(port(8090)), "configured\n", 'no client certificate: the configured server keeps serving');
unlike($t->read_file('servers_nocert.conf') // '', qr/:$p1 /, 'no client certificate: nothing from the registry in the dump');

my @bad = $t->grep_log(qr/\[(alert|crit|emerg)\]/);
is(scalar @bad, 0, 'no alerts in the error log') or diag(join "\n", @bad);

$t->stop();
