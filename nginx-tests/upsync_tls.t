#!/usr/bin/perl

# TLS to registries, against a real etcd serving https (its --cert-file,
# --key-file and, for mutual TLS, --client-cert-auth/--trusted-ca-file flags)
# with a throw-away PKI:
# - verification is on by default: a certificate from an unknown CA, or one
#   that does not name the configured host (ssl_name=), is refused with a
#   clear line and the configured servers stay;
# - ssl_trusted_certificate= (CA file), IP and DNS names, ssl_verify=off;
# - mutual TLS with ssl_certificate=/ssl_certificate_key=; without a client
#   certificate etcd refuses the session;
# - https:// to a plain-http port fails the handshake with OpenSSL's reason;
# - strong_dependency=on reads over TLS (with a client certificate) in the
#   master before workers start;
# - changes arrive over the TLS watch, and connections go where they say;
# - Consul over TLS: nginx's own stream ssl terminates in front of the Consul
#   emulator; blocking queries run over the kept-alive TLS connection.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;

use Test::Nginx qw/ :DEFAULT port wait_for show_section upsync_upstreams /;
use Test::Nginx::Backend;
use Test::Nginx::Etcd;
use Test::Nginx::Consul;
use Test::Nginx::Tls;
use Test::Nginx::Stream;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 2)->has(qw/stream upsync/);
plan(skip_all => 'no etcd 3.4') unless Test::Nginx::Etcd->available('3.4');
plan(skip_all => 'no openssl command') unless Test::Nginx::Tls->available;
$t->plan(23);

my $pki = Test::Nginx::Tls->make($t);
my ($p1, $p2) = (port(8081), port(8082));
my ($tls, $mtls) = (port(8443), port(8444));

# one etcd serving https without client certificates, one requiring them;
# the harness writes keys over their plain ports
my $etcd = Test::Nginx::Etcd->start($t, port => port(8500), peer_port => port(8600),
	name => 'etcd-tls',
	tls => { port => $tls, cert => $pki->{'server.pem'}, key => $pki->{'server.key'} });
my $metcd = Test::Nginx::Etcd->start($t, port => port(8501), peer_port => port(8601),
	name => 'etcd-mtls',
	tls => { port => $mtls, cert => $pki->{'server.pem'}, key => $pki->{'server.key'},
		ca => $pki->{'ca.pem'} });
$etcd->v3_put("/u/127.0.0.1:$p1", '{"weight":2}');
$metcd->v3_put("/u/127.0.0.1:$p2", '');

my $ca = "ssl_trusted_certificate=$pki->{'ca.pem'}";
my $client = "ssl_certificate=$pki->{'client.pem'} ssl_certificate_key=$pki->{'client.key'}";
my $plain = port(8500);
my %ups = (
	ca_ip       => "https://127.0.0.1:$tls/u/ upsync_type=etcdv3 $ca",
	ca_name     => "https://127.0.0.1:$tls/u/ upsync_type=etcdv3 $ca ssl_name=registry.test",
	system_ca   => "https://127.0.0.1:$tls/u/ upsync_type=etcdv3",
	other_ca    => "https://127.0.0.1:$tls/u/ upsync_type=etcdv3 ssl_trusted_certificate=$pki->{'other-ca.pem'}",
	wrong_name  => "https://127.0.0.1:$tls/u/ upsync_type=etcdv3 $ca ssl_name=etcd.example.org",
	no_verify   => "https://127.0.0.1:$tls/u/ upsync_type=etcdv3 ssl_verify=off",
	mtls        => "https://127.0.0.1:$mtls/u/ upsync_type=etcdv3 $ca $client strong_dependency=on",
	mtls_nocert => "https://127.0.0.1:$mtls/u/ upsync_type=etcdv3 $ca",
	plain_port  => "https://127.0.0.1:$plain/u/ upsync_type=etcdv3 ssl_verify=off",
	consul      => "https://localhost:${\ port(8445)}/v1/kv/upstreams/c/ upsync_type=consul $ca",
	via_nginx   => "https://127.0.0.1:${\ port(8446)}/u/ upsync_type=etcdv3 $ca",
);
my $conf = upsync_upstreams(\%ups, 'upsync_interval=200ms');

$t->write_file_expand('nginx.conf', <<"EOF");
%%TEST_GLOBALS%%
events { }
stream {
$conf
    server { listen 127.0.0.1:%%PORT_8080%%; proxy_pass ca_ip; }
    server { listen 127.0.0.1:%%PORT_8079%%; proxy_pass mtls; }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }

    # TLS in front of the Consul emulator
    server {
        listen 127.0.0.1:%%PORT_8445%% ssl;
        ssl_certificate $pki->{'server.pem'};
        ssl_certificate_key $pki->{'server.key'};
        proxy_pass 127.0.0.1:%%PORT_8502%%;
    }

    # TLS in front of etcd's plain port, logging whether sessions were resumed
    log_format tls \$ssl_session_reused;
    server {
        listen 127.0.0.1:%%PORT_8446%% ssl;
        ssl_certificate $pki->{'server.pem'};
        ssl_certificate_key $pki->{'server.key'};
        access_log %%TESTDIR%%/tls_access.log tls;
        proxy_pass 127.0.0.1:$plain;
    }
}
EOF

my $consul = Test::Nginx::Consul->start($t, port => port(8502));
$consul->put("upstreams/c/127.0.0.1:$p1", '{"weight":7}');

my @backends = (Test::Nginx::Backend->tcp($t, port => $p1, id => 'b1'),
	Test::Nginx::Backend->tcp($t, port => $p2, id => 'b2'));
$t->run();

sub section { show_section(port(8088), @_) }
sub greeting {
	my $s = Test::Nginx::Stream->new(port => $_[0]);
	return $s->readline(timeout => 3) // '';
}

# mutual TLS in the master, before any worker: the dump already has it
like($t->read_file('servers_mtls.conf') // '', qr/127\.0\.0\.1:$p2 /,
	'strong_dependency=on over mutual TLS: read before workers started');
ok($t->grep_log(qr/upstream "mtls".*strong_dependency=on: starting with 1 servers/),
	'strong_dependency=on over TLS: logged');

ok(wait_for(sub { section('ca_ip') =~ /:$p1 weight=2 / }, timeout => 5),
	'CA file, certificate for the IP address: synced');
is(greeting(port(8080)), "b1\n", 'connections go to the server read over TLS');
ok(wait_for(sub { section('ca_name') =~ /:$p1 weight=2 / }, timeout => 5),
	'ssl_name= that the certificate carries: synced');
ok(wait_for(sub { section('no_verify') =~ /:$p1 weight=2 / }, timeout => 5),
	'ssl_verify=off: synced');
ok(wait_for(sub { section('mtls') =~ /:$p2 / }, timeout => 5), 'mutual TLS: synced');

# refused: each keeps its configured server, with one clear line
ok($t->wait_for_log(qr/upstream "system_ca".*the registry's certificate is not trusted: (unable to get local issuer certificate|self-signed certificate in certificate chain) \(verify error \d+\) at 127\.0\.0\.1:$tls; keeping the current servers/, 5),
	'verification on by default: unknown CA refused, logged');
ok($t->wait_for_log(qr/upstream "other_ca".*the registry's certificate is not trusted/, 5),
	'a CA file of another CA: refused, logged');
ok($t->wait_for_log(qr/upstream "wrong_name".*the registry's certificate does not match "etcd\.example\.org"/, 5),
	'a name the certificate does not carry: refused, logged');
ok($t->wait_for_log(qr/upstream "mtls_nocert".*reading the response from 127\.0\.0\.1:$mtls failed: SSL_read\(\) failed .*(certificate required|bad certificate)/i, 5),
	'mutual TLS without a client certificate: refused, logged');
ok($t->wait_for_log(qr/upstream "plain_port".*TLS handshake with 127\.0\.0\.1:$plain failed: .*(wrong version number|packet length too long|record layer failure|peer closed connection in SSL handshake)/, 5),
	'https:// to a plain-http port: handshake failure with the OpenSSL reason');
for my $name (qw/system_ca wrong_name mtls_nocert/) {
	like(section($name), qr/count: 1\n.*:${\ port(8089)} /s, "$name: configured server kept");
}

# a change arrives over the TLS watch, and traffic follows it
$etcd->v3_put("/u/127.0.0.1:$p2", '');
$etcd->v3_delete("/u/127.0.0.1:$p1");
ok(wait_for(sub { my $s = section('ca_ip'); $s =~ /:$p2 / && $s !~ /:$p1 / }, timeout => 5),
	'a change arrives over the TLS watch');
is(greeting(port(8080)), "b2\n", 'and connections follow it');

# Consul through nginx's ssl: synced, then a change over the same session
ok(wait_for(sub { section('consul') =~ /:$p1 weight=7 / }, timeout => 5), 'Consul over TLS: synced');
$consul->put("upstreams/c/127.0.0.1:$p2", '{"weight":8}');
ok(wait_for(sub { section('consul') =~ /:$p2 weight=8 / }, timeout => 5),
	'Consul over TLS: a change ends the blocking query and arrives');

# each etcd v3 watch event ends its connection: the reconnect resumes the
# TLS session instead of a full handshake
ok(wait_for(sub { section('via_nginx') =~ /:$p2 / && section('via_nginx') !~ /:$p1 / }, timeout => 5),
	'etcd through nginx ssl: synced after the change');
$etcd->v3_put("/u/127.0.0.1:$p1", '');
ok(wait_for(sub { ($t->read_file('tls_access.log') // '') =~ /^r$/m }, timeout => 5),
	'a reconnect resumes the TLS session (ssl_session_reused "r")')
	or diag($t->read_file('tls_access.log'));

# no private key material or certificate bodies in the log
my $log = $t->error_log;
unlike($log, qr/PRIVATE KEY|BEGIN CERTIFICATE/, 'no key or certificate material in the log');
is(scalar(() = $log =~ /upstream "system_ca".*not trusted/g), 1,
	'a refused certificate is logged once, not on every retry');
