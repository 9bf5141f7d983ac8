#!/usr/bin/perl

# Behind something that cuts quiet connections (a cloud load balancer, a proxy,
# NAT): the registry is reached through a proxy that closes connections idle for
# 2 s. A long poll closed with no answer is an idle cut, not an error: asked
# again at once, logged at info; once cuts repeat, long polls are kept shorter
# than the cut (one notice), so changes keep arriving at once. Consul (its wait=
# shortened) and etcd v3 (the watch re-sent before the cut).

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;

use Test::Nginx qw/ :DEFAULT port wait_for show_section /;
use Test::Nginx::Consul;
use Test::Nginx::Etcd;
use Test::Nginx::IdleProxy;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 2)->has(qw/stream upsync/);
my $etcd_ok = Test::Nginx::Etcd->available;
$t->plan(17);

$t->write_file_expand('nginx.conf', <<'EOF');
%%TEST_GLOBALS%%
events { }
stream {
    upstream kv {
        upsync 127.0.0.1:%%PORT_8501%%/v1/kv/upstreams/kv/ upsync_type=consul
               upsync_interval=5s upsync_timeout=6m;
        upsync_dump_path %%TESTDIR%%/servers_kv.conf;
        server 127.0.0.1:1;
    }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF

my $consul = Test::Nginx::Consul->start($t, port => port(8500));
my $proxy = Test::Nginx::IdleProxy->start($t, port => port(8501), to => port(8500), idle => 2);
$consul->put('upstreams/kv/127.0.0.1:10001', '');
$t->run();

sub section { show_section(port(8088), $_[0]) }

sub changes_arrive {
	my ($label, $name, $put) = @_;
	my $slow = 0;
	for my $i (1 .. 5) {
		my $p = 10100 + $i;
		$put->($p);
		$slow++ unless wait_for(sub { section($name) =~ /:$p / }, timeout => 0.2, interval => 0.01);
		# spread the changes over the poll cycle
		select undef, undef, undef, 0.3 + 0.1 * $i;
	}
	is($slow, 0, "$label: 5 changes over several poll cycles, each within 200 ms");
}

ok(wait_for(sub { section('kv') =~ /count: 1\n/ }, timeout => 5), 'consul: synced through the proxy');
ok($t->wait_for_log(qr/\[info\].*upstream "kv".*the long poll was closed after \d+ms without an answer.*asking again/, 10),
	'consul: an idle cut is logged at info');
ok($t->wait_for_log(qr/\[notice\].*upstream "kv".*quiet registry connections are cut after about \d+ms: long polls now last at most \d+ms/, 10),
	'consul: once cuts repeat, one notice with the time it settled on');
my $cuts = $proxy->cuts;
changes_arrive('consul', 'kv', sub { $consul->put("upstreams/kv/127.0.0.1:$_[0]", '') });
# long polls now end before the proxy cuts them
my $mark = $t->log_offset();
ok(!$t->wait_for_log(qr/upstream "kv".*the long poll was closed/, 5, from => $mark), 'consul: no more cuts');
ok($proxy->cuts <= $cuts + 1, 'consul: the proxy cut no more long polls');
my @notices = $t->grep_log(qr/long polls now last at most/);
is(scalar @notices, 1, 'consul: the notice once');

###############################################################################
# etcd v3: the watch is the client's to end

SKIP: {
	skip 'no etcd', 7 unless $etcd_ok;
	my $etcd = Test::Nginx::Etcd->start($t, port => port(2379), peer_port => port(2380));
	my $eproxy = Test::Nginx::IdleProxy->start($t, port => port(2381), to => port(2379), idle => 2);
	$etcd->v3_put('/upstreams/e/127.0.0.1:10002', '');
	my $t2 = Test::Nginx->new(workers => 1);
	$t2->write_file_expand('nginx.conf', <<'EOF');
%%TEST_GLOBALS%%
events { }
stream {
    upstream e {
        upsync 127.0.0.1:%%PORT_2381%%/upstreams/e/ upsync_type=etcdv3 upsync_timeout=6m;
        upsync_dump_path %%TESTDIR%%/servers_e.conf;
        server 127.0.0.1:1;
    }
    server { listen 127.0.0.1:%%PORT_8089%%; upstream_show; }
}
EOF
	$t2->run();
	my $esec = sub { show_section(port(8089), 'e') };
	ok(wait_for(sub { $esec->() =~ /count: 1\n/ }, timeout => 5), 'etcd v3: synced through the proxy');
	ok($t2->wait_for_log(qr/\[notice\].*upstream "e".*long polls now last at most \d+ms/, 12),
		'etcd v3: the watch is kept shorter than the cut');
	my $slow = 0;
	for my $i (1 .. 5) {
		my $p = 10200 + $i;
		$etcd->v3_put("/upstreams/e/127.0.0.1:$p", '');
		$slow++ unless wait_for(sub { $esec->() =~ /:$p / }, timeout => 0.2, interval => 0.01);
		select undef, undef, undef, 0.3 + 0.1 * $i;
	}
	is($slow, 0, 'etcd v3: 5 changes, each within 200 ms');
	$mark = $t2->log_offset();
	ok(!$t2->wait_for_log(qr/upstream "e".*the long poll was closed/, 5, from => $mark), 'etcd v3: no more cuts');
	my @e = $t2->grep_log(qr/\[error\].*upstream "e"/);
	is(scalar @e, 0, 'etcd v3: no error lines') or diag(join '', @e);
	ok(!$t2->grep_log(qr/truncated/), 'etcd v3: nothing called truncated');
	$t2->stop;
	ok(1, 'etcd v3: done');
}

my @errors = $t->grep_log(qr/\[error\].*upstream "kv"/);
is(scalar @errors, 0, 'consul: no error lines') or diag(join '', @errors);
ok(!$t->grep_log(qr/truncated/), 'consul: nothing called truncated');
ok(!$t->grep_log(qr/registry answers again/), 'consul: no outage and recovery pairs');

###############################################################################
