#!/usr/bin/perl

# upsync_type=zookeeper when ZooKeeper fails, against real ZooKeeper 3.8:
# - one member frozen (SIGSTOP) past the session timeout: traffic goes on on
#   the last set, the client-side expiry is detected and logged in one clear
#   line, and after SIGCONT a new session reads everything again;
# - a 3-member ensemble (with a dead address listed first): the member in
#   use is stopped, then the next one frozen: the session moves on to another
#   member at once (resumed, not expired), traffic is unaffected, and changes
#   written through another member arrive.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;
use Time::HiRes qw/time/;

use Test::Nginx qw/ :DEFAULT port wait_for show_section http_get http_parse /;
use Test::Nginx::Backend;
use Test::Nginx::Stream;
use Test::Nginx::ZooKeeper;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 2)->has(qw/stream upsync/);
my $why = Test::Nginx::ZooKeeper->missing;
$t->skip_all($why) if $why;
$t->plan(24);

my $one = Test::Nginx::ZooKeeper->start($t, port => 8181, name => 'zs');
my $ens = Test::Nginx::ZooKeeper->start($t, port => 8191, members => 3, name => 'ze');
my $dead = port(8210);
my ($p1, $p2, $p3, $p4) = map { port($_) } 8081 .. 8084;
my $single = '127.0.0.1:' . $one->client_port(1);
my $list = "127.0.0.1:$dead," . $ens->hosts;

$t->write_file_expand('nginx.conf', <<"EOF");
%%TEST_GLOBALS%%
events { }
stream {
    upstream single {
        upsync $single/svc upsync_type=zookeeper zk_session_timeout=2s upsync_interval=200ms;
        upsync_dump_path %%TESTDIR%%/servers_single.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
    upstream ensemble {
        upsync $list/svc upsync_type=zookeeper zk_session_timeout=4s upsync_interval=200ms;
        upsync_dump_path %%TESTDIR%%/servers_ensemble.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
    server { listen 127.0.0.1:%%PORT_8080%%; proxy_pass single; }
    server { listen 127.0.0.1:%%PORT_8079%%; proxy_pass ensemble; }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF

$one->ops([ ['create', "/svc/127.0.0.1:$p1", ''] ]);
$ens->ops([ ['create', "/svc/127.0.0.1:$p1", ''] ]);
my @b = map { Test::Nginx::Backend->tcp($t, port => $_->[0], id => $_->[1]) }
	([$p1, 'b1'], [$p2, 'b2'], [$p3, 'b3'], [$p4, 'b4']);
$t->run();

sub section { show_section(port(8088), $_[0]) }
sub json {
	my ($name) = @_;
	return (http_parse(http_get(port(8088), "/?format=json&upstream=$name")))[2] // '';
}
sub field {
	my ($name, $f) = @_;
	return json($name) =~ /"$f": "?([^",\n]*)"?/ ? $1 : '';
}
sub greeting {
	my ($port) = @_;
	my $s = Test::Nginx::Stream->new(port => $port) or return '';
	return $s->readline(timeout => 3) // '';
}
sub count_log {
	my ($re, $from) = @_;
	return scalar(my @l = $t->grep_log($re, from => $from));
}

###############################################################################
# one member frozen past the session timeout

ok(wait_for(sub { section('single') =~ /count: 1\n.*:$p1 /s }, timeout => 10), 'single: synced');
my ($sid) = join('', $t->grep_log(qr/for upstream "single": session 0x/)) =~ /session (0x[0-9a-f]+) established/;
ok($sid, "single: session $sid");
my $sync0 = field('single', 'last_sync');

my $mark = $t->log_offset();
my $t0 = time();
$one->pause(1);
ok($t->wait_for_log(qr/for upstream "single": session $sid has expired \(no member answered within the session timeout of 2000ms\); a new session reads every znode again, the current servers stay meanwhile/,
	10, from => $mark), 'frozen: the expiry is detected and said in one line');
my $took = time() - $t0;
ok($took >= 1.5 && $took < 6, sprintf('frozen: expiry after %.2fs (timeout 2s)', $took));
is(greeting(port(8080)), "b1\n", 'frozen: traffic goes on on the last set');
# let a few reconnect rounds fail while the member stays frozen
select undef, undef, undef, 2;
is(count_log(qr/upstream "single": session 0x[0-9a-f]+ has expired/, $mark), 1, 'the expiry is said once');
my $errs = count_log(qr/\[error\] .*for upstream "single"/, $mark);
ok($errs >= 1 && $errs <= 3, "the failures are said once each ($errs lines)")
	or diag(join '', $t->grep_log(qr/for upstream "single"/, from => $mark));

$one->resume(1);
ok($t->wait_for_log(qr/for upstream "single": session (?!$sid)0x[0-9a-f]+ established at 127\.0\.0\.1:\d+ .*reading 1 znode/,
	10, from => $mark), 'resumed: a new session');
ok($t->wait_for_log(qr/for upstream "single": ZooKeeper answers again after \d+ failed attempts? \(at $single\)/,
	5, from => $mark), 'resumed: the recovery is logged');
ok(wait_for(sub { field('single', 'last_sync') ne $sync0 }, timeout => 5),
	'resumed: the znode is read again in full (last_sync moves)');
$one->ops([ ['create', "/svc/127.0.0.1:$p2", ''] ]);
ok(wait_for(sub { section('single') =~ /count: 2\n/ }, timeout => 5), 'resumed: changes arrive');
is(field('single', 'last_error'), 'null', 'resumed: no error shown');

###############################################################################
# a 3-member ensemble, a dead address first

ok(wait_for(sub { section('ensemble') =~ /count: 1\n.*:$p1 /s }, timeout => 10), 'ensemble: synced');
ok($t->grep_log(qr/for upstream "ensemble": cannot connect to 127\.0\.0\.1:$dead: .*Connection refused.*; keeping the current servers, trying the next member 127\.0\.0\.1:\d+ now/),
	'ensemble: the dead address is logged, the next member tried at once');
my $in_use = field('ensemble', 'registry_in_use');
my ($on) = grep { "127.0.0.1:" . $ens->client_port($_) eq $in_use } 1 .. 3;
ok($on, "ensemble: on member $on ($in_use)");
my ($esid) = join('', $t->grep_log(qr/for upstream "ensemble": session 0x/)) =~ /session (0x[0-9a-f]+) established/;

# the member in use stopped
$mark = $t->log_offset();
$ens->stop_member($on);
is(greeting(port(8079)), "b1\n", 'member stopped: traffic unaffected');
ok($t->wait_for_log(qr/for upstream "ensemble": session $esid resumed at 127\.0\.0\.1:(?!${\ $ens->client_port($on)})\d+/,
	10, from => $mark), 'member stopped: the session is resumed on another member');
my $werr;
ok(wait_for(sub { eval { $ens->ops([ ['create', "/svc/127.0.0.1:$p3", ''] ], timeout => 5); 1 }
	or do { $werr = $@; 0 } }, timeout => 20), 'a write through the other members') or diag($werr);
ok(wait_for(sub { section('ensemble') =~ /count: 2\n.*:$p3 /s }, timeout => 5),
	'member stopped: the change arrives');
$ens->start_member($on);

# the next member in use frozen: the read timeout moves on, the session is resumed
$in_use = field('ensemble', 'registry_in_use');
my ($on2) = grep { "127.0.0.1:" . $ens->client_port($_) eq $in_use } 1 .. 3;
$mark = $t->log_offset();
$ens->pause($on2);
ok($t->wait_for_log(qr/for upstream "ensemble": no answer from the server for \d+ ms \(read timeout.*\(at $in_use\); keeping the current servers, trying the next member/,
	10, from => $mark), "member $on2 frozen: read timeout, the next member");
ok($t->wait_for_log(qr/for upstream "ensemble": session $esid resumed at/, 10, from => $mark),
	'frozen member: the same session goes on elsewhere');
is(greeting(port(8079)) =~ /^b[13]\n$/ ? 1 : 0, 1, 'frozen member: traffic unaffected');
ok(wait_for(sub { eval { $ens->ops([ ['create', "/svc/127.0.0.1:$p4", ''] ],
	hosts => $ens->hosts(grep { $_ != $on2 } 1 .. 3), timeout => 5); 1 } }, timeout => 20)
	&& wait_for(sub { section('ensemble') =~ /count: 3\n/ }, timeout => 5),
	'frozen member: a change through another member arrives');
$ens->resume($on2);
is(count_log(qr/for upstream "ensemble": session 0x[0-9a-f]+ has expired/, 0), 0, 'the ensemble session never expired');

###############################################################################
