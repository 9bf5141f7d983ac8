#!/usr/bin/perl

# Active TCP health checks on an upsync upstream (NGINX Plus's health_check):
# traffic leaves a server that stops answering within interval*fails plus one
# probe and comes back after passes; a wrong banner and a slow answer fail the
# match; backups serve when no primary is healthy; with no server healthy the
# state is logged once and connections fail; with 4 workers each server gets
# exactly one probe per interval, from one worker, and another worker takes
# over when it is killed; the status views show the health, the text view is
# unchanged.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;
use Time::HiRes qw/time/;
use JSON::PP;

use Test::Nginx qw/ :DEFAULT port wait_for http_get http_parse show_section /;
use Test::Nginx::Backend;
use Test::Nginx::Stream;
use Test::Nginx::Consul;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 4)->has(qw/stream upsync/)->plan(39);

my ($p1, $p2, $p3, $c1, $c2, $c3) = map { port($_) } 8091 .. 8096;

$t->write_file_expand('nginx.conf', <<'EOF');
%%TEST_GLOBALS%%
events { }
stream {
    match banner {
        expect ~* "^B[0-9]+\n";
    }
    upstream hc {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/hc/ upsync_type=consul upsync_interval=200ms;
        upsync_dump_path %%TESTDIR%%/servers_hc.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
    upstream cnt {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/cnt/ upsync_type=consul upsync_interval=200ms;
        upsync_dump_path %%TESTDIR%%/servers_cnt.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
    server {
        listen 127.0.0.1:%%PORT_8080%%;
        proxy_pass hc;
        proxy_connect_timeout 1s;
        health_check interval=500ms fails=2 passes=2 match=banner;
        health_check_timeout 1s;
    }
    server {
        listen 127.0.0.1:%%PORT_8081%%;
        proxy_pass cnt;
        health_check interval=1s;
    }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF

my $consul = Test::Nginx::Consul->start($t, port => port(8500));
my %b = (
	b1 => Test::Nginx::Backend->tcp($t, port => $p1, id => 'b1'),
	b2 => Test::Nginx::Backend->tcp($t, port => $p2, id => 'b2'),
	b3 => Test::Nginx::Backend->tcp($t, port => $p3, id => 'b3'),
	c1 => Test::Nginx::Backend->tcp($t, port => $c1, id => 'c1'),
	c2 => Test::Nginx::Backend->tcp($t, port => $c2, id => 'c2'),
	c3 => Test::Nginx::Backend->tcp($t, port => $c3, id => 'c3'),
);
$consul->put("upstreams/hc/127.0.0.1:$p1", '');
$consul->put("upstreams/hc/127.0.0.1:$p2", '');
$consul->put("upstreams/hc/127.0.0.1:$p3", '{"backup":1}');
$consul->put("upstreams/cnt/127.0.0.1:$_", '') for $c1, $c2, $c3;
$t->run();

sub json {
	my (undef, undef, $b) = http_parse(http_get(port(8088), '/?format=json', timeout => 3) // '');
	return eval { decode_json($b // '') };
}

# the JSON entry of server 127.0.0.1:$port in upstream $u
sub server_of {
	my ($u, $port) = @_;
	my $j = json() or return undef;
	my ($s) = grep { $_->{server} eq "127.0.0.1:$port" } @{ $j->{upstreams}{$u}{servers} // [] };
	return $s;
}

sub health { my $s = server_of(@_); return $s && $s->{health} ? $s->{health}{state} : '' }

# waits until server $port of $u is in health state $state; the seconds it took
sub until_health {
	my ($u, $port, $state, $timeout) = @_;
	my $t0 = time();
	return wait_for(sub { health($u, $port) eq $state }, timeout => $timeout, interval => 0.02)
		? time() - $t0 : undef;
}

sub dist { count_by_backend($t, port(8080), $_[0] // 20, timeout => 3) }
sub only { my ($c, $id) = @_; join(',', sort keys %$c) eq $id }

sub restart {
	my ($id, $port, %o) = @_;
	$b{$id}->stop;
	$b{$id} = Test::Nginx::Backend->tcp($t, port => $port, id => $id, %o);
}

ok(wait_for(sub { health('hc', $p1) eq 'up' && health('hc', $p2) eq 'up'
	&& health('hc', $p3) eq 'up' }, timeout => 10), 'synced: three servers, all up');
ok(wait_for(sub { (server_of('hc', $p1)->{health}{checks} // 0) >= 2 }, timeout => 5),
	'the servers are being checked');
my $d = dist(20);
ok(($d->{b1} // 0) >= 5 && ($d->{b2} // 0) >= 5 && !$d->{b3},
	'traffic on both primaries, none on the backup: ' . join(' ', %$d));

###############################################################################
# a server that stops answering leaves within interval*fails + one probe

$b{b2}->stop;
my $took = until_health('hc', $p2, 'unhealthy', 5);
ok(defined $took, 'b2 refused: unhealthy');
ok(defined $took && $took <= 0.5 * 2 + 0.5 + 0.5,
	sprintf('within interval*fails + one probe (%.2fs <= 2.0s)', $took // -1));
ok($t->wait_for_log(qr/\[warn\] .*upsync: upstream "hc" server 127\.0\.0\.1:$p2 is unhealthy: connect refused/, 3),
	'one log line: unhealthy: connect refused');
ok(only(dist(20), 'b1'), 'traffic only on b1');
is(server_of('hc', $p2)->{health}{last_failure}, 'connect refused', 'JSON: last failure');

# it comes back after passes=2
restart('b2', $p2);
$took = until_health('hc', $p2, 'up', 5);
ok(defined $took && $took <= 0.5 * 2 + 0.5 + 0.5,
	sprintf('back up after passes=2 (%.2fs <= 2.0s)', $took // -1));
ok($t->wait_for_log(qr/\[notice\] .*upstream "hc" server 127\.0\.0\.1:$p2 is healthy again after \d+ checks/, 3),
	'one log line: healthy again after N checks');
$d = dist(20);
ok(($d->{b2} // 0) >= 5, 'traffic on b2 again: ' . join(' ', %$d));

###############################################################################
# a wrong banner, then a slow one

restart('b2', $p2, greeting => "hello\n");
ok(defined until_health('hc', $p2, 'unhealthy', 5), 'a wrong banner: unhealthy');
is(server_of('hc', $p2)->{health}{last_failure}, 'the response does not match "banner" (within 1000ms)',
	'the reason names the match');
ok(only(dist(10), 'b1'), 'traffic only on b1');

restart('b2', $p2);
ok(defined until_health('hc', $p2, 'up', 5), 'right banner: up again');
restart('b2', $p2, delay => 3);
ok(defined until_health('hc', $p2, 'unhealthy', 6), 'a banner slower than health_check_timeout: unhealthy');
is(server_of('hc', $p2)->{health}{last_failure}, 'no matching response within 1000ms',
	'the reason: the timeout');

###############################################################################
# no primary healthy: the backup serves; none healthy: said once, nothing picked

$b{b1}->stop;
ok(defined until_health('hc', $p1, 'unhealthy', 5), 'b1 unhealthy too');
ok(only(dist(10), 'b3'), 'the backup serves');
my $mark = $t->log_offset();
$b{b3}->stop;
ok(defined until_health('hc', $p3, 'unhealthy', 5), 'the backup unhealthy too');
ok($t->wait_for_log(qr/\[error\] .*upstream "hc": no server is healthy: new connections fail/, 3,
	from => $mark), 'said: no server is healthy');
ok(only(dist(5), '_fail'), 'no server is picked');
ok(wait_for(sub { (server_of('hc', $p1)->{health}{consecutive_fails} // 0) >= 6 }, timeout => 5),
	'checks go on');
is(scalar $t->grep_log(qr/no server is healthy/, from => $mark), 1, 'said once');

restart('b1', $p1);
ok(defined until_health('hc', $p1, 'up', 5), 'b1 up again');
ok($t->wait_for_log(qr/upstream "hc": 1 server\(s\) healthy again, connections flow/, 3,
	from => $mark), 'said: connections flow again');
ok(only(dist(10), 'b1'), 'traffic on b1');

###############################################################################
# status views

my $h = server_of('hc', $p1)->{health};
ok($h && $h->{checks} > $h->{checks_failed} && $h->{checks_failed} >= 2
	&& $h->{consecutive_passes} >= 2 && $h->{consecutive_fails} == 0
	&& $h->{last_check} > time() - 5, 'JSON: counters and last check time');
my (undef, undef, $prom) = http_parse(http_get(port(8088), '/metrics', timeout => 3) // '');
like($prom, qr/^upsync_server_health\{upstream="hc",server="127\.0\.0\.1:$p3",health="unhealthy"\} 1$/m,
	'Prometheus: health state');
like($prom, qr/^upsync_server_health_checks_failed_total\{upstream="hc",server="127\.0\.0\.1:$p1"\} \d+$/m,
	'Prometheus: failed checks');
my $why = server_of('hc', $p3)->{health}{last_failure} // 'none';
like($prom, qr/^upsync_server_health_last_failure_info\{upstream="hc",server="127\.0\.0\.1:$p3",reason="\Q$why\E"\} 1$/m,
	"Prometheus: the last failure's reason ($why)");
my %line = map { $_ => "        server 127.0.0.1:$_ weight=1 max_fails=2 fail_timeout=10s"
	. ($_ == $p3 ? ' backup' : '') . ";\n" } $p1, $p2, $p3;
is(show_section(port(8088), 'hc'), "Upstream name: hc; Backend server count: 3\n"
	. join('', map { $line{$_} } sort { $a <=> $b } keys %line) . "\n",
	'the text view is unchanged');

###############################################################################
# 4 workers: one prober, one probe per server and interval

my @probers = map { /\[info\] (\d+)#\d+: upsync: upstream "cnt": this worker \(pid \d+\) now runs/ ? $1 : () }
	$t->grep_log(qr/upstream "cnt": this worker/);
is(scalar @probers, 1, 'one of 4 workers runs the checks of "cnt"');
ok(wait_for(sub { $b{c1}->connections_total >= 2 }, timeout => 5), 'c1 is probed');
# the next 4 probes take 3 to 4 intervals (the first comes anywhere in the
# current one); a probe from every worker would bring them within about one
my $n0 = $b{c1}->connections_total;
my %m0 = map { $_ => $b{$_}->connections_total } qw/c2 c3/;
my $t0 = time();
wait_for(sub { $b{c1}->connections_total >= $n0 + 4 }, timeout => 8, interval => 0.02);
my $took4 = time() - $t0;
ok($took4 >= 2.8 && $took4 <= 4.6,
	sprintf('4 more probes in %.2fs: one per interval of 1s, not one per worker', $took4));
# the other servers, probed at their own points of the interval, got as many
# in the same stretch (one fewer or more at its edges), not one per worker
my @got = map { $b{$_}->connections_total - $m0{$_} } qw/c2 c3/;
ok(!grep({ $_ < 3 || $_ > 5 } @got), "c2 and c3: @got probes in the same stretch (4 intervals)");

# the prober is killed: another worker takes over and probes on
$mark = $t->log_offset();
kill 'KILL', $probers[0];
my $next = wait_for(sub {
	my ($l) = $t->grep_log(qr/upstream "cnt": this worker \(pid \d+\) now runs/, from => $mark);
	$l && $l =~ /pid (\d+)\)/ && $1 != $probers[0] ? $1 : 0;
}, timeout => 5);
ok($next, "another worker ($next) took the checks over");
$n0 = $b{c1}->connections_total;
ok(wait_for(sub { $b{c1}->connections_total >= $n0 + 2 }, timeout => 5), 'and probes on');

my @bad = grep { !/worker process \d+ exited on signal 9$/ } $t->grep_log(qr/\[(alert|crit|emerg)\]/);
is(scalar @bad, 0, 'no alerts') or diag(join "\n", @bad);
