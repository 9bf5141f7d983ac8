#!/usr/bin/perl

# Many Consul KV upstreams on one registry, within Consul's per-client
# connection limit (limits.http_max_conns_per_client, 200 by default; the
# emulator enforces it with that default).  300 upstreams under one KV parent
# and 4 workers: one long poll for all of them; every upstream syncs; a change
# to any one reaches traffic within a bound; a member's bad entries are
# skipped and reported for it alone; an upstream under another parent, on
# another registry or of the service type polls on its own.  nginx holds few
# registry connections (counted in /proc), also across a reload, whose old
# workers close theirs at once; an outage is logged once for the group and
# recorded in every member's status; a member removed by a reload is no
# longer written.  Finally, with the limit set to 3 on purpose, upstreams that
# cannot share a poll and are turned away say why, once.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;
use Time::HiRes qw/time/;
use JSON::PP;

use Test::Nginx qw/ :DEFAULT port wait_for http_get http_parse /;
use Test::Nginx::Backend;
use Test::Nginx::Consul;
use Test::Nginx::Stream;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 4)->has(qw/stream upsync/)->plan(42);

my $N = 300;
my @U = map { sprintf 'u%03d', $_ } 0 .. $N - 1;
my %PORT = (b1 => port(8091), b2 => port(8092), b3 => port(8093));
my @backends = map { Test::Nginx::Backend->tcp($t, port => $PORT{$_}, id => $_) }
	sort keys %PORT;
sub srv { "127.0.0.1:$PORT{$_[0]}" }

my $R = port(8500);
my $R2 = port(8600);
my $consul = Test::Nginx::Consul->start($t, port => $R);
my $far = Test::Nginx::Consul->start($t, port => $R2, name => 'consul2');

# every member starts on b1, in transactions of at most 64 operations
sub seed {
	my ($reg, $set) = @_;
	my @ops = map { [ set => "upstreams/$_/" . srv($set->{$_}), '' ] } sort keys %$set;
	$reg->txn(splice @ops, 0, 64) while @ops;
}
seed($consul, { map { $_ => 'b1' } @U });
$consul->put('other/x/' . srv('b1'), '');
$far->put('upstreams/far/' . srv('b1'), '');
$consul->register_service({ ID => 'web1', Name => 'web', Address => '127.0.0.1',
	Port => $PORT{b1} });

sub conf {
	my (@names) = @_;
	my $ups = join '', map { <<"EOF" } @names;
    upstream $_ {
        upsync 127.0.0.1:$R/v1/kv/upstreams/$_/ upsync_type=consul upsync_interval=500ms;
        upsync_dump_path %%TESTDIR%%/servers_$_.conf;
    }
EOF
	my %has = map { $_ => 1 } @names;
	my $proxies = join '', map { "    server { listen 127.0.0.1:%%PORT_$_->[0]%%; proxy_pass $_->[1]; }\n" }
		grep { $has{$_->[1]} || $_->[1] !~ /^u\d/ }
		([8081, 'u000'], [8082, 'u157'], [8083, 'u299'], [8084, 'other'], [8085, 'far']);
	return <<"EOF";
%%TEST_GLOBALS%%
events { }
stream {
$ups
    upstream other {
        upsync 127.0.0.1:$R/v1/kv/other/x/ upsync_type=consul upsync_interval=4s;
        upsync_dump_path %%TESTDIR%%/servers_other.conf;
    }
    upstream far {
        upsync 127.0.0.1:$R2/v1/kv/upstreams/far/ upsync_type=consul upsync_interval=500ms;
        upsync_dump_path %%TESTDIR%%/servers_far.conf;
    }
    upstream web {
        upsync 127.0.0.1:$R/v1/catalog/service/web upsync_type=consul_services upsync_interval=500ms;
        upsync_dump_path %%TESTDIR%%/servers_web.conf;
    }
$proxies    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF
}

$t->write_file_expand('nginx.conf', conf(@U));
my $t_start = time;
$t->run();

###############################################################################
# helpers

sub show_json {
	my (undef, undef, $body) = http_parse(http_get(port(8088), '/?format=json', timeout => 10) // '');
	return eval { decode_json($body // '') }->{upstreams} // {};
}

# name => "b1,b2" (the backends an upstream lists)
sub sets {
	my $j = show_json();
	my %ID = reverse %PORT;
	my %s;
	for my $u (keys %$j) {
		$s{$u} = join ',', sort map { my ($p) = $_->{server} =~ /:(\d+)$/; $ID{$p} // "port$p" }
			@{ $j->{$u}{servers} };
	}
	return \%s;
}

sub synced {
	my ($want, @names) = @_;
	my $s = sets();
	return !grep { ($s->{$_} // '') ne $want } @names;
}

# established TCP connections from these processes to 127.0.0.1:$port: ss
# (the kernel filters), else /proc (slow where the host has many sockets)
sub conns_to {
	my ($port, @pids) = @_;
	my %want = map { $_ => 1 } @pids;
	if (defined Test::Nginx::which('ss')) {
		my @l = `ss -Htnp state established dst 127.0.0.1:$port 2>/dev/null`;
		return scalar grep { my @p = /pid=(\d+)/g; grep { $want{$_} } @p } @l;
	}
	my %inode;
	for my $pid (@pids) {
		opendir(my $d, "/proc/$pid/fd") or next;
		for (readdir $d) {
			my $l = readlink("/proc/$pid/fd/$_") // next;
			$inode{$1} = 1 if $l =~ /^socket:\[(\d+)\]$/;
		}
	}
	my $hex = sprintf '%04X', $port;
	my $n = 0;
	open(my $f, '<', '/proc/net/tcp') or return undef;
	while (<$f>) {
		next unless index($_, ":$hex ") > 0;
		my @c = split;
		$n++ if $c[3] eq '01' && $c[2] =~ /:$hex$/ && $inode{$c[9]};
	}
	return $n;
}

# the nginx process that accepted a client connection (needs ss)
sub holder_of {
	my ($s) = @_;
	return undef unless defined Test::Nginx::which('ss');
	my ($proxy, $me) = ($s->port, $s->sockport);
	my @l = `ss -Htnp state established '( sport = :$proxy and dport = :$me )' 2>/dev/null`;
	return (join('', @l) =~ /pid=(\d+)/)[0];
}

sub nginx_pids { grep { defined } ($t->master_pid, $t->worker_pids(all => 1)) }

sub pollers {
	my ($from) = @_;
	return $t->grep_log(qr/now polls the registry/, from => $from // 0);
}

sub served { count_by_backend($t, port($_[0]), $_[1] // 8) }

my %ID = reverse %PORT;

###############################################################################
# 1. all 300 sync through one long poll

ok(wait_for(sub { synced('b1', @U, 'other', 'far', 'web') }, timeout => 30, interval => 0.2),
	"all $N upstreams under one parent and the others synced");
diag(sprintf('nginx start -> all synced: %.1fs', time - $t_start));

my $s = sets();
is(scalar(grep { ($s->{$_} // '') eq 'b1' } @U), $N, "each of the $N lists its registry server");

my @group_lines = grep { /consul 127\.0\.0\.1:$R\/v1\/kv\/upstreams\/ for upstreams "u000", "u001", "u002", "u003" and 296 more/ } pollers();
is(scalar @group_lines, 1, 'one worker polls for the group, named in one line');
is(scalar(pollers()), 4, 'and one each for other, far and web: 4 polls in all');

my $j = show_json();
my %pids = map { ($j->{$_}{upsync}{poller_pid} // 0) => 1 } @U;
my ($gp) = keys %pids;
ok(keys %pids == 1 && $gp > 0, "every member's status names the one polling worker ($gp)");

SKIP: {
	skip 'long polls are counted by the emulator', 3 unless $consul->is_emulator;
	my $by = $consul->stats->{blocking_by_path};
	is($by->{'/v1/kv/upstreams/'}, 1, 'one long poll on the parent');
	ok(($by->{'/v1/kv/other/x/'} // 0) == 1 && ($by->{'/v1/catalog/service/web'} // 0) == 1,
		'another parent and a service upstream poll on their own');
	ok(wait_for(sub { ($consul->stats->{conns_by_client}{'127.0.0.1'} // 0) == 3 }, timeout => 3),
		'the registry counts 3 connections from 127.0.0.1, far below its limit of 200');
}
is(conns_to($R, nginx_pids()), 3, 'nginx holds 3 connections to the registry (/proc/net/tcp)');
is(conns_to($R2, nginx_pids()), 1, 'and 1 to the other registry');

###############################################################################
# 2. a change to one member reaches traffic within a bound; the others stay

is_deeply(served(8082), { b1 => 8 }, 'u157 serves b1');
my $t0 = time;
$consul->txn([ set => 'upstreams/u157/' . srv('b2'), '' ], [ delete => 'upstreams/u157/' . srv('b1') ]);
ok(wait_for(sub { (served(8082, 2)->{b2} // 0) == 2 }, timeout => 5, interval => 0.02), 'u157 serves b2');
my $took = time - $t0;
ok($took < 2, sprintf('the change reached traffic in %.2fs (< 2s)', $took));
$s = sets();
ok($s->{u157} eq 'b2' && !grep({ $_ ne 'u157' && $s->{$_} ne 'b1' } @U), 'only u157 changed');
is_deeply(served(8081), { b1 => 8 }, 'u000 still serves b1');

# the same for the last member, by the changed-part path alone
$consul->put('upstreams/u299/' . srv('b3'), '');
ok(wait_for(sub { synced('b1,b3', 'u299') }, timeout => 5, interval => 0.05), 'u299 got b3');
my $mark = $t->log_offset;

###############################################################################
# 3. bad entries of one member are skipped and reported for it alone

$consul->put('upstreams/u042/localhost:80', '');
ok($t->wait_for_log(qr/upstream "u042" .*entry "upstreams\/u042\/localhost:80" skipped: invalid server address/, 5, from => $mark),
	'u042 reports its bad entry');
$j = show_json();
ok($j->{u042}{upsync}{skipped_count} == 1 && $j->{u041}{upsync}{skipped_count} == 0
	&& $j->{u043}{upsync}{skipped_count} == 0, 'only u042 lists it as skipped');
is(scalar($t->grep_log(qr/skipped/, from => $mark)), 1, 'one line in the log, for u042');
ok(synced('b1', 'u042'), 'u042 keeps its valid server');
$consul->delete('upstreams/u042/localhost:80');
ok($t->wait_for_log(qr/upstream "u042" .*entry "upstreams\/u042\/localhost:80" is no longer skipped/, 5, from => $mark),
	'and says when it is gone');

###############################################################################
# 4. the registry down and back: one line for the group, every status knows

SKIP: {
	skip 'fault injection needs the emulator', 5 unless $consul->is_emulator;
	$mark = $t->log_offset;
	$consul->fault({ mode => 'status', status => 500, body => 'No cluster leader',
		path_prefix => '/v1/kv/upstreams/', method => 'GET' });
	# a key of no member ends the long poll in flight; the next ones fail
	$consul->put('upstreams/poke', '');
	ok(wait_for(sub { defined show_json()->{u200}{upsync}{last_error} }, timeout => 5),
		'outage: every member has the error in its status');
	$consul->put('upstreams/u010/' . srv('b2'), '');
	$j = show_json();
	ok($j->{u010}{upsync}{last_error} =~ /HTTP status 500/ && $j->{u010}{upsync}{consecutive_failures} >= 1
		&& synced('b1', 'u010'), 'outage: the changed member too, keeping its set');
	wait_for(sub { $consul->stats->{requests}{'GET /v1/kv/upstreams/'} >= 3 }, timeout => 5);
	my @err = $t->grep_log(qr/HTTP status 500/, from => $mark);
	ok(@err == 1 && $err[0] =~ /for upstreams "u000"/, 'outage: one log line, for the group')
		or diag(scalar(@err) . " lines:\n" . join("\n", @err[0 .. ($#err < 3 ? $#err : 3)]));
	$consul->clear_faults();
	ok(wait_for(sub { synced('b1,b2', 'u010') }, timeout => 5), 'recovery: the change made meanwhile applies');
	ok($t->wait_for_log(qr/for upstreams "u000".*registry answers again/, 5, from => $mark)
		&& wait_for(sub { !defined show_json()->{u200}{upsync}{last_error} }, timeout => 5),
		'recovery: logged once, the statuses are clear');
}

###############################################################################
# 5. a reload that removes a member; old workers close their polls at once

# A session keeps the worker that polls "other" alive after the reload: its
# election tick comes every 2 s (upsync_interval=4s), so only the shutdown
# itself can have closed its long poll when the first look finds it gone.
my $op = show_json()->{other}{upsync}{poller_pid};
my ($sess, @extra);
for (1 .. 40) {
	my $c = Test::Nginx::Stream->new(port => port(8084)) or last;
	$c->read(until => qr/\n/);
	if ((holder_of($c) // 0) == $op) { $sess = $c; last }
	push @extra, $c;
}
$_->close for @extra;
my @old = $t->worker_pids;
$mark = $t->log_offset;
my @kept = grep { $_ ne 'u299' } @U;
ok($t->reload(conf => conf(@kept)), 'reloaded without u299');
SKIP: {
	skip 'no session landed on the polling worker (or no ss)', 2 unless $sess;
	ok(!Test::Nginx::_gone($op), "the old worker that polled (pid $op) still serves a session");
	is(conns_to($R, $op), 0, 'at the first look it has closed its registry connections');
}
my @lingering = grep { !Test::Nginx::_gone($_) } @old;
ok(wait_for(sub { conns_to($R, @lingering) + conns_to($R2, @lingering) == 0 }, timeout => 1),
	'no old worker holds a registry connection');
ok(wait_for(sub { my @p = pollers($mark); @p == 4 }, timeout => 5), 'new workers poll (4 polls)');
is(conns_to($R, nginx_pids()), 3, 'nginx holds 3 registry connections after the reload');

$t0 = time;
$consul->txn([ set => 'upstreams/u157/' . srv('b3'), '' ], [ delete => 'upstreams/u157/' . srv('b2'), '' ]);
ok(wait_for(sub { (served(8082, 2)->{b3} // 0) == 2 }, timeout => 5, interval => 0.02), 'after the reload: u157 serves b3');
$took = time - $t0;
ok($took < 2, sprintf('within %.2fs (< 2s)', $took));
$consul->put('upstreams/u298/' . srv('b2'), '');
ok(wait_for(sub { synced('b1,b2', 'u298') }, timeout => 5), 'after the reload: u298 changes too');
$consul->put('upstreams/u299/' . srv('b2'), '');
ok(!exists show_json()->{u299}, 'u299 is gone from upstream_show');
ok(!$t->grep_log(qr/upstream "u299"/, from => $mark), 'nothing was written for u299 after the reload');
$sess->close if $sess;

###############################################################################
# 6. over the limit on purpose: upstreams that cannot share are told why

{
	my $t2 = Test::Nginx->new(workers => 1);
	my $L = port(8700);
	my $lim = Test::Nginx::Consul->start($t2, port => $L, name => 'limited',
		args => Test::Nginx::Consul::want_real()
			? [ '-hcl', 'limits { http_max_conns_per_client = 3 }' ]
			: [ '--max-conns-per-client', '3' ]);
	# five upstreams under five parents: five polls, for three slots
	$lim->put("p$_/x/" . srv('b1'), '') for 0 .. 4;
	my $ups = join '', map { <<"EOF" } 0 .. 4;
    upstream p$_ {
        upsync 127.0.0.1:$L/v1/kv/p$_/x/ upsync_type=consul upsync_interval=300ms;
        upsync_dump_path %%TESTDIR%%/servers_p$_.conf;
        server 127.0.0.1:$PORT{b2};
    }
EOF
	$t2->write_file_expand('nginx.conf', <<"EOF");
%%TEST_GLOBALS%%
events { }
stream {
$ups    server { listen 127.0.0.1:%%PORT_8788%%; upstream_show; }
}
EOF
	$t2->run();
	my $re = qr/turned the connection away before answering .*limits\.http_max_conns_per_client/;
	ok(wait_for(sub { scalar($t2->grep_log($re)) >= 2 }, timeout => 10),
		'limit: the upstreams turned away name the connection limit');
	# several retries later (300 ms interval, backoff), still one line each
	my $failing = sub {
		my (undef, undef, $b) = http_parse(http_get(port(8788), '/?format=json') // '');
		my $j = eval { decode_json($b // '') }->{upstreams} // {};
		return grep { ($j->{$_}{upsync}{consecutive_failures} // 0) >= 3
			&& ($j->{$_}{upsync}{last_error} // '') =~ /http_max_conns_per_client/ } keys %$j;
	};
	ok(wait_for(sub { $failing->() == 2 }, timeout => 10),
		'limit: two upstreams fail again and again, their status says why');
	my @lines = $t2->grep_log($re);
	my %per = map { /upstream "(p\d)"/ ? ($1 => 1) : () } @lines;
	ok(@lines == 2 && keys(%per) == 2, 'limit: once per upstream, not per attempt')
		or diag(join "\n", @lines);
	ok(!$t2->grep_log(qr/truncated/), 'limit: never called a truncated answer');
	$t2->stop();
}

push my @alerts, $t->grep_log(qr/\[(?:alert|crit)\]/);
is(scalar @alerts, 0, 'no alerts') or diag(join "\n", @alerts);
