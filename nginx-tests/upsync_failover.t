#!/usr/bin/perl

# Registry failover lists (upsync HOST:PORT,HOST:PORT,.../PATH), against a
# real three-member etcd cluster on 127.0.0.1:
# - a dead first address: the next one is tried at once and the set syncs;
# - the member in use is killed mid-watch: the module moves to the next
#   member at once (one line naming both), keeps serving the last set, and a
#   change written through another member arrives; the recovery names the
#   member that answered;
# - every address dead: one line per distinct error, then backoff (the
#   "every registry address failed; retrying ... in Nms" line).

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;

use Test::Nginx qw/ :DEFAULT port wait_for show_section http_get http_parse /;
use Test::Nginx::Backend;
use Test::Nginx::Etcd;
use Test::Nginx::Stream;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 2)->has(qw/stream upsync/);
plan(skip_all => 'no etcd 3.4') unless Test::Nginx::Etcd->available('3.4');
$t->plan(13);

my @client = map { port($_) } 8501 .. 8503;
my @peer = map { port($_) } 8601 .. 8603;
my ($dead1, $dead2) = (port(8510), port(8511));
my ($p1, $p2) = (port(8081), port(8082));

my $cluster = join ',', map { "m$_=http://127.0.0.1:$peer[$_ - 1]" } 1 .. 3;
my @members = map {
	Test::Nginx::Etcd->start($t, name => "m$_", port => $client[$_ - 1],
		peer_port => $peer[$_ - 1], cluster => $cluster, no_wait => 1)
} 1 .. 3;
$_->wait_up for @members;

my $all = join ',', map { "127.0.0.1:$_" } @client;
$t->write_file_expand('nginx.conf', <<"EOF");
%%TEST_GLOBALS%%
events { }
stream {
    upstream cluster {
        upsync $all/f/ upsync_type=etcdv3 upsync_interval=200ms;
        upsync_dump_path %%TESTDIR%%/servers_cluster.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
    upstream dead_first {
        upsync 127.0.0.1:$dead1,127.0.0.1:$client[1]/f/ upsync_type=etcdv3 upsync_interval=200ms;
        upsync_dump_path %%TESTDIR%%/servers_dead_first.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
    upstream all_dead {
        upsync 127.0.0.1:$dead1,127.0.0.1:$dead2/f/ upsync_type=etcdv3 upsync_interval=200ms;
        upsync_dump_path %%TESTDIR%%/servers_all_dead.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
    server { listen 127.0.0.1:%%PORT_8080%%; proxy_pass cluster; }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF

my @backends = (Test::Nginx::Backend->tcp($t, port => $p1, id => 'b1'),
	Test::Nginx::Backend->tcp($t, port => $p2, id => 'b2'));
$members[1]->v3_put("/f/127.0.0.1:$p1", '');
$t->run();

sub section { show_section(port(8088), @_) }
sub greeting {
	my $s = Test::Nginx::Stream->new(port => port(8080)) or return '';
	return $s->readline(timeout => 3) // '';
}

ok(wait_for(sub { section('cluster') =~ /:$p1 / }, timeout => 5), 'cluster: synced from the first member');
ok(wait_for(sub { section('dead_first') =~ /:$p1 / }, timeout => 5), 'dead first address: synced from the next');
ok($t->grep_log(qr/upstream "dead_first".*cannot connect to 127\.0\.0\.1:$dead1: .*; keeping the current servers, trying the next registry address 127\.0\.0\.1:$client[1] now/),
	'dead first address: one line naming it and the next one');

# kill the member in use while its watch waits
my $mark = $t->log_offset();
$t->kill_spawned('m1', 'KILL');
is(greeting(), "b1\n", 'member killed: traffic still goes to the last set');
ok($t->wait_for_log(qr/upstream "cluster".*keeping the current servers, trying the next registry address 127\.0\.0\.1:$client[1] now/, 5, from => $mark),
	'member killed: moves to the next member at once, logged');

# a change through the third member arrives through the second
my $werr;
ok(wait_for(sub { eval { $members[2]->v3_put("/f/127.0.0.1:$p2", ""); 1 } or do { $werr = $@; 0 } }, timeout => 20),
	'the surviving members accept the write') or diag($werr);
ok(wait_for(sub { section('cluster') =~ /:$p2 / }, timeout => 5), 'the change arrives after the failover');
ok($t->wait_for_log(qr/upstream "cluster".*registry answers again after \d+ failed attempts? \(at 127\.0\.0\.1:($client[1]|$client[2])\)/, 5, from => $mark),
	'recovery logged with the member that answered');

my $json = (http_parse(http_get(port(8088), '/?format=json&upstream=cluster')))[2] // '';
like($json, qr/"registry_in_use": "127\.0\.0\.1:($client[1]|$client[2])"/,
	'JSON status names the member in use after the failover');
like($json, qr/"registry": "\Q$all\E\/f\/"/, 'and the configured list');

# every address dead: backoff after each round, and the configured server stays
ok($t->wait_for_log(qr/upstream "all_dead".*cannot connect to 127\.0\.0\.1:$dead2: .*every registry address failed; retrying 127\.0\.0\.1:$dead1 in \d+ms/, 5),
	'every address dead: backoff after the round, logged');
like(section('all_dead'), qr/count: 1\n.*:${\ port(8089)} /s, 'every address dead: configured server kept');
my $lines = () = $t->error_log =~ /upstream "all_dead".*cannot connect/g;
ok($lines <= 2, "every address dead: each distinct error logged once ($lines lines)");
