#!/usr/bin/perl

# Active UDP health checks, as NGINX Plus does them: a plain "health_check udp"
# sends a datagram and fails only on ICMP port unreachable (a server that
# never answers stays healthy); with a match, the datagram is the match's send
# (with \xHH escapes) and the answer must match its expect (no answer within
# health_check_timeout, a wrong answer or ICMP unreachable fail).

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

my $t = Test::Nginx->new(workers => 2)->has(qw/stream upsync/)->plan(17);

my ($u1, $u2, $u3, $e1, $w1, $none) = map { port($_) } 8091 .. 8096;

my $ups = '';
for my $u (qw/pu mu/) {
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
    match ping {
        send "\\x41BC\\x0d\\x0a";
        expect "ABC\\x0d";
    }
$ups
    server {
        listen 127.0.0.1:%%PORT_8080%% udp;
        proxy_pass pu;
        proxy_responses 1;
        proxy_timeout 1s;
        health_check udp interval=300ms;
        health_check_timeout 500ms;
    }
    server {
        listen 127.0.0.1:%%PORT_8081%% udp;
        proxy_pass mu;
        proxy_responses 1;
        proxy_timeout 1s;
        health_check udp interval=300ms match=ping;
        health_check_timeout 500ms;
    }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF

my $consul = Test::Nginx::Consul->start($t, port => port(8500));
my %b = (
	u1 => Test::Nginx::Backend->udp($t, port => $u1, id => 'u1'),
	u2 => Test::Nginx::Backend->udp($t, port => $u2, id => 'u2'),
	u3 => Test::Nginx::Backend->udp($t, port => $u3, id => 'u3', silent => 1),
	e1 => Test::Nginx::Backend->udp($t, port => $e1, id => 'e1', echo => 1),
	w1 => Test::Nginx::Backend->udp($t, port => $w1, id => 'w1', reply => "ABD\r\n"),
);
$consul->put("upstreams/pu/127.0.0.1:$_", '') for $u1, $u2;
$consul->put("upstreams/mu/127.0.0.1:$_", '') for $e1, $u3, $w1, $none;
$t->run();

sub json {
	my (undef, undef, $b) = http_parse(http_get(port(8088), '/?format=json', timeout => 3) // '');
	return eval { decode_json($b // '') };
}

sub hc {
	my ($u, $port) = @_;
	my $j = json() or return {};
	my ($s) = grep { $_->{server} eq "127.0.0.1:$port" } @{ $j->{upstreams}{$u}{servers} // [] };
	return $s && $s->{health} ? $s->{health} : {};
}

sub state { hc(@_)->{state} // '' }

# ids of the servers answering $n datagrams through the UDP proxy
sub udp_dist {
	my ($n) = @_;
	my %c;
	for (1 .. $n) {
		my $r = stream_udp(port(8080), "hi\n", timeout => 2) // '';
		$c{ $r =~ /^(\w+)/ ? $1 : '_fail' }++;
	}
	return \%c;
}

###############################################################################
# plain UDP checks

ok(wait_for(sub { state('pu', $u1) eq 'up' && state('pu', $u2) eq 'up'
	&& (hc('pu', $u2)->{checks} // 0) >= 2 }, timeout => 10), 'pu: both servers checked and up');
my $d = udp_dist(10);
ok($d->{u1} && $d->{u2}, 'datagrams reach both: ' . join(' ', %$d));

$b{u2}->stop;
ok(wait_for(sub { state('pu', $u2) eq 'unhealthy' }, timeout => 5), 'u2 stopped: unhealthy');
is(hc('pu', $u2)->{last_failure}, 'port unreachable (ICMP)', 'the reason: ICMP port unreachable');
ok($t->wait_for_log(qr/upstream "pu" server 127\.0\.0\.1:$u2 is unhealthy: port unreachable \(ICMP\)/, 3),
	'logged once with the reason');
$d = udp_dist(10);
ok(join(',', keys %$d) eq 'u1', 'datagrams reach u1 only: ' . join(' ', %$d));

$b{u2} = Test::Nginx::Backend->udp($t, port => $u2, id => 'u2');
ok(wait_for(sub { state('pu', $u2) eq 'up' }, timeout => 5), 'u2 back: up');
ok($t->wait_for_log(qr/upstream "pu" server 127\.0\.0\.1:$u2 is healthy again after \d+ checks/, 3),
	'logged: healthy again');

# a server that never answers is healthy for a plain UDP check
$consul->put("upstreams/pu/127.0.0.1:$u3", '');
ok(wait_for(sub { (hc('pu', $u3)->{checks} // 0) >= 3 }, timeout => 5), 'a silent server is checked');
my $h = hc('pu', $u3);
ok($h->{state} eq 'up' && $h->{checks_failed} == 0, 'and stays up (no ICMP error, as NGINX Plus)');
ok($b{u3}->connections_total >= 3, 'it got the datagrams');

###############################################################################
# UDP checks with a match (send with \xHH, expect)

ok(wait_for(sub { (hc('mu', $e1)->{checks} // 0) >= 2 }, timeout => 5), 'mu: checked');
$h = hc('mu', $e1);
ok($h->{state} eq 'up' && $h->{checks_failed} == 0,
	'an echo of "\x41BC\x0d\x0a" matches "ABC\x0d": the escapes are decoded');
ok(wait_for(sub { state('mu', $u3) eq 'unhealthy' }, timeout => 5)
	&& hc('mu', $u3)->{last_failure} eq 'no matching response within 500ms',
	'no answer: unhealthy after health_check_timeout');
ok(wait_for(sub { state('mu', $w1) eq 'unhealthy' }, timeout => 5)
	&& hc('mu', $w1)->{last_failure} eq 'the response does not match "ping"',
	'a wrong answer: unhealthy, the reason names the match');
ok(wait_for(sub { state('mu', $none) eq 'unhealthy' }, timeout => 5)
	&& hc('mu', $none)->{last_failure} eq 'port unreachable (ICMP)',
	'nothing listening: unhealthy (ICMP)');

my @bad = $t->grep_log(qr/\[(alert|crit|emerg)\]/);
is(scalar @bad, 0, 'no alerts') or diag(join "\n", @bad);
