#!/usr/bin/perl

# All upsync upstreams share one zone ("upsync", upsync_zone_size): one mapping
# however many upstreams there are; each upstream's memory is counted and shown,
# and capped by zone_size= when set. A registry that lists more servers than fit
# gets one error line that says how many are listed, how many fit and what to
# set, no allocator noise, the running set stays and serves, other upstreams
# keep changing, and the recovery is logged. The memory of an upstream removed
# by a reload is freed once its old workers are gone. A worker killed while it
# holds an upstream's lock does not stop the others.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;
use JSON::PP;

use Test::Nginx qw/ :DEFAULT port wait_for http_get http_parse /;
use Test::Nginx::Backend;
use Test::Nginx::Consul;
use Test::Nginx::Gdb;
use Test::Nginx::Stream qw/ stream_get /;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 2)->has(qw/stream upsync/)->plan(35);

my @small = map { sprintf 'u%02d', $_ } 0 .. 19;

sub conf {
	my (%o) = @_;
	my $ups = '';
	for my $u ('cap', 'big', grep { $_ ne ($o{without} // '') } @small) {
		my $cap = $u eq 'cap' ? 'zone_size=64k' : '';
		$ups .= <<"EOF";
    upstream $u {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/$u/ upsync_type=consul upsync_interval=200ms $cap;
        upsync_dump_path %%TESTDIR%%/servers_$u.conf;
        server 127.0.0.1:%%PORT_8081%%;
    }
EOF
	}
	return <<"EOF";
%%TEST_GLOBALS%%
events { }
stream {
    upsync_zone_size 1m;
$ups
    server { listen 127.0.0.1:%%PORT_8082%%; proxy_pass cap; proxy_connect_timeout 1s; }
    server { listen 127.0.0.1:%%PORT_8083%%; proxy_pass big; proxy_connect_timeout 1s; }
    server { listen 127.0.0.1:%%PORT_8084%%; proxy_pass u00; proxy_connect_timeout 1s; }
    server { listen 127.0.0.1:%%PORT_8085%%; proxy_pass u05; proxy_connect_timeout 1s; }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF
}

my $consul = Test::Nginx::Consul->start($t, port => port(8500));
my @b = map { Test::Nginx::Backend->tcp($t, port => port(8081 + 10 * $_), id => "b$_") } 0 .. 2;
my ($p0, $p1, $p2) = map { $_->port } @b;
$consul->put("upstreams/$_/127.0.0.1:$p0", '') for 'cap', 'big', @small;

sub json {
	my (undef, undef, $b) = http_parse(http_get(port(8088), '/?format=json', timeout => 3) // '');
	return eval { decode_json($b // '') };
}

sub servers_of {
	my ($u) = @_;
	my $j = json() or return '';
	return join ',', sort map { $_->{server} } @{ $j->{upstreams}{$u}{servers} // [] };
}

sub index_of { my $j = json() or return 0; $j->{upstreams}{$_[0]}{upsync}{index} // 0 }

# the registry's index after the last write
sub registry_index { $consul->get('/v1/kv/upstreams/?keys')->{headers}{'x-consul-index'} }

# $n servers 127.0.0.2:20000.. for upstream $u, written in transactions of 64
sub register_many {
	my ($u, $n) = @_;
	my @keys = map { "upstreams/$u/127.0.0.2:" . (20000 + $_) } 1 .. $n;
	while (my @chunk = splice @keys, 0, 64) {
		$consul->txn(map { [set => $_, ''] } @chunk);
	}
}

sub too_many { scalar $t->grep_log(qr/\[error\].*upstream "$_[0]".*the registry lists/) }

# big lists more servers than the whole zone holds from the start
register_many('big', 6000);
$t->write_file_expand('nginx.conf', conf());
$t->run();

ok(wait_for(sub { my $j = json(); $j && (grep { @{ $_->{servers} } == 1 && $_->{upsync}{index} > 1 }
	values %{ $j->{upstreams} }) == 22 }, timeout => 10), '22 upstreams synced');

###############################################################################
# one mapping for all upstreams, memory per upstream in the status views

{
	my ($w) = $t->worker_pids;
	my $maps = do { local $/; open my $fh, '<', "/proc/$w/maps" or die "maps: $!"; <$fh> };
	my @zones = grep { m{/dev/zero|SYSV} } split /\n/, $maps;
	# mapping addresses are 64-bit
	no warnings 'portable';
	my @mb = grep { my ($a, $z) = /^([0-9a-f]+)-([0-9a-f]+)/; hex($z) - hex($a) == 1048576 } @zones;
	is(scalar @mb, 1, 'one 1m shared mapping for 22 upstreams')
		or diag(join "\n", @zones);

	my $j = json();
	my $m = $j->{upstreams}{cap}{upsync}{memory};
	is($m->{cap}, 65536, 'cap: memory cap shown');
	ok($m->{used} > 0 && $m->{used} < 65536, "cap: memory used shown ($m->{used})");
	ok(!defined $j->{upstreams}{big}{upsync}{memory}{cap}, 'big: no cap');
	ok($m->{zone_size} > 900_000 && $m->{zone_size} <= 1048576, "zone size shown ($m->{zone_size})");
	my (undef, undef, $prom) = http_parse(http_get(port(8088), '/?format=prometheus', timeout => 3) // '');
	like($prom, qr/^upsync_upstream_memory_bytes\{upstream="cap"\} \d+$/m, 'prometheus: memory per upstream');
	like($prom, qr/^upsync_shared_zone_free_bytes\{\} \d+$/m, 'prometheus: shared zone free bytes');
}

###############################################################################
# over an upstream's cap: one line, the set stays, recovery

{
	my $mark = $t->log_offset;
	register_many('cap', 300);
	my $idx = registry_index();
	ok(wait_for(sub { too_many('cap') }, timeout => 10), 'cap: the registry lists more than fit');
	my ($line) = $t->grep_log(qr/upstream "cap".*the registry lists/, from => $mark);
	like($line, qr/lists \d+ servers, about \d+ fit .*keeping the current \d+; raise this upstream's zone_size= to at least \d+m/,
		'cap: the line says how many are listed and fit, and what to raise');
	my ($listed, $fit) = $line =~ /lists (\d+) servers, about (\d+) fit/;
	ok($fit > 10 && $fit < $listed, "cap: fewer fit than are listed ($fit of $listed)");
	my $n = () = servers_of('cap') =~ /,/g;
	ok($n + 1 < $listed && servers_of('cap') =~ /\Q127.0.0.1:$p0\E/, 'cap: the last set that fit stays');
	# the other servers refuse connections: nginx moves on until it reaches b0
	is(stream_get(port(8082)), "b0\n", 'cap: and serves');

	# another change of the same state: no second line
	$consul->put("upstreams/cap/127.0.0.2:30000", '');
	my $after = registry_index();
	ok(wait_for(sub { index_of('cap') >= $after }, timeout => 5), 'cap: the next answer was read');
	is(too_many('cap'), 1, 'cap: still one line');

	# back under the cap
	$consul->txn([ 'delete-tree' => 'upstreams/cap/127.0.0.2' ], [ set => "upstreams/cap/127.0.0.1:$p1", '' ]);
	ok(wait_for(sub { servers_of('cap') eq join ',', sort "127.0.0.1:$p0", "127.0.0.1:$p1" }, timeout => 5),
		'cap: a set that fits applies');
	ok(scalar $t->grep_log(qr/upstream "cap".*the registry's 2 servers fit in the shared zone again/, from => $mark),
		'cap: the recovery is logged');
}

###############################################################################
# over the shared zone: the advice is upsync_zone_size; other upstreams go on

{
	my $mark = $t->log_offset;
	ok(wait_for(sub { too_many('big') }, timeout => 20), 'big: the registry lists more than the zone holds');
	my ($line) = $t->grep_log(qr/upstream "big".*the registry lists/);
	like($line, qr/lists 6001 servers, about \d+ fit .*keeping the current 1; set "upsync_zone_size \d+m;" in the stream block \(now 1m\)/,
		'big: the line says what to set in the stream block');
	is(stream_get(port(8083)), "b0\n", 'big: the running set serves');

	# a change to another upstream still applies
	$consul->put("upstreams/u05/127.0.0.1:$p2", '');
	$consul->delete("upstreams/u05/127.0.0.1:$p0");
	ok(wait_for(sub { servers_of('u05') eq "127.0.0.1:$p2" }, timeout => 5), 'u05: changes while big does not fit');
	is(stream_get(port(8085)), "b2\n", 'u05: and reach traffic');

	is(scalar $t->grep_log(qr/ngx_slab_alloc\(\) failed/), 0, 'no allocator lines');
	is(too_many('big'), 1, 'big: one line');

	$consul->delete_tree('upstreams/big/127.0.0.2');
	$consul->put("upstreams/big/127.0.0.1:$p1", '');
	ok(wait_for(sub { servers_of('big') eq join ',', sort "127.0.0.1:$p0", "127.0.0.1:$p1" }, timeout => 10),
		'big: a set that fits applies');
	ok(scalar $t->grep_log(qr/upstream "big".*fit in the shared zone again/, from => $mark),
		'big: the recovery is logged');
}

###############################################################################
# an upstream removed by a reload: its memory is freed once its workers are gone

{
	my $mark = $t->log_offset;
	ok($t->reload(conf => conf(without => 'u19')), 'reload without u19');
	ok(wait_for(sub { $t->worker_pids(all => 1) == 2 }, timeout => 10), 'old workers gone');
	ok($t->reload(conf => conf(without => 'u19')), 'another reload');
	ok($t->wait_for_log(qr/freed the shared memory of 1 upstream\(s\) no longer configured/, 5, from => $mark),
		'the removed upstream\'s memory is freed');
	is(stream_get(port(8084)), "b0\n", 'u00 serves after the reloads');
}

###############################################################################
# a worker killed while it holds an upstream's lock

SKIP: {
	skip 'no gdb', 4 unless Test::Nginx::Gdb::available();
	my $poller = json()->{upstreams}{u00}{upsync}{poller_pid};
	skip 'no poller for u00', 4 unless $poller;
	# stops where the polling worker allocates a new set, its lock held
	my $g = Test::Nginx::Gdb->freeze_at($t, $poller, 'ngx_slab_alloc')
		or skip 'gdb cannot attach', 4;
	my $mark = $t->log_offset;
	$consul->put("upstreams/u00/127.0.0.1:$p1", '');
	ok($g->wait_hit(10), 'the poller stopped with u00\'s lock held');
	kill 'KILL', $poller;
	$g->release;
	ok(wait_for(sub { servers_of('u00') =~ /\Q127.0.0.1:$p0\E/ }, timeout => 10),
		'the status view reads u00 again');
	my $got = stream_get(port(8084));
	ok($got eq "b0\n" || $got eq "b1\n", 'u00 serves again');
	ok($t->wait_for_log(qr/\[alert\].*shared zone lock was held by process $poller, which is gone; taken back/, 10,
		from => $mark), 'the lock taken back is logged');
}
