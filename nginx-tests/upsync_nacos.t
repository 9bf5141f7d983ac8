#!/usr/bin/perl

# Nacos against a real server, rnacos (v1 naming API, open-API auth on, a 3 s
# token lifetime):
# - login from token_file=, and renewal before the token runs out: changes keep
#   arriving over several lifetimes with no refused request;
# - a failover list whose first member is down: the next one is read at once;
# - float weights 0.5 and 1.0 become 50 and 100 and split traffic 1:2;
# - weight 0 marks the server down; an instance that stops sending heartbeats
#   turns unhealthy and leaves the set while its open session goes on; a
#   disabled one leaves too; a wrong password keeps the set with one clear line
#   and the password in no log.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;
use HTTP::Tiny;
use Time::HiRes qw/time/;

use Test::Nginx qw/ :DEFAULT port wait_for show_section upsync_upstreams /;
use Test::Nginx::Backend;
use Test::Nginx::Stream;
use Test::Nginx::Nacos;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 2)->has(qw/stream upsync/);
plan(skip_all => 'no rnacos binary (scripts/test installs it; TEST_NACOS_BINARY)')
	unless Test::Nginx::Nacos->binary;
$t->plan(17);

my $SECRET = 'pw-81f0c2';
my $n = Test::Nginx::Nacos->start($t, port => port(8500), grpc_port => port(8501),
	console_port => port(8502), auth => "upsync:$SECRET", token_ttl => 3, health_timeout => 1);
my ($p1, $p2, $p3) = (port(8081), port(8082), port(8083));
$n->register('api', '127.0.0.1', $p1, weight => 0.5);
$n->register('api', '127.0.0.1', $p2, weight => 1.0);

$t->write_file('good', "upsync:$SECRET\n");
$t->write_file('wrong', "upsync:not-the-password\n");
my $i = 'upsync_interval=200ms token_file=%%TESTDIR%%';
my $conf = upsync_upstreams({
	api => "127.0.0.1:%%PORT_8503%%,127.0.0.1:%%PORT_8500%%/api upsync_type=nacos $i/good",
	wrong => "127.0.0.1:%%PORT_8500%%/api upsync_type=nacos $i/wrong",
	strong => "127.0.0.1:%%PORT_8500%%/api upsync_type=nacos $i/good strong_dependency=on",
});
$t->write_file_expand('nginx.conf', <<"EOF");
%%TEST_GLOBALS%%
events { }
stream {
$conf
    server { listen 127.0.0.1:%%PORT_8080%%; proxy_pass api; proxy_connect_timeout 2s; }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF
my @b = map { Test::Nginx::Backend->tcp($t, port => $_->[0], id => $_->[1]) }
	([$p1, 'b1'], [$p2, 'b2'], [$p3, 'b3']);
$t->run();
my $section = sub { show_section(port(8088), @_) };
my $start = time();
my $early_token = $n->_token;

ok(wait_for(sub { my $s = $section->('api');
	$s =~ /count: 2\n/ && $s =~ /:$p1 weight=50 / && $s =~ /:$p2 weight=100 / }, timeout => 5),
	'login, read through the second member of the failover list: weights 50 and 100');
ok($t->grep_log(qr/upstream "strong".*strong_dependency=on: starting with 2 servers from the registry/),
	'strong_dependency=on: the master logs in, detects the API and starts with the set');
ok($t->grep_log(qr/upstream "api".*cannot connect to 127\.0\.0\.1:${\ port(8503)}: .*trying the next registry address 127\.0\.0\.1:${\ port(8500)} now/),
	'the member that is down: logged, the next one tried at once');
ok($t->grep_log(qr/upstream "api".*reading the Nacos v1 instance-list API \(v3: HTTP 404; v2: HTTP 404\)/),
	'rnacos serves v1 only: detection logged');
my $c = count_by_backend($t, port(8080), 300);
ok(abs(($c->{b1} // 0) - 100) <= 12 && abs(($c->{b2} // 0) - 200) <= 12,
	'0.5 : 1.0 gives 100 : 200 connections (+-12)') or diag(explain $c);

ok($t->wait_for_log(qr/upstream "wrong".*authentication failed: Nacos refused user "upsync" of token_file= at \/nacos\/v1\/auth\/login: HTTP 403/, 5),
	'wrong password: logged');
like($section->('wrong'), qr/count: 1\n.*:${\ port(8089)} /s, 'wrong password: configured server kept');

# weight 0: down
$n->update('api', '127.0.0.1', $p1, weight => 0);
ok(wait_for(sub { $section->('api') =~ /:$p1 weight=1 max_fails=2 fail_timeout=10s down;/ }, timeout => 5),
	'weight 0: the server is down');
is_deeply(count_by_backend($t, port(8080), 6), { b2 => 6 }, 'and takes no new connections');

# an ephemeral instance that never sends a heartbeat turns unhealthy (rnacos:
# 1 s + 3 s) and leaves the set; a session on it goes on
$n->update('api', '127.0.0.1', $p1, weight => 1);
$n->register('api', '127.0.0.1', $p3, weight => 1, ephemeral => 1);
ok(wait_for(sub { $section->('api') =~ /count: 3\n/ }, timeout => 5), 'ephemeral instance added');
my $s;
for (1 .. 12) {
	my $try = Test::Nginx::Stream->new(port => port(8080));
	if (($try->readline // '') eq "b3\n") { $s = $try; last }
	$try->close;
}
ok(wait_for(sub { my $x = $section->('api'); $x =~ /count: 2\n/ && $x !~ /:$p3 / }, timeout => 10),
	'no heartbeats: unhealthy, left the set');
$s->write("still here\n") if $s;
is($s ? $s->readline : undef, "still here\n", 'its open session goes on');
$s->close if $s;
$n->update('api', '127.0.0.1', $p2, weight => 1, enabled => 0);
ok(wait_for(sub { my $x = $section->('api'); $x =~ /count: 1\n/ && $x =~ /:$p1 / }, timeout => 5),
	'disabled instance leaves the set');
my $other = $p2;

# token renewal: after three lifetimes (3 s each) changes still arrive and no
# request was ever refused for its token
wait_for(sub { time() - $start > 9.5 }, timeout => 12);
$n->update('api', '127.0.0.1', $other, weight => 1);
ok(wait_for(sub { $section->('api') =~ /count: 2\n/ }, timeout => 5),
	'a change after three token lifetimes arrives');
ok(!$t->grep_log(qr/upstream "api".*(no longer accepted|authentication failed)/),
	'renewed before it ran out: no refused token, no failed login');
my $r = HTTP::Tiny->new(timeout => 5)->get("http://127.0.0.1:${\ port(8500)}/nacos/v1/ns/instance/list?serviceName=api&accessToken=$early_token");
is($r->{status}, 403, 'while a token as old as the first one is refused by now');

unlike($t->error_log, qr/\Q$SECRET\E|not-the-password/, 'no password in the error log');

$t->stop();
