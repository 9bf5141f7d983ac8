#!/usr/bin/perl

# Consul KV sync end to end: the C module's documented sequence (show and dump
# after every step), traffic going exactly to the registered servers in weight
# proportion, one blocking connection per upstream with 4 workers, a change
# reaching new connections within 200 ms, sessions surviving the removal of
# their server, bad data keeping the last good set, and the running set
# surviving a reload.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;
use Time::HiRes qw/time/;

use Test::Nginx qw/ :DEFAULT port wait_for http_get http_parse stream_get /;
use Test::Nginx::Backend;
use Test::Nginx::Stream;
use Test::Nginx::Consul;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 4)->has(qw/stream upsync/)->plan(40);

my ($p1, $p2, $p3) = (port(8081), port(8082), port(8083));
my $seed = port(8089);

# The upstream includes a seed file, not its dump: after a reload the set must
# come from the shared zone, not from the file.
$t->write_file('seed.conf', "server 127.0.0.1:$seed;\n");

$t->write_file_expand('nginx.conf', <<'EOF');
%%TEST_GLOBALS%%
events { }
stream {
    upstream test {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/test upsync_type=consul
               upsync_interval=500ms upsync_timeout=6m;
        upsync_dump_path %%TESTDIR%%/servers_test.conf;
        include %%TESTDIR%%/seed.conf;
    }
    server { listen 127.0.0.1:%%PORT_8080%%; proxy_pass test; proxy_connect_timeout 2s; }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF

my $consul = Test::Nginx::Consul->start($t, port => port(8500));
my @b = map { Test::Nginx::Backend->tcp($t, port => $_->[0], id => $_->[1]) }
	([$p1, 'b1'], [$p2, 'b2'], [$p3, 'b3']);

$t->run();

my $show_port = port(8088);
my $proxy_port = port(8080);

sub body {
	my (undef, undef, $body) = http_parse(http_get($show_port) // '');
	return $body // '';
}

sub line {
	my ($port, %a) = @_;
	my $l = sprintf "server 127.0.0.1:%d weight=%d max_fails=%d fail_timeout=%ds",
		$port, $a{weight} // 1, $a{max_fails} // 2, $a{fail_timeout} // 10;
	$l .= ' down' if $a{down};
	return "$l;";
}

# expected show body and dump for a list of server lines (sorted by address)
sub expect {
	my @lines = sort { ($a =~ /:(\d+)/)[0] <=> ($b =~ /:(\d+)/)[0] } @_;
	my $show = "Upstream name: test; Backend server count: " . scalar(@lines) . "\n"
		. join('', map { "        $_\n" } @lines) . "\n";
	return ($show, join('', map { "$_\n" } @lines));
}

sub step {
	my ($name, @lines) = @_;
	my ($show, $dump) = expect(@lines);
	ok(wait_for(sub { body() eq $show }, timeout => 5), "$name: upstream_show")
		or diag("got:\n" . body() . "want:\n$show");
	my $got = wait_for(sub { my $f = $t->read_file('servers_test.conf') // '';
		$f eq $dump ? $f : undef }, timeout => 5);
	is($got // $t->read_file('servers_test.conf'), $dump, "$name: dump file");
}

###############################################################################
# The C module's sequence

# An empty registry never empties the upstream: the seed server stays.
ok(wait_for(sub { $t->grep_log(qr/upstream "test".*lists no servers; keeping the last 1/) },
	timeout => 5), 'empty registry keeps the configured server');
like(body(), qr/server 127\.0\.0\.1:$seed weight=1 max_fails=1 fail_timeout=10s;/,
	'seed server shown');

$consul->put("upstreams/test/127.0.0.1:$p1", '');
step('add with an empty value', line($p1));

$consul->put("upstreams/test/127.0.0.1:$p2", '{"weight":10,"max_fails":3,"fail_timeout":10}');
step('add with attributes', line($p1), line($p2, weight => 10, max_fails => 3));

$consul->delete("upstreams/test/127.0.0.1:$p1");
step('delete', line($p2, weight => 10, max_fails => 3));

$consul->put("upstreams/test/127.0.0.1:$p1", '{"weight":20,"max_fails":0,"fail_timeout":30}');
step('re-add', line($p1, weight => 20, max_fails => 0, fail_timeout => 30),
	line($p2, weight => 10, max_fails => 3));

# Attributes missing from a value take their defaults (the value is the truth).
$consul->put("upstreams/test/127.0.0.1:$p2", '{"weight":40}');
step('weight update', line($p1, weight => 20, max_fails => 0, fail_timeout => 30),
	line($p2, weight => 40));

$consul->put("upstreams/test/127.0.0.1:$p2", '{"weight":40,"max_fails":3,"fail_timeout":"20s","down":1}');
step('down 1', line($p1, weight => 20, max_fails => 0, fail_timeout => 30),
	line($p2, weight => 40, max_fails => 3, fail_timeout => 20, down => 1));

$consul->put("upstreams/test/127.0.0.1:$p2", '{"weight":40,"max_fails":3,"fail_timeout":"20s","down":0}');
step('down 0', line($p1, weight => 20, max_fails => 0, fail_timeout => 30),
	line($p2, weight => 40, max_fails => 3, fail_timeout => 20));

my $mark = $t->log_offset();
$consul->delete_tree("upstreams/test/");
ok($t->wait_for_log(qr/lists no servers; keeping the last 2/, 5, from => $mark),
	'delete all: logged');
step('delete all keeps the last set', line($p1, weight => 20, max_fails => 0, fail_timeout => 30),
	line($p2, weight => 40, max_fails => 3, fail_timeout => 20));

###############################################################################
# Traffic goes to exactly the registered servers, in weight proportion

$consul->put("upstreams/test/127.0.0.1:$p1", '{"weight":3}');
$consul->put("upstreams/test/127.0.0.1:$p2", '{"weight":1}');
ok(wait_for(sub { my $b = body(); $b =~ /count: 2\n/ && $b =~ /:$p1 weight=3 / && $b =~ /:$p2 weight=1 / }, timeout => 5),
	'weights 3 and 1 applied');
my $c = count_by_backend($t, $proxy_port, 400);
is(join(',', sort keys %$c), 'b1,b2', 'connections reach only registered servers');
ok(abs(($c->{b1} // 0) - 300) <= 12 && abs(($c->{b2} // 0) - 100) <= 12,
	'weights 3:1 give 300:100 (+-12)') or diag(explain $c);

###############################################################################
# One blocking query per upstream for the whole instance, not per worker

SKIP: {
	skip 'request counters need the emulator', 2 unless $consul->is_emulator;
	ok(wait_for(sub { my $s = $consul->stats;
		($s->{blocking_by_path}{'/v1/kv/upstreams/test/'} // 0) == 1 }, timeout => 5),
		'4 workers hold exactly 1 blocking query');
	is($consul->stats->{open_connections}, 1, 'and exactly 1 connection');
}

###############################################################################
# A change reaches new connections in every worker within 200 ms

$consul->put("upstreams/test/127.0.0.1:$p3", '');
$consul->delete("upstreams/test/127.0.0.1:$p1");
$consul->delete("upstreams/test/127.0.0.1:$p2");
my $t0 = time();
my $ok = wait_for(sub {
	my $c = count_by_backend($t, $proxy_port, 8);
	($c->{b3} // 0) == 8;
}, timeout => 0.2, interval => 0.005);
my $took = time() - $t0;
ok($ok, sprintf('new set serves every connection within 200 ms (%.0f ms)', $took * 1000));
$c = count_by_backend($t, $proxy_port, 40);
is_deeply($c, { b3 => 40 }, 'all 4 workers use the new set');

###############################################################################
# An open session survives the removal of its server

my $s = Test::Nginx::Stream->new(port => $proxy_port);
is($s->readline, "b3\n", 'session opened on b3');
$consul->put("upstreams/test/127.0.0.1:$p1", '');
$consul->delete("upstreams/test/127.0.0.1:$p3");
ok(wait_for(sub { body() =~ /count: 1\n.*:$p1 / }, timeout => 5), 'b3 removed from the set');
$s->write("still here\n");
is($s->readline, "still here\n", 'the removed server still serves its open session');
is_deeply(count_by_backend($t, $proxy_port, 8), { b1 => 8 }, 'new sessions go to b1');
$s->close;
ok(wait_for(sub { $b[2]->open_connections == 0 }, timeout => 5), 'session closed cleanly');

###############################################################################
# Bad data never replaces the last good set

$mark = $t->log_offset();
$consul->put("upstreams/test/127.0.0.1:$p2", '{"weight":-5}');
ok($t->wait_for_log(qr/upstream "test".*127\.0\.0\.1:$p2.*invalid value for "weight"/, 5, from => $mark),
	'bad weight: error names upstream, key and cause');
like(body(), qr/count: 1\n.*:$p1 /, 'bad weight: last good set kept');
$consul->put("upstreams/test/127.0.0.1:$p2", '{"weight":2}');
ok(wait_for(sub { body() =~ /count: 2\n/ }, timeout => 5), 'fixed value applies');

###############################################################################
# A reload keeps the running set with no gap (the include has only the seed)

my $before = body();
ok($t->reload(), 'reloaded');
is(body(), $before, 'after reload: same set, straight from the shared zone');
is_deeply([sort keys %{ count_by_backend($t, $proxy_port, 12) }], ['b1', 'b2'],
	'after reload: traffic on the registry set');
$consul->put("upstreams/test/127.0.0.1:$p3", '');
ok(wait_for(sub { body() =~ /count: 3\n/ }, timeout => 5), 'after reload: new workers keep syncing');

SKIP: {
	skip 'request counters need the emulator', 1 unless $consul->is_emulator;
	ok(wait_for(sub { ($consul->stats->{blocking_by_path}{'/v1/kv/upstreams/test/'} // 0) == 1 },
		timeout => 5), 'after reload: still exactly 1 blocking query');
}

my @bad = $t->grep_log(qr/\[(alert|crit|emerg)\]/);
is(scalar @bad, 0, 'no alerts in the error log') or diag(join '', @bad);

###############################################################################
