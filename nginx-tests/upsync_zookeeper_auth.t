#!/usr/bin/perl

# Digest authentication with upsync_type=zookeeper (token_file= holds
# USER:PASSWORD), against real ZooKeeper 3.8.  A stock server accepts any
# digest credential when it is sent; what the credentials are worth shows on
# reads of a znode with an ACL: the right ones read it, wrong ones (and none)
# get NoAuth, reported clearly once and retried (the set stays), and once the
# ACL lets them read, the znode is read again.  The password is in no log
# line, dump or status view; each credential has its own session.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;

use Test::Nginx qw/ :DEFAULT port wait_for show_section http_get http_parse /;
use Test::Nginx::Registry;
use Test::Nginx::ZooKeeper;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 2)->has(qw/stream upsync/);
my $why = Test::Nginx::ZooKeeper->missing;
$t->skip_all($why) if $why;
$t->plan(15);

my $zk = Test::Nginx::ZooKeeper->start($t, port => 8181, name => 'zk');
my $zport = $zk->client_port(1);
my $cred = 'upsync:s3cret-pass';
my $d = $t->testdir;
$t->write_file('good.secret', "$cred\n");
$t->write_file('bad.secret', "upsync:wr0ng-pa55\n");
my ($p1, $p2) = (port(8081), port(8082));

my %ups = (
	good => "127.0.0.1:$zport/secure upsync_type=zookeeper token_file=$d/good.secret",
	bad => "127.0.0.1:$zport/secure upsync_type=zookeeper token_file=$d/bad.secret",
	anon => "127.0.0.1:$zport/secure upsync_type=zookeeper",
);
my $blocks = Test::Nginx::upsync_upstreams(\%ups);
$t->write_file_expand('nginx.conf', <<"EOF");
%%TEST_GLOBALS%%
events { }
stream {
$blocks
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF

$zk->ops([ ['create_acl', '/secure', '', $cred],
	['create_acl', "/secure/127.0.0.1:$p1", '', $cred],
	['create_acl', "/secure/127.0.0.1:$p2", '{"weight":2}', $cred] ], auth => $cred);
$t->run();

sub section { show_section(port(8088), $_[0]) }
sub get { (http_parse(http_get(port(8088), $_[0])))[2] // '' }

ok(wait_for(sub { section('good') =~ /count: 2\n/ }, timeout => 10),
	'the right credentials read the ACL-protected children');
my $NOAUTH = qr/getChildren \/secure: NoAuth \(-102\): the node's ACL does not let these credentials read it \(check the digest user and password\); keeping the current servers, reading it again every 5000ms/;
ok($t->wait_for_log(qr/upstream "bad".*$NOAUTH/, 5), 'wrong password: NoAuth, said clearly');
ok($t->wait_for_log(qr/upstream "anon".*$NOAUTH/, 5), 'no credentials: NoAuth');
like(section('bad'), qr/count: 1\n.*:${\ port(8089)} /s, 'wrong password: the configured server stays');
like(get('/?format=json&upstream=bad'), qr/"last_error": "getChildren \/secure: NoAuth \(-102\)/,
	'wrong password: the status shows the error');
# nothing to wait for: the point is that nothing more is logged while the
# read is retried (every 5 s), so let one retry happen
select undef, undef, undef, 5.5;
my @lines = $t->grep_log(qr/upstream "bad".*NoAuth/);
is(scalar @lines, 1, 'the error is logged once, not once per retry');
is(Test::Nginx::Registry::connections_from({ port => $zport }, $t->worker_pids), 3,
	'one session (connection) per credential');

# the ACL opens up: the retried read succeeds
my $mark = $t->log_offset();
$zk->ops([ ['acl_open', '/secure'], ['acl_open', "/secure/127.0.0.1:$p1"],
	['acl_open', "/secure/127.0.0.1:$p2"] ], auth => $cred);
ok(wait_for(sub { section('bad') =~ /count: 2\n/ && section('anon') =~ /count: 2\n/ }, timeout => 10),
	'readable now: both read it within a retry');
ok($t->wait_for_log(qr/upstream "bad".*the znode can be read again \(was: getChildren \/secure: NoAuth/, 5,
	from => $mark), 'and say so');
like(get('/?format=json&upstream=bad'), qr/"last_error": null/, 'the error is cleared');

# the password is nowhere
my $all = $t->error_log . join('', map { $t->read_file("servers_$_.conf") // '' } sort keys %ups)
	. get('/') . get('/?format=json') . get('/metrics');
unlike($all, qr/s3cret|wr0ng|pa55/, 'no password in the log, the dumps or the status views');
like($t->error_log, qr/upstream "good"/, 'the log was read');
like(get('/?format=json'), qr/"good"/, 'the status was read');

# the log never shows a credential, even where a server quotes one
ok(!$t->grep_log(qr/upsync:s3/), 'not even user:password');
my @bad = $t->grep_log(qr/\[(alert|crit|emerg)\]/);
is(scalar @bad, 0, 'no alerts') or diag(join '', @bad);
