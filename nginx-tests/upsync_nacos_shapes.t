#!/usr/bin/perl

# Nacos answer shapes and login against the project's emulator
# (nacos_emulator.py), for what rnacos does not serve:
# - a 3.x server (v3 client API only, v1/v2 gone) with auth: nacos_api=auto finds
#   v3, logs in, maps float weights (0.5 -> 50, 1.0 -> 100);
# - a 2.x server (v2 and v1): auto moves past the v3 404 to v2; nacos_api=v2
#   skips detection; healthyOnly=false is always sent;
# - a 3.x server without the v1 login path (only /nacos/v3/auth/user/login): the v1
#   login answers 404, the v3 one is used (and kept: v1 is not asked again); a wrong
#   password there is refused with the v3 path named;
# - every token expires: one new login, the change still arrives;
# - wrong or missing credentials, and a registry error (503), keep the set with
#   one clear line; the password and token are in no log, dump or status;
# - an instance turning unhealthy or disabled leaves the set while its open
#   session goes on; polls with no change are spaced by upsync_interval.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;
use Time::HiRes qw/time/;

use Test::Nginx qw/ :DEFAULT port wait_for http_get http_parse show_section upsync_upstreams /;
use Test::Nginx::Backend;
use Test::Nginx::Stream;
use Test::Nginx::Nacos;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 2)->has(qw/stream upsync/);
plan(skip_all => 'python3 missing') unless Test::Nginx::which('python3');
$t->plan(27);

my $SECRET = 'pw-3c9e71';
my $v3 = Test::Nginx::Nacos->start($t, emulator => 1, name => 'nacos3', port => port(8500),
	auth => "upsync:$SECRET", args => ['--apis', 'v3']);
my $v2 = Test::Nginx::Nacos->start($t, emulator => 1, name => 'nacos2', port => port(8501),
	args => ['--apis', 'v1,v2']);
my $l3 = Test::Nginx::Nacos->start($t, emulator => 1, name => 'nacos3login', port => port(8502),
	auth => "upsync:$SECRET", login_apis => 'v3', args => ['--apis', 'v3']);
my ($p1, $p2, $p3) = (port(8081), port(8082), port(8083));
$v3->register('orders', '127.0.0.1', $p1, weight => 0.5);
$v3->register('orders', '127.0.0.1', $p2, weight => 1.0);
$v2->register('web', '127.0.0.1', $p1, weight => 2);
$v2->register('web', '127.0.0.1', $p2, weight => 2, metadata => { max_fails => '0' });
$l3->register('pay', '127.0.0.1', $p1, weight => 2.0);
$l3->control('reset_stats');   # from here on, nginx's requests only

$t->write_file('good', "upsync:$SECRET\n");
$t->write_file('wrong', "upsync:not-the-password\n");
my $i = 'upsync_interval=200ms';
my $conf = upsync_upstreams({
	v3 => "127.0.0.1:%%PORT_8500%%/orders upsync_type=nacos $i token_file=%%TESTDIR%%/good",
	v3wrong => "127.0.0.1:%%PORT_8500%%/orders upsync_type=nacos $i token_file=%%TESTDIR%%/wrong",
	v3none => "127.0.0.1:%%PORT_8500%%/orders upsync_type=nacos $i",
	v2 => "127.0.0.1:%%PORT_8501%%/web upsync_type=nacos $i",
	l3 => "127.0.0.1:%%PORT_8502%%/pay upsync_type=nacos $i token_file=%%TESTDIR%%/good",
	l3wrong => "127.0.0.1:%%PORT_8502%%/pay upsync_type=nacos $i token_file=%%TESTDIR%%/wrong",
	v2fixed => "127.0.0.1:%%PORT_8501%%/nacos/v2/ns/instance/list?serviceName=web&namespaceId=public upsync_type=nacos nacos_api=v2 $i",
});
$t->write_file_expand('nginx.conf', <<"EOF");
%%TEST_GLOBALS%%
events { }
stream {
$conf
    server { listen 127.0.0.1:%%PORT_8080%%; proxy_pass v2; proxy_connect_timeout 2s; }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF
my @b = map { Test::Nginx::Backend->tcp($t, port => $_->[0], id => $_->[1]) }
	([$p1, 'b1'], [$p2, 'b2'], [$p3, 'b3']);
$t->run();
my $section = sub { show_section(port(8088), @_) };

###############################################################################
# shapes and detection

ok(wait_for(sub { my $s = $section->('v3');
	$s =~ /count: 2\n/ && $s =~ /:$p1 weight=50 / && $s =~ /:$p2 weight=100 / }, timeout => 5),
	'v3 shape with login: float weights 0.5 and 1.0 become 50 and 100');
ok($t->grep_log(qr/upstream "v3".*reading the Nacos v3 instance-list API$/m),
	'v3: detection logged');
ok(wait_for(sub { my $s = $section->('v2');
	$s =~ /count: 2\n/ && $s =~ /:$p1 weight=200 max_fails=2 / && $s =~ /:$p2 weight=200 max_fails=0 / }, timeout => 5),
	'v2 shape: synced, metadata max_fails applied');
ok($t->grep_log(qr/upstream "v2".*reading the Nacos v2 instance-list API \(v3: HTTP 404\)/),
	'v2: auto moved past the v3 404, logged once');
ok(wait_for(sub { $section->('v2fixed') =~ /count: 2\n/ }, timeout => 5),
	'nacos_api=v2 from a copied open-API path: synced');
ok(!$t->grep_log(qr/upstream "v2fixed".*reading the Nacos/),
	'nacos_api=v2: no detection');
my %ho = map { ($_ // 'unset') => 1 } @{ $v2->stats->{healthy_only} }, @{ $v3->stats->{healthy_only} };
is(join(',', sort keys %ho), 'false', 'healthyOnly=false on every list request');

###############################################################################
# credentials

ok($t->wait_for_log(qr/upstream "v3wrong".*authentication failed: Nacos refused user "upsync" of token_file= at \/nacos\/v1\/auth\/login: HTTP 403: unknown user!/, 5),
	'wrong password: refused, logged');
ok($t->wait_for_log(qr/upstream "v3none".*authentication failed: Nacos requires authentication: set token_file=/, 5),
	'no credentials: logged');
like($section->('v3wrong') . $section->('v3none'), qr/count: 1\n.*:${\ port(8089)} .*count: 1\n.*:${\ port(8089)} /s,
	'both keep the configured server');

# a 3.x server with only the v3 login path
ok(wait_for(sub { $section->('l3') =~ /count: 1\n.*:$p1 weight=200 /s }, timeout => 5),
	'v3 login only: logged in, synced');
ok($t->wait_for_log(qr/upstream "l3wrong".*authentication failed: Nacos refused user "upsync" of token_file= at \/nacos\/v3\/auth\/user\/login: HTTP 403: unknown user!/, 5),
	'v3 login only, wrong password: refused, the v3 login path named');
like($section->('l3wrong'), qr/count: 1\n.*:${\ port(8089)} /s, 'v3 login only, wrong password: the configured server kept');
# the refused upstream tries again after its backoff: wait for a second refusal, so
# that a try at the v1 path after the first one would be counted
ok(wait_for(sub { $l3->stats->{refused} >= 2 }, timeout => 10), 'v3 login only: the wrong password tried again');
my $st = $l3->stats;
my %login = map { ($_ => $st->{requests}{"POST /nacos/$_"} // 0) } qw{v1/auth/login v3/auth/user/login};
ok($login{'v1/auth/login'} == 2 && $login{'v3/auth/user/login'} >= 3 && $st->{logins} >= 1,
	'v3 login only: v1 tried once per upstream (404), then the v3 path, kept for later logins')
	or diag(explain $st);

my $mark = $t->log_offset();
my $logins = $v3->stats->{logins};
$v3->control('expire_tokens');
$v3->register('orders', '127.0.0.1', $p3, weight => 0.25);
ok(wait_for(sub { $section->('v3') =~ /:$p3 weight=25 / }, timeout => 5),
	'every token expired: the change still arrives');
ok($t->wait_for_log(qr/upstream "v3".*access token is no longer accepted \(expired or revoked\); logging in again/, 3, from => $mark),
	'new login logged as a notice');
ok($v3->stats->{logins} - $logins <= 3, 'one new login per refused upstream (v3 and v3wrong tries)')
	or diag($v3->stats->{logins} - $logins);

###############################################################################
# health, enabled, sessions, errors

my $s = Test::Nginx::Stream->new(port => port(8080));
my $first = $s->readline // '';
chomp $first;
my ($sp, $other) = $first eq 'b1' ? ($p1, $p2) : ($p2, $p1);
$v2->update('web', '127.0.0.1', $sp, weight => 2, healthy => 0);
ok(wait_for(sub { $section->('v2') =~ /count: 1\n.*:$other /s }, timeout => 5),
	"unhealthy instance ($first) leaves the set");
$s->write("still here\n");
is($s->readline, "still here\n", 'its open session goes on');
$s->close;
$v2->update('web', '127.0.0.1', $sp, weight => 2);
$v2->update('web', '127.0.0.1', $other, weight => 2, enabled => 0);
ok(wait_for(sub { $section->('v2') =~ /count: 1\n.*:$sp /s }, timeout => 5),
	'disabled instance leaves the set, the healthy one is back');

$mark = $t->log_offset();
$v2->control('fault', { mode => 'status', status => 503, body => 'overloaded',
	path_prefix => '/nacos/v2/ns/instance/list', count => 4 });
ok($t->wait_for_log(qr/upstream "v2".*unexpected HTTP status 503: "overloaded"; keeping the current servers/, 5, from => $mark),
	'503: logged, set kept');
ok($t->wait_for_log(qr/upstream "v2".*registry answers again after \d+ failed attempt/, 10, from => $mark),
	'recovery logged');
like($section->('v2'), qr/count: 1\n.*:$sp /s, 'same set after the outage');

# no change: polls spaced by upsync_interval (200 ms; 4 upstreams read E2/E3)
$v2->control('reset_stats');
my $t0 = time();
wait_for(sub { time() - $t0 >= 2 }, timeout => 3);
my $n = $v2->stats->{requests}{'GET /nacos/v2/ns/instance/list'} // 0;
ok($n >= 10 && $n <= 24, "2 upstreams polling every 200 ms: $n requests in 2 s");

###############################################################################
# secrets

my $log = $t->error_log;
my @tokens = grep { length } @{ $v3->stats->{access_tokens} }, @{ $l3->stats->{access_tokens} };
unlike($log, qr/\Q$SECRET\E|not-the-password/, 'no password in the error log');
my $all = join '', (map { $t->read_file("servers_$_.conf") // '' } qw/v3 v3wrong v3none v2 v2fixed l3 l3wrong/),
	map { (http_parse(http_get(port(8088), $_)))[2] // '' } '/', '/?format=json', '/metrics';
ok(!grep({ index($log . $all, $_) >= 0 } @tokens, $SECRET),
	'no password or token in the log, the dumps or upstream_show (text, JSON, metrics)');

$t->stop();
