#!/usr/bin/perl

# The module built by scripts/build-debian-module.sh, loaded into Debian's
# packaged nginx (/usr/sbin/nginx + libnginx-mod-stream):
# nginx -t, upstream_show with one static and one upsync upstream (whose
# registry is a closed port, so the configured server stays), and a session
# proxied through the upsync upstream to a real backend; then (with etcd) a
# registry read over mutual TLS through Debian's nginx and its OpenSSL, and a
# change that arrives over a resumed TLS session.
#
# Independent of the caller's TEST_NGINX_* settings: the binary, the globals
# (load the packaged stream module) and the module path are set below.
# Test::Nginx reads TEST_NGINX_BINARY in new(), TEST_NGINX_GLOBALS and
# TEST_NGINX_MODULE when the config is expanded and in has(); nothing at
# import time, so setting %ENV before new() is enough.

use strict;
use warnings;

use Cwd ();
use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::Nginx qw/ :DEFAULT port wait_for http_get http_parse stream_get show_section /;
use Test::Nginx::Backend;
use Test::Nginx::Etcd;
use Test::Nginx::Tls;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $ROOT = Cwd::abs_path("$FindBin::Bin/..");
my $NGINX = '/usr/sbin/nginx';
my $STREAM_SO = '/usr/lib/nginx/modules/ngx_stream_module.so';
my $MODULE = "$ROOT/target/debian/ngx_stream_upsync_module.so";

for ([$NGINX, 'Debian nginx (apt-get install nginx-core)'],
	[$STREAM_SO, 'Debian stream module (apt-get install libnginx-mod-stream)'],
	[$MODULE, 'module not built for Debian nginx '
		. '(run scripts/build-debian-module.sh)'])
{
	my ($path, $what) = @$_;
	plan(skip_all => "$path not found: $what") unless -f $path;
}

# Only our own settings (this process and the nginx it starts); the caller's
# diagnostics switches (VERBOSE, LEAVE, CATLOG) are kept.
delete @ENV{ grep { /^TEST_NGINX_/
	&& !/^TEST_NGINX_(?:VERBOSE|LEAVE|CATLOG)$/ } keys %ENV };
$ENV{TEST_NGINX_BINARY} = $NGINX;
$ENV{TEST_NGINX_GLOBALS} = "load_module $STREAM_SO;";
$ENV{TEST_NGINX_MODULE} = $MODULE;

my $t = Test::Nginx->new(workers => 1)->has(qw/stream upsync/)->plan(13);

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

events { }

stream {
    %%TEST_GLOBALS_STREAM%%

    upstream st {
        server 127.0.0.1:%%PORT_8081%% weight=3 max_fails=2 fail_timeout=20s;
    }

    upstream up {
        # nothing listens on PORT_8500: every poll fails, the server below stays
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/up/ upsync_type=consul
               upsync_interval=500ms upsync_timeout=1s strong_dependency=off;
        upsync_dump_path %%TESTDIR%%/servers_up.conf;
        server 127.0.0.1:%%PORT_8082%% weight=5 max_fails=0 fail_timeout=30s;
    }

    server {
        listen 127.0.0.1:%%PORT_8080%%;
        proxy_pass up;
    }

    server {
        listen 127.0.0.1:%%PORT_8083%%;
        upstream_show;
    }
}
EOF

###############################################################################

my ($ok, $out) = $t->test_config();
ok($ok, 'nginx -t passes with the module loaded into Debian nginx')
	or diag($out);

my $b = Test::Nginx::Backend->tcp($t, port => port(8082), id => 'b1');

$t->run();

# wait for the first (failed) poll of the closed registry port
ok($t->wait_for_log(qr/\[error\].*upstream "up"/, 10),
	'failed registry poll is logged');

my ($status, $h, $body) = http_parse(http_get(port(8083), '/'));

my $p1 = port(8081);
my $p2 = port(8082);
my $expect = "Upstream name: st; Backend server count: 1\n"
	. "        server 127.0.0.1:$p1 weight=3 max_fails=2 fail_timeout=20s;\n"
	. "\n"
	. "Upstream name: up; Backend server count: 1\n"
	. "        server 127.0.0.1:$p2 weight=5 max_fails=0 fail_timeout=30s;\n"
	. "\n";

is($status, 200, 'upstream_show status');
is($body, $expect, 'upstream_show body, byte for byte');
is($h->{'content-length'}, length($expect), 'upstream_show content-length');

is(stream_get(port(8080)), "b1\n", 'proxied through the upsync upstream');
ok(wait_for(sub { $b->connections_total >= 1 }, timeout => 3),
	'backend saw the proxied connection');

is(stream_get(port(8080)), "b1\n", 'proxied again after the failed polls');

$t->stop();

is(scalar $t->alerts, 0, 'no alerts in error.log')
	or diag($t->tail_log(30));
###############################################################################
# TLS with Debian's nginx (its OpenSSL, its ngx_ssl_* structures)

SKIP: {
	skip 'no etcd 3.4 or openssl command', 4
		unless Test::Nginx::Etcd->available('3.4') && Test::Nginx::Tls->available;

	my $t2 = Test::Nginx->new(workers => 1);
	my $pki = Test::Nginx::Tls->make($t2);
	my $tls = port(8443);
	my $etcd = Test::Nginx::Etcd->start($t2, port => port(8501), peer_port => port(8601),
		tls => { port => $tls, cert => $pki->{'server.pem'}, key => $pki->{'server.key'},
			ca => $pki->{'ca.pem'} });
	$etcd->v3_put("/d/127.0.0.1:$p1", '');
	$t2->write_file_expand('nginx.conf', <<"EOF");

%%TEST_GLOBALS%%

events { }

stream {
    upstream d {
        upsync https://127.0.0.1:$tls/d/ upsync_type=etcdv3 upsync_interval=200ms
               strong_dependency=on ssl_trusted_certificate=$pki->{'ca.pem'}
               ssl_certificate=$pki->{'client.pem'} ssl_certificate_key=$pki->{'client.key'};
        upsync_dump_path %%TESTDIR%%/servers_d.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
    server { listen 127.0.0.1:%%PORT_8083%%; upstream_show; }
}
EOF
	# strong_dependency=on: the master reads the registry over TLS with Debian's
	# nginx (a --with-debug build, whose verify callback logs) before it starts
	$t2->run();
	like(show_section(port(8083), 'd'), qr/:$p1 /,
		'Debian nginx: strong_dependency read over mutual TLS at start');
	ok(wait_for(sub { show_section(port(8083), 'd') =~ /:$p1 / }, timeout => 5),
		'Debian nginx: synced over mutual TLS');
	$etcd->v3_put("/d/127.0.0.1:$p2", '');
	ok(wait_for(sub { show_section(port(8083), 'd') =~ /:$p2 / }, timeout => 5),
		'Debian nginx: a change arrives after the TLS reconnect');
	$t2->stop();
	is(scalar $t2->alerts, 0, 'Debian nginx with TLS: no alerts in error.log')
		or diag($t2->tail_log(30));
}
