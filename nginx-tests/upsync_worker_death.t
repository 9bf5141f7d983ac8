#!/usr/bin/perl

# A worker killed with -9 while it proxies a session: the session's hold on its
# server (the active count, which max_conns compares against) is given back,
# so the server is usable again and upstream_show shows active 0.  The same in
# a new generation of workers after a reload (the zone is kept), and for a
# server that is removed from the registry and added back around the death.

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

my $t = Test::Nginx->new(workers => 2)->has(qw/stream upsync/)->plan(33);

my %listen = (w1 => port(8081), w2 => port(8082), w3 => port(8083), w4 => port(8084));
my ($p1, $p2) = (port(8091), port(8092));

my $ups = '';
for my $u (sort keys %listen) {
	$ups .= <<"EOF";
    upstream $u {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/$u/ upsync_type=consul upsync_interval=500ms;
        upsync_dump_path %%TESTDIR%%/servers_$u.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
    server { listen 127.0.0.1:$listen{$u}; proxy_pass $u; proxy_connect_timeout 1s; }
EOF
}

$t->write_file_expand('nginx.conf', <<"EOF");
%%TEST_GLOBALS%%
events { }
stream {
$ups
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF

my $consul = Test::Nginx::Consul->start($t, port => port(8500));
my @backends = (Test::Nginx::Backend->tcp($t, port => $p1, id => 'b1'),
	Test::Nginx::Backend->tcp($t, port => $p2, id => 'b2'));
$consul->put("upstreams/$_/127.0.0.1:$p1", '{"max_conns":1}') for sort keys %listen;
$t->run();

sub json {
	my (undef, undef, $b) = http_parse(http_get(port(8088), '/?format=json', timeout => 3) // '');
	return eval { decode_json($b // '') };
}

# the JSON entry of server 127.0.0.1:$port in upstream $u (undef if not listed)
sub server_of {
	my ($u, $port) = @_;
	my $j = json() or return undef;
	my ($s) = grep { $_->{server} eq "127.0.0.1:$port" } @{ $j->{upstreams}{$u}{servers} // [] };
	return $s;
}

sub active { my $s = server_of(@_); return $s ? $s->{active} : 'absent' }

# wait until $u lists exactly the servers on @ports
sub synced {
	my ($u, @ports) = @_;
	my $want = join ',', sort map { "127.0.0.1:$_" } @ports;
	return wait_for(sub {
		my $j = json() or return 0;
		join(',', sort map { $_->{server} } @{ $j->{upstreams}{$u}{servers} // [] }) eq $want;
	}, timeout => 5);
}

# opens a session through $u and returns (client, greeting, owning worker)
sub hold {
	my ($u) = @_;
	my $s = Test::Nginx::Stream->new(port => $listen{$u}, timeout => 3) or return;
	my $g = $s->readline // '';
	my $w = wait_for(sub { $t->connection_owner($listen{$u}, $s->sockport) }, timeout => 2);
	return ($s, $g, $w);
}

# kill -9 the worker; true once the master has replaced it
sub kill_worker {
	my ($pid) = @_;
	return 0 unless $pid;
	my $mark = $t->log_offset();
	kill 'KILL', $pid;
	return wait_for(sub {
		my @w = $t->worker_pids();
		@w == 2 && !grep({ $_ == $pid } @w)
			&& $t->grep_log(qr/worker process $pid exited on signal 9/, from => $mark);
	}, timeout => 5);
}

# the greeting of one new session through $u ('' if it got no backend)
sub greeting {
	my ($u) = @_;
	my $r = stream_get($listen{$u}, timeout => 3) // '';
	return $r =~ s/\n.*//sr;
}

ok(synced($_, $p1), "$_: synced, one server with max_conns=1") for sort keys %listen;

###############################################################################
# w1: the worker holding the only session dies

my ($s, $g, $w) = hold('w1');
is($g, "b1\n", 'w1: session on b1');
ok($w, "w1: the session is held by worker " . ($w // '?'));
is(active('w1', $p1), 1, 'w1: active 1 while the session is open');

ok(kill_worker($w), 'w1: the owning worker is killed and replaced');
ok($s->closed(timeout => 3), 'w1: the client sees the session end');

my $off = $t->log_offset();
ok(wait_for(sub { active('w1', $p1) eq '0' }, timeout => 5),
	'w1: active back to 0 after the worker died (is ' . active('w1', $p1) . ')');
is(greeting('w1'), 'b1', 'w1: a new session gets the server');
is(scalar $t->grep_log(qr/no live upstreams/, from => $off), 0, 'w1: no "no live upstreams"');

###############################################################################
# a reload keeps the zone; a new generation's worker dies the same way

ok($t->reload(), 'reload');
ok(synced('w2', $p1), 'w2: set kept across the reload');
($s, $g, $w) = hold('w2');
is($g, "b1\n", 'w2: session on b1 (new generation)');
is(active('w2', $p1), 1, 'w2: active 1');
ok(kill_worker($w), 'w2: the owning worker is killed and replaced');
$off = $t->log_offset();
ok(wait_for(sub { active('w2', $p1) eq '0' }, timeout => 5),
	'w2: active back to 0 after the reload and the death (is ' . active('w2', $p1) . ')');
is(greeting('w2'), 'b1', 'w2: a new session gets the server');
is(active('w1', $p1), 0, 'w1: still 0 after the reload');

###############################################################################
# w3: the worker dies, then the server is removed and added back

($s, $g, $w) = hold('w3');
is($g, "b1\n", 'w3: session on b1');
ok(kill_worker($w), 'w3: the owning worker is killed');
$consul->put("upstreams/w3/127.0.0.1:$p2", '');
$consul->delete("upstreams/w3/127.0.0.1:$p1");
ok(synced('w3', $p2), 'w3: b1 removed (b2 stays)');
$consul->put("upstreams/w3/127.0.0.1:$p1", '{"max_conns":1}');
ok(synced('w3', $p1, $p2), 'w3: b1 added back');
is(active('w3', $p1), 0, 'w3: b1 comes back with active 0');

# two sessions held at once: one of them must be on b1 (max_conns 1, rr)
my @held = map { [hold('w3')] } 1 .. 2;
is(join(' ', sort map { $_->[1] =~ s/\n//r } @held), 'b1 b2', 'w3: b1 takes a session again');
is(active('w3', $p1), 1, 'w3: and counts it');
$_->[0]->close for @held;

###############################################################################
# w4: the server is removed while the session is open, then the worker dies,
# then the server is added back

($s, $g, $w) = hold('w4');
is($g, "b1\n", 'w4: session on b1');
$consul->put("upstreams/w4/127.0.0.1:$p2", '');
$consul->delete("upstreams/w4/127.0.0.1:$p1");
ok(synced('w4', $p2), 'w4: b1 removed while its session is open');
ok(kill_worker($w), "w4: the owning worker is killed");
$consul->put("upstreams/w4/127.0.0.1:$p1", '{"max_conns":1}');
ok(synced('w4', $p1, $p2), 'w4: b1 added back after the worker died');
is(active('w4', $p1), 0, 'w4: b1 comes back with active 0');

my @bad = grep { !/worker process \d+ exited on signal 9$/ } $t->grep_log(qr/\[(alert|crit|emerg)\]/);
is(scalar @bad, 0, 'no alerts, no worker died of anything but our kill -9') or diag(join "\n", @bad);
