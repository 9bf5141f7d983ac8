#!/usr/bin/perl

# upstream_show's machine-readable forms: JSON (?format=json) and Prometheus
# (/metrics), the ?upstream= filter, live per-server counters and per-upstream
# sync state, and access control on the show server with allow/deny.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;
use JSON::PP;

use Test::Nginx qw/ :DEFAULT port wait_for http_get http_parse /;
use Test::Nginx::Backend;
use Test::Nginx::Stream;
use Test::Nginx::Consul;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 2)->has(qw/stream upsync/)->plan(22);
my ($p1, $p2) = (port(8081), port(8082));

$t->write_file_expand('nginx.conf', <<'EOF');
%%TEST_GLOBALS%%
events { }
stream {
    upstream app {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/app/ upsync_type=consul upsync_interval=200ms;
        upsync_dump_path %%TESTDIR%%/servers_app.conf;
        upsync_lb least_conn;
        server 127.0.0.1:%%PORT_8089%%;
    }
    upstream plain {
        server 127.0.0.1:%%PORT_8082%% weight=2;
        server 127.0.0.1:%%PORT_8083%% backup;
    }
    server { listen 127.0.0.1:%%PORT_8080%%; proxy_pass app; }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
    server { listen 127.0.0.1:%%PORT_8090%%; allow 127.0.0.1; deny all; upstream_show; }
    server { listen 127.0.0.1:%%PORT_8091%%; deny all; upstream_show; }
}
EOF

my $consul = Test::Nginx::Consul->start($t, port => port(8500));
my @backends = (Test::Nginx::Backend->tcp($t, port => $p1, id => 'b1'),
	Test::Nginx::Backend->tcp($t, port => $p2, id => 'b2'));
$consul->put("upstreams/app/127.0.0.1:$p1", '{"weight":2,"max_conns":5}');
$consul->put("upstreams/app/127.0.0.1:$p2", '{"backup":1}');
$t->run();

sub get {
	my ($path, $port) = @_;
	my ($status, $h, $body) = http_parse(http_get($port // port(8088), $path) // '');
	return ($status, $h, $body // '');
}
sub json { my (undef, undef, $b) = get(@_); return eval { decode_json($b) } }

ok(wait_for(sub { my $j = json('/?format=json'); $j && $j->{upstreams}{app}{server_count} == 2 }, timeout => 5),
	'json: synced set');

# an open session shows up as an active connection, in any worker's answer
my $s = Test::Nginx::Stream->new(port => port(8080));
is($s->readline, "b1\n", 'session on b1');
my $j = json('/?format=json');
my ($b1) = grep { $_->{server} eq "127.0.0.1:$p1" } @{ $j->{upstreams}{app}{servers} };
my ($b2) = grep { $_->{server} eq "127.0.0.1:$p2" } @{ $j->{upstreams}{app}{servers} };
is($b1->{active}, 1, 'json: active connections counted across workers');
ok($b1->{connections} >= 1, 'json: total connections');
is_deeply([@$b1{qw/weight max_conns state/}], [2, 5, 'up'], 'json: weight, max_conns, state up');
is($b2->{state}, 'backup', 'json: backup state');
my $u = $j->{upstreams}{app}{upsync};
is_deeply([@$u{qw/type registry lb/}], ['consul', '127.0.0.1:' . port(8500) . '/v1/kv/upstreams/app/', 'least_conn'],
	'json: source type, registry and method');
ok($u->{index} > 0 && $u->{generation} >= 2 && $u->{updates} >= 1, 'json: index, generation, updates');
ok($u->{last_sync} && !defined $u->{last_error} && $u->{consecutive_failures} == 0, 'json: healthy sync state');
ok($u->{poller_pid} > 0, 'json: the polling worker');
is($j->{upstreams}{plain}{upsync}, undef, 'json: static upstream has no upsync section');
is(scalar @{ $j->{upstreams}{plain}{servers} }, 2, 'json: static upstream servers');
$s->close;

# Prometheus
my ($st, $h, $m) = get('/metrics');
is($h->{'content-type'}, 'text/plain; version=0.0.4', 'metrics: content type');
like($m, qr/^upsync_upstream_servers\{upstream="app"\} 2$/m, 'metrics: servers gauge');
like($m, qr/^upsync_server_state\{upstream="app",server="127\.0\.0\.1:$p2",state="backup"\} 1$/m,
	'metrics: server state');
like($m, qr/^upsync_server_connections_total\{upstream="app",server="127\.0\.0\.1:$p1"\} [1-9]\d*$/m,
	'metrics: connections counter');

# filter by upstream
$j = json('/?format=json&upstream=plain');
is_deeply([keys %{ $j->{upstreams} }], ['plain'], 'filter: one upstream');
($st) = get('/?upstream=nope');
like($st // '', qr/404/, 'filter: unknown upstream is 404');

# a registry error shows up in the status
SKIP: {
	skip 'fault injection needs the emulator', 1 unless $consul->is_emulator;
	$consul->fault({ mode => 'status', status => 503, path_prefix => '/v1/kv/upstreams/app', method => 'GET' });
	# wake the blocking query in flight: the next one meets the fault
	$consul->put("upstreams/app/127.0.0.1:$p1", '{"weight":3,"max_conns":5}');
	ok(wait_for(sub { my $j = json('/?format=json'); my $u = $j && $j->{upstreams}{app}{upsync};
		$u && ($u->{last_error} // '') =~ /503/ && $u->{consecutive_failures} >= 1 }, timeout => 5),
		'json: last error and consecutive failures');
	$consul->clear_faults;
}

# default text stays the C module's
my (undef, undef, $text) = get('/');
like($text, qr/\AUpstream name: app; Backend server count: 2\n/, 'text: unchanged default');

# access control with the stream access module
like((get('/', port(8090)))[2], qr/Upstream name: app/, 'allow 127.0.0.1: report served');
is(http_get(port(8091), '/') // '', '', 'deny all: connection closed without a report');
