#!/usr/bin/perl

# Self-test of the Test::Nginx harness with plain nginx stream features:
# static upstream with two TCP backends (weights 3:1), a UDP backend,
# nginx -t error messages, reload/restart, wait_for semantics, helpers.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';
use lib 'lib';

use Test::More;
use Time::HiRes qw/time/;

use Test::Nginx qw/ :DEFAULT port wait_for http_get http_parse
	stream_get stream_udp /;
use Test::Nginx::Backend;
use Test::Nginx::Stream;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 2)->has(qw/stream/)->plan(43);

my $conf = <<'EOF';
%%TEST_GLOBALS%%
%%DAEMON%%
events { }

stream {
    %%TEST_GLOBALS_STREAM%%

    upstream u {
        server 127.0.0.1:%%PORT_8081%% weight=3;
        server 127.0.0.1:%%PORT_8082%% weight=1;
    }

    upstream uu {
        server 127.0.0.1:%%PORT_8083_UDP%%;
    }

    server {
        listen 127.0.0.1:%%PORT_8080%%;
        proxy_pass u;
    }

    server {
        listen 127.0.0.1:%%PORT_8084%% udp;
        proxy_pass uu;
        proxy_responses 1;
        proxy_timeout 1s;
    }
}

http {
    %%TEST_GLOBALS_HTTP%%

    server {
        listen 127.0.0.1:%%PORT_8085%%;
        location / {
            return 200 "ok\n";
        }
    }
}
EOF

(my $conf_daemon = $conf) =~ s/%%DAEMON%%/daemon off;/;
(my $conf_nodaemon = $conf) =~ s/%%DAEMON%%\n//;

$t->write_file_expand('nginx.conf', $conf_daemon);

###############################################################################
# harness basics (no nginx running)

eval { $t->has('no_such_feature') };
like($@, qr/unknown feature 'no_such_feature'/, 'unknown feature dies');

is(port(8080), port(8080), 'port() stable for the same number');
my %distinct = map { port($_) => 1 } 8080 .. 8085;
is(scalar keys %distinct, 6, 'port() distinct for different numbers');
is(readlink('/tmp/nginx-test-ports/' . port(8080)), $$, 'port claimed');

my $text = $t->read_file('nginx.conf');
unlike($text, qr/%%/, 'config fully expanded');
like($text, qr/worker_processes 2;/, 'workers from new()');

my $n = 0;
is(wait_for(sub { ++$n >= 3 ? "done$n" : 0 }, interval => 0.01), 'done3',
	'wait_for returns the truthy value');

my $t0 = time;
my $r = wait_for(sub { 0 }, timeout => 0.3);
my $el = time - $t0;
ok(!defined $r && $el >= 0.29 && $el < 1.5,
	sprintf('wait_for times out with undef (%.2fs)', $el));

# nginx -t

$t->write_file_expand('broken.conf', <<'EOF');
%%TEST_GLOBALS%%
events { }
stream {
    upstream u { server 127.0.0.1:1 weight=0; }
    server { listen 127.0.0.1:%%PORT_8080%%; proxy_pass u; }
}
EOF

my ($ok, $out) = $t->test_config('broken.conf');
ok(!$ok, 'test_config fails on broken config');
like($out, qr/invalid parameter "weight=0"/, 'test_config message');

($ok, $out) = $t->test_config();
ok($ok, 'test_config ok on good config') or diag($out);

###############################################################################
# backends

my $b1 = Test::Nginx::Backend->tcp($t, port => port(8081), id => 'b1');
my $b2 = Test::Nginx::Backend->tcp($t, port => port(8082), id => 'b2');
my $u1 = Test::Nginx::Backend->udp($t, port => port(8083), id => 'u1');

is(stream_get(port(8081)), "b1\n", 'backend answers directly');
is(wait_for(sub { $b1->connections_total }), 1, 'backend counts');

###############################################################################
# nginx

isa_ok($t->run(), 'Test::Nginx', 'run');

my $master = $t->master_pid;
ok($master && kill(0, $master), 'master running');
my @workers = $t->worker_pids;
is(scalar @workers, 2, 'two workers');

like(stream_get(port(8080)), qr/^b[12]\n\z/, 'proxied');

my $c = count_by_backend($t, port(8080), 400);
ok(abs(($c->{b1} // 0) - 300) <= 15, "weight 3: $c->{b1}");
ok(abs(($c->{b2} // 0) - 100) <= 15, "weight 1: " . ($c->{b2} // 0));
ok(!$c->{_fail}, 'no failed connections');

ok(wait_for(sub {
	$b1->connections_total + $b2->connections_total == 402 }),
	'backend connection counters');

# hold a connection open

my $s = Test::Nginx::Stream->new(port => port(8080));
my $greet = $s->readline;
like($greet, qr/^b[12]\n\z/, 'held connection greeting');
is($s->io("hello\n", until => qr/\n/), "hello\n", 'echo');
my $held = $greet =~ /b1/ ? $b1 : $b2;
ok(wait_for(sub { $held->open_connections == 1 }), 'open connection seen');
$s->close;
ok(wait_for(sub { $held->open_connections == 0 }), 'closed connection seen');

# udp

is(stream_udp(port(8084), "ping"), "u1\n", 'udp proxied');
is($u1->connections_total, 1, 'udp datagram counted');

# http helpers

my ($status, $h, $body) = http_parse(http_get(port(8085), '/'));
is($status, 200, 'http_get status');
is($body, "ok\n", 'http_get body');
is($h->{'content-length'}, 3, 'http_parse headers');

# reload

my $off = $t->log_offset;
ok($t->reload(), 'reload');
my @new = $t->worker_pids;
my %old = map { $_ => 1 } @workers;
ok(@new == 2 && !grep({ $old{$_} } @new), "new workers @new (old @workers)");
ok($t->wait_for_log(qr/signal 1 \(SIGHUP\) received/, 5, from => $off),
	'wait_for_log');
like(stream_get(port(8080)), qr/^b[12]\n\z/, 'proxied after reload');

# failed reload keeps old workers

$t->write_file('nginx.conf', $t->read_file('nginx.conf')
	=~ s/weight=1;/weight=0;/r);
ok(!$t->reload(quiet => 1, timeout => 3), 'reload with broken config fails');
is(join(',', $t->worker_pids), join(',', @new), 'workers kept');
$t->write_file_expand('nginx.conf', $conf_daemon);

# backend down: everything goes to the other one

$b1->stop;
$c = count_by_backend($t, port(8080), 20);
is($c->{b2}, 20, 'failover to b2');

# restart without "daemon off;" in the config

$t->write_file_expand('nginx.conf', $conf_nodaemon);
ok($t->restart(), 'restart');
isnt($t->master_pid, $master, 'new master');
is(stream_get(port(8080)), "b2\n", 'proxied after restart');

# spawned helpers

my $pid = $t->spawn('sleeper', 'sleep', '30');
ok(kill(0, $pid), 'spawned helper running');
ok($t->kill_spawned('sleeper') && !kill(0, $pid), 'spawned helper killed');

# stop

$master = $t->master_pid;
my $b2pid = $b2->pid;
$t->stop();
ok(!kill(0, $master) && !kill(0, $b2pid) && !$t->master_pid,
	'stop: nginx and helpers gone');

###############################################################################
