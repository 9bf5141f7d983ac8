#!/usr/bin/perl

# upstream_show: the exact report (static upstreams, an upsync upstream
# whose registry is down, no upstreams at all) and how the endpoint copes
# with unusual clients (large request, silent client, half-close, slow
# reader with a tiny receive buffer, many sequential connections, UDP).

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';
use lib 'lib';

use Test::Nginx;

use IO::Select;
use POSIX ();
use Socket qw/PF_INET SOCK_STREAM SOL_SOCKET SO_RCVBUF SHUT_WR
	inet_aton pack_sockaddr_in sockaddr_in/;
use Time::HiRes qw/time/;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/stream upsync/)->plan(36);

$t->write_file_expand('nginx.conf', <<'EOF');
%%TEST_GLOBALS%%
events { }

stream {
    %%TEST_GLOBALS_STREAM%%

    upstream a {
        server 127.0.0.1:%%PORT_8081%% weight=40;
        server 127.0.0.1:%%PORT_8082%% weight=20 max_fails=0 fail_timeout=30s;
    }

    upstream s {
        upsync 127.0.0.1:%%PORT_8099%%/v1/kv/upstreams/u/ upsync_type=consul
            upsync_interval=1s;
        upsync_dump_path %%TESTDIR%%/s.conf;
        server 127.0.0.1:%%PORT_8084%%;
    }

    upstream b {
        server 127.0.0.1:%%PORT_8083%% down;
    }

    server {
        listen 127.0.0.1:%%PORT_8088%%;
        upstream_show;
    }

    server {
        listen 127.0.0.1:%%PORT_8089%% udp;
        upstream_show;
    }
}
EOF

my ($p1, $p2, $p3, $p4) = map { port($_) } 8081 .. 8084;

my $body = <<"EOF";
Upstream name: a; Backend server count: 2
        server 127.0.0.1:$p1 weight=40 max_fails=1 fail_timeout=10s;
        server 127.0.0.1:$p2 weight=20 max_fails=0 fail_timeout=30s;

Upstream name: s; Backend server count: 1
        server 127.0.0.1:$p4 weight=1 max_fails=1 fail_timeout=10s;

Upstream name: b; Backend server count: 1
        server 127.0.0.1:$p3 weight=1 max_fails=1 fail_timeout=10s down;

EOF

my $expect = response($body);

$t->run();

###############################################################################
# the report

my $show = port(8088);

ok($t->wait_for_log(qr/\[error\].*upsync: upstream "s"/, 10),
	'registry of "s" unreachable (poll failed)');

my $r = http_get($show);
is($r, $expect, 'report, byte for byte');

my ($status, $h, $b) = http_parse($r);
is($h->{'content-length'}, length $b, 'content-length is the body length');

###############################################################################
# unusual clients

my ($data, $err);

# (1) a 64 KiB request, written completely before reading

($data, $err) = talk(port => $show,
	send => "GET / HTTP/1.0\r\n" . ('x' x 65536) . "\r\n\r\n");
is($data, $expect, 'large request: complete report');
is($err, '', 'large request: clean close, no reset');

# (2) a client that sends nothing

($data, $err) = talk(port => $show);
is($data, $expect, 'silent client: complete report');
is($err, '', 'silent client: clean close');

# (3) a client that half-closes at once

($data, $err) = talk(port => $show, shutdown => 1);
is($data, $expect, 'half-closed client: complete report');
is($err, '', 'half-closed client: clean close');

# (3a) a request, then half-close

($data, $err) = talk(port => $show, send => "GET / HTTP/1.0\r\n\r\n",
	shutdown => 1);
is($data, $expect, 'request and half-close: complete report');
is($err, '', 'request and half-close: clean close');

# (5) 200 sequential connections

my ($same, @errs) = (0);
for (1 .. 200) {
	($data, $err) = talk(port => $show, send => "GET / HTTP/1.0\r\n\r\n");
	$same++ if defined $data && $data eq $expect;
	push @errs, $err if $err ne '';
}
is($same, 200, '200 sequential connections: identical reports');
is(join(', ', @errs), '', '200 sequential connections: no errors');

# (6) upstream_show on a udp listener must not hurt the worker

my @workers = $t->worker_pids;
my $off = $t->log_offset;

my $u = Test::Nginx::Stream->new(port => port(8089), udp => 1);
ok($u && defined $u->write("GET / HTTP/1.0\r\n\r\n"), 'udp datagram sent');
ok($t->wait_for_log(qr/udp client .* connected to/, 5, from => $off),
	'udp datagram handled');
$u->close if $u;

is(http_get($show), $expect, 'report after the udp datagram');
is(join(',', $t->worker_pids), join(',', @workers), 'same worker after udp');
is($t->grep_log(qr/exited on signal|\[alert\]|\[crit\]/), 0,
	'no crash, alert or crit in error.log');

###############################################################################
# (4) a slow reader with a tiny receive buffer and a report > 64 KiB

my $big = '';
my $big_body = '';
for my $i (1 .. 300) {
	$big .= "    upstream up$i {\n";
	$big_body .= "Upstream name: up$i; Backend server count: 4\n";
	for my $j (1 .. 4) {
		my $p = 10000 + $i * 4 + $j;
		$big .= "        server 127.0.0.1:$p weight=$j max_fails=$j;\n";
		$big_body .= "        server 127.0.0.1:$p weight=$j "
			. "max_fails=$j fail_timeout=10s;\n";
	}
	$big .= "    }\n";
	$big_body .= "\n";
}

$t->write_file_expand('nginx.conf', <<"EOF");
%%TEST_GLOBALS%%
events { }

stream {
    %%TEST_GLOBALS_STREAM%%

$big
    server {
        listen 127.0.0.1:%%PORT_8088%%;
        upstream_show;
    }

    # a small send buffer (no autotuning), so that the report cannot be
    # handed to the kernel at once: nginx must wait for the slow reader
    server {
        listen 127.0.0.1:%%PORT_8091%% sndbuf=4k;
        upstream_show;
    }
}
EOF

ok($t->restart(), 'restart with 300 upstreams');
$off = $t->log_offset;

ok(length $big_body > 65536, 'report body is larger than 64 KiB ('
	. length($big_body) . ')');

my ($worker) = $t->worker_pids;
my $fds = fd_count($worker);

my $sock = talk_open(port => port(8091), send => "GET / HTTP/1.0\r\n\r\n",
	rcvbuf => 1024);

# the client reads nothing yet: nginx's socket is still established with a
# full send queue, so nginx holds the rest of the report itself
ok(wait_for(sub { my ($st, $txq) = tcp_state(port(8091),
		$sock ? (sockaddr_in(getsockname($sock)))[0] : 0);
	defined $st && $st == 1 && $txq > 0 }),
	'slow reader: nginx waits for a full socket');

my $cpu0 = cpu_seconds($worker);
my $t0 = time;

# the client behaviour under test: stall, then read in small pieces
Time::HiRes::sleep(1);
($data, $err) = talk_read($sock, chunk => 512, pause => 0.002,
	timeout => 30);

my $elapsed = time - $t0;
my $cpu1 = cpu_seconds($worker);

is($err, '', 'slow reader: clean close');
($status, $h, $b) = http_parse($data);
is($h->{'content-length'}, length $big_body, 'slow reader: content-length');
ok(($b // "") eq $big_body, 'slow reader: complete body ('
	. length($b // '') . ' of ' . length($big_body) . ' bytes)');
is($data, response($big_body), 'slow reader: response byte for byte');
ok(defined $cpu0 && defined $cpu1 && $cpu1 - $cpu0 < 0.5,
	sprintf('worker did not spin: %.2fs CPU during a %.2fs slow read',
		($cpu1 // 0) - ($cpu0 // 0), $elapsed));
is($t->grep_log(qr/\[alert\]|\[crit\]|exited on signal/, from => $off), 0,
	'slow reader: no alert or crit in error.log');

# a slow reader that goes away in the middle of the report

$sock = talk_open(port => port(8091), send => "GET / HTTP/1.0\r\n\r\n",
	rcvbuf => 1024);
ok(wait_for(sub { my ($st, $txq) = tcp_state(port(8091),
		$sock ? (sockaddr_in(getsockname($sock)))[0] : 0);
	defined $st && $st == 1 && $txq > 0 }),
	'aborting reader: nginx waits for a full socket');
close $sock if $sock;

# the worker is still fine, and has closed every client connection
is(http_get(port(8091)), response($big_body),
	'report after the aborted reader');
is(join(',', $t->worker_pids), $worker, 'same worker after the abort');
ok(wait_for(sub { fd_count($worker) == $fds }, timeout => 15),
	"worker closed its client connections ($fds descriptors before, "
	. fd_count($worker) . " now)");

###############################################################################
# no upstreams at all

$t->write_file_expand('nginx.conf', <<'EOF');
%%TEST_GLOBALS%%
events { }

stream {
    %%TEST_GLOBALS_STREAM%%

    server {
        listen 127.0.0.1:%%PORT_8088%%;
        upstream_show;
    }

    server {
        listen 127.0.0.1:%%PORT_8090%%;
        proxy_pass 127.0.0.1:%%PORT_8081%%;
    }
}
EOF

ok($t->restart(), 'restart without upstreams');

is(http_get($show), "HTTP/1.0 200 OK\r\nServer: nginx\r\n"
	. "Content-Type: text/plain\r\nContent-Length: 21\r\n"
	. "Connection: close\r\n\r\nNo upstreams defined\n",
	'no upstreams: report, byte for byte (implicit upstream not listed)');

($data, $err) = talk(port => $show, shutdown => 1);
is($data, response("No upstreams defined\n"), 'no upstreams: half-close');
is($err, '', 'no upstreams: clean close');

is($t->grep_log(qr/\[alert\]|\[crit\]|exited on signal/), 0,
	'no alert or crit in error.log');

###############################################################################

sub response {
	my ($body) = @_;
	return "HTTP/1.0 200 OK\r\n"
		. "Server: nginx\r\n"
		. "Content-Type: text/plain\r\n"
		. "Content-Length: " . length($body) . "\r\n"
		. "Connection: close\r\n"
		. "\r\n"
		. $body;
}

# talk(port => P, send => DATA, shutdown => 1, rcvbuf => N, chunk => N,
#      pause => SECS, timeout => SECS): ($data, $err); $err is '' when the
# server closed cleanly (EOF), else what went wrong (e.g. a reset)
sub talk {
	my (%o) = @_;
	my $s = talk_open(%o) or return (undef, "connect or write: $!");
	return talk_read($s, %o);
}

# talk_open(port => P, send => DATA, shutdown => 1, rcvbuf => N): socket
sub talk_open {
	my (%o) = @_;

	socket(my $s, PF_INET, SOCK_STREAM, 0) or return undef;
	if ($o{rcvbuf}) {
		setsockopt($s, SOL_SOCKET, SO_RCVBUF, $o{rcvbuf}) or return undef;
	}
	connect($s, pack_sockaddr_in($o{port}, inet_aton('127.0.0.1')))
		or return undef;
	binmode $s;

	if (defined $o{send}) {
		local $SIG{PIPE} = 'IGNORE';
		my $off = 0;
		while ($off < length $o{send}) {
			my $n = syswrite($s, $o{send}, length($o{send}) - $off, $off);
			return undef unless defined $n;
			$off += $n;
		}
	}
	shutdown($s, SHUT_WR) if $o{shutdown};
	return $s;
}

# talk_read($sock, chunk => N, pause => SECS, timeout => SECS):
# reads until EOF, then closes; ($data, $err)
sub talk_read {
	my ($s, %o) = @_;
	return (undef, 'no socket') unless $s;

	my ($data, $err) = ('', '');
	my $sel = IO::Select->new($s);
	my $deadline = time + ($o{timeout} // 10);

	while (1) {
		my $left = $deadline - time;
		if ($left <= 0) {
			$err = 'timeout';
			last;
		}
		next unless $sel->can_read($left);

		my $n = sysread($s, my $buf, $o{chunk} // 65536);
		if (!defined $n) {
			$err = "read: $!";
			last;
		}
		last if $n == 0;
		$data .= $buf;

		# the client behaviour under test: a slow reader
		Time::HiRes::sleep($o{pause}) if $o{pause};
	}

	close $s;
	return ($data, $err);
}

# (state, tx_queue) of the TCP socket 127.0.0.1:$lport <-> 127.0.0.1:$rport
# from /proc/net/tcp (state 1 is ESTABLISHED)
sub tcp_state {
	my ($lport, $rport) = @_;
	open my $fh, '<', '/proc/net/tcp' or return;
	my $want = sprintf('0100007F:%04X 0100007F:%04X', $lport, $rport);
	while (<$fh>) {
		my @f = split ' ';
		next unless @f > 4 && "$f[1] $f[2]" eq $want;
		my ($tx) = split /:/, $f[4];
		return (hex $f[3], hex $tx);
	}
	return;
}

# open descriptors of a process
sub fd_count {
	my ($pid) = @_;
	opendir my $d, "/proc/$pid/fd" or return -1;
	return scalar grep { /^\d+$/ } readdir $d;
}

# utime + stime of a process, in seconds
sub cpu_seconds {
	my ($pid) = @_;
	open my $fh, '<', "/proc/$pid/stat" or return undef;
	my $s = <$fh> // return undef;
	my @f = split ' ', substr($s, rindex($s, ')') + 2);
	# fields 14 and 15 of stat(5); @f starts at field 3
	return ($f[11] + $f[12]) / POSIX::sysconf(POSIX::_SC_CLK_TCK());
}

###############################################################################
