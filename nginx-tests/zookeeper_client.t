#!/usr/bin/perl

# The sans-IO ZooKeeper client (core/src/registry/zookeeper) against real
# ZooKeeper 3.8, driven by its blocking example driver (core/examples/zkwatch,
# one line per event with a wall-clock stamp): changes seen with their
# latency, a server restart (session resumed), a member paused past the
# session timeout (expiry detected by the client, new session, full re-read),
# digest auth accepted and refused, 10,000 children, forced one-shot watches
# (the pre-3.6 fallback path), and a 3-member ensemble losing the member the
# client is on.  No nginx is started, but the harness wants TEST_NGINX_BINARY.
# Skips without java, the zookeeper package, python kazoo or the zkwatch
# binary (cargo build -p upsync-core --example zkwatch).

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';
use lib 'lib';

use Test::More;
use Time::HiRes ();

use Test::Nginx qw/ :DEFAULT port wait_for /;
use Test::Nginx::ZooKeeper;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new();

my $why = Test::Nginx::ZooKeeper->missing;
$t->skip_all($why) if $why;
my $zkwatch = $ENV{TEST_ZKWATCH_BINARY}
	// "$FindBin::Bin/../target/debug/examples/zkwatch";
$t->skip_all("no $zkwatch (cargo build -p upsync-core --example zkwatch)")
	unless -x $zkwatch;

$t->plan(5);

my $ZK = 'Test::Nginx::ZooKeeper';

###############################################################################
# watchers: zkwatch processes, their log lines

sub watcher {
	my ($name, @args) = @_;
	$t->spawn($name, $zkwatch, '--duration', 600, @args);
	return $name;
}

sub lines {
	my ($name) = @_;
	return split /\n/, ($t->read_file("$name.log") // '');
}

# the number of lines so far (a mark to search after)
sub mark { scalar(my @l = lines($_[0])) }

# the first line after $from that matches $re, waiting up to $timeout s
sub wait_line {
	my ($name, $re, $from, $timeout) = @_;
	my $hit;
	wait_for(sub {
		my @l = lines($name);
		for my $i (($from // 0) .. $#l) {
			next unless $l[$i] =~ $re;
			$hit = $l[$i];
			return 1;
		}
		return 0;
	}, timeout => $timeout // 10, interval => 0.02);
	diag("$name: no line like $re; last lines:\n"
		. join("\n", (lines($name))[-8 .. -1]))
		unless defined $hit || !lines($name);
	return $hit;
}

sub stamp { defined $_[0] && $_[0] =~ /^(\d+) / ? $1 : undef }

sub session_id { defined $_[0] && $_[0] =~ /established id=(0x[0-9a-f]+)/ ? $1 : '' }

# runs zk ops and waits for the next listing line of $w matching $re:
# (line, ms from the first op's start to the listing)
sub change_and_wait {
	my ($zk, $w, $ops, $re, %o) = @_;
	my $m = mark($w);
	my @out = $zk->ops($ops, %o);
	my $line = wait_line($w, $re, $m, $o{wait} // 10);
	my $t0 = $ZK->op_time($ops->[0][0], @out);
	return ($line, defined $line ? stamp($line) - $t0 : undef);
}

my @latency;

###############################################################################

subtest 'one member: changes, restart, paused past the session timeout' => sub {
	plan tests => 19;
	my $zk = $ZK->start($t, port => 8181, name => 'zka');
	note(sprintf('ZooKeeper up in %.2fs', $zk->startup_time));
	is($zk->mode(1), 'standalone', 'standalone member');

	$zk->ops([ ['create', '/svc/127.0.0.1:8001', ''],
		['create', '/svc/127.0.0.1:8002', '{"weight":3}'],
		['create', '/svc/web-1', ''] ]);
	my $w = watcher('wa', '--timeout', 4000, $zk->hosts, '/svc');
	my $est = wait_line($w, qr/established .* resumed=false/);
	ok($est, 'session established');
	ok(wait_line($w, qr/ mode persistent$/), 'addWatch detected (3.8)');
	like(wait_line($w, qr/ listing /), qr/count=3 servers=2 bad=1 /,
		'first listing; the bad child counted');
	like(wait_line($w, qr/ bad /), qr/child "web-1": invalid server address/,
		'the bad child is named');

	my ($l, $ms) = change_and_wait($zk, $w,
		[ ['create', '/svc/127.0.0.1:8003', ''] ], qr/ listing .*count=4/);
	ok($l, "created child listed ($ms ms)");
	push @latency, "create $ms";
	($l, $ms) = change_and_wait($zk, $w,
		[ ['set', '/svc/127.0.0.1:8001', '{"weight":5,"down":1}'] ],
		qr/ listing /);
	like($l, qr/server 127\.0\.0\.1:8001 weight=5 max_fails=2 fail_timeout=10s down;/,
		"changed data listed ($ms ms)");
	push @latency, "data $ms";
	($l, $ms) = change_and_wait($zk, $w,
		[ ['delete', '/svc/127.0.0.1:8003'] ], qr/ listing /);
	like($l, qr/count=3 /, "deleted child gone ($ms ms)");
	push @latency, "delete $ms";

	# restart: the session survives (kept in the server's log)
	my $m = mark($w);
	$zk->restart_member(1);
	ok(wait_line($w, qr/ disconnected /, $m), 'restart: disconnected');
	my $again = wait_line($w, qr/established .* resumed=true/, $m, 15);
	is(session_id($again), session_id($est), 'restart: same session resumed');
	($l, $ms) = change_and_wait($zk, $w,
		[ ['create', '/svc/127.0.0.1:8004', ''] ], qr/ listing .*count=4/);
	ok($l, "after the restart: change listed ($ms ms)");

	# paused (SIGSTOP) past the 4 s session timeout: the kernel still
	# accepts connections, nothing answers
	$m = mark($w);
	my $p0 = int(Time::HiRes::time() * 1000);
	$zk->pause(1);
	my $exp = wait_line($w, qr/ expired id=\S+ by_client=true/, $m, 15);
	ok($exp, 'paused: expiry detected by the client');
	my $took = stamp($exp) - $p0;
	# 4000 ms after the last answer (a ping every 1333 ms)
	ok($took >= 2500 && $took < 9000, "expiry after ${took} ms (timeout 4000)");
	push @latency, "expiry-detected $took";
	my $ro = wait_line($w, qr/ disconnected .*read timeout/, $m, 1);
	ok($ro, 'paused: read timeout first');
	$zk->resume(1);
	my $new = wait_line($w, qr/established .* resumed=false/, $m, 20);
	ok($new, 'resumed server: a new session');
	isnt(session_id($new), session_id($est), 'new session id');
	ok(wait_line($w, qr/ listing .*count=4/, $m, 10),
		'new session: everything read again');
	($l, $ms) = change_and_wait($zk, $w,
		[ ['delete', '/svc/web-1'] ], qr/ listing .*count=3 servers=3 bad=0/);
	ok($l, "new session follows changes ($ms ms)");
	unlike(join("\n", lines($w)), qr/panicked|watch_error/, 'no errors');
	$t->kill_spawned($w);
	$zk->stop;
};

###############################################################################

subtest 'one-shot watches (the fallback path) and digest auth' => sub {
	plan tests => 13;
	my $zk = $ZK->start($t, port => 8184, name => 'zkb');
	$zk->ops([ ['create', '/svc/127.0.0.1:9001', ''],
		['create', '/svc/127.0.0.1:9002', ''] ]);
	my $w = watcher('wo', '--mode', 'oneshot', '--timeout', 4000,
		$zk->hosts, '/svc');
	my $est = wait_line($w, qr/established .* resumed=false/);
	ok(wait_line($w, qr/ listing .*count=2/), 'one-shot: first listing');
	my ($l, $ms) = change_and_wait($zk, $w,
		[ ['set', '/svc/127.0.0.1:9001', '{"weight":7}'] ], qr/ listing /);
	like($l, qr/9001 weight=7/, "one-shot: data change ($ms ms)");
	push @latency, "oneshot-data $ms";
	($l) = change_and_wait($zk, $w,
		[ ['set', '/svc/127.0.0.1:9001', '{"weight":8}'] ], qr/ listing /);
	like($l, qr/9001 weight=8/, 'one-shot: the watch was re-armed');
	($l, $ms) = change_and_wait($zk, $w,
		[ ['create', '/svc/127.0.0.1:9003', ''] ], qr/ listing /);
	like($l, qr/count=3 /, "one-shot: created child ($ms ms)");
	($l) = change_and_wait($zk, $w,
		[ ['delete', '/svc/127.0.0.1:9002'] ], qr/ listing /);
	like($l, qr/count=2 .*children=127\.0\.0\.1:9001,127\.0\.0\.1:9003 /,
		'one-shot: deleted child');
	my $m = mark($w);
	$zk->restart_member(1);
	my $again = wait_line($w, qr/established .* resumed=true/, $m, 15);
	is(session_id($again), session_id($est), 'one-shot: session resumed');
	($l) = change_and_wait($zk, $w,
		[ ['set', '/svc/127.0.0.1:9003', '{"backup":1}'] ], qr/ listing /);
	like($l, qr/9003 weight=1 max_fails=2 fail_timeout=10s backup;/,
		'one-shot: data watch handed back by SetWatches');
	($l) = change_and_wait($zk, $w,
		[ ['create', '/svc/127.0.0.1:9004', ''] ], qr/ listing /);
	like($l, qr/count=3 /, 'one-shot: child watch handed back by SetWatches');
	unlike(join("\n", lines($w)), qr/ mode |addWatch/, 'no addWatch sent');
	$t->kill_spawned($w);

	# digest auth: a path only upsync:s3cret-pass may read
	my $cred = 'upsync:s3cret-pass';
	$zk->ops([ ['create_acl', '/secure', '', $cred],
		['create_acl', '/secure/127.0.0.1:7001', '', $cred],
		['create_acl', '/secure/127.0.0.1:7002', '', $cred] ], auth => $cred);
	my $good = watcher('wg', '--auth', $cred, $zk->hosts, '/secure');
	like(wait_line($good, qr/ listing /), qr/count=2 servers=2/,
		'digest auth accepted: ACL-protected children read');
	my $bad = watcher('wb', '--auth', 'upsync:wr0ng-pa55', $zk->hosts,
		'/secure');
	like(wait_line($bad, qr/ watch_error /),
		qr/getChildren \/secure: NoAuth \(-102\)/,
		'wrong password: NoAuth, named');
	my $anon = watcher('wn', $zk->hosts, '/secure');
	ok(wait_line($anon, qr/ watch_error .*NoAuth/), 'no credentials: NoAuth');
	my $all = join "\n", lines($bad);
	ok($all !~ /wr0ng|pa55/ && $all !~ / listing /,
		'no listing, the password never shown');
	$t->kill_spawned($_) for $good, $bad, $anon;
	$zk->stop;
};

###############################################################################

subtest '10,000 children' => sub {
	plan tests => 8;
	my $zk = $ZK->start($t, port => 8187, name => 'zkc');
	my @out = $zk->ops([ ['bulk', '/big', 10000, ''] ], timeout => 60);
	my $t0 = $ZK->op_time('bulk', @out);
	note(sprintf('10,000 children created in %.1fs',
		(Time::HiRes::time() * 1000 - $t0) / 1000));
	for my $mode (qw/persistent oneshot/) {
		my $w = watcher("wk$mode", '--mode', $mode, '--print-children', 0,
			$zk->hosts, '/big');
		my $est = wait_line($w, qr/ established /, 0, 10);
		my $l = wait_line($w, qr/ listing /, 0, 30);
		like($l, qr/count=10000 servers=10000 bad=0/,
			"$mode: 10,000 children listed");
		my $full = stamp($l) - stamp($est);
		push @latency, "$mode-10k-full-read $full";
		my ($c, $ms) = change_and_wait($zk, $w,
			[ ['create', '/big/10.99.99.99:80', ''] ],
			qr/ listing .*count=10001/);
		ok($c, "$mode: one more child ($ms ms, full read took $full ms)");
		push @latency, "$mode-10k-create $ms";
		my ($d) = change_and_wait($zk, $w,
			[ ['delete', '/big/10.99.99.99:80'] ],
			qr/ listing .*count=10000/);
		ok($d, "$mode: and gone again");
		if ($mode eq 'oneshot') {
			# 10,000 data watches handed back (SetWatches in batches)
			my $m = mark($w);
			$zk->restart_member(1);
			ok(wait_line($w, qr/established .* resumed=true/, $m, 15),
				'oneshot: resumed after a restart');
			my ($r) = change_and_wait($zk, $w,
				[ ['set', '/big/10.0.39.250:80', '{"weight":9}'] ],
				qr/ listing /);
			ok($r && $r !~ / bad=[1-9]/,
				'oneshot: a data watch among 10,000 still armed');
		}
		$t->kill_spawned($w);
	}
	$zk->stop;
};

###############################################################################

subtest 'ensemble of three: the member in use stops or hangs' => sub {
	plan tests => 8;
	my $zk = $ZK->start($t, members => 3, port => 8191, name => 'zke');
	note(sprintf('ensemble up in %.2fs', $zk->startup_time));
	my @modes = sort map { $zk->mode($_) } 1 .. 3;
	is("@modes", 'follower follower leader', 'one leader, two followers');
	$zk->ops([ ['create', '/svc/127.0.0.1:6001', ''] ]);

	# which member a watcher is on: the last "connect" before "established"
	my $member_of = sub {
		my ($w, $from) = @_;
		my ($addr, $on);
		for my $line ((lines($w))[($from // 0) .. mark($w) - 1]) {
			$addr = $1 if $line =~ / connect 127\.0\.0\.1:(\d+)$/;
			$on = $addr if $line =~ / established /;
		}
		return (grep { $zk->client_port($_) == ($on // 0) } 1 .. 3)[0];
	};

	for my $mode (qw/persistent oneshot/) {
		my $w = watcher("we$mode", '--mode', $mode, '--timeout', 4000,
			$zk->hosts, '/svc');
		my $est = wait_line($w, qr/established .* resumed=false/);
		wait_line($w, qr/ listing /);
		my $on = $member_of->($w);
		my $m = mark($w);
		my $changes;
		if ($mode eq 'persistent') {
			# stopped: the connection closes, the next member resumes
			$zk->stop_member($on);
			$changes = [ ['create', '/svc/127.0.0.1:6002', ''] ];
		} else {
			# hung: the read timeout moves on; meanwhile a change,
			# which SetWatches' catch-up reports
			$zk->pause($on);
			$zk->ops([ ['create', '/svc/127.0.0.1:6003', ''] ]);
			$changes = [ ['set', '/svc/127.0.0.1:6001', '{"weight":4}'] ];
		}
		my $again = wait_line($w, qr/established .* resumed=true/, $m, 20);
		is(session_id($again), session_id($est),
			"$mode: session resumed on another member");
		isnt($member_of->($w, $m), $on, "$mode: a different member");
		if ($mode eq 'oneshot') {
			ok(wait_line($w, qr/ listing .*6003/, $m, 10),
				'oneshot: the change made meanwhile is listed after the resume');
		}
		my $re = $mode eq 'oneshot' ? qr/ listing .*6001 weight=4/
			: qr/ listing .*6002/;
		my ($l, $ms) = change_and_wait($zk, $w, $changes, $re, wait => 15);
		ok($l, "$mode: change after the failover listed ($ms ms)");
		if ($mode eq 'oneshot') {
			$zk->resume($on);
		} else {
			$zk->start_member($on);
		}
		$t->kill_spawned($w);
	}
	$zk->stop;
};

###############################################################################

subtest 'latencies (change to listing, ms)' => sub {
	plan tests => 1;
	note(join ', ', @latency);
	ok(@latency >= 8, 'recorded: ' . join(', ', @latency));
};

###############################################################################
