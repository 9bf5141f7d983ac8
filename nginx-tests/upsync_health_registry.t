#!/usr/bin/perl

# Health state and registry changes: the state is keyed by address, so it
# survives a change that adds and removes other servers; with "mandatory" a
# newly registered server gets no connection before it passes its first check;
# a server the registry removes is no longer probed; with "persistent" the
# state survives "nginx -s reload", without it servers start over ("checking");
# a recovered server comes back through its slow_start ramp; port= probes
# another port than the server's.

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

my $t = Test::Nginx->new(workers => 2)->has(qw/stream upsync/)->plan(39);

my ($p1, $p2, $p3, $pbad, $r1, $r2, $s1, $s2, $none) = map { port($_) } 8091 .. 8099;

my $ups = '';
for my $u (qw/m p np ss pt/) {
	$ups .= <<"EOF";
    upstream $u {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/$u/ upsync_type=consul upsync_interval=200ms;
        upsync_dump_path %%TESTDIR%%/servers_$u.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
EOF
}

$t->write_file_expand('nginx.conf', <<"EOF");
%%TEST_GLOBALS%%
events { }
stream {
    match banner {
        expect "b";
    }
$ups
    health_check_timeout 1s;
    server {
        listen 127.0.0.1:%%PORT_8080%%;
        proxy_pass m;
        health_check interval=300ms match=banner mandatory;
    }
    server {
        listen 127.0.0.1:%%PORT_8081%%;
        proxy_pass p;
        health_check interval=300ms match=banner mandatory persistent;
    }
    server {
        listen 127.0.0.1:%%PORT_8082%%;
        proxy_pass np;
        health_check interval=300ms match=banner mandatory;
    }
    server {
        listen 127.0.0.1:%%PORT_8083%%;
        proxy_pass ss;
        health_check interval=300ms match=banner;
    }
    server {
        listen 127.0.0.1:%%PORT_8084%%;
        proxy_pass pt;
        health_check interval=300ms match=banner port=$s1;
    }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF

my $consul = Test::Nginx::Consul->start($t, port => port(8500));
my %b = (
	b1 => Test::Nginx::Backend->tcp($t, port => $p1, id => 'b1'),
	b2 => Test::Nginx::Backend->tcp($t, port => $p2, id => 'b2'),
	b3 => Test::Nginx::Backend->tcp($t, port => $p3, id => 'b3'),
	bad => Test::Nginx::Backend->tcp($t, port => $pbad, id => 'x4'),
	r1 => Test::Nginx::Backend->tcp($t, port => $r1, id => 'br1'),
	r2 => Test::Nginx::Backend->tcp($t, port => $r2, id => 'br2'),
	s1 => Test::Nginx::Backend->tcp($t, port => $s1, id => 'bs1'),
	s2 => Test::Nginx::Backend->tcp($t, port => $s2, id => 'bs2'),
);
$consul->put("upstreams/ss/127.0.0.1:$s1", '');
$consul->put("upstreams/ss/127.0.0.1:$s2", '{"slow_start":"4s"}');
$consul->put("upstreams/pt/127.0.0.1:$none", '');
$consul->put("upstreams/m/127.0.0.1:$_", '') for $p1, $p2;
for my $u (qw/p np/) {
	$consul->put("upstreams/$u/127.0.0.1:$_", '') for $r1, $r2;
}
$t->run();

sub json {
	my (undef, undef, $b) = http_parse(http_get(port(8088), '/?format=json', timeout => 3) // '');
	return eval { decode_json($b // '') };
}

sub server_of {
	my ($u, $port) = @_;
	my $j = json() or return undef;
	my ($s) = grep { $_->{server} eq "127.0.0.1:$port" } @{ $j->{upstreams}{$u}{servers} // [] };
	return $s;
}

sub hc { my $s = server_of(@_); return $s && $s->{health} ? $s->{health} : {} }
sub state { hc(@_)->{state} // '' }

sub listed {
	my ($u, @ports) = @_;
	my $want = join ',', sort map { "127.0.0.1:$_" } @ports;
	my $j = json() or return 0;
	return join(',', sort map { $_->{server} } @{ $j->{upstreams}{$u}{servers} // [] }) eq $want;
}

sub dist { count_by_backend($t, $_[0], $_[1] // 10, timeout => 3) }
sub only { my ($c, $id) = @_; join(',', sort keys %$c) eq $id }

ok(wait_for(sub { listed('m', $p1, $p2) && state('m', $p1) eq 'up' && state('m', $p2) eq 'up' },
	timeout => 10), 'm: synced, both servers passed their first check');
ok($t->wait_for_log(qr/upstream "m" server 127\.0\.0\.1:$p1 is healthy: its first check passed/, 3),
	'mandatory: "first check passed" is logged');

###############################################################################
# the state survives a registry change that adds and removes other servers

$b{b2}->stop;
ok(wait_for(sub { state('m', $p2) eq 'unhealthy' }, timeout => 5), 'b2 unhealthy');
my $before = hc('m', $p2);
my $mark = $t->log_offset();
$consul->put("upstreams/m/127.0.0.1:$p3", '');
$consul->delete("upstreams/m/127.0.0.1:$p1");
ok(wait_for(sub { listed('m', $p2, $p3) }, timeout => 5), 'registry: b3 added, b1 removed');
my $after = hc('m', $p2);
is($after->{state}, 'unhealthy', 'b2 is still unhealthy right after the change');
ok($after->{checks} >= $before->{checks} && $after->{checks_failed} >= $before->{checks_failed}
	&& $after->{consecutive_fails} >= $before->{consecutive_fails},
	"its counters go on ($before->{checks_failed} -> $after->{checks_failed} failed)");
ok(wait_for(sub { state('m', $p3) eq 'up' }, timeout => 5), 'b3 (new) passed its first check');
ok(only(dist(port(8080)), 'b3'), 'traffic on b3 only');
is(scalar $t->grep_log(qr/server 127\.0\.0\.1:$p2 is healthy/, from => $mark), 0,
	'b2 never came back by the change');

###############################################################################
# mandatory: a newly registered server gets no connection before it passes

$mark = $t->log_offset();
$consul->put("upstreams/m/127.0.0.1:$pbad", '');
ok(wait_for(sub { listed('m', $p2, $p3, $pbad) }, timeout => 5), 'x4 (a wrong banner) registered');
my $d = dist(port(8080), 30);
ok(only($d, 'b3'), 'no connection reaches it: ' . join(' ', %$d));
ok(wait_for(sub { state('m', $pbad) eq 'unhealthy' }, timeout => 5),
	'its first check failed: unhealthy (it was "checking")');
ok($t->wait_for_log(qr/server 127\.0\.0\.1:$pbad is unhealthy: the response does not match "banner"/, 3,
	from => $mark), 'logged with the reason');

###############################################################################
# mandatory: a server that will pass (it greets after 0.7 s, within the 1 s
# timeout) takes no connection while its first check is in flight, and takes
# connections once it passed

my $pslow = port(8086);
my $slow = Test::Nginx::Backend->tcp($t, port => $pslow, id => 'b5', delay => 0.7);
$consul->put("upstreams/m/127.0.0.1:$pslow", '');
ok(wait_for(sub { listed('m', $p2, $p3, $pbad, $pslow) }, timeout => 5), 'b5 (a slow banner) registered');
my ($during, $reached) = (0, 0);
for (1 .. 200) {
	last unless state('m', $pslow) eq 'checking';
	my $c = dist(port(8080), 1);
	last unless state('m', $pslow) eq 'checking';
	$during++;
	$reached += $c->{b5} // 0;
}
ok($during >= 3, "$during connections made while b5 was checking");
is($reached, 0, 'none of them reached b5');
ok(wait_for(sub { state('m', $pslow) eq 'up' }, timeout => 5), 'its first check passed: up');
ok(wait_for(sub { (dist(port(8080), 6)->{b5} // 0) > 0 }, timeout => 10), 'then it takes connections');
$consul->delete("upstreams/m/127.0.0.1:$pslow");
ok(wait_for(sub { listed('m', $p2, $p3, $pbad) }, timeout => 5), 'b5 removed again');
undef $slow;

###############################################################################
# the registry removes a server: its probes stop

$consul->delete("upstreams/m/127.0.0.1:$pbad");
ok(wait_for(sub { listed('m', $p2, $p3) }, timeout => 5), 'x4 removed from the registry');
my $n0 = $b{bad}->connections_total;
my $b0 = $b{b3}->connections_total;
# three probe rounds of b3 (300ms each) are the clock
ok(wait_for(sub { $b{b3}->connections_total >= $b0 + 3 }, timeout => 5), 'b3 is probed on');
my $n = $b{bad}->connections_total - $n0;
ok($n <= 1, "x4 is no longer probed ($n probe(s) after its removal, at most one in flight)");

###############################################################################
# reload: "persistent" keeps the state, without it servers start over

ok(wait_for(sub { state('p', $r1) eq 'up' && state('np', $r1) eq 'up'
	&& state('p', $r2) eq 'up' && state('np', $r2) eq 'up' }, timeout => 5), 'p, np: both up');
$b{r2}->stop;
ok(wait_for(sub { state('p', $r2) eq 'unhealthy' && state('np', $r2) eq 'unhealthy' }, timeout => 5),
	'p, np: br2 unhealthy');
my $p_before = hc('p', $r2);
$mark = $t->log_offset();
my @old = $t->worker_pids();
ok($t->reload(), 'reload');
ok(wait_for(sub { !grep { kill 0, $_ } @old }, timeout => 3),
	'the old workers exit at once (probe timers do not hold them)');
my $p_after = hc('p', $r2);
ok($p_after->{state} eq 'unhealthy' && $p_after->{checks} >= $p_before->{checks},
	"persistent: br2 still unhealthy, its counters kept ($p_before->{checks} -> $p_after->{checks} checks)");
ok(only(dist(port(8081)), 'br1'), 'persistent: traffic on br1 at once, nothing waits for a check');
ok($t->wait_for_log(qr/upstream "np" server 127\.0\.0\.1:$r1 is healthy: its first check passed/, 3,
	from => $mark), 'without persistent: br1 started over ("checking") and passed again');
ok(wait_for(sub { state('np', $r2) eq 'unhealthy' }, timeout => 5), 'without persistent: br2 unhealthy again');
is(scalar $t->grep_log(qr/upstream "p" server .* is healthy: its first check passed/, from => $mark), 0,
	'persistent: nothing started over');

###############################################################################
# slow_start: a recovered server ramps up again

# bs2's ramp since its registration is over once it takes about half
ok(wait_for(sub { my $d = dist(port(8083), 40); ($d->{bs2} // 0) >= 14 }, timeout => 15),
	'ss: bs2 (slow_start=4s) is past half its ramp (35% of the connections)');
$b{s2}->stop;
ok(wait_for(sub { state('ss', $s2) eq 'unhealthy' }, timeout => 5), 'bs2 unhealthy');
$b{s2} = Test::Nginx::Backend->tcp($t, port => $s2, id => 'bs2');
ok(wait_for(sub { state('ss', $s2) eq 'up' }, timeout => 5), 'bs2 healthy again');
$d = dist(port(8083), 40);
ok(($d->{bs2} // 0) < 12, 'right after it recovered bs2 gets a small share: ' . join(' ', %$d));
ok(wait_for(sub { my $d = dist(port(8083), 40); ($d->{bs2} // 0) >= 14 }, timeout => 15),
	'and past half its ramp again (35%)');

###############################################################################
# port=: the check goes to another port than the server's

ok(wait_for(sub { (hc('pt', $none)->{checks} // 0) >= 2 }, timeout => 5), 'pt: checked');
ok(state('pt', $none) eq 'up' && hc('pt', $none)->{checks_failed} == 0,
	'a server with nothing on its own port is up: port= is probed');

my @bad = $t->grep_log(qr/\[(alert|crit|emerg)\]/);
is(scalar @bad, 0, 'no alerts') or diag(join "\n", @bad);
