package Test::Nginx::SyncScenario;

# The sync scenarios every registry must pass, run by upsync_sync_*.t against
# Consul KV, etcd v2, etcd v3 and Kubernetes (table-driven over registries, not
# copied; a registry without per-server settings, Kubernetes, expects the
# defaults where the others expect the values they were given):
# the C module's documented sequence with show and dump after every step,
# traffic in weight proportion, one registry connection for 4 workers, a change
# reaching every worker within 200 ms, an open session outliving its server's
# removal, bad data keeping the last good set, and a reload keeping the set.

use strict;
use warnings;

use Exporter qw/import/;
use Test::More;
use Time::HiRes qw/time/;

use Test::Nginx qw/ port wait_for http_get http_parse /;
use Test::Nginx::Backend;
use Test::Nginx::Stream;
use Test::Nginx::Registry;

our @EXPORT_OK = qw/run_sync TESTS/;

# assertions per run of run_sync
use constant TESTS => 40;

# run_sync(kind => 'consul'|'etcd2'|'etcd3'|'kubernetes', version => '3.4'|'3.5', [plan => N])
sub run_sync {
	my (%o) = @_;
	my $t = Test::Nginx->new(workers => 4)->has(qw/stream upsync/);
	$t->plan($o{plan}) if $o{plan};

	my ($p1, $p2, $p3) = (port(8081), port(8082), port(8083));
	my $seed = port(8089);
	my $reg = Test::Nginx::Registry->start($t, kind => $o{kind}, version => $o{version},
		port => port(8500), peer_port => port(8600));
	my $L = $reg->label;
	note("registry: $L");

	# The upstream includes a seed file, not its dump: after a reload the set
	# must come from the shared zone, not from the file.
	$t->write_file('seed.conf', "server 127.0.0.1:$seed;\n");
	my $upsync = $reg->upsync('test', 'upsync_interval=500ms upsync_timeout=6m');
	$t->write_file_expand('nginx.conf', <<"EOF");
%%TEST_GLOBALS%%
events { }
stream {
    upstream test {
        $upsync;
        upsync_dump_path %%TESTDIR%%/servers_test.conf;
        include %%TESTDIR%%/seed.conf;
    }
    server { listen 127.0.0.1:%%PORT_8080%%; proxy_pass test; proxy_connect_timeout 2s; }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF

	my @b = map { Test::Nginx::Backend->tcp($t, port => $_->[0], id => $_->[1]) }
		([$p1, 'b1'], [$p2, 'b2'], [$p3, 'b3']);
	$t->run();

	my $show_port = port(8088);
	my $proxy_port = port(8080);
	my $put = sub { $reg->put_server('test', "127.0.0.1:$_[0]", $_[1]) };
	my $del = sub { $reg->delete_server('test', "127.0.0.1:$_[0]") };

	my $body = sub {
		my (undef, undef, $b) = http_parse(http_get($show_port) // '');
		return $b // '';
	};
	my $attrs = $reg->attributes;
	my $line = sub {
		my ($port, %a) = @_;
		%a = (down => $a{down}) unless $attrs;
		my $l = sprintf "server 127.0.0.1:%d weight=%d max_fails=%d fail_timeout=%ds",
			$port, $a{weight} // 1, $a{max_fails} // 2, $a{fail_timeout} // 10;
		$l .= ' down' if $a{down};
		return "$l;";
	};
	my $step = sub {
		my ($name, @lines) = @_;
		@lines = sort { ($a =~ /:(\d+)/)[0] <=> ($b =~ /:(\d+)/)[0] } @lines;
		my $show = "Upstream name: test; Backend server count: " . scalar(@lines) . "\n"
			. join('', map { "        $_\n" } @lines) . "\n";
		my $dump = join('', map { "$_\n" } @lines);
		ok(wait_for(sub { $body->() eq $show }, timeout => 5), "$L: $name: upstream_show")
			or diag("got:\n" . $body->() . "want:\n$show");
		my $got = wait_for(sub { my $f = $t->read_file('servers_test.conf') // '';
			$f eq $dump ? $f : undef }, timeout => 5);
		is($got // $t->read_file('servers_test.conf'), $dump, "$L: $name: dump file");
	};
	my $conns = sub { $reg->connections_from($t->worker_pids) };

	###################################################################
	# The C module's sequence

	ok(wait_for(sub { $t->grep_log(qr/upstream "test".*lists no servers; keeping the last 1/) },
		timeout => 5), "$L: empty registry keeps the configured server");
	like($body->(), qr/server 127\.0\.0\.1:$seed weight=1 max_fails=1 fail_timeout=10s;/,
		"$L: seed server shown");

	$put->($p1, '');
	$step->('add with an empty value', $line->($p1));

	$put->($p2, '{"weight":10,"max_fails":3,"fail_timeout":10}');
	$step->('add with attributes', $line->($p1), $line->($p2, weight => 10, max_fails => 3));

	$del->($p1);
	$step->('delete', $line->($p2, weight => 10, max_fails => 3));

	$put->($p1, '{"weight":20,"max_fails":0,"fail_timeout":30}');
	$step->('re-add', $line->($p1, weight => 20, max_fails => 0, fail_timeout => 30),
		$line->($p2, weight => 10, max_fails => 3));

	# Attributes missing from a value take their defaults (the value is the truth).
	$put->($p2, '{"weight":40}');
	$step->('weight update', $line->($p1, weight => 20, max_fails => 0, fail_timeout => 30),
		$line->($p2, weight => 40));

	$put->($p2, '{"weight":40,"max_fails":3,"fail_timeout":"20s","down":1}');
	$step->('down 1', $line->($p1, weight => 20, max_fails => 0, fail_timeout => 30),
		$line->($p2, weight => 40, max_fails => 3, fail_timeout => 20, down => 1));

	$put->($p2, '{"weight":40,"max_fails":3,"fail_timeout":"20s","down":0}');
	$step->('down 0', $line->($p1, weight => 20, max_fails => 0, fail_timeout => 30),
		$line->($p2, weight => 40, max_fails => 3, fail_timeout => 20));

	my $mark = $t->log_offset();
	$reg->delete_all('test');
	my @last = ($line->($p1, weight => 20, max_fails => 0, fail_timeout => 30),
		$line->($p2, weight => 40, max_fails => 3, fail_timeout => 20));
	# A registry that deletes one server at a time (Nacos) may be read in between:
	# the last set is then the server it deletes last.
	my $n = $reg->deletes_at_once ? 2 : '[12]';
	ok($t->wait_for_log(qr/lists no servers; keeping the last $n\b/, 5, from => $mark),
		"$L: delete all: logged");
	my ($kept) = map { /keeping the last (\d+)/ ? $1 : () }
		$t->grep_log(qr/lists no servers/, from => $mark);
	if (($kept // 2) == 1) {
		my ($gone_last) = (sort map { "127.0.0.1:$_" } $p1, $p2)[-1];
		@last = grep { /server \Q$gone_last\E / } @last;
	}
	$step->('delete all keeps the last set', @last);

	###################################################################
	# Traffic goes to exactly the registered servers, in weight proportion

	$put->($p1, '{"weight":3}');
	$put->($p2, '{"weight":1}');
	my ($w1, $w2) = $attrs ? (3, 1) : (1, 1);
	ok(wait_for(sub { my $b = $body->(); $b =~ /count: 2\n/ && $b =~ /:$p1 weight=$w1 / && $b =~ /:$p2 weight=$w2 / },
		timeout => 5), "$L: weights $w1 and $w2 applied");
	my $c = count_by_backend($t, $proxy_port, 400);
	is(join(',', sort keys %$c), 'b1,b2', "$L: connections reach only registered servers");
	my ($n1, $n2) = (400 * $w1 / ($w1 + $w2), 400 * $w2 / ($w1 + $w2));
	ok(abs(($c->{b1} // 0) - $n1) <= 12 && abs(($c->{b2} // 0) - $n2) <= 12,
		"$L: weights $w1:$w2 give $n1:$n2 (+-12)") or diag(explain $c);

	###################################################################
	# One registry connection for the whole instance, not one per worker

	ok(wait_for(sub { $conns->() == 1 }, timeout => 5),
		"$L: 4 workers hold exactly 1 registry connection") or diag('connections: ' . $conns->());
	SKIP: {
		skip "$L: the long-poll counter needs an emulator", 1
			unless defined $reg->watches_open('test');
		ok(wait_for(sub { $reg->watches_open('test') == 1 },
			timeout => 5), "$L: and exactly 1 blocking query (watch)");
	}

	###################################################################
	# A change reaches new connections in every worker within 200 ms

	$put->($p3, '');
	$del->($p1);
	$del->($p2);
	my $t0 = time();
	my $ok = wait_for(sub {
		my $c = count_by_backend($t, $proxy_port, 8);
		($c->{b3} // 0) == 8;
	}, timeout => 0.2, interval => 0.005);
	ok($ok, sprintf('%s: new set serves every connection within 200 ms (%.0f ms)', $L, (time() - $t0) * 1000));
	is_deeply(count_by_backend($t, $proxy_port, 40), { b3 => 40 }, "$L: all 4 workers use the new set");

	###################################################################
	# An open session survives the removal of its server

	my $s = Test::Nginx::Stream->new(port => $proxy_port);
	is($s->readline, "b3\n", "$L: session opened on b3");
	$put->($p1, '');
	$del->($p3);
	ok(wait_for(sub { $body->() =~ /count: 1\n.*:$p1 / }, timeout => 5), "$L: b3 removed from the set");
	$s->write("still here\n");
	is($s->readline, "still here\n", "$L: the removed server still serves its open session");
	is_deeply(count_by_backend($t, $proxy_port, 8), { b1 => 8 }, "$L: new sessions go to b1");
	$s->close;
	ok(wait_for(sub { $b[2]->open_connections == 0 }, timeout => 5), "$L: session closed cleanly");

	###################################################################
	# Bad data never replaces the last good set

	$mark = $t->log_offset();
	SKIP: {
		my ($bad_re) = $reg->put_bad('test', "127.0.0.1:$p2");
		skip "$L: this registry refuses bad data itself", 3 unless $bad_re;
		ok($t->wait_for_log($bad_re, 5, from => $mark),
			"$L: bad data: error names upstream, entry and cause");
		like($body->(), qr/count: 1\n.*:$p1 /, "$L: bad data: last good set kept");
		$put->($p2, '{"weight":2}');
		ok(wait_for(sub { $body->() =~ /count: 2\n/ }, timeout => 5), "$L: fixed value applies");
	}
	$put->($p2, '{"weight":2}');

	###################################################################
	# A reload keeps the running set with no gap (the include has only the seed)

	my $before = $body->();
	ok($t->reload(), "$L: reloaded");
	is($body->(), $before, "$L: after reload: same set, straight from the shared zone");
	is_deeply([sort keys %{ count_by_backend($t, $proxy_port, 12) }], ['b1', 'b2'],
		"$L: after reload: traffic on the registry set");
	$put->($p3, '');
	ok(wait_for(sub { $body->() =~ /count: 3\n/ }, timeout => 5), "$L: after reload: new workers keep syncing");
	ok(wait_for(sub { $conns->() == 1 }, timeout => 5), "$L: after reload: still exactly 1 registry connection");

	my @bad = $t->grep_log(qr/\[(alert|crit|emerg)\]/);
	is(scalar @bad, 0, "$L: no alerts in the error log") or diag(join '', @bad);

	$t->stop();
}

1;
