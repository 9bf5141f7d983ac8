#!/usr/bin/perl

# One bad registration never freezes an upstream: among 20 good entries, an
# entry that is not a valid server (a host name, port 0, a value that is not
# JSON, a negative weight; Consul KV and the service catalog) is skipped and
# reported (one line when it appears, one when it goes away, and in the JSON
# and Prometheus views), while every other add and delete applies at once.
# Bad data never enters the connection backoff: the fix applies at once too.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use JSON::PP;
use Test::More;

use Test::Nginx qw/ :DEFAULT port wait_for http_get http_parse show_section /;
use Test::Nginx::Consul;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 2)->has(qw/stream upsync/)->plan(34);

$t->write_file_expand('nginx.conf', <<'EOF');
%%TEST_GLOBALS%%
events { }
stream {
    upstream kv {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/kv/ upsync_type=consul
               upsync_interval=5s upsync_timeout=6m;
        upsync_dump_path %%TESTDIR%%/servers_kv.conf;
        server 127.0.0.1:1;
    }
    upstream svc {
        upsync 127.0.0.1:%%PORT_8500%%/v1/catalog/service/web upsync_type=consul_services
               upsync_interval=5s upsync_timeout=6m;
        upsync_dump_path %%TESTDIR%%/servers_svc.conf;
        server 127.0.0.1:1;
    }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF

my $consul = Test::Nginx::Consul->start($t, port => port(8500));
my $base = 20000 + (port(8500) % 1000) * 10;	# ports only named, never connected to
my @good = map { "127.0.0.1:" . ($base + $_) } 1 .. 20;
$consul->put("upstreams/kv/$_", '{"weight":2}') for @good;
$t->run();

# A change has to show within 200 ms (the module has no backoff on bad data).
sub within_200ms { wait_for($_[0], timeout => 0.2, interval => 0.01) }
sub section { show_section(port(8088), $_[0]) }
sub count_of { (section($_[0]) =~ /count: (\d+)\n/)[0] // -1 }
sub json {
	my (undef, undef, $body) = http_parse(http_get(port(8088), '/?format=json') // '');
	return eval { decode_json($body // '') } // {};
}

ok(wait_for(sub { count_of('kv') == 20 }, timeout => 5), 'kv: 20 servers synced');

my @BAD = (
	[ 'a host name', 'upstreams/kv/db.example:5432', '', qr/invalid server address "db\.example:5432".*host names are not resolved/ ],
	[ 'port 0', 'upstreams/kv/127.0.0.1:0', '', qr/invalid server address "127\.0\.0\.1:0"/ ],
	[ 'a value that is not JSON', "upstreams/kv/127.0.0.1:" . ($base + 50), 'weight: 3', qr/value is not a JSON object/ ],
	[ 'a negative weight', "upstreams/kv/127.0.0.1:" . ($base + 51), '{"weight":-5}', qr/invalid value for "weight": -5 \(an integer from 1 to 10000\)/ ],
);

my $n = 21;
for my $case (@BAD) {
	my ($what, $key, $value, $cause) = @$case;
	my $mark = $t->log_offset();
	$consul->put($key, $value);
	ok($t->wait_for_log(qr/\[warn\].*upstream "kv".*entry "\Q$key\E" skipped: .*$cause.*; the other entries apply/, 5, from => $mark),
		"$what: one line names the upstream, the key and the cause");
	# every later add and delete applies at once
	my $add = "127.0.0.1:" . ($base + $n++);
	$consul->put("upstreams/kv/$add", '');
	ok(within_200ms(sub { section('kv') =~ /\Q$add\E / }), "$what: an add applies within 200 ms");
	my $gone = shift @good;
	$consul->delete("upstreams/kv/$gone");
	ok(within_200ms(sub { section('kv') !~ /\Q$gone\E / }), "$what: a delete applies within 200 ms");
	my $j = json()->{upstreams}{kv}{upsync} // {};
	ok(($j->{skipped_count} // 0) == 1 && ($j->{skipped}[0]{key} // '') eq $key
		&& ($j->{skipped}[0]{cause} // '') =~ $cause, "$what: the JSON view lists the skipped entry and why")
		or diag(explain $j);
	# fixing (here: removing) the entry applies at once and is logged once
	$mark = $t->log_offset();
	$consul->delete($key);
	ok($t->wait_for_log(qr/\[notice\].*upstream "kv".*entry "\Q$key\E" is no longer skipped/, 5, from => $mark),
		"$what: its end is logged");
	my @lines = $t->grep_log(qr/upstream "kv".*\Q$key\E/);
	is(scalar @lines, 2, "$what: two lines in all (appears, goes away)") or diag(join '', @lines);
}

# a bad value fixed in place: the server appears within 200 ms
my $fix = "127.0.0.1:" . ($base + 60);
$consul->put("upstreams/kv/$fix", '{"weight":0}');
ok($t->wait_for_log(qr/entry "upstreams\/kv\/\Q$fix\E" skipped/, 5), 'weight 0: skipped');
$consul->put("upstreams/kv/$fix", '{"weight":4}');
ok(within_200ms(sub { section('kv') =~ /\Q$fix\E weight=4 / }), 'fixed in place: applied within 200 ms');

# the service catalog: a host name as ServiceAddress, port 0
$consul->register_service({ ID => 'web-1', Name => 'web', Address => '127.0.0.1', Port => $base + 70 });
ok(wait_for(sub { section('svc') =~ /count: 1\n/ }, timeout => 5), 'svc: synced');
my $mark = $t->log_offset();
$consul->register_service({ ID => 'web-host', Name => 'web', Address => 'web-3.internal', Port => 8080 });
$consul->register_service({ ID => 'web-port0', Name => 'web', Address => '127.0.0.1', Port => 0 });
ok($t->wait_for_log(qr/\[warn\].*upstream "svc".*entry "web-host" skipped: invalid server address "web-3\.internal"/, 5, from => $mark),
	'svc: a host name is skipped, named by its service ID');
ok($t->wait_for_log(qr/\[warn\].*upstream "svc".*entry "web-port0" skipped: invalid port 0 \(expected 1 to 65535\)/, 5, from => $mark),
	'svc: port 0 is named as such');
$consul->register_service({ ID => 'web-2', Name => 'web', Address => '127.0.0.1', Port => $base + 71 });
ok(within_200ms(sub { section('svc') =~ /count: 2\n/ }), 'svc: a new good instance applies within 200 ms');

# Prometheus
my (undef, undef, $metrics) = http_parse(http_get(port(8088), '/metrics') // '');
like($metrics // '', qr/^upsync_upstream_skipped_entries\{upstream="svc"\} 2$/m, 'metrics: skipped entries per upstream');

# no [error] lines: bad entries are not errors of the exchange
my @errors = $t->grep_log(qr/\[error\].*upsync/);
is(scalar @errors, 0, 'no error lines') or diag(join '', @errors);
ok(!$t->grep_log(qr/retrying in \d+ms/), 'no backoff');

###############################################################################
