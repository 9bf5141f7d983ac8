#!/usr/bin/perl

# 10,000 children under one znode (upsync_type=zookeeper, real ZooKeeper 3.8):
# the first read publishes all of them at once (one set, one plan, one dump),
# a child added or removed afterwards is applied within a second, and a
# second upstream on the ensemble still shares the one connection.  Also
# strong_dependency=on: the master reads the znode before the workers start
# (and nginx does not start when ZooKeeper cannot be read).

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;
use Time::HiRes qw/time/;

use Test::Nginx qw/ :DEFAULT port wait_for show_section /;
use Test::Nginx::Registry;
use Test::Nginx::ZooKeeper;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 2)->has(qw/stream upsync/);
my $why = Test::Nginx::ZooKeeper->missing;
$t->skip_all($why) if $why;
$t->plan(13);

my $zk = Test::Nginx::ZooKeeper->start($t, port => 8181, name => 'zk');
my $zport = $zk->client_port(1);
my @out = $zk->ops([ ['bulk', '/big', 10000, ''], ['create', '/small/127.0.0.1:' . port(8081), ''] ],
	timeout => 120);
note(sprintf('10,000 children created in %.1fs',
	time() - Test::Nginx::ZooKeeper->op_time('bulk', @out) / 1000));

my %ups = (
	big => "127.0.0.1:$zport/big upsync_type=zookeeper strong_dependency=on",
	small => "127.0.0.1:$zport/small upsync_type=zookeeper",
);
my $blocks = Test::Nginx::upsync_upstreams(\%ups);
$t->write_file_expand('nginx.conf', <<"EOF");
%%TEST_GLOBALS%%
events { }
stream {
$blocks
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF

sub section { show_section(port(8088), $_[0]) }
sub count { section($_[0]) =~ /count: (\d+)\n/ ? $1 : -1 }

# strong_dependency=on, ZooKeeper read by the master
my $t0 = time();
$t->run();
note(sprintf('nginx started in %.1fs', time() - $t0));
is(count('big'), 10000, 'strong_dependency=on: the master read the 10,000 children before the workers ran');
ok($t->grep_log(qr/upstream "big".*strong_dependency=on: starting with 10000 servers from the registry/),
	'strong_dependency=on: logged');
my $dump = $t->read_file('servers_big.conf') // '';
is(scalar(() = $dump =~ /^server /mg), 10000, 'strong_dependency=on: the dump has them');

# the workers' session reads them again: a full read, nothing changes
ok($t->wait_for_log(qr/for upstreams "big", "small": session 0x[0-9a-f]+ established .*reading 2 znodes/, 10),
	'the workers open one session for both upstreams');
ok(wait_for(sub { count('small') == 1 }, timeout => 10), 'the small upstream syncs too');
is(Test::Nginx::Registry::connections_from({ port => $zport }, $t->worker_pids), 1,
	'one connection for both');
# the workers' full read is done when the big upstream's status has a sync time
my $json = sub { (Test::Nginx::http_parse(Test::Nginx::http_get(port(8088), '/?format=json&upstream=big')))[2] // '' };
$t0 = time();
ok(wait_for(sub { $json->() =~ /"last_sync": \d/ }, timeout => 30),
	sprintf('the workers read the 10,000 children again (%.1fs)', time() - $t0));

$t0 = time();
$zk->ops([ ['create', '/big/10.99.99.99:80', ''] ]);
ok(wait_for(sub { count('big') == 10001 }, timeout => 5),
	sprintf('one more child: 10,001 servers (%.0f ms after the write returned)', (time() - $t0) * 1000));
$t0 = time();
$zk->ops([ ['delete', '/big/10.0.0.1:80'], ['delete', '/big/10.0.0.2:80'] ]);
ok(wait_for(sub { count('big') == 9999 }, timeout => 5),
	sprintf('two removed: 9,999 servers (%.0f ms)', (time() - $t0) * 1000));
my @changes = $t->grep_log(qr/upstream "big".*servers now/);
ok(@changes <= 4, scalar(@changes) . ' publishes for those changes (no per-child churn)')
	or diag(join '', @changes);

# strong_dependency=on with ZooKeeper down: nginx does not start
$t->stop_nginx();
$zk->stop;
ok(!$t->run(no_die => 1), 'ZooKeeper down: nginx refuses to start');
ok($t->grep_log(qr/\[emerg\] .*upstream "big".*strong_dependency=on and the registry cannot be read: 127\.0\.0\.1:$zport: connect: .*; nginx does not start/),
	'ZooKeeper down: the reason is logged');
my @bad = grep { !/strong_dependency/ } $t->grep_log(qr/\[(alert|crit|emerg)\]/);
is(scalar @bad, 0, 'no other alerts') or diag(join '', @bad);
