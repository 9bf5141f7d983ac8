#!/usr/bin/perl

# Consul faults and balancer states: strong_dependency at startup, a registry
# outage (last set kept, backoff counted, one log line, recovery), hostile
# responses, a dead server skipped via proxy_next_upstream, backup servers used
# only when no primary can be, and max_fails counted across 4 workers.  Each
# upstream lives under a KV parent of its own (out/servers/, bad/servers/,
# lb/servers/), so each polls alone and a fault hits only its own requests
# (upstreams under one parent share one poll: upsync_consul_many.t).

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;
use Time::HiRes qw/time/;

use Test::Nginx qw/ :DEFAULT port wait_for http_get http_parse show_section /;
use Test::Nginx::Backend;
use Test::Nginx::Consul;
use Test::Nginx::Stream;
use JSON::PP;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 4)->has(qw/stream upsync/)->plan(36);

my ($p1, $p2, $dead) = (port(8081), port(8082), port(8083));

$t->write_file_expand('nginx.conf', <<'EOF');
%%TEST_GLOBALS%%
events { }
stream {
    upstream out {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/out/servers/ upsync_type=consul
               upsync_interval=200ms upsync_timeout=3s;
        upsync_dump_path %%TESTDIR%%/servers_out.conf;
        server 127.0.0.1:%%PORT_8081%%;
    }
    upstream bad {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/bad/servers/ upsync_type=consul
               upsync_interval=200ms upsync_timeout=3s;
        upsync_dump_path %%TESTDIR%%/servers_bad.conf;
        server 127.0.0.1:%%PORT_8081%%;
    }
    upstream lb {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/lb/servers/ upsync_type=consul
               upsync_interval=200ms;
        upsync_dump_path %%TESTDIR%%/servers_lb.conf;
        server 127.0.0.1:%%PORT_8081%%;
    }
    server { listen 127.0.0.1:%%PORT_8084%%; proxy_pass out; }
    server { listen 127.0.0.1:%%PORT_8085%%; proxy_pass lb; proxy_connect_timeout 2s; }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF

my $consul = Test::Nginx::Consul->start($t, port => port(8500));
# keep the objects: a backend stops when its object goes away
my @backends = (Test::Nginx::Backend->tcp($t, port => $p1, id => 'b1'),
	Test::Nginx::Backend->tcp($t, port => $p2, id => 'b2'));

$consul->put("out/servers/127.0.0.1:$p1", '');
$consul->put("bad/servers/127.0.0.1:$p1", '');
$t->run();

sub show {
	my (undef, undef, $body) = http_parse(http_get(port(8088)) // '');
	return $body // '';
}

sub section { show_section(port(8088), $_[0]) }

###############################################################################
# Registry outage: the last set stays, retries back off, one log line, recovery

ok(wait_for(sub { section('out') =~ /count: 1\n.*:$p1 weight=1 max_fails=2 /s }, timeout => 5),
	'out: synced');

SKIP: {
	skip 'fault injection needs the emulator', 8 unless $consul->is_emulator;

	my $mark = $t->log_offset();
	$consul->fault({ mode => 'status', status => 500, body => 'rpc error: no leader',
		path_prefix => '/v1/kv/out/servers', method => 'GET' });
	$consul->control('reset_stats');
	my $t0 = time();
	ok($t->wait_for_log(qr/upstream "out".*unexpected HTTP status 500: "rpc error: no leader"; keeping the current servers/,
		5, from => $mark), 'outage: error logged with the upstream and the cause');
	# traffic continues on the last good set meanwhile
	is_deeply(count_by_backend($t, port(8084), 20), { b1 => 20 }, 'outage: traffic on the last set');
	wait_for(sub { time() - $t0 >= 3 }, timeout => 4, interval => 0.1);
	my $n = $consul->stats->{requests}{'GET /v1/kv/out/servers/'} // 0;
	my $secs = time() - $t0;
	# interval 200ms with backoff to 800ms: a handful, never a hot loop
	ok($n >= 3 && $n <= 12, sprintf('outage: %d requests in %.1fs (backoff, no hot loop)', $n, $secs));
	my @lines = $t->grep_log(qr/upstream "out".*HTTP status 500/, from => $mark);
	is(scalar @lines, 1, 'outage: one log line for the whole outage, not one per attempt');
	like(section('out'), qr/count: 1\n.*:$p1 /s, 'outage: upstream_show still lists the last set');

	$consul->put("out/servers/127.0.0.1:$p2", '');
	$consul->clear_faults();
	my $t1 = time();
	ok(wait_for(sub { section('out') =~ /count: 2\n/ }, timeout => 5), 'recovery: the change made during the outage arrives');
	my $rec = time() - $t1;
	ok($rec < 1.5, sprintf('recovery within the backoff cap (%.2fs)', $rec));
	ok($t->wait_for_log(qr/upstream "out".*registry answers again/, 5, from => $mark), 'recovery: logged');
}

###############################################################################
# Hostile responses: a clear log line each, the last good set stays

ok(wait_for(sub { section('bad') =~ /count: 1\n/ }, timeout => 5), 'bad: synced');

SKIP: {
	skip 'fault injection needs the emulator', 6 unless $consul->is_emulator;

	my @cases = (
		[ { mode => 'malformed' }, qr/invalid JSON in response/ ],
		[ { mode => 'truncate' }, qr/truncated/ ],
		[ { mode => 'body', body => '{"not":"a list"}' }, qr/invalid JSON in response: invalid type: map/ ],
		[ { mode => 'body', body => '[]', headers => { 'X-Consul-Index' => undef } }, qr/no X-Consul-Index header/ ],
		[ { mode => 'body', body => '[{"Key":"bad/servers/example.com:80","Value":null}]' },
			qr{entry "bad/servers/example.com:80" skipped: invalid server address} ],
		[ { mode => 'hang' }, qr/no complete response within \d+ms/ ],
	);
	for my $c (@cases) {
		my ($fault, $re) = @$c;
		my $mark = $t->log_offset();
		$consul->fault({ %$fault, path_prefix => '/v1/kv/bad/servers', method => 'GET' });
		my $ok = $t->wait_for_log(qr/upstream "bad".*$re/, 8, from => $mark);
		$consul->clear_faults();
		ok($ok && section('bad') =~ /count: 1\n.*:$p1 /s, "bad: $fault->{mode} logged ($re), last set kept");
	}
}

###############################################################################
# Index going backwards (snapshot restore): start over and still see changes

SKIP: {
	skip 'index manipulation needs the emulator', 2 unless $consul->is_emulator;
	$consul->control('set_index', { index => 1 });
	$consul->put("bad/servers/127.0.0.1:$p2", '{"weight":7}');
	ok(wait_for(sub { section('bad') =~ /:$p2 weight=7 / }, timeout => 5), 'index reset: later change applied');
	ok(wait_for(sub { ($consul->stats->{blocking_by_path}{'/v1/kv/bad/servers/'} // 0) == 1 }, timeout => 5),
		'index reset: back to one blocking query');
}

###############################################################################
# A dead server is skipped (next upstream), and max_fails is counted across workers

$consul->put("lb/servers/127.0.0.1:$dead", '{"max_fails":1,"fail_timeout":"30s"}');
$consul->put("lb/servers/127.0.0.1:$p1", '');
ok(wait_for(sub { section('lb') =~ /count: 2\n/ }, timeout => 5), 'lb: dead + live server registered');
my $mark = $t->log_offset();
my $c = count_by_backend($t, port(8085), 40);
is_deeply($c, { b1 => 40 }, 'every connection succeeds: the dead server is retried on the next one');
my @refused = $t->grep_log(qr/connect\(\) failed .*127\.0\.0\.1:$dead/, from => $mark);
is(scalar @refused, 1, 'max_fails=1 across 4 workers: the dead server was tried exactly once')
	or diag(scalar(@refused) . " attempts");

###############################################################################
# A failing server that answers again: its first connection clears its failures
# while that session is still open (nginx's notify on connect), not at its end

sub fails_of {
	my (undef, undef, $body) = http_parse(http_get(port(8088), '/?format=json') // '');
	my $j = eval { decode_json($body // '') } or return -1;
	my ($s) = grep { $_->{server} eq "127.0.0.1:$_[0]" } @{ $j->{upstreams}{lb}{servers} };
	return $s ? $s->{fails} : -1;
}

$consul->put("lb/servers/127.0.0.1:$dead", '{"max_fails":1,"fail_timeout":"1s"}');
ok(wait_for(sub { section('lb') =~ /:$dead weight=1 max_fails=1 fail_timeout=1s;/ }, timeout => 5),
	'lb: the dead server now has fail_timeout=1s');
ok(wait_for(sub { count_by_backend($t, port(8085), 2); fails_of($dead) >= 1 }, timeout => 10),
	'its failed connect is on record');
my $b3 = Test::Nginx::Backend->tcp($t, port => $dead, id => 'b3');
my @open;
ok(wait_for(sub {
	my $s = Test::Nginx::Stream->new(port => port(8085), timeout => 3) or return 0;
	my $line = $s->readline // '';
	return 0 unless $line eq "b3\n";
	push @open, $s;
}, timeout => 10), 'after fail_timeout it takes a connection again');
is(fails_of($dead), 0, 'its failures are cleared while that session is still open');
$_->close for @open;
undef $b3;

###############################################################################
# Backup servers carry traffic only when no primary can

$consul->delete("lb/servers/127.0.0.1:$dead");
$consul->put("lb/servers/127.0.0.1:$p2", '{"backup":1}');
ok(wait_for(sub { section('lb') =~ /:$p2 weight=1 max_fails=2 fail_timeout=10s backup;/ }, timeout => 5),
	'backup shown as backup');
is_deeply(count_by_backend($t, port(8085), 20), { b1 => 20 }, 'primary up: backup idle');
$consul->put("lb/servers/127.0.0.1:$p1", '{"down":1}');
ok(wait_for(sub { section('lb') =~ /:$p1 .* down;/ }, timeout => 5), 'primary marked down');
is_deeply(count_by_backend($t, port(8085), 20), { b2 => 20 }, 'primary down: backup serves');
$consul->put("lb/servers/127.0.0.1:$p1", '');
ok(wait_for(sub { section('lb') !~ /down;/ }, timeout => 5), 'primary up again');
is_deeply(count_by_backend($t, port(8085), 20), { b1 => 20 }, 'primary back: backup idle again');

###############################################################################
# strong_dependency=on: nginx refuses to start without the registry, and
# starts from the registry's set when it answers

my $t2 = Test::Nginx->new(workers => 1)->has(qw/stream upsync/);
$t2->write_file('seed.conf', "server 127.0.0.1:$dead;\n");
my $sd = <<'EOF';
%%TEST_GLOBALS%%
events { }
stream {
    upstream sd {
        upsync 127.0.0.1:REGISTRY/v1/kv/out/servers/ upsync_type=consul strong_dependency=on;
        upsync_dump_path %%TESTDIR%%/servers_sd.conf;
        include %%TESTDIR%%/seed.conf;
    }
    server { listen 127.0.0.1:%%PORT_8090%%; upstream_show; }
}
EOF
(my $down = $sd) =~ s/REGISTRY/$dead/;
$t2->write_file_expand('nginx.conf', $down);
eval { local $SIG{__WARN__} = sub {}; $t2->run(); };
ok($@, 'strong_dependency=on, registry down: nginx does not start');
like($t2->error_log, qr/\[emerg\].*upstream "sd".*strong_dependency=on and the registry cannot be read: .*Connection refused.*nginx does not start/,
	'strong_dependency: clear emerg message');

(my $up = $sd) =~ s/REGISTRY/port(8500)/e;
$t2->write_file_expand('nginx.conf', $up);
$t2->run();
my (undef, undef, $b2) = http_parse(http_get(port(8090)) // '');
ok($b2 =~ /count: 2\n/ && $b2 =~ /:$p1 / && $b2 =~ /:$p2 / && $b2 !~ /:$dead /,
	'strong_dependency: started with the registry set, not the seed') or diag($b2);
my $dump = $t2->read_file('servers_sd.conf') // '';
ok($dump =~ /:$p1 / && $dump =~ /:$p2 / && $dump !~ /:$dead /, 'strong_dependency: dump written at startup')
	or diag($dump);
$t2->stop();

my @bad = $t->grep_log(qr/\[(alert|crit)\]/);
is(scalar @bad, 0, 'no alerts or crits in the error log') or diag(join '', @bad);

###############################################################################
