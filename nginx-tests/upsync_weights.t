#!/usr/bin/perl

# Registry weights and the ketama ring.  weight 10000 (the largest a registry
# entry may carry) on three servers with hash_ketama: keys spread over all
# three exactly as nginx's own "hash ... consistent" places them, and every
# connection is served promptly.  weight 1000000 is an invalid entry: one
# error line naming the upstream, the entry and the value, traffic keeps
# going to the good servers, and the worker never stalls building a ring of
# 160 million points.
#
# The worker's address space is capped (prlimit) before the bad entry is
# written, so a build that accepts the entry fails its allocation instead of
# taking 1.2 GB of the machine's memory.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;
use IO::Socket::INET;
use IO::Select;
use Time::HiRes qw/time/;

use Test::Nginx qw/ :DEFAULT port wait_for http_get show_section /;
use Test::Nginx::Backend;
use Test::Nginx::Consul;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 1)->has(qw/stream upsync/);
$t->skip_all('prlimit(1) is needed to cap the worker memory') unless Test::Nginx::which('prlimit');
$t->plan(15);

my @p = map { port(8081 + $_) } 0 .. 3;

# stock upstream with the same 3 servers, in address order, at weight 500: a
# total weight (1,500) under the bound of the module's ring (nginx's ring exactly
# up to a total of 1,638; beyond it the ring is bounded, see README)
my $stock = join "\n", map { "        server 127.0.0.1:$_ weight=500;" } sort { $a <=> $b } @p[0 .. 2];

$t->write_file_expand('nginx.conf', <<"EOF");
%%TEST_GLOBALS%%
events { }
stream {
    upstream heavy {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/heavy/ upsync_type=consul upsync_interval=200ms;
        upsync_dump_path %%TESTDIR%%/servers_heavy.conf;
        upsync_lb hash_ketama \$remote_port;
        server 127.0.0.1:%%PORT_8089%%;
    }
    upstream mid {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/mid/ upsync_type=consul upsync_interval=200ms;
        upsync_dump_path %%TESTDIR%%/servers_mid.conf;
        upsync_lb hash_ketama \$remote_port;
        server 127.0.0.1:%%PORT_8089%%;
    }
    upstream huge {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/huge/ upsync_type=consul upsync_interval=200ms;
        upsync_dump_path %%TESTDIR%%/servers_huge.conf;
        upsync_lb hash_ketama \$remote_port;
        server 127.0.0.1:%%PORT_8089%%;
    }
    upstream stock {
        hash \$remote_port consistent;
$stock
    }
    server { listen 127.0.0.1:%%PORT_8060%%; proxy_pass heavy; }
    server { listen 127.0.0.1:%%PORT_8061%%; proxy_pass stock; }
    server { listen 127.0.0.1:%%PORT_8062%%; proxy_pass huge; proxy_connect_timeout 1s; }
    server { listen 127.0.0.1:%%PORT_8063%%; proxy_pass mid; }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF

my $consul = Test::Nginx::Consul->start($t, port => port(8500));
my @backends = map { Test::Nginx::Backend->tcp($t, port => $p[$_], id => "b$_") } 0 .. 3;
$consul->put("upstreams/heavy/127.0.0.1:$p[$_]", '{"weight":10000}') for 0 .. 2;
$consul->put("upstreams/mid/127.0.0.1:$p[$_]", '{"weight":500}') for 0 .. 2;
$consul->put("upstreams/huge/127.0.0.1:$p[$_]", '') for 0 .. 1;
$t->run();

sub section { show_section(port(8088), $_[0]) }

ok(wait_for(sub { section('heavy') =~ /count: 3\n/ && section('huge') =~ /count: 2\n/
		&& section('mid') =~ /count: 3\n/ }, timeout => 5),
	'synced');

# Client ports chosen by the test sit above the kernel's ephemeral range (and
# apart from the ones upsync_lb.t uses).
my ($eph_hi) = (($t->read_file('/proc/sys/net/ipv4/ip_local_port_range') // '') =~ /(\d+)\s*$/);
use constant LOCAL_BASE => 64000;
die "ephemeral ports reach into the test's client ports\n" if ($eph_hi // 60999) >= LOCAL_BASE;

# one connection from a chosen local port: (greeting, seconds it took)
sub via_port {
	my ($port, $local) = @_;
	my $t0 = time;
	my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$port", LocalAddr => '127.0.0.1',
		LocalPort => $local, ReuseAddr => 1, Timeout => 10) or return ("connect: $!", time - $t0);
	my $l = '';
	if (IO::Select->new($s)->can_read(10)) {
		$l = <$s> // '';
	}
	close $s;
	chomp $l;
	return ($l, time - $t0);
}

###############################################################################
# weight 10000 on three servers

# the first connection after the change: the ring (bounded, built once by the
# poller outside the lock) is already there; timed apart from the others
my ($first, $took_first) = via_port(port(8060), LOCAL_BASE);
ok($first =~ /^b[0-2]$/ && $took_first < 2,
	sprintf('weight 10000 x3: the first connection (the ring is built) served within 2s (%s, %.2fs)',
		$first, $took_first));

my %n;
my ($same, $slowest) = (0, 0);
for my $k (1 .. 60) {
	my ($a, $took) = via_port(port(8060), LOCAL_BASE + $k);
	my ($m) = via_port(port(8063), LOCAL_BASE + $k);
	my ($b) = via_port(port(8061), LOCAL_BASE + $k);
	$n{$a}++;
	$same++ if $m eq $b && $m =~ /^b\d$/;
	$slowest = $took if $took > $slowest;
}
is(scalar(grep { /^b[0-2]$/ } keys %n), 3, 'weight 10000 x3: keys spread over all three servers')
	or diag(explain \%n);
is($same, 60, 'weight 500 x3: every key placed as "hash $remote_port consistent" places it');
ok($slowest < 2, sprintf('weight 10000 x3: the next 120 connections each served within 2s (slowest %.2fs)', $slowest));

###############################################################################
# weight 1000000: an invalid entry

my $worker = ($t->worker_pids)[0];
my $cap = Test::Nginx::vm_size($t->master_pid);
$cap = Test::Nginx::vm_size($worker) if Test::Nginx::vm_size($worker) > $cap;
$cap += 128 << 20;
ok($cap > 128 << 20 && $t->limit_address_space($cap),
	sprintf('worker memory capped at %d MB', $cap >> 20));

my $off = $t->log_offset();
$consul->put("upstreams/huge/127.0.0.1:$p[3]", '{"weight":1000000}');
my $line = $t->wait_for_log(qr/\[(?:error|warn)\].*upstream "huge".*127\.0\.0\.1:$p[3].*"weight": 1000000\b/,
	5, from => $off);
ok($line, 'weight 1000000: an error line names the upstream, the entry and the value')
	or diag($t->tail_log(5));

# the next connections are served by the good servers, promptly
# (at most 10; a failure ends the loop: on a build that accepts the entry each
# connection costs a worker)
my %h;
my $slow = 0;
for (1 .. 10) {
	my $t0 = time;
	my $r = stream_get(port(8062), timeout => 3) // '';
	$r =~ s/\n.*//s;
	$h{ length $r ? $r : 'none' }++;
	$slow = time - $t0 if time - $t0 > $slow;
	last unless $r =~ /^b[01]$/;
}
is(($h{b0} // 0) + ($h{b1} // 0), 10, 'weight 1000000: traffic keeps flowing to the good servers')
	or diag(explain \%h);
ok($slow < 2, sprintf('weight 1000000: every connection served within 2s (slowest %.2fs)', $slow));

my $t0 = time;
my $show = http_get(port(8088), '/', timeout => 2) // '';
ok($show =~ /Upstream name: huge;/ && time - $t0 < 2, 'upstream_show answers within 2s');
unlike(section('huge'), qr/:$p[3] /, 'the invalid entry is not in the set');
ok(section('huge') =~ /count: 2\n/ && section('huge') =~ /:$p[0] / && section('huge') =~ /:$p[1] /,
	'the good servers stay');
is(scalar($t->grep_log(qr/exited on signal/)), 0, 'no worker died')
	or diag(join "\n", $t->grep_log(qr/exited on signal/));
ok((grep { $_ == $worker } $t->worker_pids), 'the worker is the same process');

my @bad = $t->grep_log(qr/\[(alert|crit|emerg)\]/);
is(scalar @bad, 0, 'no alerts') or diag(join "\n", @bad);
