#!/usr/bin/perl

# etcd specifics, against real etcd 3.4 and 3.5:
# - v2: a watch re-sent from an index older than etcd's last 1000 events gets
#   400/errorCode 401; the module reads everything again and keeps syncing;
# - v3: a watch from a compacted revision is cancelled; same recovery;
# - an etcd restart in the middle of a watch: one error line, the last set
#   keeps serving, and syncing resumes when etcd is back.
# A short upsync_timeout makes the module re-send its quiet watch from the
# same index after a flood of unrelated events: that is what exposes it to a
# cleared history.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;

use Test::Nginx qw/ :DEFAULT port wait_for http_get http_parse /;
use Test::Nginx::Backend;
use Test::Nginx::Registry;

select STDERR; $| = 1;
select STDOUT; $| = 1;

use constant PER_RUN => 9;

Test::Nginx->new()->has(qw/stream upsync/);
my @runs = map { my $v = $_; map { [$_, $v] } qw/etcd2 etcd3/ }
	grep { Test::Nginx::Registry->available('etcd2', $_) } qw/3.4 3.5/;
plan(skip_all => 'no etcd binary') unless @runs;
plan(tests => PER_RUN * @runs);

for my $run (@runs) {
	my ($kind, $version) = @$run;
	my $t = Test::Nginx->new(workers => 2);
	my $reg = Test::Nginx::Registry->start($t, kind => $kind, version => $version,
		port => port(8500), peer_port => port(8600));
	my $etcd = $reg->etcd;
	my $L = $reg->label;
	my ($p1, $p2) = (port(8081), port(8082));
	my $upsync = $reg->upsync('e', 'upsync_interval=200ms upsync_timeout=2s');

	$t->write_file_expand('nginx.conf', <<"EOF");
%%TEST_GLOBALS%%
events { }
stream {
    upstream e {
        $upsync;
        upsync_dump_path %%TESTDIR%%/servers_e.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
    server { listen 127.0.0.1:%%PORT_8080%%; proxy_pass e; }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF
	my @backends = (Test::Nginx::Backend->tcp($t, port => $p1, id => 'b1'),
		Test::Nginx::Backend->tcp($t, port => $p2, id => 'b2'));
	$reg->put_server('e', "127.0.0.1:$p1", '');
	$t->run();

	my $show = sub {
		my (undef, undef, $b) = http_parse(http_get(port(8088)) // '');
		return $b // '';
	};
	ok(wait_for(sub { $show->() =~ /count: 1\n.*:$p1 /s }, timeout => 5), "$L: synced");

	# Many unrelated events while the module's watch waits quietly; when the
	# watch times out (2 s) it is re-sent from its old position.
	my $mark = $t->log_offset();
	if ($kind eq 'etcd2') {
		$etcd->flood_v2('other/key', 1100);
		ok($t->wait_for_log(qr/upstream "e".*etcd no longer has the events since index \d+.*reading everything again/,
			8, from => $mark), "$L: cleared history detected and logged");
	} else {
		for (1 .. 20) { $etcd->v3_put('/other/key', "v$_") }
		$etcd->v3_compact($etcd->v3_revision);
		ok($t->wait_for_log(qr/upstream "e".*the watch from revision \d+ was cancelled \(compacted up to revision \d+\); reading everything again/,
			8, from => $mark), "$L: compacted watch detected and logged");
	}
	$reg->put_server('e', "127.0.0.1:$p2", '{"weight":2}');
	ok(wait_for(sub { $show->() =~ /count: 2\n/ }, timeout => 5), "$L: changes apply after the recovery");
	my @errors = $t->grep_log(qr/\[error\].*upstream "e"/, from => $mark);
	is(scalar @errors, 0, "$L: the recovery is not an error") or diag(join '', @errors);

	# etcd restarts in the middle of a watch
	$mark = $t->log_offset();
	$etcd->stop();
	ok($t->wait_for_log(qr/\[error\].*upstream "e".*keeping the current servers/, 8, from => $mark),
		"$L: etcd down: one error line");
	my $c = count_by_backend($t, port(8080), 30);
	is_deeply([sort keys %$c], ['b1', 'b2'], "$L: etcd down: traffic on the last set");
	$etcd->start_again();
	$reg->delete_server('e', "127.0.0.1:$p1");
	ok(wait_for(sub { $show->() =~ /count: 1\n.*:$p2 /s }, timeout => 10), "$L: etcd back: syncing resumes");
	ok($t->wait_for_log(qr/upstream "e".*registry answers again/, 5, from => $mark), "$L: recovery logged");
	my @errs = $t->grep_log(qr/\[error\].*upstream "e"/, from => $mark);
	ok(@errs >= 1 && @errs <= 3, "$L: a few error lines for the whole outage, not one per attempt (" . scalar(@errs) . ')');

	$t->stop();
}
