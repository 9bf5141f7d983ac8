#!/usr/bin/perl

# upsync_type=zookeeper against real ZooKeeper 3.8 (one member), 4 workers and
# 10 upstreams on the one ensemble:
# - exactly 1 TCP connection (and 1 session) for the whole instance, every
#   upstream synced from its own znode;
# - a chroot (zk_chroot=), the Curator layout (zk_layout=curator), a znode
#   that does not exist yet, bad children skipped and reported;
# - the session owner killed (-9): another worker takes over with a new
#   session and reads everything again; a stalled owner (SIGSTOP) is replaced
#   and, resumed, closes its session (1 connection again);
# - a reload keeps the sets and old workers exit at once; a graceful
#   shutdown is not held up by the session.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;
use Time::HiRes qw/time/;

use Test::Nginx qw/ :DEFAULT port wait_for show_section http_get http_parse /;
use Test::Nginx::Backend;
use Test::Nginx::Registry;
use Test::Nginx::Stream;
use Test::Nginx::ZooKeeper;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 4)->has(qw/stream upsync/);
my $why = Test::Nginx::ZooKeeper->missing;
$t->skip_all($why) if $why;
$t->plan(35);

my $zk = Test::Nginx::ZooKeeper->start($t, port => 8181, name => 'zk');
my $zport = $zk->client_port(1);
my ($p1, $p2, $p3) = (port(8081), port(8082), port(8083));

# u0..u7: ip_port children under /svc/uN (u7's znode is created later);
# u8: zk_chroot=/prod; u9: the Curator layout under /services/web
my %ups = map { ("u$_" => "127.0.0.1:$zport/svc/u$_ upsync_type=zookeeper") } 0 .. 7;
$ups{u8} = "127.0.0.1:$zport/svc/u8 upsync_type=zookeeper zk_chroot=/prod";
$ups{u9} = "127.0.0.1:$zport/services/web upsync_type=zookeeper zk_layout=curator";
my $blocks = Test::Nginx::upsync_upstreams(\%ups, 'upsync_interval=500ms');

$t->write_file_expand('nginx.conf', <<"EOF");
%%TEST_GLOBALS%%
events { }
stream {
$blocks
    server { listen 127.0.0.1:%%PORT_8080%%; proxy_pass u0; }
    server { listen 127.0.0.1:%%PORT_8079%%; proxy_pass u9; }
    server { listen 127.0.0.1:%%PORT_8078%%; proxy_pass u8; }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF

my $curator = sub {
	my ($id, $port, $extra) = @_;
	return qq({"name":"web","id":"$id","address":"127.0.0.1","port":$port,"sslPort":null,)
		. qq("payload":$extra,"registrationTimeUTC":1700000000000,"serviceType":"DYNAMIC"});
};
$zk->ops([
	(map { ['create', "/svc/u$_/127.0.0.1:$p1", '{"weight":' . ($_ + 1) . '}'] } 0 .. 6),
	['create', "/svc/u0/web-1", ''],
	['create', "/prod/svc/u8/127.0.0.1:$p2", ''],
	['create', "/svc/u8/127.0.0.1:$p3", ''],     # outside the chroot: not u8's
	['create', '/services/web/id-1', $curator->('id-1', $p1,
		'{"@class":"org.springframework.cloud.zookeeper.discovery.ZookeeperInstance","metadata":{"weight":"7"}}')],
	['create', '/services/web/id-bad', '{"name":"web","id":"id-bad","address":"web.internal","port":80}'],
]);

my @b = map { Test::Nginx::Backend->tcp($t, port => $_->[0], id => $_->[1]) }
	([$p1, 'b1'], [$p2, 'b2'], [$p3, 'b3']);
$t->run();

sub section { show_section(port(8088), $_[0]) }
sub conns { Test::Nginx::Registry::connections_from({ port => $zport }, $t->worker_pids) }
sub owners {
	my ($from) = @_;
	return map { /\(pid (\d+)\) now runs the ZooKeeper session/ ? $1 : () }
		$t->grep_log(qr/now runs the ZooKeeper session/, from => $from // 0);
}
sub greeting {
	my ($port) = @_;
	my $s = Test::Nginx::Stream->new(port => $port) or return '';
	return $s->readline(timeout => 3) // '';
}
sub json {
	my ($name) = @_;
	return (http_parse(http_get(port(8088), "/?format=json&upstream=$name")))[2] // '';
}

###############################################################################
# one session for 4 workers and 10 upstreams

ok(wait_for(sub { !grep { section("u$_") !~ /count: 1\n.*:$p1 weight=@{[$_ + 1]} /s } 0 .. 6 },
	timeout => 10), 'u0..u6: each synced from its own znode');
ok(wait_for(sub { conns() == 1 }, timeout => 5), '4 workers x 10 upstreams: 1 connection to ZooKeeper')
	or diag('connections: ' . conns());
my $max = 0;
for (1 .. 10) { my $c = conns(); $max = $c if $c > $max; select undef, undef, undef, 0.1; }
is($max, 1, 'and it stays 1');
my @o = owners();
is(scalar @o, 1, 'one worker runs the session');
my @est = $t->grep_log(qr/session 0x[0-9a-f]+ established at 127\.0\.0\.1:$zport .*reading 10 znodes/);
is(scalar @est, 1, 'one session, reading the 10 znodes');

like(json('u3'), qr/"poller_pid": $o[0]\b/, 'every zone names the owner (u3)');
like(json('u3'), qr/"registry_in_use": "127\.0\.0\.1:$zport"/, 'and the member in use');

###############################################################################
# chroot, Curator, bad children, a znode created later

ok(wait_for(sub { section('u8') =~ /count: 1\n.*:$p2 /s }, timeout => 5),
	'zk_chroot=/prod: /prod/svc/u8 read, not /svc/u8');
is(greeting(port(8078)), "b2\n", 'chroot: traffic on its server');
ok(wait_for(sub { section('u9') =~ /count: 1\n\s+server 127\.0\.0\.1:$p1 weight=7 max_fails=2 fail_timeout=10s;\n/s },
	timeout => 5), 'curator: the instance, weight from payload.metadata');
is(greeting(port(8079)), "b1\n", 'curator: traffic on it');
ok($t->grep_log(qr/upstream "u9".*entry "id-bad" skipped: invalid server address "web\.internal".*the other entries apply/),
	'curator: the bad instance is skipped, named, with the cause');
like(json('u9'), qr/"skipped_count": 1/, 'curator: the status lists it');
ok($t->grep_log(qr/upstream "u0".*entry "web-1" skipped: invalid server address "web-1"/),
	'ip_port: a bad child is skipped and named');
ok($t->grep_log(qr/upstream "u7".*the znode \/svc\/u7 does not exist/),
	'a missing znode is reported');

my $mark = $t->log_offset();
$zk->ops([ ['create', "/svc/u7/127.0.0.1:$p3", ''], ['delete', '/svc/u0/web-1'] ]);
ok(wait_for(sub { section('u7') =~ /count: 1\n.*:$p3 /s }, timeout => 5), 'the znode created later is read');
ok($t->wait_for_log(qr/upstream "u0".*entry "web-1" is no longer skipped/, 5, from => $mark),
	'the bad child removed: logged');
like(json('u0'), qr/"index": [1-9]\d*/, 'index: the zxid');

###############################################################################
# the owner killed: another worker, a new session, everything read again

$mark = $t->log_offset();
my $owner = $o[0];
kill 'KILL', $owner;
my $t0 = time();
my $next = wait_for(sub { my @n = grep { $_ != $owner } owners($mark); $n[0] }, timeout => 5);
ok($next, sprintf('another worker (%s) takes over in %.2fs', $next // '-', time() - $t0));
ok($t->wait_for_log(qr/session 0x[0-9a-f]+ established at .*reading 10 znodes/, 5, from => $mark),
	'with a new session reading every znode');
$zk->ops([ ['put', "/svc/u0/127.0.0.1:$p2", '{"weight":2}'] ]);
ok(wait_for(sub { section('u0') =~ /count: 2\n/ }, timeout => 5), 'changes apply after the takeover');
ok(wait_for(sub { conns() == 1 }, timeout => 5), 'still 1 connection');

###############################################################################
# a stalled owner is replaced; resumed, it closes its session

$mark = $t->log_offset();
my $a = $next;
kill 'STOP', $a;
my $bb = wait_for(sub { my @n = grep { $_ != $a } owners($mark); $n[0] }, timeout => 10);
ok($bb, "a stalled owner ($a) is replaced (by " . ($bb // '-') . ')');
$zk->ops([ ['put', "/svc/u1/127.0.0.1:$p2", ''] ]);
ok(wait_for(sub { section('u1') =~ /count: 2\n/ }, timeout => 5), 'the new owner syncs');
kill 'CONT', $a;
ok($t->wait_for_log(qr/\[warn\] $a#\d+: .*lost the ZooKeeper session lease/, 5, from => $mark),
	'the stalled worker notices it lost the lease');
ok(wait_for(sub { conns() == 1 }, timeout => 5), 'and closes its session: 1 connection again')
	or diag('connections: ' . conns());
is(greeting(port(8080)) =~ /^b[12]\n$/ ? 1 : 0, 1, 'traffic unaffected');

###############################################################################
# reload and graceful shutdown

my $before = section('u0');
my @old = $t->worker_pids();
$t0 = time();
ok($t->reload(), 'reload');
ok(wait_for(sub { !grep { kill 0, $_ } @old }, timeout => 5), 'old workers are gone');
ok(time() - $t0 < 2, sprintf('old workers exited in %.2fs (not held by the session)', time() - $t0));
is(section('u0'), $before, 'the set is kept across the reload');
$zk->ops([ ['delete', "/svc/u0/127.0.0.1:$p2"] ]);
ok(wait_for(sub { section('u0') =~ /count: 1\n/ && conns() == 1 }, timeout => 5),
	'new workers sync, over 1 connection');

my $master = $t->master_pid();
$t0 = time();
kill 'QUIT', $master;
ok(wait_for(sub { Test::Nginx::_gone($master) }, timeout => 10), 'graceful shutdown completes');
ok(time() - $t0 < 3, sprintf('graceful shutdown took %.2fs', time() - $t0));

my @bad = grep { !/worker process $owner exited on signal 9/ }
	$t->grep_log(qr/\[(alert|crit|emerg)\]/);
is(scalar @bad, 0, 'no alerts (but the kill -9)') or diag(join '', @bad);

###############################################################################
