#!/usr/bin/perl

# The poller: exactly one per upstream per nginx instance; kill -9 of the
# polling worker hands polling to another worker within one interval; a reload
# or a graceful shutdown is never held up by the long poll in flight.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;
use Time::HiRes qw/time/;

use Test::Nginx qw/ :DEFAULT port wait_for http_get http_parse /;
use Test::Nginx::Backend;
use Test::Nginx::Consul;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 4)->has(qw/stream upsync/)->plan(16);

$t->write_file_expand('nginx.conf', <<'EOF');
%%TEST_GLOBALS%%
events { }
stream {
    upstream p {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/p/ upsync_type=consul
               upsync_interval=1s upsync_timeout=6m;
        upsync_dump_path %%TESTDIR%%/servers_p.conf;
        server 127.0.0.1:%%PORT_8081%%;
    }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF

my $consul = Test::Nginx::Consul->start($t, port => port(8500));
$t->run();

sub show {
	my (undef, undef, $body) = http_parse(http_get(port(8088)) // '');
	return $body // '';
}

sub pollers {
	my ($from) = @_;
	return map { /\(pid (\d+)\) now polls/ ? $1 : () }
		$t->grep_log(qr/now polls the registry/, from => $from // 0);
}

ok(wait_for(sub { scalar pollers() }, timeout => 5), 'a worker polls');
my @p = pollers();
is(scalar @p, 1, 'exactly one of 4 workers polls');
my $poller = $p[0];

SKIP: {
	skip 'request counters need the emulator', 1 unless $consul->is_emulator;
	ok(wait_for(sub { ($consul->stats->{blocking_in_flight} // 0) == 1 }, timeout => 5),
		'one long poll in flight');
}

# kill -9 the polling worker: another worker takes over within one interval
my $mark = $t->log_offset();
kill 'KILL', $poller;
my $t0 = time();
my $next = wait_for(sub { my @n = grep { $_ != $poller } pollers($mark); $n[0] }, timeout => 3);
my $took = time() - $t0;
ok($next, "another worker ($next) took over");
ok($took <= 1.0, sprintf('takeover within one interval (%.2fs <= 1s)', $took));
$consul->put('upstreams/p/127.0.0.1:' . port(8082), '');
ok(wait_for(sub { show() =~ /:${\ port(8082)} / }, timeout => 5), 'changes apply after the takeover');

SKIP: {
	skip 'request counters need the emulator', 1 unless $consul->is_emulator;
	ok(wait_for(sub { ($consul->stats->{blocking_in_flight} // 0) == 1 }, timeout => 5),
		'still exactly one long poll');
}

# A worker that loses the lease in the middle of an exchange (it was stopped
# while another took over) must poll again when the lease comes back to it.
$mark = $t->log_offset();
my $a = $next;
kill 'STOP', $a;
my $b = wait_for(sub { my @n = grep { $_ != $a } pollers($mark); $n[0] }, timeout => 10);
ok($b, "a stalled poller ($a) is replaced after its lease (by $b)");
kill 'CONT', $a;
ok($t->wait_for_log(qr/\[warn\] $a#\d+: .*lost the polling lease/, 5, from => $mark),
	'the stalled worker notices it lost the lease');
my @others = grep { $_ != $a } $t->worker_pids();
$mark = $t->log_offset();
kill 'STOP', @others;
my $back = wait_for(sub { grep { $_ == $a } pollers($mark) }, timeout => 10);
kill 'CONT', @others;
ok($back, 'the lease comes back to it');
$consul->put('upstreams/p/127.0.0.1:' . port(8083), '');
ok(wait_for(sub { show() =~ /:${\ port(8083)} / }, timeout => 5),
	'and it polls again: the change applies');

# A reload: old workers exit at once despite their timers and long poll
my @old = $t->worker_pids();
$t0 = time();
ok($t->reload(), 'reload');
ok(wait_for(sub { !grep { kill 0, $_ } @old }, timeout => 5), 'old workers are gone');
my $gone = time() - $t0;
ok($gone < 2, sprintf('old workers exited in %.2fs (not held by the module)', $gone));

# A graceful shutdown (QUIT) is not held up either
my $master = $t->master_pid();
$t0 = time();
kill 'QUIT', $master;
# the master is our child: reaped (or a zombie) means it has exited
ok(wait_for(sub { Test::Nginx::_gone($master) }, timeout => 10), 'graceful shutdown completes');
ok(time() - $t0 < 3, sprintf('graceful shutdown took %.2fs', time() - $t0));

###############################################################################
