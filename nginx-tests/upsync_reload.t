#!/usr/bin/perl

# Reloads that change an upstream's upsync source, and workers that poll when
# they should not.  Regression tests, each with its own nginx instance:
#
# 1. strong_dependency=on applies at first start only: a reload to a source
#    whose registry is down keeps the master (new workers, configured servers).
# 2. A reload that nginx rejects (a listen port is busy) leaves the running
#    set alone, and the old workers keep polling the old source.
# 3. A reload rejected because the zone cannot hold the configured servers
#    does not make the next reload to that source keep the old set.
# 4. A worker must not publish what it read after it stopped being the
#    poller: (a) an old worker still serving a session after a reload that
#    changed the source; (b) a worker stalled past its lease, resumed (i)
#    while the worker that took over polls, (ii) after that worker exited
#    and gave the lease back.
#
# Backends greet with their id, so the served set is read off connections.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;
use IO::Socket::INET;
use Time::HiRes qw/time/;

use JSON::PP;

use Test::Nginx qw/ :DEFAULT port wait_for http_get http_parse show_section /;
use Test::Nginx::Backend;
use Test::Nginx::Consul;
use Test::Nginx::Stream;

select STDERR; $| = 1;
select STDOUT; $| = 1;

# The registry and the backends live in an instance that never runs nginx.
my $host = Test::Nginx->new()->has(qw/stream upsync/)->plan(46);

my $consul = Test::Nginx::Consul->start($host, port => port(8500));
my $R = port(8500);

my %PORT = (a1 => port(8081), a2 => port(8082), a3 => port(8083),
	b1 => port(8084), b2 => port(8085));
my %ID = reverse %PORT;
my @ALERTS;
# keep the objects: a backend stops when its object goes away
my @backends = map { Test::Nginx::Backend->tcp($host, port => $PORT{$_}, id => $_) }
	sort keys %PORT;

###############################################################################
# helpers

# A stream config with upstream u (upsync $upsync; the servers @servers) behind
# proxy port $n+1 and upstream_show on port $n+2; $extra goes into stream {}.
sub conf {
	my (%o) = @_;
	my ($n, $extra) = ($o{n}, $o{extra} // '');
	my $servers = join '', map { "        server $_;\n" } @{$o{servers}};
	my $proxy = port($n + 1);
	my $show = port($n + 2);
	return <<"EOF";
%%TEST_GLOBALS%%
events { }
stream {
    upstream u {
        upsync $o{upsync};
        upsync_dump_path %%TESTDIR%%/servers_u.conf;
$servers    }
    server { listen 127.0.0.1:$proxy; proxy_pass u; proxy_connect_timeout 2s; }
    server { listen 127.0.0.1:$show; upstream_show; }
$extra}
EOF
}

sub consul_src {
	my ($prefix, $extra, $port) = @_;
	return "127.0.0.1:" . ($port // $R) . "/v1/kv/$prefix/ upsync_type=consul"
		. (defined $extra ? " $extra" : '');
}

sub srv { "127.0.0.1:$PORT{$_[0]}" }

# ids of the backends listed in a text (upstream_show section, dump file)
sub ids_in {
	my ($text) = @_;
	my %seen = map { ($ID{$_} // "port$_") => 1 } ($text // '') =~ /127\.0\.0\.1:(\d+)/g;
	return join ',', sort keys %seen;
}

sub shown { ids_in(show_section(port($_[0] + 2), 'u')) }
sub dumped { ids_in($_[0]->read_file('servers_u.conf')) }
sub served { count_by_backend($host, port($_[0] + 1), $_[1] // 6) }

sub register {
	my ($prefix, @ids) = @_;
	$consul->put("$prefix/" . srv($_), '') for @ids;
}

sub pollers {
	my ($t, $from) = @_;
	return map { /\(pid (\d+)\) now polls/ ? $1 : () }
		$t->grep_log(qr/now polls the registry/, from => $from // 0);
}

sub published_by {
	my ($t, $pid, $from) = @_;
	return scalar $t->grep_log(qr/\] $pid#\d+: .* servers now \(/, from => $from);
}

sub blocking {
	my ($path) = @_;
	return $consul->stats->{blocking_by_path}{$path} // 0;
}

# kill() for pids read from logs: never a missing pid (0 is the process group)
sub signal {
	my ($sig, @pids) = @_;
	@pids = grep { defined && /^\d+$/ && $_ > 1 } @pids;
	return @pids ? kill($sig, @pids) : 0;
}

sub stopped {
	my ($pid) = @_;
	my ($state) = Test::Nginx::_stat_fields($pid);
	return defined $state && $state eq 'T';
}

sub poller_pid {
	my ($n) = @_;
	my (undef, undef, $body) = http_parse(http_get(port($n + 2), '/?format=json') // '');
	my $j = eval { decode_json($body // '') } or return undef;
	return $j->{upstreams}{u}{upsync}{poller_pid};
}

# Polls $bad for $secs; true if it never held.
sub never {
	my ($bad, $secs) = @_;
	return !wait_for($bad, timeout => $secs, interval => 0.05);
}

###############################################################################
# 1. strong_dependency=on and a reload to an unreachable registry

{
	my $t = Test::Nginx->new(workers => 2);
	my $n = 8110;
	register('r1/a', 'a1');
	$t->write_file_expand('nginx.conf', conf(n => $n,
		upsync => consul_src('r1/a', 'upsync_interval=500ms strong_dependency=on'),
		servers => [ srv('a2') ]));
	$t->run();
	is(shown($n), 'a1', 'strong: started from the registry');

	my $master = $t->master_pid;
	my @old = $t->worker_pids;
	my $mark = $t->log_offset;
	my $dead = port($n + 9);	# claimed by the harness, nobody listens
	my $reloaded = $t->reload(quiet => 1, conf => conf(n => $n,
		upsync => consul_src('r1/b', 'upsync_interval=500ms strong_dependency=on', $dead),
		servers => [ srv('b1') ]));
	ok($reloaded, 'strong: reload to an unreachable registry succeeds');
	is($t->master_pid, $master, 'strong: the master is still running');
	ok(wait_for(sub { !grep { !Test::Nginx::_gone($_) } @old }, timeout => 3),
		'strong: the old workers exit');
	my @new = $t->worker_pids;
	my %was = map { $_ => 1 } @old;
	ok(@new == 2 && !grep({ $was{$_} } @new), 'strong: new workers run')
		or diag("workers now: @new; before: @old");
	is_deeply(served($n), { b1 => 6 }, 'strong: connections go to the configured server');
	is(scalar $t->grep_log(qr/\[emerg\]/, from => $mark), 0, 'strong: no [emerg] for the reload')
		or diag(join "\n", $t->grep_log(qr/\[emerg\]|exit/, from => $mark));
	@old = @new;
	ok($t->reload(quiet => 1), 'strong: a second reload succeeds');
	my @again = $t->worker_pids;
	%was = map { $_ => 1 } @old;
	ok(@again && !grep({ $was{$_} } @again), 'strong: the second reload starts new workers');
	push @ALERTS, $t->grep_log(qr/\[(?:alert|crit)\]/);
	$t->stop();
}

###############################################################################
# 2. a rejected reload (busy listen port) leaves the running set alone

{
	my $t = Test::Nginx->new(workers => 2);
	my $n = 8120;
	register('r2/a', 'a1');
	register('r2/b', 'b2');
	$t->write_file_expand('nginx.conf', conf(n => $n,
		upsync => consul_src('r2/a', 'upsync_interval=4s'),
		servers => [ srv('a1') ]));
	$t->run();
	ok(wait_for(sub { pollers($t) && shown($n) eq 'a1' }, timeout => 5), 'rejected: synced');

	my $busy_port = port($n + 3);
	my $busy = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $busy_port,
		Proto => 'tcp', Listen => 5) or die "cannot listen on $busy_port: $!\n";
	my @old = $t->worker_pids;
	# nginx tries bind() 5 times, 500ms apart: watch the set meanwhile
	my %during;
	ok($t->reload_rejected(conf => conf(n => $n,
			upsync => consul_src('r2/b', 'upsync_interval=4s'),
			servers => [ srv('b1') ],
			extra => "    server { listen 127.0.0.1:$busy_port; proxy_pass u; }\n"),
			watch => sub { $during{shown($n)}++ }),
		'rejected: nginx refuses the reload (port busy)');
	is(join(',', $t->worker_pids), join(',', @old), 'rejected: the old workers stay');
	is(join(' ', sort keys %during), 'a1', 'rejected: the running set stays during the attempt')
		or diag(explain \%during);
	is_deeply(served($n), { a1 => 6 }, 'rejected: connections still go to the running set');
	is(shown($n), 'a1', 'rejected: upstream_show lists the running set');
	is(dumped($t), 'a1', 'rejected: the dump lists the running set');

	register('r2/a', 'a2');
	ok(wait_for(sub { shown($n) eq 'a1,a2' }, timeout => 5),
		'rejected: a change of the old source still applies') or diag('shown: ' . shown($n));
	my $c = served($n, 8);
	ok(($c->{a2} // 0) > 0 && !grep({ !/^a[12]$/ } keys %$c), 'rejected: and reaches traffic')
		or diag(explain $c);
	close $busy;
	push @ALERTS, $t->grep_log(qr/\[(?:alert|crit)\]/);
	$t->stop();
}

###############################################################################
# 3. a reload rejected because the zone is too small, then a good one

{
	my $t = Test::Nginx->new(workers => 2);
	my $n = 8130;
	register('r3/a', 'a1');
	$t->write_file_expand('nginx.conf', conf(n => $n,
		upsync => consul_src('r3/a', 'upsync_interval=500ms zone_size=64k'),
		servers => [ srv('a1') ]));
	$t->run();
	ok(wait_for(sub { shown($n) eq 'a1' }, timeout => 5), 'zone full: synced');

	my $mark = $t->log_offset;
	my @many = map { '127.0.0.1:' . (40000 + $_) } 1 .. 1000;
	ok($t->reload_rejected(conf => conf(n => $n,
			upsync => consul_src('r3/b', 'upsync_interval=500ms zone_size=64k'),
			servers => \@many)),
		'zone full: nginx refuses 1000 servers in a 64k zone');
	ok(scalar $t->grep_log(qr/\[emerg\].*"u"/, from => $mark), 'zone full: the [emerg] names the upstream');
	is(shown($n), 'a1', 'zone full: the running set stays');

	# prefix r3/b is empty: the configured server is the set
	ok($t->reload(conf => conf(n => $n,
			upsync => consul_src('r3/b', 'upsync_interval=500ms zone_size=64k'),
			servers => [ srv('b1') ])),
		'zone full: then a reload that fits');
	is_deeply(served($n), { b1 => 6 }, 'zone full: connections go to the new source\'s servers');
	is(shown($n), 'b1', 'zone full: upstream_show lists the new source\'s servers');
	# nginx's slab allocator logs the failed allocation of the rejected reload
	push @ALERTS, grep { !/ngx_slab_alloc\(\) failed: no memory/ }
		$t->grep_log(qr/\[(?:alert|crit)\]/);
	$t->stop();
}

###############################################################################
# 4a. an old worker's long poll ends after a reload that changed the source

SKIP: {
	skip 'needs the emulator (counts long polls in flight)', 8 unless $consul->is_emulator;

	my $t = Test::Nginx->new(workers => 1);
	my $n = 8140;
	register('r4/a', 'a1');
	register('r4/b', 'b2');
	# interval 4s: the old worker's election tick (every 2 s) would stop its
	# poller; the change to the old source comes within that
	$t->write_file_expand('nginx.conf', conf(n => $n,
		upsync => consul_src('r4/a', 'upsync_interval=4s'),
		servers => [ srv('a1') ]));
	$t->run();
	# its election ticks come every 2 s from the first one, which logs this
	$t->wait_for_log(qr/now polls the registry/, 5);
	my $tick0 = time;
	ok(wait_for(sub { blocking('/v1/kv/r4/a/') == 1 }, timeout => 5),
		'old poller: a long poll on the old source is in flight');

	# a session keeps the old worker alive after the reload
	my $s = Test::Nginx::Stream->new(port => port($n + 1));
	my $greet = $s && $s->read(until => qr/\n/);
	is($greet, "a1\n", 'old poller: a session through the old worker');
	my ($old) = $t->worker_pids;

	# reload just after the old worker's tick: the next one is ~1.8 s away
	my $phase = sub { my $d = time - $tick0; $d - 2 * int($d / 2) };
	wait_for(sub { my $p = $phase->(); $p > 0.1 && $p < 0.3 }, timeout => 2.5, interval => 0.01);
	my $t0 = time;
	my $mark = $t->log_offset;
	ok($t->reload(conf => conf(n => $n,
			upsync => consul_src('r4/b', 'upsync_interval=4s'),
			servers => [ srv('b1') ]))
		&& wait_for(sub { shown($n) eq 'b2' }, timeout => 1),
		'old poller: reloaded to another source, its set is in use');
	register('r4/a', 'a3');
	my $late = time - $t0;
	diag(sprintf('changed the old source %.2fs after the reload', $late)) if $late > 1;
	ok(wait_for(sub { blocking('/v1/kv/r4/a/') == 0 }, timeout => 3),
		'old poller: the old long poll has ended');
	ok(never(sub { shown($n) ne 'b2' }, 1.5), 'old poller: upstream_show keeps the new source\'s set')
		or diag('shown: ' . shown($n));
	is(published_by($t, $old, $mark), 0, 'old poller: the old worker published nothing after the reload')
		or diag(join "\n", $t->grep_log(qr/servers now/, from => $mark));
	ok(never(sub { dumped($t) ne 'b2' }, 1), 'old poller: the dump is the new source\'s set')
		or diag('dumped: ' . dumped($t));
	is_deeply(served($n), { b2 => 6 }, 'old poller: connections go to the new source\'s set');
	$s->close if $s;
	push @ALERTS, $t->grep_log(qr/\[(?:alert|crit)\]/);
	$t->stop();
}

###############################################################################
# 4b. a worker stalled past its lease, with an answer waiting in its socket

SKIP: {
	skip 'needs the emulator (counts long polls in flight)', 12 unless $consul->is_emulator;

	my $t = Test::Nginx->new(workers => 4);
	my $n = 8150;
	my $path = '/v1/kv/r5/';
	register('r5', 'a1');
	$t->write_file_expand('nginx.conf', conf(n => $n,
		upsync => consul_src('r5', 'upsync_interval=1s'),
		servers => [ srv('a1') ]));
	$t->run();
	ok(wait_for(sub { scalar pollers($t) }, timeout => 5)
		&& wait_for(sub { blocking($path) == 1 }, timeout => 5),
		'stalled: one worker long-polls');
	my ($w) = pollers($t);

	# (i) resumed while the worker that took over holds the lease
	my $mark = $t->log_offset;
	signal('STOP', $w);
	my $x = wait_for(sub { (grep { $_ != $w } pollers($t, $mark))[0] }, timeout => 8);
	ok($x && wait_for(sub { blocking($path) == 2 }, timeout => 5),
		"stalled: another worker takes over from $w");
	register('r5', 'a2');		# change 1: $w's socket gets this answer too
	wait_for(sub { shown($n) eq 'a1,a2' }, timeout => 5);
	register('r5', 'a3');		# change 2
	ok(wait_for(sub { shown($n) eq 'a1,a2,a3' }, timeout => 5),
		'stalled: both changes applied by the new poller');
	$mark = $t->log_offset;
	signal('CONT', $w);
	wait_for(sub { !stopped($w) }, timeout => 2);
	ok(never(sub { shown($n) ne 'a1,a2,a3' }, 1.5), 'stalled: the set stays at change 2')
		or diag('shown: ' . shown($n));
	is(published_by($t, $w, $mark), 0, 'stalled: the stalled worker published nothing')
		or diag(join "\n", $t->grep_log(qr/servers now/, from => $mark));

	# (ii) resumed when the lease is free again: the worker that took over
	# has exited (and gave the lease back) before the stalled one runs
	ok(wait_for(sub { blocking($path) == 1 }, timeout => 5), 'stalled again: one long poll');
	$mark = $t->log_offset;
	signal('STOP', $x);
	my $y = wait_for(sub { (grep { $_ != $x } pollers($t, $mark))[0] }, timeout => 8);
	ok($y && wait_for(sub { blocking($path) == 2 }, timeout => 5),
		"stalled again: another worker takes over from $x");
	register('r5', 'b1');		# change 3: $x's socket gets this answer too
	wait_for(sub { shown($n) eq 'a1,a2,a3,b1' }, timeout => 5);
	$consul->delete('r5/' . srv('a1'));	# change 4
	ok(wait_for(sub { shown($n) eq 'a2,a3,b1' }, timeout => 5),
		'stalled again: both changes applied by the new poller');

	# the master must not start a worker that takes the free lease first,
	# nor the other workers: only $x runs when $y has exited
	my $master = $t->master_pid;
	my @others = grep { $_ != $x && $_ != $y } $t->worker_pids;
	signal('STOP', $master, @others);
	signal('QUIT', $y);
	wait_for(sub { Test::Nginx::_gone($y) }, timeout => 5);
	# later polls get no answer: whatever $x publishes stays visible
	$consul->fault({ mode => 'hang', path_prefix => '/v1/kv/r5', method => 'GET' });
	$mark = $t->log_offset;
	signal('CONT', $x);
	ok(wait_for(sub { (poller_pid($n) // 0) == $x }, timeout => 5),
		"stalled again: $x polls again");
	ok(never(sub { shown($n) ne 'a2,a3,b1' }, 1.5), 'stalled again: the set stays at change 4')
		or diag('shown: ' . shown($n));
	is(published_by($t, $x, $mark), 0, 'stalled again: the stalled worker published nothing')
		or diag(join "\n", $t->grep_log(qr/servers now/, from => $mark));
	ok(never(sub { dumped($t) ne 'a2,a3,b1' }, 1), 'stalled again: the dump is at change 4')
		or diag('dumped: ' . dumped($t));
	$consul->clear_faults();
	signal('CONT', $master, @others);
	push @ALERTS, $t->grep_log(qr/\[(?:alert|crit)\]/);
	$t->stop();
}

is(scalar @ALERTS, 0, 'no alerts or crits in the error logs') or diag(join "\n", @ALERTS);

###############################################################################
