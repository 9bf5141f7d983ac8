#!/usr/bin/perl

# upstream_show on static upstreams whose servers nginx re-resolves at run time
# ("server NAME resolve;" in upstreams with a zone, nginx >= 1.27.3).  Worker 0
# resolves the names again every second and adds or frees tens of peers in the
# shared zone each time.  Meanwhile:
#  - several clients read the text and JSON reports from 4 workers and
#    connections are proxied: every report is well formed and shows, for each
#    upstream, the size of one DNS answer (a whole list, never a torn one);
#  - a reading worker is frozen with gdb in the middle of its walk over a peer
#    list while the names are resolved again, then let go: its report is
#    whole too.  A walk without the peers' read lock resumes on peers that
#    were freed and reused meanwhile; with the lock, worker 0 waits instead.
# No worker dies, nothing is alerted.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;
use JSON::PP;
use POSIX ();
use Time::HiRes qw/time/;

use Test::Nginx qw/ :DEFAULT port wait_for http_get http_parse /;
use Test::Nginx::Backend;
use Test::Nginx::Dns;
use Test::Nginx::Gdb;
use Test::Nginx::Stream;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 4)->has(qw/stream upsync/);

my ($maj, $min, $pat) = $t->nginx_V =~ m{nginx version: nginx/(\d+)\.(\d+)\.(\d+)};
$t->skip_all('no "resolve" in stream upstreams before nginx 1.27.3')
	unless defined $maj && ($maj * 1_000_000 + $min * 1000 + $pat) >= 1_027_003;

use constant UPSTREAMS => 4;	# s1 .. s4, each resolving its own churning name
use constant SECONDS => 8;	# how long the clients run
use constant READERS => 4;	# processes reading upstream_show

# The sizes of the DNS answers (all 127.0.0.1, one peer each), big and small
# in turn, so that each resolution frees or adds most of a list.  A report
# read under the lock shows one of these sizes for each upstream; a torn one
# almost always some other number.
my @SIZES = (200, 3, 150, 7, 180, 2, 120, 9);
my %SIZE = map { $_ => 1 } @SIZES;

my $bport = port(8081);
my $ups = '';
for my $i (1 .. UPSTREAMS) {
	# one zone for all: freed peers' memory is reused across the upstreams
	$ups .= "    upstream s$i { zone shared 2m; server backend$i.test:$bport resolve; }\n";
}

$t->write_file_expand('nginx.conf', <<"EOF");
%%TEST_GLOBALS%%
events { }
stream {
    resolver 127.0.0.1:%%PORT_8053_UDP%% ipv6=off;
    resolver_timeout 1s;
$ups
    server { listen 127.0.0.1:%%PORT_8060%%; proxy_pass s1; }
    server { listen 127.0.0.1:%%PORT_8061%%; proxy_pass s2; }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF

my ($ok, $err) = $t->test_config;
$t->skip_all("nginx does not take \"server ... resolve\": $err") if !$ok && $err =~ /resolve/;

# Each name cycles through the sizes from its own starting point: when one
# list is small, the next one is big.  TTL 0: worker
# 0 resolves each name again every second.
my %names;
for my $i (1 .. UPSTREAMS) {
	my @order = map { $SIZES[($_ + $i) % @SIZES] } 0 .. $#SIZES;
	$names{"backend$i.test"} = [ map { [('127.0.0.1') x $_] } @order ];
}
my $dns = Test::Nginx::Dns->start($t, port => port(8053), ttl => 0, names => \%names);
my $backend = Test::Nginx::Backend->tcp($t, port => $bport, id => 'b');

$t->plan(13);
$t->run();

my $show = port(8088);

# checks one answer; '' when it is well formed, else what is wrong
sub check_answer {
	my ($raw, $json) = @_;
	my ($st, $h, $body) = http_parse($raw // '');
	return 'no answer' unless defined $st;
	return "status $st" unless $st eq '200';
	my %count;
	if ($json) {
		my $j = eval { decode_json($body) } or return 'invalid JSON';
		for my $i (1 .. UPSTREAMS) {
			my $s = $j->{upstreams}{"s$i"}{servers};
			return "s$i missing" unless ref $s eq 'ARRAY';
			my @odd = grep { ($_->{server} // '') ne "127.0.0.1:$bport" } @$s;
			return "s$i: server " . ($odd[0]{server} // 'undef') if @odd;
			$count{$i} = @$s;
		}
	} else {
		for my $i (1 .. UPSTREAMS) {
			my ($n, $lines) = $body =~ /^Upstream name: s$i; Backend server count: (\d+)\n((?: {8}[^\n]*\n)*)\n/m
				or return "s$i missing or malformed";
			my @l = split /\n/, $lines;
			return "s$i: count $n but " . scalar(@l) . ' lines' if @l != $n;
			my @odd = grep { !/^ {8}server 127\.0\.0\.1:$bport weight=1 max_fails=1 fail_timeout=10s;$/ } @l;
			return "s$i: line '$odd[0]'" if @odd;
			$count{$i} = $n;
		}
	}
	for my $i (sort keys %count) {
		return "s$i: $count{$i} servers, not the size of any DNS answer" unless $SIZE{$count{$i}};
	}
	return '';
}

ok(wait_for(sub { $dns->queries >= UPSTREAMS && check_answer(http_get($show, '/?format=json'), 1) eq '' },
	timeout => 5), 'every upstream resolved its name: a well-formed report');
my @workers = sort { $a <=> $b } $t->worker_pids;

###############################################################################
# Clients: READERS processes reading the reports (text and JSON in turn), one
# process proxying connections.  Each writes one line per answer to its file.

my $t_end = time + SECONDS;
my @kids;
for my $k (1 .. READERS + 1) {
	my $pid = fork();
	die "fork: $!\n" unless defined $pid;
	if (!$pid) {
		my $out = $t->testdir . "/client-$k.out";
		open my $fh, '>', $out or POSIX::_exit(1);
		$fh->autoflush(1);
		my $n = 0;
		while (time < $t_end && $n < 5000) {
			$n++;
			if ($k > READERS) {
				my $r = stream_get(port(8060 + $n % 2), timeout => 3) // '';
				print $fh ($r eq "b\n" ? "ok\n" : "bad proxy: '" . ($r =~ s/\n/\\n/gr) . "'\n");
				next;
			}
			my $json = $n % 2;
			my $raw = http_get($show, $json ? '/?format=json' : '/', timeout => 3);
			my $bad = check_answer($raw, $json);
			if (!$bad) {
				# the server count of s1, to see the churn
				my ($c1) = $json
					? scalar @{ decode_json((http_parse($raw))[2])->{upstreams}{s1}{servers} }
					: ($raw =~ /Upstream name: s1; Backend server count: (\d+)/);
				print $fh "ok $c1\n";
			} else {
				print $fh "bad " . ($json ? 'json' : 'text') . ": $bad\n";
			}
		}
		close $fh;
		POSIX::_exit(0);
	}
	push @kids, $pid;
}
my $q0 = $dns->queries;
wait_for(sub { !grep { !Test::Nginx::_gone($_) } @kids }, timeout => SECONDS + 20);

my (@bad, %seen, $reports, $proxied);
for my $k (1 .. READERS + 1) {
	for (split /\n/, $t->read_file("client-$k.out") // '') {
		if (/^ok(?: (\d+))?$/) {
			if (defined $1) { $reports++; $seen{$1}++ } else { $proxied++ }
		} else {
			push @bad, $_;
		}
	}
}

my $resolutions = $dns->queries - $q0;
ok($resolutions >= UPSTREAMS * (SECONDS - 3), "the answers changed while the clients ran ($resolutions resolutions)");
ok(keys %seen >= 3, 'the reports saw the server count change (s1: '
	. join(', ', map { "$_ x$seen{$_}" } sort { $a <=> $b } keys %seen) . ')');
ok(($reports // 0) >= 50, 'reports read: ' . ($reports // 0));
ok(($proxied // 0) >= 20, 'connections proxied: ' . ($proxied // 0));
is(scalar @bad, 0, 'every report well formed, every connection served')
	or diag(join "\n", @bad[0 .. ($#bad < 9 ? $#bad : 9)]);

###############################################################################
# The same race made likely: a reading worker (not worker 0, which resolves)
# is frozen with gdb in the middle of its walk over a big list (the 41st
# server of a report: in s1 or, when s1 is small, in s2), the names are
# resolved again twice (the list shrinks, its peers are freed and their memory
# reused), then it goes on.

SKIP: {
	skip 'no gdb', 3 unless Test::Nginx::Gdb::available();
	my ($w0) = map { /start worker process (\d+)/ ? $1 : () } $t->grep_log(qr/start worker process \d+/);
	my @readers = grep { $_ != ($w0 // 0) } @workers;
	my (@torn, $frozen, $attempts);
	for my $w (@readers) {
		my $g = Test::Nginx::Gdb->freeze_at($t, $w, 'upsync_core::servers::server_line', ignore => 40)
			or last;
		$attempts++;
		my @c;
		for (1 .. 60) {
			my $s = Test::Nginx::Stream->new(port => $show, timeout => 15) or next;
			$s->write("GET / HTTP/1.0\r\n\r\n");
			push @c, $s;
			last if $g->wait_hit(0.2);
		}
		if ($g->hit) {
			$frozen++;
			# (with the read lock held, worker 0 cannot apply them: bounded)
			my $q = $dns->queries;
			wait_for(sub { $dns->queries >= $q + 2 * UPSTREAMS }, timeout => 5);
		}
		$g->release;
		for my $s (@c) {
			my $bad = check_answer($s->read(eof => 1, timeout => 10), 0);
			push @torn, "worker $w: $bad" if $bad;
		}
	}
	skip 'gdb cannot stop a worker at upsync_core::servers::server_line', 3 unless $attempts;
	ok($frozen, 'a worker was frozen mid-report (' . ($frozen // 0) . " of $attempts)");
	is(scalar @torn, 0, 'the reports of the frozen workers are whole') or diag(join "\n", @torn);
	is(check_answer(http_get($show, '/?format=json'), 1), '', 'and a report after them too');
}

my @died = $t->grep_log(qr/exited on signal/);
is(scalar @died, 0, 'no worker died') or diag(join "\n", @died);
is(join(',', sort { $a <=> $b } $t->worker_pids), join(',', @workers), 'worker pids unchanged');
is(check_answer(http_get($show, '/'), 0), '', 'after the churn: a well-formed report');

my @alerts = $t->grep_log(qr/\[(alert|crit|emerg)\]/);
is(scalar @alerts, 0, 'no alerts') or diag(join "\n", @alerts[0 .. ($#alerts < 9 ? $#alerts : 9)]);
