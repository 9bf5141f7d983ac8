#!/usr/bin/perl

# Every upsync_lb method on a synced set: distribution by weight, ketama
# placement identical to nginx's own "hash ... consistent" for the same
# servers and keys, ~1/N of keys moving when a server is added, least_conn,
# max_conns across 4 workers, UDP upstreams, and "zone" in the same upstream.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;
use IO::Socket::INET;
use Socket qw/SOL_SOCKET SO_REUSEADDR/;

use Test::Nginx qw/ :DEFAULT port wait_for http_get http_parse show_section stream_udp /;
use Test::Nginx::Backend;
use Test::Nginx::Stream;
use Test::Nginx::Consul;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 4)->has(qw/stream upsync/)->plan(29);

my @p = map { port(8081 + $_) } 0 .. 4;          # 5 backends
my ($u1, $u2) = (port(8091), port(8092));         # UDP backends
my $seed = port(8099);

# stock upstream with the same 4 servers, in the same (address) order
my $stock = join "\n", map { "        server 127.0.0.1:$_;" } sort { $a <=> $b } @p[0 .. 3];

my $ups = '';
for my $m (qw/rr lc lcs ket mod rnd two udp zoned ss/) {
	# lcs: the C module's form, the stock directive next to upsync_lb
	my %lb = (rr => '', lc => 'upsync_lb least_conn;', lcs => "least_conn;\n        upsync_lb least_conn;", ket => 'upsync_lb hash_ketama $remote_port;',
		mod => 'upsync_lb hash $remote_port;', rnd => 'upsync_lb random;',
		two => 'upsync_lb random two;', udp => '', zoned => 'zone zoned 64k;', ss => '');
	$ups .= <<"EOF";
    upstream $m {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/$m/ upsync_type=consul upsync_interval=200ms;
        upsync_dump_path %%TESTDIR%%/servers_$m.conf;
        $lb{$m}
        server 127.0.0.1:$seed;
    }
EOF
}

$t->write_file_expand('nginx.conf', <<"EOF");
%%TEST_GLOBALS%%
events { }
stream {
$ups
    upstream stock {
        hash \$remote_port consistent;
$stock
    }
    server { listen 127.0.0.1:%%PORT_8060%%; proxy_pass rr; }
    server { listen 127.0.0.1:%%PORT_8061%%; proxy_pass lc; }
    server { listen 127.0.0.1:%%PORT_8071%%; proxy_pass lcs; }
    server { listen 127.0.0.1:%%PORT_8062%%; proxy_pass ket; }
    server { listen 127.0.0.1:%%PORT_8069%%; proxy_pass ket; }
    server { listen 127.0.0.1:%%PORT_8063%%; proxy_pass mod; }
    server { listen 127.0.0.1:%%PORT_8064%%; proxy_pass rnd; }
    server { listen 127.0.0.1:%%PORT_8065%%; proxy_pass two; }
    server { listen 127.0.0.1:%%PORT_8066%% udp; proxy_pass udp; proxy_responses 1; proxy_timeout 1s; }
    server { listen 127.0.0.1:%%PORT_8067%%; proxy_pass zoned; }
    server { listen 127.0.0.1:%%PORT_8068%%; proxy_pass stock; }
    server { listen 127.0.0.1:%%PORT_8070%%; proxy_pass ss; }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF

my $consul = Test::Nginx::Consul->start($t, port => port(8500));
my @backends = ((map { Test::Nginx::Backend->tcp($t, port => $p[$_], id => "b$_") } 0 .. 4),
	Test::Nginx::Backend->udp($t, port => $u1, id => 'u1'),
	Test::Nginx::Backend->udp($t, port => $u2, id => 'u2'));

# weights 3:1 for rr/lc/rnd/two/zoned; 4 equal servers for the hashes
for my $m (qw/rr lc lcs rnd two zoned/) {
	$consul->put("upstreams/$m/127.0.0.1:$p[0]", '{"weight":3}');
	$consul->put("upstreams/$m/127.0.0.1:$p[1]", '{"weight":1}');
}
for my $m (qw/ket mod/) {
	$consul->put("upstreams/$m/127.0.0.1:$p[$_]", '') for 0 .. 3;
}
$consul->put("upstreams/ss/127.0.0.1:$p[0]", '');
$consul->put("upstreams/udp/127.0.0.1:$u1", '');
$consul->put("upstreams/udp/127.0.0.1:$u2", '');

$t->run();

sub section { show_section(port(8088), $_[0]) }

ok(wait_for(sub {
	!grep({ section($_) !~ /count: 2\n/ } qw/rr lc lcs rnd two zoned udp/)
		&& section('ket') =~ /count: 4\n/ && section('mod') =~ /count: 4\n/
}, timeout => 10), 'all upstreams synced');

# Client ports chosen by the test sit above the kernel's ephemeral range, so no
# connection nginx or the harness opens can hold them.
my $range = '';
if (open(my $f, '<', '/proc/sys/net/ipv4/ip_local_port_range')) {
	$range = <$f>;
}
my ($eph_hi) = ($range // '') =~ /(\d+)\s*$/;
use constant LOCAL_BASE => 62000;
die "ephemeral ports reach into the test's client ports\n" if ($eph_hi // 60999) >= LOCAL_BASE;

# one connection from a chosen local port; returns the backend id
sub via_port {
	my ($port, $local) = @_;
	my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$port", LocalAddr => '127.0.0.1',
		LocalPort => $local, ReuseAddr => 1, Timeout => 3) or return "connect: $!";
	$s->timeout(3);
	my $l = <$s> // '';
	close $s;
	chomp $l;
	return $l;
}

###############################################################################
# Distribution by weight

my $c = count_by_backend($t, port(8060), 400);
is_deeply($c, { b0 => 300, b1 => 100 }, 'roundrobin 3:1 across 4 workers: exactly 300/100');

# the C module's form: least_conn; next to upsync_lb least_conn; is accepted
# with a notice and balances the same
ok(scalar $t->grep_log(qr/\[notice\].*upstream "lcs": "least_conn" is upsync_lb's method \(the C module's form\)/),
	'least_conn; next to upsync_lb least_conn: accepted with a notice');
{
	my @open = map { Test::Nginx::Stream->new(port => port(8071)) } 1 .. 12;
	my %n;
	$n{ ($_->readline // '') =~ s/\n//r }++ for @open;
	is_deeply(\%n, { b0 => 9, b1 => 3 }, 'least_conn; (C module form): 12 open sessions split 9:3');
	$_->close for @open;
	ok(wait_for(sub { $backends[0]->open_connections == 0 && $backends[1]->open_connections == 0 },
		timeout => 5), 'those sessions closed');
}

# least_conn with sessions held open: each new session goes to the lowest
# connections/weight, so 12 open sessions over weights 3:1 end exactly 9:3
{
	my @open = map { Test::Nginx::Stream->new(port => port(8061)) } 1 .. 12;
	my %n;
	$n{ ($_->readline // '') =~ s/\n//r }++ for @open;
	is_deeply(\%n, { b0 => 9, b1 => 3 }, 'least_conn: 12 open sessions over weights 3:1 split 9:3');
	$_->close for @open;
	ok(wait_for(sub { $backends[0]->open_connections == 0 && $backends[1]->open_connections == 0 },
		timeout => 5), 'least_conn sessions closed');
}

$c = count_by_backend($t, port(8064), 800);
ok(abs(($c->{b0} // 0) - 600) <= 60, 'random 3:1 within 10% (b0=' . ($c->{b0} // 0) . ')');

# random two also weighs load (sessions still closing), so only the direction holds
$c = count_by_backend($t, port(8065), 800);
ok(($c->{b0} // 0) >= 440 && ($c->{b1} // 0) >= 80 && ($c->{b0} // 0) + ($c->{b1} // 0) == 800,
	'random two: both used, the heavier one takes most (b0=' . ($c->{b0} // 0) . ')');

$c = count_by_backend($t, port(8067), 400);
is_deeply($c, { b0 => 300, b1 => 100 }, 'zone directive in the same upstream: no crash, same balancing');

# hash_modula on $remote_port spreads keys over all 4 servers
my %mod;
$mod{ via_port(port(8063), LOCAL_BASE + $_) }++ for 1 .. 200;
is(scalar(grep { /^b[0-3]$/ } keys %mod), 4, 'hash_modula: keys spread over all 4 servers');
ok(!grep({ $_ > 90 } values %mod), 'hash_modula: no server takes more than 45% of 200 keys')
	or diag(explain \%mod);

###############################################################################
# ketama: the same placement as nginx's own consistent hash

my (%ket, $same);
for my $k (1 .. 200) {
	my $local = LOCAL_BASE + 1000 + $k;
	my $a = via_port(port(8062), $local);
	my $b = via_port(port(8068), $local);
	$ket{$local} = $a;
	$same++ if $a eq $b && $a =~ /^b\d$/;
}
is($same, 200, 'hash_ketama places all 200 keys exactly like "hash $remote_port consistent"')
	or diag(join ' ', map { "$_=$ket{$_}" } grep { $ket{$_} !~ /^b\d$/ } sort keys %ket);

# Adding a 5th server moves about 1/5 of the keys, all of them to the new
# server. The key is the client's port: the "after" connections use the same
# ports through a second listener of the same upstream (the first one still
# has those ports in TIME_WAIT).
$consul->put("upstreams/ket/127.0.0.1:$p[4]", '');
ok(wait_for(sub { section('ket') =~ /count: 5\n/ }, timeout => 5), 'ketama: 5th server added');
my ($moved, $elsewhere) = (0, 0);
for my $k (1 .. 200) {
	my $local = LOCAL_BASE + 1000 + $k;
	my $now = via_port(port(8069), $local);
	next if $now eq $ket{$local};
	$moved++;
	$elsewhere++ if $now ne 'b4';
}
ok($moved >= 20 && $moved <= 70, "ketama: $moved of 200 keys moved (ideal 40)");
is($elsewhere, 0, 'ketama: keys only move to the new server');

###############################################################################
# max_conns holds across 4 workers

$consul->put("upstreams/lc/127.0.0.1:$p[0]", '{"weight":3,"max_conns":2}');
$consul->put("upstreams/lc/127.0.0.1:$p[1]", '{"weight":1}');
ok(wait_for(sub { section('lc') =~ /:$p[0] weight=3 max_fails=2 fail_timeout=10s max_conns=2;/ }, timeout => 5),
	'max_conns=2 applied');
my @held;
for (1 .. 12) {
	my $s = Test::Nginx::Stream->new(port => port(8061));
	my $l = $s->readline // '';
	push @held, [$s, $l];
}
my %open;
$open{ $_->[1] }++ for @held;
is($open{"b0\n"} // 0, 2, 'least_conn + max_conns: b0 holds exactly 2 of 12 open sessions');
is($open{"b1\n"} // 0, 10, 'the other 10 go to b1');
ok(wait_for(sub { $backends[0]->open_connections == 2 }, timeout => 5), 'b0 sees 2 open connections');
$_->[0]->close for @held;
ok(wait_for(sub { $backends[0]->open_connections == 0 && $backends[1]->open_connections == 0 }, timeout => 5),
	'sessions closed');

###############################################################################
# UDP upstreams

my %udp;
for (1 .. 20) {
	my $r = stream_udp(port(8066), "ping") // 'none';
	chomp $r;
	$udp{$r}++;
}
is_deeply(\%udp, { u1 => 10, u2 => 10 }, 'UDP: datagrams balanced over the synced servers');
$consul->delete("upstreams/udp/127.0.0.1:$u1");
ok(wait_for(sub { section('udp') =~ /count: 1\n/ }, timeout => 5), 'UDP: server removed');
%udp = ();
for (1 .. 10) {
	my $r = stream_udp(port(8066), "ping") // 'none';
	chomp $r;
	$udp{$r}++;
}
is_deeply(\%udp, { u2 => 10 }, 'UDP: the change applies');

###############################################################################
# slow_start: a server added with slow_start=3s takes a growing share

ok(wait_for(sub { section('ss') =~ /count: 1\n/ }, timeout => 5), 'slow_start upstream synced');
use Time::HiRes ();
my $t0 = Time::HiRes::time();
$consul->put("upstreams/ss/127.0.0.1:$p[1]", '{"slow_start":"3s"}');
ok(wait_for(sub { section('ss') =~ /count: 2\n/ }, timeout => 5), 'slow_start: server added');
$c = count_by_backend($t, port(8070), 100);
ok(($c->{b1} // 0) < 30, 'slow_start: early share well under half (' . ($c->{b1} // 0) . '/100)');
my $full = wait_for(sub {
	my $c = count_by_backend($t, port(8070), 100);
	($c->{b1} // 0) >= 45 ? Time::HiRes::time() : 0;
}, timeout => 8, interval => 0.1);
ok($full && $full - $t0 >= 1.5, sprintf('slow_start: full share only after the ramp (%.1fs)', ($full || 0) - $t0));

my @bad = $t->grep_log(qr/\[(alert|crit|emerg)\]/);
is(scalar @bad, 0, 'no alerts') or diag(join '', @bad);
