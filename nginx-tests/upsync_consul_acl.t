#!/usr/bin/perl

# Consul ACL tokens: token_file= (the secret stays out of nginx.conf), sent as
# X-Consul-Token; a missing or wrong token and a token that may read only part
# of the prefix each keep the last set with a clear line; the token never
# appears in the error log, the dump or upstream_show.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;

use Test::Nginx qw/ :DEFAULT port wait_for http_get http_parse show_section /;
use Test::Nginx::Consul;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 2)->has(qw/stream upsync/);
plan(skip_all => 'ACL setup uses the emulator') unless !Test::Nginx::Consul::want_real();
$t->plan(18);

my $secret = 's3cr3t-0b7e5c';
$t->write_file('token', "$secret\n");
$t->write_file('narrow', "narrow-token\n");
$t->write_file('pair', "pair-token\n");
$t->write_file('wrong', "not-a-token\n");
# the good token is private; the narrow one is readable by everyone (warned about)
chmod 0600, $t->testdir . '/token';
chmod 0644, $t->testdir . '/narrow';
chmod 0600, $t->testdir . '/pair';
my $p = port(8081);

$t->write_file_expand('nginx.conf', <<'EOF');
%%TEST_GLOBALS%%
events { }
stream {
    upstream good {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/good/ upsync_type=consul
               upsync_interval=200ms token_file=%%TESTDIR%%/token;
        upsync_dump_path %%TESTDIR%%/servers_good.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
    upstream none {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/good/ upsync_type=consul upsync_interval=200ms;
        upsync_dump_path %%TESTDIR%%/servers_none.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
    upstream wrong {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/good/ upsync_type=consul
               upsync_interval=200ms token_file=%%TESTDIR%%/wrong;
        upsync_dump_path %%TESTDIR%%/servers_wrong.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
    upstream partial {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/good/ upsync_type=consul
               upsync_interval=200ms token_file=%%TESTDIR%%/narrow;
        upsync_dump_path %%TESTDIR%%/servers_partial.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
    upstream ga {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/grp/a/ upsync_type=consul
               upsync_interval=200ms token_file=%%TESTDIR%%/pair;
        upsync_dump_path %%TESTDIR%%/servers_ga.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
    upstream gb {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/grp/b/ upsync_type=consul
               upsync_interval=200ms token_file=%%TESTDIR%%/pair;
        upsync_dump_path %%TESTDIR%%/servers_gb.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF

# the secret may read everything; "narrow-token" only keys under upstreams/good/a
my $consul = Test::Nginx::Consul->start($t, port => port(8500),
	args => ['--acl-token', "$secret", '--acl-token', 'narrow-token=upstreams/good/127.0.0.1:1',
		'--acl-token', 'pair-token=grp/a/', '--acl-token', 'pair-token=grp/b/']);
$consul->{http}->default_headers({ 'X-Consul-Token' => $secret });
$consul->put("upstreams/good/127.0.0.1:$p", '{"weight":3}');
# "ga" and "gb" share a poll of grp/ (same registry, token and parent), but their
# token may not read grp/other/
$consul->put("grp/a/127.0.0.1:$p", '{"weight":4}');
$consul->put("grp/b/127.0.0.1:$p", '{"weight":5}');
$consul->put("grp/other/127.0.0.1:1", '');
$t->run();

sub section { show_section(port(8088), @_) }

ok(wait_for(sub { section('good') =~ /:$p weight=3 / }, timeout => 5), 'token_file: synced with the token');
ok($t->wait_for_log(qr/upstream "none".*(unexpected HTTP status 403|may not read every entry)/, 5),
	'no token: refused, logged');
ok($t->wait_for_log(qr/upstream "wrong".*unexpected HTTP status 403: "ACL not found"/, 5),
	'unknown token: refused, logged');
ok($t->wait_for_log(qr/upstream "partial".*may not read every entry \(X-Consul-Results-Filtered-By-ACLs\)/, 5),
	'partial token: filtered list refused, logged');
like(section('none'), qr/count: 1\n.*:${\ port(8089)} /s, 'no token: configured set kept');
like(section('partial'), qr/count: 1\n.*:${\ port(8089)} /s, 'partial token: configured set kept');

# upstreams that share a poll under a parent their token may not read in full:
# they poll one by one instead, and sync
ok($t->wait_for_log(qr/\[warn\].*upsync: consul \S+\/v1\/kv\/grp\/ for upstreams "ga", "gb": the ACL token may not read every key under the parent prefix .*these 2 upstreams poll one by one/, 5),
	'a shared poll filtered by the ACL: said once, the upstreams poll one by one');
ok(wait_for(sub { section('ga') =~ /:$p weight=4 / && section('gb') =~ /:$p weight=5 / }, timeout => 5),
	'both synced from their own prefixes');
$consul->put("grp/b/127.0.0.1:$p", '{"weight":6}');
ok(wait_for(sub { section('gb') =~ /:$p weight=6 / }, timeout => 5), 'and a later change applies');
ok(!$t->grep_log(qr/upstream "g[ab]".*may not read every entry/), 'no error for either upstream');

ok(scalar $t->grep_log(qr/\[warn\].*token_file ".*\/narrow" of upstream "partial" can be read by group or others \(mode 0644\); make it 0600/),
	'a token file others may read: warned, with its mode');
ok(!$t->grep_log(qr/\[warn\].*token_file ".*\/token" of upstream/), 'a private one: no warning');

my $log = $t->error_log;
unlike($log, qr/\Q$secret\E/, 'the token is not in the error log');
unlike($t->read_file('servers_good.conf') // '', qr/\Q$secret\E/, 'nor in the dump');
unlike((http_parse(http_get(port(8088), '/')))[2] // '', qr/\Q$secret\E/, 'nor in upstream_show text');
unlike((http_parse(http_get(port(8088), '/?format=json')))[2] // '', qr/\Q$secret\E/, 'nor in JSON');
unlike((http_parse(http_get(port(8088), '/metrics')))[2] // '', qr/\Q$secret\E/, 'nor in metrics');

# a token file that cannot be read fails nginx -t with the path and the cause
my $conf = $t->read_file('nginx.conf');
$conf =~ s{token_file=\S+/token;}{token_file=/nonexistent/token;};
$t->write_file('bad.conf', $conf);
my ($ok, $err) = $t->test_config('bad.conf');
like($err, qr/\[emerg\] upsync: cannot read token_file "\/nonexistent\/token" of upstream "good": No such file/,
	'unreadable token_file: nginx -t names the file and the cause');
