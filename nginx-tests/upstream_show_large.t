#!/usr/bin/perl

# upstream_show with an upsync upstream of 2,000 servers, rendered a slice at
# a time: every report is complete and correct (text with its Content-Length,
# JSON valid, Prometheus lines whole, each family together, every server once);
# clients that close in the middle of an answer leave the worker fine; proxied
# connections are served while a big answer is being rendered and while one
# waits for its reader; a worker that exits meanwhile finishes the answer for
# a reader that reads, and closes it cleanly after worker_shutdown_timeout for
# one that does not.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;
use JSON::PP;
use IO::Select;
use POSIX ();
use Socket qw/PF_INET SOCK_STREAM SOL_SOCKET SO_RCVBUF inet_aton pack_sockaddr_in/;
use Time::HiRes qw/time/;

use Test::Nginx qw/ :DEFAULT port wait_for http_get http_parse /;
use Test::Nginx::Backend;
use Test::Nginx::Consul;
use Test::Nginx::Stream;

select STDERR; $| = 1;
select STDOUT; $| = 1;

use constant N => 2000;

my $t = Test::Nginx->new()->has(qw/stream upsync/)->plan(38);

my $CONF = <<'EOF';
%%TEST_GLOBALS%%
worker_shutdown_timeout 6s;
events { }
stream {
    %%TEST_GLOBALS_STREAM%%

    upstream big {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/big/ upsync_type=consul;
        upsync_dump_path %%TESTDIR%%/servers_big.conf;
        server 127.0.0.1:%%PORT_8081%%;
    }

    upstream small {
        server 127.0.0.1:%%PORT_8081%%;
    }

    server { listen 127.0.0.1:%%PORT_8080%%; proxy_pass small; }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }

    # a small send buffer: an answer waits for a reader that does not read
    server { listen 127.0.0.1:%%PORT_8089%% sndbuf=4k; upstream_show; }
}
EOF
$t->write_file_expand('nginx.conf', $CONF);

my $consul = Test::Nginx::Consul->start($t, port => port(8500));
my $backend = Test::Nginx::Backend->tcp($t, port => port(8081), id => 'b');

# the servers: registry entries only (the upstream takes no traffic), on
# 127.0.0.1, every fifth one with a weight of its own
my %weight;
for my $i (0 .. N - 1) {
	$weight{30000 + $i} = $i % 5 ? 1 : 2 + $i % 7;
}
my @ports = sort { $a <=> $b } keys %weight;
for (my $i = 0; $i < @ports; $i += 64) {
	my $end = $i + 63 < $#ports ? $i + 63 : $#ports;
	my @chunk = @ports[$i .. $end];
	$consul->txn(map { [ set => "upstreams/big/127.0.0.1:$_",
		$weight{$_} == 1 ? '' : qq({"weight":$weight{$_}}) ] } @chunk);
}

$t->run();

my ($show, $slow, $proxy) = (port(8088), port(8089), port(8080));

sub get {
	my ($path, %o) = @_;
	my $raw = http_get($o{port} // $show, $path, timeout => 20);
	my ($st, $h, $body) = http_parse($raw // '');
	return ($st // '', $h // {}, $body // '', $raw // '');
}

ok(wait_for(sub { my (undef, undef, $b) = get('/');
	$b =~ /^Upstream name: big; Backend server count: ${\N}$/m }, timeout => 20),
	'the registry\'s ' . N . ' servers are synced');

my ($worker) = $t->worker_pids;
my $fds = fd_count($worker);

###############################################################################
# complete and correct

# text: the C module's report, byte for byte, with its Content-Length
my $want_text = "Upstream name: big; Backend server count: " . N . "\n"
	. join('', map {; "        server 127.0.0.1:$_ weight=$weight{$_} max_fails=2 fail_timeout=10s;\n" } @ports)
	. "\nUpstream name: small; Backend server count: 1\n"
	. "        server 127.0.0.1:" . port(8081) . " weight=1 max_fails=1 fail_timeout=10s;\n\n";
my ($st, $h, $body, $raw) = get('/');
is($raw, "HTTP/1.0 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\n"
	. "Content-Length: " . length($want_text) . "\r\nConnection: close\r\n\r\n$want_text",
	'text: the whole report, byte for byte (' . length($want_text) . ' bytes)');

# JSON: valid, every server once, with its weight; streamed (no Content-Length)
($st, $h, $body) = get('/?format=json');
is($st, 200, 'json: 200');
is($h->{'content-length'}, undef, 'json: streamed, without Content-Length');
is($h->{'content-type'}, 'application/json', 'json: content type');
my $j = eval { decode_json($body) };
ok($j, 'json: valid (' . length($body) . ' bytes)');
my @servers = @{ $j->{upstreams}{big}{servers} // [] };
is($j->{upstreams}{big}{server_count}, N, 'json: server_count');
is(scalar @servers, N, 'json: ' . N . ' servers listed');
my %seen;
my @wrong = grep { my ($p) = $_->{server} =~ /^127\.0\.0\.1:(\d+)$/;
	!$p || $seen{$p}++ || ($weight{$p} // 0) != $_->{weight} } @servers;
is(scalar @wrong, 0, 'json: each server once, with its weight');
is(scalar keys %seen, N, 'json: every registered server');
is(scalar @{ $j->{upstreams}{small}{servers} // [] }, 1, 'json: the static upstream too');
ok($j->{upstreams}{big}{upsync}{generation} >= 2 && !defined $j->{upstreams}{small}{upsync},
	'json: the upsync section');

# Prometheus: whole lines, each family together, every server once per family
($st, $h, $body) = get('/metrics');
is($st, 200, 'metrics: 200');
like($body, qr/\n\z/, 'metrics: ends with a whole line');
my @lines = split /\n/, $body;
my @bad = grep { !/^# (HELP|TYPE) [a-z_]+ .+$/ && !/^[a-z_]+\{[^{}]*\} -?[0-9.]+$/ } @lines;
is(scalar @bad, 0, 'metrics: ' . scalar(@lines) . ' lines, every one whole')
	or diag(join "\n", @bad[0 .. ($#bad < 4 ? $#bad : 4)]);
my (%done, $cur, @split);
for (@lines) {
	my ($name) = /^(?:# (?:HELP|TYPE) )?([a-z_]+)/ or next;
	next if defined $cur && $name eq $cur;
	push @split, $name if $done{$name}++;
	$cur = $name;
}
is(join(',', @split), '', 'metrics: the rows of each family together');
my %rows;
for (@lines) {
	my ($fam, $p) = /^(upsync_server_[a-z_]+)\{upstream="big",server="127\.0\.0\.1:(\d+)"/ or next;
	$rows{$fam}{$p}++;
}
my @short = grep {
	my $want = $_ eq 'upsync_server_state' ? 4 : 1;
	my $r = $rows{$_} // {};
	keys %$r != N || grep { $_ != $want } values %$r
} qw/upsync_server_weight upsync_server_active_connections
	upsync_server_connections_total upsync_server_fails upsync_server_state/;
is(join(',', @short), '', 'metrics: every server in every per-server family, once');
my @wrong_w = grep { /^upsync_server_weight\{upstream="big",server="127\.0\.0\.1:(\d+)"\} (\d+)$/
	&& $weight{$1} != $2 } @lines;
is(scalar @wrong_w, 0, 'metrics: weights');
like($body, qr/^upsync_upstream_servers\{upstream="big"\} ${\N}$/m, 'metrics: server count');

###############################################################################
# clients that go away in the middle of an answer

my @gone;
for my $path ('/?format=json', '/metrics', '/') {
	for my $read (0, 3000) {
		my $s = talk_open($show, "GET $path HTTP/1.0\r\n\r\n", 2048) or next;
		if ($read) {
			my $got = '';
			my $sel = IO::Select->new($s);
			while (length $got < $read && $sel->can_read(10)) {
				sysread($s, my $buf, 1024) or last;
				$got .= $buf;
			}
			push @gone, "$path: read " . length $got if length $got < $read;
		}
		close $s;	# unread data: a reset
	}
}
is(join('; ', @gone), '', 'six clients closed mid-answer (json, metrics, text)');

($st, $h, $body) = get('/?format=json');
$j = eval { decode_json($body) };
is(scalar @{ $j->{upstreams}{big}{servers} // [] }, N, 'a complete answer after them');
is(join(',', $t->worker_pids), $worker, 'same worker');
# (at most as many: the registry connection may be between two polls)
ok(wait_for(sub { fd_count($worker) <= $fds }, timeout => 15),
	"the worker closed their connections ($fds descriptors before, " . fd_count($worker) . ' now)');

###############################################################################
# proxied connections while a big answer is rendered: a reader takes the
# Prometheus report as fast as it can through a small receive buffer (so the
# answer cannot leave in one go, however fast the worker renders it);
# meanwhile connections are proxied.  The reader reads on after its first
# bytes only once a proxied connection has completed after them (or 10 s
# passed), so however the processes are scheduled the two overlap, and a
# worker that served nothing while the answer is under way fails the count.

my $stamp = $t->testdir . '/reader.out';
my $started = $t->testdir . '/reader.started';
my $go = $t->testdir . '/proxied.one';
my $pid = fork();
die "fork: $!\n" unless defined $pid;
if (!$pid) {
	my ($first, $n, $data) = (0, 0, '');
	my $s = talk_open($show, "GET /metrics HTTP/1.0\r\n\r\n", 8192)
		or POSIX::_exit(1);
	my $sel = IO::Select->new($s);
	while ($sel->can_read(20)) {
		my $k = sysread($s, my $buf, 65536);
		last unless $k;
		if (!$first) {
			$first = time;
			open my $fh, '>', $started;
			close $fh;
			wait_for(sub { -e $go }, timeout => 10);
		}
		$data .= $buf;
	}
	my $last = time;
	my (undef, undef, $b) = http_parse($data);
	my $rows = () = ($b // '') =~ /^upsync_server_state\{upstream="big",/mg;
	open my $fh, '>', "$stamp.tmp" or POSIX::_exit(1);
	printf $fh "%.6f %.6f %d %d\n", $first, $last, length $data, $rows;
	close $fh;
	rename "$stamp.tmp", $stamp;
	POSIX::_exit(0);
}
my (@served, $failed);
for (1 .. 2000) {
	last if -e $stamp;
	my $r = Test::Nginx::Stream->new(port => $proxy, timeout => 5);
	my $line = $r ? $r->readline : undef;
	if (($line // '') eq "b\n") { push @served, time } else { $failed++ }
	$r->close if $r;
	# a connection completed after the reader's first bytes: let it read on
	if (@served && !-e $go && -e $started) { open my $fh, '>', $go; close $fh }
}
wait_for(sub { -e $stamp }, timeout => 30);
waitpid($pid, 0);
my ($first, $last, $len, $rows) = split ' ', ($t->read_file('reader.out') // '');
is($rows, 4 * N, 'the reader got the whole report (' . ($len // 0) . ' bytes)');
my @during = grep { $_ > ($first // 9e9) && $_ < ($last // 0) } @served;
ok(@during >= 1, scalar(@during) . ' of ' . scalar(@served)
	. ' proxied connections completed between the first and the last byte of the report');
is($failed // 0, 0, 'every proxied connection served');

# the same with a reader that waits: the answer waits for it, the worker serves
my $s = talk_open($slow, "GET /?format=json HTTP/1.0\r\n\r\n", 1024);
ok(wait_for(sub { my ($state, $txq) = tcp_state($slow, $s); defined $state && $txq > 0 }),
	'an answer waits for its reader');
my $ok = 0;
for (1 .. 20) {
	my $r = Test::Nginx::Stream->new(port => $proxy, timeout => 5) or next;
	$ok++ if ($r->readline // '') eq "b\n";
	$r->close;
}
is($ok, 20, 'proxied connections served meanwhile');
my ($data, $err) = talk_read($s);
$j = eval { decode_json((http_parse($data // ''))[2] // '') };
is(scalar @{ $j->{upstreams}{big}{servers} // [] }, N, 'then the reader reads: the answer is whole');

###############################################################################
# the worker exits in the middle of an answer (reload)

my $reader = talk_open($slow, "GET /?format=json HTTP/1.0\r\n\r\n", 1024);
my $idle = talk_open($slow, "GET /metrics HTTP/1.0\r\n\r\n", 1024);
ok(wait_for(sub { my ($a) = (tcp_state($slow, $reader))[1]; my ($b) = (tcp_state($slow, $idle))[1];
	($a // 0) > 0 && ($b // 0) > 0 }), 'two answers wait for their readers');
my $off = $t->log_offset;
ok($t->reload, 'reload');
ok(!Test::Nginx::_gone($worker), 'the old worker stays for its answers');

# a reader that reads: the old worker finishes its answer (read through a
# larger buffer now, well within worker_shutdown_timeout on a loaded machine)
setsockopt($reader, SOL_SOCKET, SO_RCVBUF, 1 << 20);
($data, $err) = talk_read($reader);
$j = eval { decode_json((http_parse($data // ''))[2] // '') };
is(scalar @{ $j->{upstreams}{big}{servers} // [] }, N, 'exiting worker: a reader that reads gets the whole answer');
is($err, '', 'exiting worker: and a clean close');

# a reader that does not: closed after worker_shutdown_timeout, the worker exits
ok(wait_for(sub { Test::Nginx::_gone($worker) }, timeout => 15), 'the old worker exits (worker_shutdown_timeout)');
($data, $err) = talk_read($idle, 5);
ok(defined $data && length $data > 0 && $err eq '', 'the waiting reader sees its answer end ('
	. length($data // '') . ' bytes, ' . ($err || 'EOF') . ')');
is(scalar $t->grep_log(qr/\[(alert|crit|emerg)\]|exited on signal/), 0, 'no alert, crit or crash');
($st, $h, $body) = get('/?format=json');
$j = eval { decode_json($body) };
is(scalar @{ $j->{upstreams}{big}{servers} // [] }, N, 'the new worker answers');

###############################################################################

# a client socket to 127.0.0.1:$port (a small receive buffer with $rcvbuf)
# that has sent $send
sub talk_open {
	my ($port, $send, $rcvbuf) = @_;
	socket(my $s, PF_INET, SOCK_STREAM, 0) or return undef;
	setsockopt($s, SOL_SOCKET, SO_RCVBUF, $rcvbuf) or return undef if $rcvbuf;
	connect($s, pack_sockaddr_in($port, inet_aton('127.0.0.1'))) or return undef;
	binmode $s;
	local $SIG{PIPE} = 'IGNORE';
	syswrite($s, $send) == length $send or return undef;
	return $s;
}

# reads to EOF and closes: ($data, $err), $err '' on a clean EOF
sub talk_read {
	my ($s, $timeout) = @_;
	return (undef, 'no socket') unless $s;
	my ($data, $err) = ('', '');
	my $sel = IO::Select->new($s);
	my $deadline = time + ($timeout // 20);
	while (1) {
		my $left = $deadline - time;
		if ($left <= 0) { $err = 'timeout'; last }
		next unless $sel->can_read($left);
		my $n = sysread($s, my $buf, 65536);
		if (!defined $n) { $err = "read: $!"; last }
		last if $n == 0;
		$data .= $buf;
	}
	close $s;
	return ($data, $err);
}

# (state, tx_queue) of nginx's side of the connection of client socket $s to
# 127.0.0.1:$port, from /proc/net/tcp
sub tcp_state {
	my ($port, $s) = @_;
	return unless $s;
	my (undef, $cport) = (unpack_sockaddr(getsockname($s)));
	open my $fh, '<', '/proc/net/tcp' or return;
	my $want = sprintf('0100007F:%04X 0100007F:%04X', $port, $cport);
	while (<$fh>) {
		my @f = split ' ';
		next unless @f > 4 && "$f[1] $f[2]" eq $want;
		my ($tx) = split /:/, $f[4];
		return (hex $f[3], hex $tx);
	}
	return;
}

sub unpack_sockaddr {
	my ($port, $addr) = Socket::unpack_sockaddr_in($_[0]);
	return ($addr, $port);
}

sub fd_count {
	my ($pid) = @_;
	opendir my $d, "/proc/$pid/fd" or return -1;
	return scalar grep { /^\d+$/ } readdir $d;
}

###############################################################################
