#!/usr/bin/perl

# Hostile registries: a table of bad responses, served by the Consul emulator's
# fault API and by a scripted raw HTTP server (Test::Nginx::RawHttp) standing
# in for Consul, etcd v2 and etcd v3.  Each case is
#     [ name, how it is served, what must happen ]
# and for each one the test checks that
#   1. no nginx worker crashed (no "exited on signal" / panic line, same
#      worker pids),
#   2. upstream_show still lists the last good set, byte for byte,
#   3. the expected log line appeared, naming the upstream and the cause
#      (or, for responses that are valid after all, that nothing was logged
#      as an error).
# Every fault is served once (count 1): the next poll gets the good answer
# again, so the module's error state is reset ("registry answers again")
# before the next case, and every case's cause is logged afresh.
# Each upstream has its own nginx (2 workers), so a crash belongs to exactly
# one upstream, and so to the case it was running.  The upstreams run their
# cases in parallel, one case at a time each.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use JSON::PP;
use MIME::Base64 qw/encode_base64/;
use Test::More;
use Time::HiRes qw/time/;

use Test::Nginx qw/ :DEFAULT port wait_for http_get http_parse /;
use Test::Nginx::Consul;
use Test::Nginx::RawHttp;

select STDERR; $| = 1;
select STDOUT; $| = 1;

local $ENV{TEST_NGINX_CONSUL} = 'emulator';	# the fault API is the emulator's

# the harness of the registries (and of the plan); each upstream's nginx has its own
my $t = Test::Nginx->new()->has(qw/stream upsync/);

my $T0 = time;
my $INTERVAL = '100ms';
my $TIMEOUT = '2s';	# Consul: wait=1s, deadline 3062ms; etcd reads: 2000ms
my $CONSUL_DEADLINE = 3062;

sub b64 { encode_base64($_[0], '') }
# base64 of text: UTF-8 first (a registry stores bytes; the tests write text)
sub b64t { my $s = $_[0]; utf8::encode($s); b64($s) }
my $JSON = JSON::PP->new->canonical;

###############################################################################
# The upstreams and their last good sets

# name => { type, good => [ [addr, value-json, show line] ], ... }
my %U;
my @ORDER = qw/ck1 ck2 ck3 cs rc1 rc2 re2 re3/;

for my $n (1 .. 3) {
	$U{"ck$n"} = { type => 'consul', via => 'emu', prefix => "upstreams/ck$n/",
		emu_prefix => "/v1/kv/upstreams/ck$n/", emu_stat => "GET /v1/kv/upstreams/ck$n/",
		good => [
			[ "127.0.0.1:100${n}1", '{"weight":5}', 'weight=5 max_fails=2 fail_timeout=10s' ],
			[ "127.0.0.1:100${n}2", '{"max_fails":3,"fail_timeout":"7s"}', 'weight=1 max_fails=3 fail_timeout=7s' ],
		] };
}
$U{cs} = { type => 'consul_services', via => 'emu',
	emu_prefix => '/v1/catalog/service/websvc', emu_stat => 'GET /v1/catalog/service/websvc',
	good => [
		[ '127.0.0.1:10041', [ 'weight=2' ], 'weight=2 max_fails=2 fail_timeout=10s' ],
		[ '127.0.0.1:10042', [ 'max_fails=0' ], 'weight=1 max_fails=0 fail_timeout=10s' ],
	] };
for my $n (1 .. 2) {
	$U{"rc$n"} = { type => 'consul', via => 'raw', prefix => "upstreams/rc$n/",
		good => [
			[ "127.0.0.1:100${n}5", '{"weight":2}', 'weight=2 max_fails=2 fail_timeout=10s' ],
			[ "127.0.0.1:100${n}6", '{"max_fails":0}', 'weight=1 max_fails=0 fail_timeout=10s' ],
		] };
}
$U{re2} = { type => 'etcd', via => 'raw', prefix => '/upstreams/re2',
	good => [
		[ '127.0.0.1:10071', '{"weight":4}', 'weight=4 max_fails=2 fail_timeout=10s' ],
		[ '127.0.0.1:10072', '', 'weight=1 max_fails=2 fail_timeout=10s' ],
	] };
$U{re3} = { type => 'etcdv3', via => 'raw', prefix => '/upstreams/re3/',
	good => [
		[ '127.0.0.1:10081', '{"max_conns":7}', 'weight=1 max_fails=2 fail_timeout=10s max_conns=7' ],
		[ '127.0.0.1:10082', '{"weight":3,"down":true}', 'weight=3 max_fails=2 fail_timeout=10s down' ],
	] };

for my $name (@ORDER) {
	my $u = $U{$name};
	$u->{name} = $name;
	$u->{show} = "Upstream name: $name; Backend server count: 2\n"
		. join('', map { "        server $_->[0] $_->[2];\n" } @{$u->{good}});
}

###############################################################################
# Response builders

# resp('200 OK', [headers], body, cl => 0 to leave Content-Length out)
sub resp {
	my ($status, $headers, $body, %o) = @_;
	$body //= '';
	my $h = join '', map { "$_\r\n" } @{$headers // []};
	$h .= 'Content-Length: ' . length($body) . "\r\n" if $o{cl} // 1;
	return "HTTP/1.1 $status\r\n$h\r\n$body";
}
sub chunk { sprintf("%x\r\n%s\r\n", length $_[0], $_[0]) }

# Consul KV JSON for a list of [key, value] (value undef: null; else base64'd)
sub kv_json {
	return '[' . join(',', map {
		'{"LockIndex":0,"Key":' . $JSON->encode($_->[0]) . ',"Flags":0,"Value":'
			. (defined $_->[1] ? '"' . b64t($_->[1]) . '"' : 'null')
			. ',"CreateIndex":5,"ModifyIndex":5}'
	} @_) . ']';
}
sub good_kv { my ($u) = @_; map { [ "$u->{prefix}$_->[0]", $_->[1] ] } @{$u->{good}} }

my $CONSUL_INDEX = 100;
sub consul_ok {
	my ($body, @extra) = @_;
	return resp('200 OK', [ 'Content-Type: application/json', "X-Consul-Index: $CONSUL_INDEX",
		'X-Consul-Knownleader: true', @extra ], $body);
}

my $ETCD_INDEX = 50;
sub etcd2_listing {
	my ($u, @leaves) = @_;
	my $dir = $u->{prefix};
	@leaves = map { { key => "$dir/$_->[0]", value => $_->[1], modifiedIndex => 4, createdIndex => 4 } }
		@{$u->{good}} unless @leaves;
	return $JSON->encode({ action => 'get', node => { key => $dir, dir => JSON::PP::true,
		nodes => \@leaves, modifiedIndex => 3, createdIndex => 3 } });
}
sub etcd2_ok {
	my ($body, @extra) = @_;
	return resp('200 OK', [ 'Content-Type: application/json', "X-Etcd-Cluster-Id: 1",
		"X-Etcd-Index: $ETCD_INDEX", 'X-Raft-Index: 99', 'X-Raft-Term: 2', @extra ], $body);
}
my $ETCD2_EVENT = '{"action":"set","node":{"key":"/upstreams/re2/127.0.0.1:10099","value":"","modifiedIndex":51,"createdIndex":51}}';

my $REV = 30;
sub etcd3_range {
	my ($u, $rev, @kvs) = @_;
	@kvs = map { [ "$u->{prefix}$_->[0]", $_->[1] ] } @{$u->{good}} unless @kvs;
	return '{"header":{"cluster_id":"1","member_id":"2","revision":' . $JSON->encode($rev // "$REV")
		. ',"raft_term":"2"},"kvs":[' . join(',', map {
			'{"key":"' . b64($_->[0]) . '","create_revision":"5","mod_revision":"6","version":"1","value":"'
			. b64t($_->[1]) . '"}' } @kvs) . '],"count":"' . scalar(@kvs) . '"}';
}
sub etcd3_ok { resp('200 OK', [ 'Content-Type: application/json', 'Grpc-Metadata-Content-Type: application/grpc' ], $_[0]) }
my $W_HEAD = resp('200 OK', [ 'Content-Type: application/json', 'Transfer-Encoding: chunked' ], '', cl => 0);
my $W_CREATED = '{"result":{"header":{"cluster_id":"1","member_id":"2","revision":"30","raft_term":"2"},"created":true}}' . "\n";
my $W_PROGRESS = '{"result":{"header":{"revision":"30"}}}' . "\n";	# a message without events
my $W_EVENT = '{"result":{"header":{"revision":"31"},"events":[{"kv":{"key":"' . b64('/upstreams/re3/127.0.0.1:10099')
	. '","create_revision":"31","mod_revision":"31","version":"1"}}]}}' . "\n";

# The good answers of the raw servers.
my %GOOD = (
	consul => sub {
		my ($u, $req) = @_;
		my ($idx) = $req->{target} =~ /[?&]index=(\d+)/;
		# a blocking query at the current index waits (as Consul's does), and
		# is answered at once when the test changes the faults
		my @wait = ($idx // 0) == $CONSUL_INDEX ? ([ await => 800 ]) : ();
		return [ @wait, [ send => consul_ok(kv_json(good_kv($u))) ] ];
	},
	etcd => sub {
		my ($u, $req) = @_;
		return [ [ send => etcd2_ok(etcd2_listing($u)) ] ] unless $req->{target} =~ /wait=true/;
		# a watch: headers at once, an event when the test changes the faults
		return [ [ send => resp('200 OK', [ 'Content-Type: application/json', "X-Etcd-Index: $ETCD_INDEX",
			'Transfer-Encoding: chunked' ], '', cl => 0) ],
			[ await => 30_000 ], [ send => chunk($ETCD2_EVENT) . "0\r\n\r\n" ] ];
	},
	etcdv3 => sub {
		my ($u, $req) = @_;
		return [ [ send => etcd3_ok(etcd3_range($u)) ] ] unless $req->{target} eq '/v3/watch';
		return [ [ send => $W_HEAD . chunk($W_CREATED) ], [ await => 30_000 ], [ send => chunk($W_EVENT) ] ];
	},
);
my %CLASSIFY = (
	consul => sub { 'read' },
	etcd => sub { $_[0]{target} =~ /wait=true/ ? 'watch' : 'read' },
	etcdv3 => sub { $_[0]{target} eq '/v3/watch' ? 'watch' : 'read' },
);

###############################################################################
# The cases
#
# Each case: [ name, serve, expect ]
#   serve:  { emu => { fault fields } }             Consul emulator, once
#           { raw => [ steps ], on => 'read'|'watch', match => 'text' }
#                                                   raw server, once (on the
#                                                   first request of that class
#                                                   whose target has the text)
#   expect: 'regex'              by what the regex names (see kind_of):
#                                a transport or status failure: an [error] line
#                                "...: <regex>...; keeping the current servers,
#                                retrying ...", then "registry answers again";
#                                bad data in a good exchange ({ data => }): an
#                                [error] line "...; keeping the current servers,
#                                the next change is read as soon as the registry
#                                has one", then "the registry's answer is valid
#                                again" (no failover, no backoff);
#                                one bad entry ({ skip => }): a [warn] line
#                                'entry "KEY" skipped: <regex>; the other entries
#                                apply' (every valid entry applies) and no error
#           { log => 'regex' }   a warn/notice line, and no error
#           { quiet => 1 }       the response is valid: no error line at all
#           { any => 'regex' }   either that error, or accepted quietly
#   Extra keys in expect: timeout (s), requests => qr// (a later request
#   must match, raw servers only).
# %P in bodies and regexes is the upstream's key prefix.

my $LONG_E = "\x{e9}" x 40;	# 80 bytes of UTF-8: a 64-byte cut falls inside a character
my $LONGKEY = '1' x 100_000;
my $CAUSE_ADDR = 'invalid server address';

sub kv_bad_value {	# one entry with this raw JSON value text
	my ($value) = @_;
	return { emu => { mode => 'body', body => kv_json([ '%P127.0.0.1:10999', $value ]) } };
}
sub kv_bad_key {
	my ($key) = @_;
	return { emu => { mode => 'body', body => kv_json([ "%P$key", undef ]) } };
}
sub kv_raw_body { return { emu => { mode => 'body', body => $_[0], ($_[1] ? (status => $_[1]) : ()) } } }
sub kv_headers { return { emu => { mode => 'body', body => '%GOOD', headers => $_[0] } } }

my @CONSUL_EMU = (
	# not JSON, or not the JSON Consul sends
	[ 'malformed JSON', { emu => { mode => 'malformed' } }, 'invalid JSON in response' ],
	[ 'plain text', kv_raw_body('not json at all'), 'invalid JSON in response: expected ident|invalid JSON in response: expected value' ],
	[ 'empty 200 body', kv_raw_body(''), 'invalid JSON in response: EOF while parsing' ],
	[ 'object instead of list', kv_raw_body('{"not":"a list"}'), 'invalid JSON in response: invalid type: map, expected a sequence' ],
	[ 'null body', kv_raw_body('null'), 'invalid JSON in response: invalid type: null, expected a sequence' ],
	[ 'string body', kv_raw_body('"upstreams"'), 'invalid JSON in response: invalid type: string "upstreams", expected a sequence' ],
	[ 'number body', kv_raw_body('42'), 'invalid JSON in response: invalid type: integer `42`, expected a sequence' ],
	[ 'list of numbers', kv_raw_body('[1,2,3]'), 'invalid type: integer `1`, expected struct KvEntry' ],
	[ 'list of strings', kv_raw_body('["%P127.0.0.1:1","%P127.0.0.1:2"]'), 'invalid type: string ".*127.0.0.1:1", expected struct KvEntry' ],
	[ 'list of null', kv_raw_body('[null]'), 'invalid type: null, expected struct KvEntry' ],
	[ 'raw NUL byte in a string', kv_raw_body(qq([{"Key":"%P127.0.0.1:1\x00","Value":null}])), 'invalid JSON in response: control character' ],
	[ 'trailing garbage after the list', kv_raw_body('[]]'), 'invalid JSON in response: trailing characters' ],
	[ 'nesting 10000 deep', kv_raw_body('[' x 10000 . ']' x 10000), 'invalid JSON in response: (recursion limit exceeded|invalid type: sequence)' ],
	[ 'invalid UTF-8', kv_raw_body(qq([{"Key":"%P\x{fffd}\x{fffe}","Value":null}])), "$CAUSE_ADDR|invalid JSON" ],
	# wrong types in entries
	[ 'Key as number', kv_raw_body('[{"Key":12345,"Value":null}]'), 'invalid type: integer `12345`, expected a string' ],
	[ 'Key null', kv_raw_body('[{"Key":null,"Value":null}]'), 'invalid type: null, expected a string' ],
	[ 'Key missing', kv_raw_body('[{"Value":null,"Flags":0}]'), 'missing field `Key`' ],
	[ 'Key as list', kv_raw_body('[{"Key":["%P127.0.0.1:1"],"Value":null}]'), 'invalid type: sequence, expected a string' ],
	[ 'Value as object', kv_raw_body('[{"Key":"%P127.0.0.1:1","Value":{"weight":1}}]'), 'invalid type: map, expected a string' ],
	[ 'Value as number', kv_raw_body('[{"Key":"%P127.0.0.1:1","Value":7}]'), 'invalid type: integer `7`, expected a string' ],
	[ 'Value as list of strings', kv_raw_body('[{"Key":"%P127.0.0.1:1","Value":["a","b"]}]'), 'invalid type: sequence, expected a string' ],
	[ 'Value as boolean', kv_raw_body('[{"Key":"%P127.0.0.1:1","Value":true}]'), 'invalid type: boolean `true`, expected a string' ],
	[ 'Value not base64', kv_raw_body('[{"Key":"%P127.0.0.1:1","Value":"!!!not base64"}]'), 'entry "%P127.0.0.1:1": value is not a JSON object: value is not base64' ],
	[ 'Value not JSON', kv_bad_value('hello'), 'entry "%P127.0.0.1:10999": value is not a JSON object: expected value' ],
	[ 'Value a JSON list', kv_bad_value('[1,2]'), 'value is not a JSON object: \[1,2\]' ],
	[ 'Value a JSON number', kv_bad_value('17'), 'value is not a JSON object: 17' ],
	[ 'Value a long non-ASCII JSON string', kv_bad_value(qq("$LONG_E")), 'value is not a JSON object' ],
	# numbers
	[ 'weight 0', kv_bad_value('{"weight":0}'), 'invalid value for "weight": 0 \(an integer from 1 to 10000\)' ],
	[ 'weight negative', kv_bad_value('{"weight":-5}'), 'invalid value for "weight": -5 ' ],
	[ 'weight 1e30', kv_bad_value('{"weight":1e30}'), 'invalid value for "weight": 1e\+30 ' ],
	[ 'weight 2^64', kv_bad_value('{"weight":18446744073709551616}'), 'invalid value for "weight": 1\.8446744073709552e\+19 ' ],
	[ 'weight 2^64 as a string', kv_bad_value('{"weight":"18446744073709551616"}'), 'invalid value for "weight": "18446744073709551616" ' ],
	[ 'weight -0', kv_bad_value('{"weight":-0}'), 'invalid value for "weight": -?0(\.0)? ' ],
	[ 'weight 1e3', kv_bad_value('{"weight":1e3}'), 'invalid value for "weight": 1000\.0 ' ],
	[ 'weight 2.5', kv_bad_value('{"weight":2.5}'), 'invalid value for "weight": 2\.5 ' ],
	[ 'weight over the maximum', kv_bad_value('{"weight":1000001}'), 'invalid value for "weight": 1000001 ' ],
	[ 'weight just over 10000', kv_bad_value('{"weight":10001}'), 'invalid value for "weight": 10001 \(an integer from 1 to 10000\)' ],
	[ 'weight a word', kv_bad_value('{"weight":"heavy"}'), 'invalid value for "weight": "heavy" ' ],
	[ 'weight empty string', kv_bad_value('{"weight":""}'), 'invalid value for "weight": "" ' ],
	[ 'weight null', kv_bad_value('{"weight":null}'), 'invalid value for "weight": null ' ],
	[ 'weight true', kv_bad_value('{"weight":true}'), 'invalid value for "weight": true ' ],
	[ 'weight object', kv_bad_value('{"weight":{"v":1}}'), 'invalid value for "weight": \{"v":1\} ' ],
	[ 'weight long non-ASCII string', kv_bad_value(qq({"weight":"$LONG_E"})), 'invalid value for "weight"' ],
	[ 'max_fails negative', kv_bad_value('{"max_fails":-1}'), 'invalid value for "max_fails": -1 \(a non-negative integer\)' ],
	[ 'max_conns "1e9"', kv_bad_value('{"max_conns":"1e9"}'), 'invalid value for "max_conns": "1e9" ' ],
	[ 'fail_timeout bad unit', kv_bad_value('{"fail_timeout":"10x"}'), 'invalid value for "fail_timeout": "10x" ' ],
	[ 'fail_timeout 1e30', kv_bad_value('{"fail_timeout":1e30}'), 'invalid value for "fail_timeout": 1e\+30 ' ],
	[ 'fail_timeout overflowing', kv_bad_value('{"fail_timeout":"99999999999999999999s"}'), 'invalid value for "fail_timeout": "99999999999999999999s" ' ],
	[ 'fail_timeout over a year', kv_bad_value('{"fail_timeout":31536001}'), 'invalid value for "fail_timeout": 31536001 ' ],
	[ 'down "maybe"', kv_bad_value('{"down":"maybe"}'), 'invalid value for "down": "maybe" \(0, 1, true or false\)' ],
	[ 'down 2', kv_bad_value('{"down":2}'), 'invalid value for "down": 2 ' ],
	[ 'backup list', kv_bad_value('{"backup":[]}'), 'invalid value for "backup": \[\] ' ],
	[ 'slow_start negative', kv_bad_value('{"slow_start":-1}'), 'invalid value for "slow_start": -1 ' ],
	# addresses
	[ 'host name', kv_bad_key('example.com:80'), qq($CAUSE_ADDR "example.com:80".*host names are not resolved) ],
	[ 'octet 999', kv_bad_key('999.1.1.1:80'), qq($CAUSE_ADDR "999.1.1.1:80") ],
	[ 'port 0', kv_bad_key('127.0.0.1:0'), qq($CAUSE_ADDR "127.0.0.1:0") ],
	[ 'port 65536', kv_bad_key('127.0.0.1:65536'), qq($CAUSE_ADDR "127.0.0.1:65536") ],
	[ 'port -1', kv_bad_key('127.0.0.1:-1'), qq($CAUSE_ADDR "127.0.0.1:-1") ],
	[ 'no port', kv_bad_key('127.0.0.1'), qq($CAUSE_ADDR "127.0.0.1") ],
	[ 'IPv6 without brackets', kv_bad_key('::1:80'), qq($CAUSE_ADDR "::1:80") ],
	[ 'IPv6 without port', kv_bad_key('[::1]'), qq($CAUSE_ADDR "\\[::1\\]") ],
	[ 'unicode address', kv_bad_key("\x{fc}n\x{ef}c\x{f8}d\x{e9}:80"), qq($CAUSE_ADDR "[^"]+:80") ],
	[ 'escaped NUL in the key', kv_raw_body('[{"Key":"%P127.0.0.1:80\u0000","Value":null}]'), qq($CAUSE_ADDR "127.0.0.1:80.") ],
	[ 'line break in the key (log forging)', kv_raw_body('[{"Key":"%P1.2.3.4:80\nFORGED [emerg] 1#1: forged line","Value":null}]'),
		{ err => $CAUSE_ADDR, no_line => '^FORGED' } ],
	[ '100 KB key', kv_bad_key("$LONGKEY:80"), qq($CAUSE_ADDR "1111) ],
	[ 'empty key (not under the prefix)', kv_raw_body('[{"Key":"","Value":null}]'), { log => 'the registry lists no servers; keeping the last 2' } ],
	[ 'key "/"', kv_raw_body('[{"Key":"/","Value":"!!"}]'), { log => 'the registry lists no servers; keeping the last 2' } ],
	[ 'empty list', kv_raw_body('[]'), { log => 'the registry lists no servers; keeping the last 2 \(an upstream is never emptied\)' } ],
	[ 'every server twice', kv_raw_body('%GOOD2'), { log => '2 entries repeat an address already listed; the first one is used' } ],
	[ 'a folder key with a bad value', kv_raw_body('%GOODFOLDER'), { quiet => 1 } ],
	# status and headers
	[ 'status 500', { emu => { mode => 'status', status => 500, body => 'rpc error: No cluster leader' } }, 'unexpected HTTP status 500: "rpc error: No cluster leader"' ],
	[ 'status 503 with a 100 KB body', { emu => { mode => 'status', status => 503, body => 'x' x 100_000 } }, 'unexpected HTTP status 503: "x{128}\.\.\."' ],
	[ 'status 301', { emu => { mode => 'body', status => 301, body => '', headers => { Location => 'http://127.0.0.1:1/' } } }, 'unexpected HTTP status 301' ],
	[ 'status 403 ACL', { emu => { mode => 'status', status => 403, body => 'Permission denied' } }, 'unexpected HTTP status 403: "Permission denied"' ],
	[ '404 without X-Consul-Index', { emu => { mode => 'body', status => 404, body => '', headers => { 'X-Consul-Index' => undef } } }, 'response has no X-Consul-Index header' ],
	[ '404 with X-Consul-Index (empty prefix)', { emu => { mode => 'body', status => 404, body => '' } }, { log => 'the registry lists no servers' } ],
	[ 'no X-Consul-Index', kv_headers({ 'X-Consul-Index' => undef }), 'response has no X-Consul-Index header' ],
	[ 'X-Consul-Index negative', kv_headers({ 'X-Consul-Index' => '-5' }), 'invalid X-Consul-Index header "-5"' ],
	[ 'X-Consul-Index -0', kv_headers({ 'X-Consul-Index' => '-0' }), 'invalid X-Consul-Index header "-0"' ],
	[ 'X-Consul-Index a word', kv_headers({ 'X-Consul-Index' => 'abc' }), 'invalid X-Consul-Index header "abc"' ],
	[ 'X-Consul-Index empty', kv_headers({ 'X-Consul-Index' => '' }), 'invalid X-Consul-Index header ""' ],
	[ 'X-Consul-Index 2^64', kv_headers({ 'X-Consul-Index' => '18446744073709551616' }), 'invalid X-Consul-Index header "18446744073709551616"' ],
	[ 'X-Consul-Index 1e3', kv_headers({ 'X-Consul-Index' => '1e3' }), 'invalid X-Consul-Index header "1e3"' ],
	[ 'X-Consul-Index hex', kv_headers({ 'X-Consul-Index' => '0x10' }), 'invalid X-Consul-Index header "0x10"' ],
	[ 'X-Consul-Index goes backwards', { emu => { mode => 'index_backwards', index => 1 } }, { quiet => 1 } ],
	# transport
	[ 'truncated body', { emu => { mode => 'truncate' } }, 'bad response: connection closed before the response was complete \(truncated\)' ],
	# a kept-alive connection closed without an answer: asked again at once on a new one
	[ 'closed without an answer', { emu => { mode => 'close' } }, { quiet => 1 } ],
	# a reset before any byte on a new connection is how Consul's per-client
	# connection limit can look: the line says so
	[ 'connection reset', { emu => { mode => 'refuse' } }, 'reset by peer|truncated|cannot connect|refused|turned the connection away before answering' ],
	[ 'no answer at all', { emu => { mode => 'hang' } }, { err => "no complete response within ${CONSUL_DEADLINE}ms \\(upsync_timeout\\)", timeout => 10 } ],
	# another registry's answer
	[ 'etcd v2 body', kv_raw_body('{"action":"get","node":{"key":"/%P","dir":true,"nodes":[{"key":"/%P127.0.0.1:1","value":""}]}}'), 'invalid type: map, expected a sequence' ],
	[ 'etcd v3 body', kv_raw_body('{"header":{"revision":"5"},"kvs":[{"key":"' . b64('/x/127.0.0.1:1') . '"}]}'), 'invalid type: map, expected a sequence' ],
	[ 'catalog body', kv_raw_body('[{"Node":"n","Address":"127.0.0.1","ServiceID":"web","ServicePort":80}]'), 'missing field `Key`' ],
);

sub svc_body { { emu => { mode => 'body', body => $_[0] } } }
my @SERVICES_EMU = (
	[ 'object instead of list', svc_body('{"web":[]}'), 'invalid JSON in response: invalid type: map, expected a sequence' ],
	[ 'not JSON', svc_body('<html>502 Bad Gateway</html>'), 'invalid JSON in response' ],
	[ 'port as string', svc_body('[{"ServiceID":"s-port-str","Address":"127.0.0.1","ServicePort":"8080"}]'), 'entry "s-port-str": invalid port "8080" \(expected 1 to 65535\)' ],
	[ 'port 0', svc_body('[{"ServiceID":"s-port0","Address":"127.0.0.1","ServicePort":0}]'), 'entry "s-port0": invalid port 0 \(expected 1 to 65535\)' ],
	[ 'port 70000', svc_body('[{"ServiceID":"s-port70000","Address":"127.0.0.1","ServicePort":70000}]'), 'entry "s-port70000": invalid port 70000 ' ],
	[ 'port negative', svc_body('[{"ServiceID":"s-portneg","Address":"127.0.0.1","ServicePort":-80}]'), 'entry "s-portneg": invalid port -80 ' ],
	[ 'port 1e3', svc_body('[{"ServiceID":"s-port1e3","Address":"127.0.0.1","ServicePort":1e3}]'), 'entry "s-port1e3": invalid port 1000\.0 ' ],
	[ 'address as object', svc_body('[{"ServiceID":"s-addrobj","Address":{"ip":"127.0.0.1"},"ServicePort":80}]'), qq(entry "s-addrobj": $CAUSE_ADDR "") ],
	[ 'host name address', svc_body('[{"ServiceID":"s-host","Address":"web.example","ServicePort":80}]'), qq(entry "s-host": $CAUSE_ADDR "web.example" \\(expected ip:port or \\[ipv6\\]:port; host names are not resolved\\)) ],
	[ 'weight tag 0', svc_body('[{"ServiceID":"s-w0","Address":"127.0.0.1","ServicePort":80,"ServiceTags":["weight=0"]}]'), 'entry "s-w0": invalid value for "weight": "0"' ],
	[ 'max_fails tag a word', svc_body('[{"ServiceID":"s-mf","Address":"127.0.0.1","ServicePort":80,"ServiceTags":["max_fails=many"]}]'), 'invalid value for "max_fails": "many"' ],
	[ 'fail_timeout tag 1e30', svc_body('[{"ServiceID":"s-ft","Address":"127.0.0.1","ServicePort":80,"ServiceTags":["fail_timeout=1e30"]}]'), 'invalid value for "fail_timeout": "1e30"' ],
	[ 'down tag "maybe"', svc_body('[{"ServiceID":"s-down","Address":"127.0.0.1","ServicePort":80,"ServiceTags":["down=maybe"]}]'), 'invalid value for "down": "maybe"' ],
	[ 'weight tag long non-ASCII', svc_body(qq([{"ServiceID":"s-wlong","Address":"127.0.0.1","ServicePort":80,"ServiceTags":["weight=$LONG_E"]}])), 'entry "s-wlong": invalid value for "weight"' ],
	[ 'list of null', svc_body('[null]'), 'entry "\(service without ID\)": invalid port none' ],
	[ 'list of strings', svc_body('["web1","web2"]'), 'entry "\(service without ID\)": invalid port none' ],
	[ 'Service as a string (health shape)', svc_body('[{"Node":{"Address":"127.0.0.1"},"Service":"web","Checks":[]}]'), 'invalid port none' ],
	[ 'fields of the wrong type that are ignored', svc_body('%GOODSVC'), { quiet => 1 } ],
	[ 'ServiceID a long non-ASCII string', svc_body(qq([{"ServiceID":"$LONG_E$LONG_E","Address":"127.0.0.1","ServicePort":0}])), 'invalid port 0' ],
	[ 'empty list', svc_body('[]'), { log => 'the registry lists no servers' } ],
	[ 'status 500', { emu => { mode => 'status', status => 500, body => 'No cluster leader' } }, 'unexpected HTTP status 500: "No cluster leader"' ],
);

# Raw-server cases for a Consul KV upstream: the HTTP layer.
my $GOOD_HEAD = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Consul-Index: $CONSUL_INDEX\r\n";
my @CONSUL_RAW = (
	[ 'slow drip, complete in time', { raw => [ [ drip => '%GOODRESP', 3 ] ] }, { quiet => 1, timeout => 10 } ],
	[ 'slow drip past upsync_timeout', { raw => [ [ drip => '%GOODRESP', 40 ] ] }, { err => "no complete response within ${CONSUL_DEADLINE}ms", timeout => 7 } ],
	[ 'slow headers', { raw => [ [ drip => $GOOD_HEAD, 4 ], [ send => "Content-Length: 2\r\n\r\n[]" ] ] }, { log => 'the registry lists no servers', timeout => 10 } ],
	[ '5000 headers', { raw => [ [ send => $GOOD_HEAD ], [ repeat => "X-Flood: yes\r\n", 5000 ], [ send => "Content-Length: 2\r\n\r\n[]" ] ] },
		'bad response: response header larger than 65536 bytes or more than 100 headers' ],
	[ '101 headers', { raw => [ [ send => $GOOD_HEAD ], [ repeat => "X-Flood: yes\r\n", 98 ], [ send => "Content-Length: 2\r\n\r\n[]" ] ] },
		'response header larger than 65536 bytes or more than 100 headers' ],
	[ '100 headers exactly', { raw => [ [ send => $GOOD_HEAD . "X-Flood: yes\r\n" x 96 . "Content-Length: %GOODLEN\r\n\r\n%GOODKV" ] ] }, { quiet => 1 } ],
	[ 'one 100 KB header', { raw => [ [ send => $GOOD_HEAD . 'X-Big: ' ], [ repeat => 'a' x 1000, 100 ], [ send => "\r\nContent-Length: 2\r\n\r\n[]" ] ] },
		'response header larger than 65536 bytes' ],
	[ 'endless header line', { raw => [ [ send => $GOOD_HEAD . 'X-Big: ' ], [ repeat => 'a' x 4096, 2048 ], [ 'close' ] ] }, 'response header larger than 65536 bytes' ],
	[ 'Content-Length shorter than the body', { raw => [ [ send => $GOOD_HEAD . "Content-Length: 10\r\n\r\n%GOODKV" ] ] },
		{ any => 'data after the end of the response|invalid JSON in response' } ],
	[ 'Content-Length longer than the body, then close', { raw => [ [ send => $GOOD_HEAD . "Content-Length: 100000\r\n\r\n%GOODKV" ], [ 'close' ] ] },
		'connection closed before the response was complete \(truncated\)' ],
	[ 'Content-Length longer than the body, then silence', { raw => [ [ send => $GOOD_HEAD . "Content-Length: 100000\r\n\r\n%GOODKV" ], [ 'hang' ] ] },
		{ err => "no complete response within ${CONSUL_DEADLINE}ms", timeout => 10 } ],
	[ 'Content-Length negative', { raw => [ [ send => $GOOD_HEAD . "Content-Length: -1\r\n\r\n[]" ] ] }, 'bad response: invalid Content-Length' ],
	[ 'Content-Length a word', { raw => [ [ send => $GOOD_HEAD . "Content-Length: many\r\n\r\n[]" ] ] }, 'bad response: invalid Content-Length' ],
	[ 'Content-Length +2', { raw => [ [ send => $GOOD_HEAD . "Content-Length: +2\r\n\r\n[]" ] ] }, 'bad response: invalid Content-Length' ],
	[ 'Content-Length 2^64', { raw => [ [ send => $GOOD_HEAD . "Content-Length: 18446744073709551616\r\n\r\n[]" ] ] }, 'bad response: invalid Content-Length' ],
	[ 'two different Content-Lengths', { raw => [ [ send => $GOOD_HEAD . "Content-Length: 2\r\nContent-Length: 3\r\n\r\n[] " ] ] }, 'bad response: invalid Content-Length' ],
	[ '10 MB body announced', { raw => [ [ send => $GOOD_HEAD . "Content-Length: 10485760\r\n\r\n[" ], [ repeat => ' ' x 65536, 160 ] ] },
		'bad response: response body larger than the 8388608 byte limit' ],
	[ '10 MB chunked body', { raw => [ [ send => $GOOD_HEAD . "Transfer-Encoding: chunked\r\n\r\n" ], [ repeat => chunk(' ' x 65536), 160 ], [ send => "0\r\n\r\n" ] ] },
		'response body larger than the 8388608 byte limit' ],
	[ '10 MB body until close', { raw => [ [ send => "HTTP/1.0 200 OK\r\nX-Consul-Index: 100\r\n\r\n[" ], [ repeat => ' ' x 65536, 160 ], [ 'close' ] ] },
		'response body larger than the 8388608 byte limit' ],
	[ 'chunk size not hex', { raw => [ [ send => $GOOD_HEAD . "Transfer-Encoding: chunked\r\n\r\nzz\r\n[]\r\n0\r\n\r\n" ] ] }, 'bad response: invalid chunked encoding' ],
	[ 'chunk size 2^64-1', { raw => [ [ send => $GOOD_HEAD . "Transfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n[]\r\n" ] ] }, 'bad response: invalid chunked encoding' ],
	[ 'chunk size negative', { raw => [ [ send => $GOOD_HEAD . "Transfer-Encoding: chunked\r\n\r\n-2\r\n[]\r\n0\r\n\r\n" ] ] }, 'bad response: invalid chunked encoding' ],
	[ 'chunk size 1 GB', { raw => [ [ send => $GOOD_HEAD . "Transfer-Encoding: chunked\r\n\r\n40000000\r\n[]" ] ] }, 'response body larger than the 8388608 byte limit' ],
	[ 'chunk data longer than its size', { raw => [ [ send => $GOOD_HEAD . "Transfer-Encoding: chunked\r\n\r\n1\r\n[]\r\n0\r\n\r\n" ] ] }, 'bad response: invalid chunked encoding' ],
	[ 'chunked stream cut short', { raw => [ [ send => $GOOD_HEAD . "Transfer-Encoding: chunked\r\n\r\n" . chunk('[') ], [ 'close' ] ] },
		'bad response: connection closed before the response was complete \(truncated\)' ],
	[ 'chunk cut in its data', { raw => [ [ send => $GOOD_HEAD . "Transfer-Encoding: chunked\r\n\r\n100\r\n[{" ], [ 'close' ] ] }, 'truncated' ],
	[ 'endless chunk-size line', { raw => [ [ send => $GOOD_HEAD . "Transfer-Encoding: chunked\r\n\r\n" ], [ repeat => '0' x 1024, 64 ], [ 'close' ] ] },
		'bad response: invalid chunked encoding' ],
	[ 'chunked without the last CRLF, then silence', { raw => [ [ send => $GOOD_HEAD . "Transfer-Encoding: chunked\r\n\r\n" . '%GOODCHUNK' . "0\r\n" ], [ 'hang' ] ] },
		{ err => "no complete response within ${CONSUL_DEADLINE}ms", timeout => 10 } ],
	[ 'binary garbage', { raw => [ [ send => join('', map { chr(($_ * 7919 + 13) % 256) } 1 .. 4096) ], [ 'close' ] ] }, 'bad response: invalid response header' ],
	[ 'HTTP/0.9 style (body only)', { raw => [ [ send => '%GOODKV' ], [ 'close' ] ] }, 'bad response: invalid response header' ],
	[ 'SSH banner', { raw => [ [ send => "SSH-2.0-OpenSSH_9.2p1\r\n" ], [ 'close' ] ] }, 'bad response: invalid response header' ],
	[ 'TLS alert', { raw => [ [ send => "\x15\x03\x01\x00\x02\x02\x28" ], [ 'close' ] ] }, 'bad response: invalid response header' ],
	[ 'closed at once', { raw => [ [ 'close' ] ] }, { quiet => 1 } ],
	# on a new connection: how Consul's per-client connection limit looks
	[ 'closed at once, and again on a new connection', { raw => [ [ 'close' ] ], count => 2 },
		'the registry at 127\.0\.0\.1:\d+ turned the connection away before answering \(HTTP 429, or closed or reset before any byte\): is this address over Consul\'s per-client connection limit \(limits\.http_max_conns_per_client' ],
	[ 'reset at once', { raw => [ [ 'rst' ] ] }, 'reset by peer|truncated' ],
	# Consul's answer to a client over limits.http_max_conns_per_client, whole or cut
	[ 'HTTP 429 of the connection limit', { raw => [ [ send => "HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain\r\nContent-Length: 81\r\nConnection: close\r\n\r\nYour IP is issuing too many concurrent connections, please rate limit your calls\n" ] ] },
		'turned the connection away before answering .*limits\.http_max_conns_per_client' ],
	# (on the kept-alive connection a cut answer is just truncated: Consul turns
	# connections away when it accepts them; the retry is on a new one)
	[ 'HTTP 429 of the connection limit, cut', { raw => [ [ send => "HTTP/1.1 429 Too Many Requests\r\nContent-Length: 81\r\n\r\nYour IP" ], [ 'close' ] ], count => 2 },
		'turned the connection away before answering' ],
	[ 'HTTP 429 of a rate limit', { raw => [ [ send => "HTTP/1.1 429 Too Many Requests\r\nContent-Length: 19\r\n\r\nrate limit exceeded" ] ] },
		'unexpected HTTP status 429: "rate limit exceeded"' ],
	[ 'status line garbage', { raw => [ [ send => "HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n" ] ] }, 'bad response: invalid response header' ],
	[ 'status 999', { raw => [ [ send => "HTTP/1.1 999 Odd\r\nX-Consul-Index: 100\r\nContent-Length: 0\r\n\r\n" ] ] }, 'unexpected HTTP status 999' ],
	[ 'status 204', { raw => [ [ send => "HTTP/1.1 204 No Content\r\nX-Consul-Index: 100\r\n\r\n" ] ] }, 'unexpected HTTP status 204' ],
	[ 'header without a colon', { raw => [ [ send => $GOOD_HEAD . "Broken header\r\nContent-Length: 2\r\n\r\n[]" ] ] }, 'bad response: invalid response header' ],
	[ 'NUL in a header', { raw => [ [ send => $GOOD_HEAD . "X-Null: a\x00b\r\nContent-Length: 2\r\n\r\n[]" ] ] }, 'bad response: invalid response header' ],
	[ 'data after the response', { raw => [ [ send => consul_ok('[]') . "HTTP/1.1 200 OK\r\n\r\n" ] ] }, 'data after the end of the response' ],
	[ '1xx then the response (one write)', { raw => [ [ send => "HTTP/1.1 100 Continue\r\n\r\n" . '%GOODRESP' ] ] }, { quiet => 1 } ],
	[ '1xx then a short response (one write)', { raw => [ [ send => "HTTP/1.1 100 Continue\r\n\r\n" . consul_ok('[]') ] ] },
		{ log => 'the registry lists no servers' } ],
	[ '1xx then the response (two writes)', { raw => [ [ send => "HTTP/1.1 100 Continue\r\n\r\n" ], [ sleep => 50 ], [ send => '%GOODRESP' ] ] }, { quiet => 1 } ],
	[ '1xx loop, 1 MB', { raw => [ [ repeat => "HTTP/1.1 102 Processing\r\n\r\n" x 100, 400 ], [ 'close' ] ] }, 'truncated' ],
	[ '1xx loop, then silence', { raw => [ [ repeat => "HTTP/1.1 100 Continue\r\n\r\n", 50 ], [ 'hang' ] ] },
		{ err => "no complete response within ${CONSUL_DEADLINE}ms", timeout => 10 } ],
	[ 'chunked and Content-Length', { raw => [ [ send => $GOOD_HEAD . "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n" . '%GOODCHUNK' . "0\r\n\r\n" ] ] }, { quiet => 1 } ],
	[ 'two X-Consul-Index headers', { raw => [ [ send => "HTTP/1.1 200 OK\r\nX-Consul-Index: 100\r\nX-Consul-Index: 5\r\nContent-Length: %GOODLEN\r\n\r\n%GOODKV" ] ] }, { quiet => 1 } ],
	[ 'X-Consul-Index backwards', { match => "index=$CONSUL_INDEX&", raw => [ [ send => "HTTP/1.1 200 OK\r\nX-Consul-Index: 7\r\nContent-Length: %GOODLEN\r\n\r\n%GOODKV" ] ] },
		{ quiet => 1, next_request => qr/[?&]index=0&/ } ],
	[ 'X-Consul-Index 0', { match => "index=$CONSUL_INDEX&", raw => [ [ send => "HTTP/1.1 200 OK\r\nX-Consul-Index: 0\r\nContent-Length: %GOODLEN\r\n\r\n%GOODKV" ] ] },
		{ quiet => 1, next_request => qr/[?&]index=0&/ } ],
	[ 'X-Consul-Index 2^64-1', { raw => [ [ send => "HTTP/1.1 200 OK\r\nX-Consul-Index: 18446744073709551615\r\nContent-Length: %GOODLEN\r\n\r\n%GOODKV" ] ] },
		{ quiet => 1, requests => qr/[?&]index=18446744073709551615&/ } ],
	[ 'unsolicited bytes on the idle connection', { raw => [ [ send => '%GOODRESP' ], [ sleep => 30 ], [ send => "HTTP/1.1 200 OK\r\n\r\n" ] ] }, { quiet => 1 } ],
	[ 'etcd v3 body', { raw => [ [ send => consul_ok('{"header":{"revision":"3"}}') ] ] }, 'invalid type: map, expected a sequence' ],
);

# etcd v2 (raw server)
sub e2 { my ($body, @h) = @_; { raw => [ [ send => etcd2_ok($body, @h) ] ] } }
sub e2w { my ($bytes) = @_; { on => 'watch', raw => [ [ send => $bytes ] ] } }
my $GOODE2 = etcd2_listing($U{re2});
my $GOODE2RESP = etcd2_ok($GOODE2);
my $GOODE2LEAVES = join ',', map { $JSON->encode({ key => "$U{re2}{prefix}/$_->[0]", value => $_->[1] }) } @{$U{re2}{good}};
my $GOODE3RESP = etcd3_ok(etcd3_range($U{re3}));
my $E2_WHEAD = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Etcd-Index: $ETCD_INDEX\r\n";
my @ETCD2 = (
	[ 'invalid JSON', e2('{"action":"get","node":'), 'invalid JSON in response: EOF while parsing' ],
	[ 'consul body', e2(kv_json([ 'upstreams/re2/127.0.0.1:1', undef ])), 'invalid JSON in response: invalid type: (sequence|map, expected a string)' ],
	[ 'empty object', e2('{}'), 'invalid JSON in response: response has no "node"' ],
	[ 'a key, not a directory', e2('{"action":"get","node":{"key":"/upstreams/re2/127.0.0.1:1","value":""}}'), 'is a key, not a directory' ],
	[ 'key as number', e2('{"action":"get","node":{"key":5,"dir":true}}'), 'invalid type: integer `5`, expected a string' ],
	[ 'dir as string', e2('{"action":"get","node":{"key":"/upstreams/re2","dir":"true"}}'), 'invalid type: string "true", expected a boolean' ],
	[ 'nodes as object', e2('{"action":"get","node":{"key":"/upstreams/re2","dir":true,"nodes":{"a":1}}}'), 'invalid type: map, expected a sequence' ],
	[ 'value as object', e2('{"action":"get","node":{"key":"/upstreams/re2","dir":true,"nodes":[{"key":"/upstreams/re2/127.0.0.1:1","value":{"weight":1}}]}}'), 'invalid type: map, expected a string' ],
	[ 'host name', e2('{"action":"get","node":{"key":"/upstreams/re2","dir":true,"nodes":[{"key":"/upstreams/re2/db.example:5432","value":""}]}}'),
		qq(entry "/upstreams/re2/db.example:5432": $CAUSE_ADDR) ],
	[ 'weight "0"', e2('{"action":"get","node":{"key":"/upstreams/re2","dir":true,"nodes":[{"key":"/upstreams/re2/127.0.0.1:1","value":"{\"weight\":\"0\"}"}]}}'),
		'invalid value for "weight": "0"' ],
	[ 'value not JSON', e2('{"action":"get","node":{"key":"/upstreams/re2","dir":true,"nodes":[{"key":"/upstreams/re2/127.0.0.1:1","value":"weight=2"}]}}'),
		'value is not a JSON object' ],
	[ 'empty key', e2('{"action":"get","node":{"key":"/upstreams/re2","dir":true,"nodes":[{"key":"","value":""}]}}'), qq($CAUSE_ADDR "") ],
	[ 'nested 1000 deep', e2('{"action":"get","node":' . '{"key":"/d","dir":true,"nodes":[' x 1000 . ']}' x 1000 . '}'), 'recursion limit exceeded' ],
	[ 'no X-Etcd-Index', { raw => [ [ send => resp('200 OK', [ 'Content-Type: application/json' ], $GOODE2) ] ] }, 'response has no X-Etcd-Index header' ],
	[ 'X-Etcd-Index a word', { raw => [ [ send => resp('200 OK', [ 'X-Etcd-Index: lots' ], $GOODE2) ] ] }, 'invalid X-Etcd-Index header "lots"' ],
	[ 'X-Etcd-Index negative', { raw => [ [ send => resp('200 OK', [ 'X-Etcd-Index: -1' ], $GOODE2) ] ] }, 'invalid X-Etcd-Index header "-1"' ],
	[ 'X-Etcd-Index 2^64-1', { raw => [ [ send => resp('200 OK', [ 'X-Etcd-Index: 18446744073709551615' ], $GOODE2) ] ] }, { any => 'X-Etcd-Index' } ],
	[ '404 errorCode 100 (no directory)', { raw => [ [ send => resp('404 Not Found', [ "X-Etcd-Index: $ETCD_INDEX" ], '{"errorCode":100,"message":"Key not found","cause":"/upstreams/re2","index":50}') ] ] },
		{ log => 'the registry lists no servers' } ],
	[ '404 without JSON', { raw => [ [ send => resp('404 Not Found', [], '404 page not found') ] ] }, 'unexpected HTTP status 404: "404 page not found"' ],
	[ '403 errorCode 110', { raw => [ [ send => resp('403 Forbidden', [], '{"errorCode":110,"message":"The request requires user authentication"}') ] ] },
		'unexpected HTTP status 403: "etcd error 110: The request requires user authentication"' ],
	[ '500 errorCode a string', { raw => [ [ send => resp('500 Internal Server Error', [], '{"errorCode":"300","message":"raft"}') ] ] }, 'unexpected HTTP status 500: "\{"errorCode":"300"' ],
	[ 'etcd v3 body', e2('{"header":{"revision":"3"},"kvs":[]}'), 'response has no "node"' ],
	[ 'error body with 200', e2('{"errorCode":100,"message":"Key not found"}'), 'response has no "node"' ],
	[ 'header flood', { raw => [ [ send => $E2_WHEAD ], [ repeat => "X-Flood: 1\r\n", 3000 ], [ send => "\r\n" ] ] }, 'response header larger than' ],
	[ 'slow drip past upsync_timeout', { raw => [ [ drip => $GOODE2RESP, 8 ] ] }, { err => 'no complete response within 2000ms', timeout => 6 } ],
	[ 'truncated', { raw => [ [ send => $E2_WHEAD . "Content-Length: 5000\r\n\r\n{\"action\":" ], [ 'close' ] ] }, 'truncated' ],
	[ '10 MB listing', { raw => [ [ send => $E2_WHEAD . "Transfer-Encoding: chunked\r\n\r\n" ], [ repeat => chunk(' ' x 65536), 160 ], [ send => "0\r\n\r\n" ] ] },
		'response body larger than the 8388608 byte limit' ],
	[ 'same server in two directories', e2('{"action":"get","node":{"key":"/upstreams/re2","dir":true,"nodes":[{"key":"/upstreams/re2/a","dir":true,"nodes":[' . $GOODE2LEAVES . ']},' . $GOODE2LEAVES . ']}}'),
		{ log => '2 entries repeat an address already listed' } ],
	[ '1xx then the listing (one write)', { raw => [ [ send => "HTTP/1.1 100 Continue\r\n\r\n" . $GOODE2RESP ] ] }, { quiet => 1 } ],
	[ '400 errorCode 401 on a read', { raw => [ [ send => resp('400 Bad Request', [ "X-Etcd-Index: $ETCD_INDEX" ],
		'{"errorCode":401,"message":"The event in requested index is outdated and cleared","cause":"the requested history has been cleared [1008/4]","index":2007}') ] ] },
		{ any => 'status 400|errorCode 401', log_ok => 'etcd no longer has the events' } ],
	[ '400 errorCode 401 on every read (8 times)', { count => 8, raw => [ [ send => resp('400 Bad Request', [ "X-Etcd-Index: $ETCD_INDEX" ],
		'{"errorCode":401,"message":"The event in requested index is outdated and cleared","cause":"the requested history has been cleared [1008/4]","index":2007}') ] ] },
		{ any => 'status 400|errorCode 401', max_lines => [ 'etcd no longer has the events|error 401', 1 ], max_rate => 20, timeout => 8 } ],
	# the watch
	[ 'watch: invalid JSON event', e2w(etcd2_ok('{"action":')), 'invalid JSON in response: EOF while parsing' ],
	[ 'watch: event without action', e2w(etcd2_ok('{"node":{"key":"/x"}}')), 'watch event has no "action"' ],
	[ 'watch: event as a list', e2w(etcd2_ok('[1]')), 'invalid JSON in response: invalid type: (sequence|integer `1`, expected a string)' ],
	[ 'watch: headers, then close', { on => 'watch', raw => [ [ send => $E2_WHEAD . "Transfer-Encoding: chunked\r\n\r\n" ], [ 'close' ] ] }, 'truncated' ],
	[ 'watch: bogus chunk', { on => 'watch', raw => [ [ send => $E2_WHEAD . "Transfer-Encoding: chunked\r\n\r\nxyz\r\n" ] ] }, 'invalid chunked encoding' ],
	[ 'watch: history cleared (400/401)', e2w(resp('400 Bad Request', [ "X-Etcd-Index: 2007" ],
		'{"errorCode":401,"message":"The event in requested index is outdated and cleared","cause":"the requested history has been cleared [1008/4]","index":2007}')),
		{ log => 'etcd no longer has the events since index 51 \(it keeps the last 1000\); reading everything again' } ],
	[ 'watch: status 500', e2w(resp('500 Internal Server Error', [], 'raft: stopped')), 'unexpected HTTP status 500: "raft: stopped"' ],
	[ 'watch: binary garbage', e2w("\x00\x01\x02\xff\xfe" x 100), 'invalid response header' ],
	[ 'watch: 10 MB event', { on => 'watch', raw => [ [ send => $E2_WHEAD . "Transfer-Encoding: chunked\r\n\r\n" ], [ repeat => chunk(' ' x 65536), 160 ] ] },
		'response body larger than the 8388608 byte limit' ],
	[ 'watch: never answers (normal for a watch)', { on => 'watch', raw => [ [ 'hang' ] ] }, { quiet => 1, timeout => 10, requests => qr/wait=true/ } ],
	[ 'watch: 1xx then the event (one write)', e2w("HTTP/1.1 100 Continue\r\n\r\n" . etcd2_ok($ETCD2_EVENT)),
		{ quiet => 1, next_request => qr{^GET /v2/keys/upstreams/re2/\?recursive=true$} } ],
	[ 'watch: the event, after a 1xx (two writes)', { on => 'watch', raw => [ [ send => "HTTP/1.1 100 Continue\r\n\r\n" ], [ sleep => 50 ], [ send => etcd2_ok($ETCD2_EVENT) ] ] },
		{ quiet => 1, next_request => qr{^GET /v2/keys/upstreams/re2/\?recursive=true$} } ],
);

# etcd v3 (raw server)
sub e3 { my ($body) = @_; { raw => [ [ send => etcd3_ok($body) ] ] } }
sub e3kv { my ($key, $value) = @_; e3(etcd3_range($U{re3}, undef, [ $key, $value ])) }
sub e3w { my ($text) = @_; { on => 'watch', raw => [ [ send => $W_HEAD . chunk($text) ] ] } }
my @ETCD3 = (
	[ 'invalid JSON', e3('{"header":'), 'invalid JSON in response: EOF while parsing' ],
	[ 'consul body', e3(kv_json([ '/upstreams/re3/127.0.0.1:1', undef ])), 'invalid JSON in response: response has no header.revision' ],
	[ 'empty object', e3('{}'), 'response has no header.revision' ],
	[ 'revision as number', e3(etcd3_range($U{re3}, 30)), { quiet => 1 } ],
	[ 'revision a word', e3(etcd3_range($U{re3}, 'thirty')), 'response has no header.revision' ],
	[ 'revision negative', e3(etcd3_range($U{re3}, '-1')), 'response has no header.revision' ],
	[ 'revision 1e30', e3('{"header":{"revision":1e30},"kvs":[]}'), 'response has no header.revision' ],
	[ 'revision 2^64-1', e3(etcd3_range($U{re3}, '18446744073709551615')), { any => 'revision' } ],
	[ 'kvs as object', e3('{"header":{"revision":"30"},"kvs":{"a":1}}'), '"kvs" is not a list' ],
	[ 'kvs of numbers', e3('{"header":{"revision":"30"},"kvs":[1,2]}'), { log => 'the registry lists no servers' } ],
	[ 'key not base64', e3('{"header":{"revision":"30"},"kvs":[{"key":"!!!","value":""}]}'), 'invalid JSON in response: key not base64' ],
	[ 'key as number', e3('{"header":{"revision":"30"},"kvs":[{"key":5,"value":""}]}'), 'invalid JSON in response: key unexpected 5' ],
	[ 'value not base64', e3('{"header":{"revision":"30"},"kvs":[{"key":"' . b64('/upstreams/re3/127.0.0.1:1') . '","value":"%%%"}]}'),
		'entry "/upstreams/re3/127.0.0.1:1": value is not a JSON object: value not base64' ],
	[ 'value as object', e3('{"header":{"revision":"30"},"kvs":[{"key":"' . b64('/upstreams/re3/127.0.0.1:1') . '","value":{"weight":1}}]}'),
		'value is not a JSON object: value unexpected' ],
	[ 'weight -1', e3kv('/upstreams/re3/127.0.0.1:1', '{"weight":-1}'), 'invalid value for "weight": -1' ],
	[ 'host name', e3kv('/upstreams/re3/cache.example:11211', ''), qq(entry "/upstreams/re3/cache.example:11211": $CAUSE_ADDR) ],
	[ 'non-UTF-8 key', e3kv("/upstreams/re3/\xff\xfe:80", ''), qq($CAUSE_ADDR) ],
	[ 'value a long non-ASCII string', e3kv('/upstreams/re3/127.0.0.1:1', qq("$LONG_E")), 'value is not a JSON object' ],
	[ 'gateway error with 200', e3('{"error":"etcdserver: request timed out","code":14,"message":"etcdserver: request timed out"}'),
		'unexpected HTTP status 200: ""etcdserver: request timed out""' ],
	[ 'grpc error 503', { raw => [ [ send => resp('503 Service Unavailable', [], '{"code":14,"message":"etcdserver: leader changed"}') ] ] },
		'unexpected HTTP status 503: "\{"code":14' ],
	[ 'auth error 401', { raw => [ [ send => resp('401 Unauthorized', [], '{"code":16,"message":"etcdserver: invalid auth token"}') ] ] }, 'authentication failed: etcd requires authentication: set token_file=' ],
	[ '10 MB range', { raw => [ [ send => "HTTP/1.1 200 OK\r\nContent-Length: 10485760\r\n\r\n" ], [ repeat => ' ' x 65536, 160 ] ] },
		'response body larger than the 8388608 byte limit' ],
	[ 'slow drip past upsync_timeout', { raw => [ [ drip => $GOODE3RESP, 10 ] ] }, { err => 'no complete response within 2000ms', timeout => 6 } ],
	[ '1xx then the range (one write)', { raw => [ [ send => "HTTP/1.1 100 Continue\r\n\r\n" . $GOODE3RESP ] ] }, { quiet => 1 } ],
	# the watch
	[ 'watch: auth error', e3w('{"error":{"grpc_code":16,"http_code":401,"message":"invalid auth token","http_status":"Unauthorized"}}'),
		'authentication failed: etcd requires authentication: set token_file= to a file holding USER:PASSWORD \(watch error: invalid auth token\)' ],
	[ 'watch: compacted', e3w('{"result":{"header":{"revision":"40"},"canceled":true,"compact_revision":"38"}}'),
		{ log => 'the watch from revision 31 was cancelled \(compacted up to revision 38\); reading everything again' } ],
	[ 'watch: cancelled with a reason', e3w('{"result":{"header":{"revision":"40"},"canceled":true,"cancel_reason":"mvcc: required revision is a future revision"}}'),
		{ log => 'cancelled \(mvcc: required revision is a future revision\)' } ],
	[ 'watch: garbage JSON', e3w('}{'), 'invalid JSON in watch stream' ],
	[ 'watch: message without result', e3w('{"foo":1}'), 'unexpected watch message \{"foo":1\}' ],
	[ 'watch: a bare number', e3w("12345\n"), 'unexpected watch message 12345' ],
	[ 'watch: events with junk keys (still a change)', e3w('{"result":{"events":[{"kv":{"key":"!!!"}}]}}'), { quiet => 1, next_request => qr{^POST /v3/kv/range$} } ],
	[ 'watch: bogus chunk', { on => 'watch', raw => [ [ send => $W_HEAD . "qq\r\n" ] ] }, 'invalid chunked encoding' ],
	[ 'watch: created, then close', { on => 'watch', raw => [ [ send => $W_HEAD . chunk($W_CREATED) ], [ 'close' ] ] }, 'truncated' ],
	[ 'watch: stream ended cleanly', { on => 'watch', raw => [ [ send => $W_HEAD . chunk($W_CREATED) . "0\r\n\r\n" ] ] }, { quiet => 1 } ],
	[ 'watch: status 404', e3w_status('404 Not Found', '{"code":5,"message":"Not Found"}'), 'unexpected HTTP status 404' ],
	[ 'watch: 1xx then a short stream (one write)', { on => 'watch', raw => [ [ send => "HTTP/1.1 100 Continue\r\n\r\n" . $W_HEAD . "0\r\n\r\n" ] ] }, { quiet => 1 } ],
	[ 'watch: 1xx then the stream (one write)', { on => 'watch', raw => [ [ send => "HTTP/1.1 100 Continue\r\n\r\n" . $W_HEAD . chunk($W_EVENT) ] ] },
		{ quiet => 1, next_request => qr{^POST /v3/kv/range$} } ],
	[ 'watch: 3000 progress messages, then an event', { on => 'watch', raw => [ [ send => $W_HEAD ],
		[ repeat => chunk($W_PROGRESS), 3000 ], [ send => chunk($W_EVENT) ] ] }, { quiet => 1, next_request => qr{^POST /v3/kv/range$} } ],
	# the stream is re-parsed on every read: 2 MB must not take seconds of a worker
	[ 'watch: 2 MB of progress messages, then an event (in under 4 s)', { on => 'watch', raw => [ [ send => $W_HEAD ],
		[ repeat => chunk($W_PROGRESS x 1600), 32 ], [ send => chunk($W_EVENT) ] ] },
		{ quiet => 1, timeout => 4, next_request => qr{^POST /v3/kv/range$} } ],
);
sub e3w_status { my ($st, $body) = @_; { on => 'watch', raw => [ [ send => resp($st, [ 'Content-Type: application/json' ], $body) ] ] } }

###############################################################################
# Assign the cases to upstreams

my @CASES;
# What an expected cause is: a bad entry (skipped, the others apply), bad data in
# a good exchange, or a failed exchange.
sub kind_of {
	my ($re) = @_;
	return 'skip' if $re =~ /invalid port/;
	return 'either' if $re =~ /\Q$CAUSE_ADDR\E/ && $re =~ /invalid JSON/;
	return 'skip' if $re =~ /invalid value for|\Q$CAUSE_ADDR\E|value is not a JSON object|^entry "/;
	return 'data' if $re =~ /invalid JSON|invalid type|missing field|response has no|invalid X-|is not a list|watch event has no|unexpected watch message|is a key, not a directory|recursion limit/;
	return 'err';
}
sub add_cases {
	my ($group, $names, @list) = @_;
	my $i = 0;
	for my $c (@list) {
		my $name = $names->[$i++ % @$names];
		my ($cname, $serve, $expect) = @$c;
		$expect = { err => $expect } unless ref $expect;
		if (defined $expect->{err} && (my $k = kind_of($expect->{err})) ne 'err') {
			my $v = delete $expect->{err};
			# the cause of a skipped entry follows 'entry "KEY" skipped: '
			$v =~ s/^entry "(.*?)": /entry "$1" skipped: / if $k eq 'skip';
			$expect = { %$expect, $k => $v };
		}
		push @CASES, { group => $group, name => $cname, u => $name, serve => $serve, expect => $expect };
	}
}
add_cases('consul (emulator)', [qw/ck1 ck2 ck3/], @CONSUL_EMU);
add_cases('consul_services (emulator)', ['cs'], @SERVICES_EMU);
add_cases('consul (raw HTTP)', [qw/rc1 rc2/], @CONSUL_RAW);
add_cases('etcd v2 (raw HTTP)', ['re2'], @ETCD2);
add_cases('etcd v3 (raw HTTP)', ['re3'], @ETCD3);
# TEST_HOSTILE_ONLY=regex: only the cases whose "group: upstream: name" matches
if (defined(my $only = $ENV{TEST_HOSTILE_ONLY})) {
	@CASES = grep { "$_->{group}: $_->{u}: $_->{name}" =~ /$only/ } @CASES;
}
push @{$U{$_->{u}}{cases}}, $_ for @CASES;

$t->plan(3 * @CASES + 3);

###############################################################################
# Registries and nginx

my $consul = Test::Nginx::Consul->start($t, port => port(8500));
my %RAWPORT = (rc1 => 8601, rc2 => 8602, re2 => 8603, re3 => 8604);
for my $name (sort keys %RAWPORT) {
	my $u = $U{$name};
	my $good = $GOOD{$u->{type}};
	$u->{raw} = Test::Nginx::RawHttp->start($t, port => port($RAWPORT{$name}), name => "raw-$name",
		classify => $CLASSIFY{$u->{type}}, good => sub { $good->($u, $_[0]) });
}

for my $n (1 .. 3) {
	my $u = $U{"ck$n"};
	$consul->put("$u->{prefix}$_->[0]", $_->[1]) for @{$u->{good}};
}
my $i = 0;
for my $g (@{$U{cs}{good}}) {
	my ($host, $p) = split /:/, $g->[0];
	$consul->register_service({ ID => 'web' . ++$i, Name => 'websvc', Address => $host, Port => $p + 0, Tags => $g->[1] });
}

my $n = 0;
for my $name (@ORDER) {
	my $u = $U{$name};
	my $addr = $u->{via} eq 'emu' ? '127.0.0.1:%%PORT_8500%%' : "127.0.0.1:%%PORT_$RAWPORT{$name}%%";
	my $pre = $u->{prefix} // '';
	my $path = {
		consul => "/v1/kv/$pre",
		consul_services => '/v1/catalog/service/websvc',
		etcd => "/v2/keys$pre/",
		etcdv3 => $pre,
	}->{$u->{type}};
	$u->{show_port} = port(8080 + $n++);
	$u->{t} = Test::Nginx->new(workers => 2);
	$u->{t}->write_file_expand('nginx.conf', <<"EOF");
%%TEST_GLOBALS%%
events { }
stream {
    upstream $name {
        # zone_size=1m: the upstream may use 1 MB, so answers are read up to 8 MB
        upsync $addr$path upsync_type=$u->{type}
               upsync_interval=$INTERVAL upsync_timeout=$TIMEOUT zone_size=1m;
        upsync_dump_path %%TESTDIR%%/servers_$name.conf;
        server 127.0.0.1:1;
    }
    server { listen 127.0.0.1:$u->{show_port}; upstream_show; }
}
EOF
	$u->{t}->run();
	$u->{log} = [];
	$u->{log_pos} = 0;
	$u->{log_rest} = '';
}

sub section {
	my ($name) = @_;
	my (undef, undef, $body) = http_parse(http_get($U{$name}{show_port}, '/', timeout => 3) // '');
	my ($s) = ($body // '') =~ /(Upstream name: \Q$name\E;.*?\n)(?:\n|\z)/s;
	return $s // '';
}

my $ready = wait_for(sub { !grep { section($_) ne $U{$_}{show} } @ORDER }, timeout => 10, interval => 0.05);
ok($ready, 'every upstream synced its good set') or do {
	for my $name (grep { section($_) ne $U{$_}{show} } @ORDER) {
		diag("$name:\n" . section($name) . "expected:\n$U{$name}{show}" . $U{$name}{t}->tail_log(20));
	}
};

###############################################################################
# Body templates (per upstream)

for my $name (@ORDER) {
	my $u = $U{$name};
	my %tpl;
	if ($u->{type} eq 'consul') {
		my @g = good_kv($u);
		$tpl{'%GOODKV'} = kv_json(@g);
		$tpl{'%GOOD2'} = kv_json(@g, @g);
		$tpl{'%GOODFOLDER'} = kv_json(@g, [ $u->{prefix}, 'not base64 and not JSON' ]);
		$tpl{'%GOODLEN'} = length $tpl{'%GOODKV'};
		$tpl{'%GOODRESP'} = consul_ok($tpl{'%GOODKV'});
		$tpl{'%GOODCHUNK'} = chunk($tpl{'%GOODKV'});
		$tpl{'%GOOD'} = $tpl{'%GOODKV'};
	} elsif ($u->{type} eq 'consul_services') {
		# the good set, with fields of the wrong type that are ignored:
		# ServiceWeights a string, non-string tags, an unknown Meta shape
		$tpl{'%GOODSVC'} = '[{"Node":"emu-node","Address":"127.0.0.1","ServiceID":"web1","ServiceName":"websvc",'
			. '"ServiceAddress":"127.0.0.1","ServicePort":10041,"ServiceTags":["weight=2",5,null,{"a":1}],'
			. '"ServiceWeights":"heavy","ServiceMeta":[1]},'
			. '{"Node":"emu-node","Address":"127.0.0.1","ServiceID":"web2","ServiceName":"websvc",'
			. '"ServiceAddress":"127.0.0.1","ServicePort":10042,"ServiceTags":["max_fails=0"],'
			. '"ServiceWeights":{"Passing":"7"}}]';
	} elsif ($u->{type} eq 'etcd') {
		$tpl{'%GOODE2'} = etcd2_listing($u);
		$tpl{'%GOODE2RESP'} = etcd2_ok($tpl{'%GOODE2'});
		$tpl{'%GOODE2LEAVES'} = join ',', map { $JSON->encode({ key => "$u->{prefix}/$_->[0]", value => $_->[1] }) } @{$u->{good}};
	} elsif ($u->{type} eq 'etcdv3') {
		$tpl{'%GOODE3RESP'} = etcd3_ok(etcd3_range($u));
	}
	$tpl{'%P'} = $u->{prefix} // '';
	$u->{tpl} = \%tpl;
}

# Expands templates in a string (longest names first).
sub expand {
	my ($u, $s) = @_;
	return $s unless defined $s && !ref $s;
	my $tpl = $u->{tpl};
	for my $k (sort { length $b <=> length $a } keys %$tpl) {
		$s =~ s/\Q$k\E/$tpl->{$k}/g;
	}
	return $s;
}
sub expand_deep {
	my ($u, $x) = @_;
	return [ map { expand_deep($u, $_) } @$x ] if ref $x eq 'ARRAY';
	return { map { $_ => expand_deep($u, $x->{$_}) } keys %$x } if ref $x eq 'HASH';
	return expand($u, $x);
}
# %P inside regexes: the quoted prefix
sub expand_re {
	my ($u, $re) = @_;
	my $p = quotemeta($u->{prefix} // '');
	$re =~ s/%P/$p/g;
	return $re;
}

###############################################################################
# The log, read incrementally

sub log_poll {
	my ($u) = @_;
	open my $fh, '<', $u->{t}->testdir . '/error.log' or return;
	binmode $fh;
	seek $fh, $u->{log_pos}, 0;
	local $/;
	my $new = <$fh> // '';
	close $fh;
	$u->{log_pos} += length $new;
	$new = ($u->{log_rest} // "") . $new;
	my @l = split /\n/, $new, -1;
	$u->{log_rest} = pop @l;
	push @{$u->{log}}, @l;
}
sub log_find {
	my ($u, $from, $re) = @_;
	my $log = $u->{log};
	for my $i ($from .. $#$log) {
		return $i if $log->[$i] =~ $re;
	}
	return undef;
}
my $CRASH = qr/exited on signal|panicked at|worker process \d+ exited with code [1-9]/;

###############################################################################
# Running cases: one at a time per upstream, upstreams in parallel

sub reqcount {
	my ($u) = @_;
	return $u->{raw}->request_count if $u->{raw};
	return $consul->stats->{requests}{$u->{emu_stat}} // 0;
}

sub start_case {
	my ($c) = @_;
	my $u = $U{$c->{u}};
	my $e = $c->{expect};
	log_poll($u);
	my $s = { c => $c, mark => scalar @{$u->{log}}, t0 => time, phase => 'run',
		pids => join(',', sort $u->{t}->worker_pids) };
	my $name = quotemeta $u->{name};
	my $pre = qr/upsync: upstream "$name" \(.*?\): /;
	for my $k (qw/err any data either/) {
		next unless defined $e->{$k};
		my $re = expand_re($u, $e->{$k});
		$s->{err_re} = qr/\[error\].*${pre}.*?(?:$re)/;
	}
	if (defined $e->{log}) {
		my $re = expand_re($u, $e->{log});
		$s->{log_re} = qr/\[(?:warn|notice)\].*${pre}.*?(?:$re)/;
	}
	for my $k (qw/skip either/) {
		next unless defined $e->{$k};
		my $re = expand_re($u, $e->{$k});
		$s->{log_re} = qr/\[warn\].*${pre}entry ".*" skipped: .*?(?:$re).*; the other entries apply$|\[warn\].*${pre}(?:$re).*; the other entries apply$/;
	}
	$s->{any_err_re} = qr/\[error\].*${pre}/;
	$s->{back_re} = defined $e->{data} || defined $e->{either}
		? qr/${pre}the registry's answer is valid again/
		: qr/${pre}registry answers again/;
	$s->{newpoller_re} = qr/${pre}this worker \(pid \d+\) now polls/;
	$s->{c0} = reqcount($u);
	my $serve = expand_deep($u, $c->{serve});
	if ($serve->{emu}) {
		$s->{fault} = $consul->fault({ %{$serve->{emu}}, path_prefix => $u->{emu_prefix},
			method => 'GET', count => 1 })->{id};
	} else {
		$s->{fault} = $u->{raw}->fault({ on => $serve->{on} // 'read', count => $serve->{count} // 1, steps => $serve->{raw},
			match => $serve->{match} });
	}
	$u->{cur} = $s;
}

# The request sequence number that took the fault, or undef.
sub consumed {
	my ($u, $s) = @_;
	if ($u->{raw}) {
		# a fault for several requests is consumed once it is used up
		return undef if ($s->{c}{serve}{count} // 1) > 1 && $u->{raw}->pending($s->{fault});
		return $u->{raw}->consumed($s->{fault});
	}
	my $r = $consul->get('/_emu/faults');
	my $live = $r->{success} ? decode_json($r->{content}) : [];
	$live = $live->{faults} // [] if ref $live eq 'HASH';
	return undef if grep { ($_->{id} // -1) == $s->{fault} } @$live;
	return reqcount($u);
}

sub step_case {
	my ($u) = @_;
	my $s = $u->{cur};
	my $e = $s->{c}{expect};
	my $limit = $e->{timeout} // 6;
	if (time - $s->{t0} > $limit) {
		return finish_case($u, "timed out after ${limit}s in phase '$s->{phase}'");
	}
	if (defined log_find($u, $s->{mark}, $CRASH)) {
		return finish_case($u, 'a worker crashed');
	}
	if ($s->{phase} eq 'run') {
		if ($s->{err_re} && defined(my $i = log_find($u, $s->{mark}, $s->{err_re}))) {
			$s->{cause} = $u->{log}[$i];
			$s->{err_i} = $i;
			$s->{phase} = 'recover';
			# bad data: the position moved on, so the module reads again with the next
			# change; the test makes one (a parked good answer ends) and waits for it
			if (defined $e->{data} || defined $e->{either}) {
				$s->{phase} = 'settle_data';
				$u->{raw}->clear_faults if $u->{raw};
			}
			return;
		}
		if ($s->{log_re} && defined(my $i = log_find($u, $s->{mark}, $s->{log_re}))) {
			$s->{cause} = $u->{log}[$i];
			enter_settle($u, reqcount($u));
			return;
		}
		if ($e->{quiet} || $e->{any}) {
			my $seq = consumed($u, $s);
			if (defined $seq) {
				$s->{consumed_seq} = $seq;
				enter_settle($u, $seq);
			}
		}
		if (!$s->{err_re} && defined(my $i = log_find($u, $s->{mark}, $s->{any_err_re}))) {
			$s->{err_i} = $i;	# an error where none was expected: wait for the recovery
			$s->{phase} = 'recover';
		}
	} elsif ($s->{phase} eq 'settle_data') {
		return finish_case($u) if defined log_find($u, $s->{err_i}, $s->{back_re});
		$u->{raw}->clear_faults if $u->{raw} && (time - $s->{t0}) > 1;
	} elsif ($s->{phase} eq 'recover') {
		return finish_case($u) if defined log_find($u, $s->{err_i}, $s->{back_re});
		# a new poller (the old one's worker died) starts with a clean state
		enter_settle($u, reqcount($u)) if defined log_find($u, $s->{err_i}, $s->{newpoller_re});
	} elsif ($s->{phase} eq 'settle') {
		# ('any': the error may come after the fault was served)
		if ($s->{err_re} && !defined $s->{cause} && defined(my $i = log_find($u, $s->{mark}, $s->{err_re}))) {
			($s->{cause}, $s->{err_i}, $s->{phase}) = ($u->{log}[$i], $i, 'recover');
			return;
		}
		return finish_case($u) if reqcount($u) >= $s->{settle_from} + 2;
	}
}

# Settling: two more requests after $from, so the module has handled a good
# answer after the case's one.  A raw server's parked good watch is ended at
# once (its fault generation changes), so the module reads again right away.
sub enter_settle {
	my ($u, $from) = @_;
	my $s = $u->{cur};
	$s->{phase} = 'settle';
	$s->{settle_from} = $from;
	$u->{raw}->clear_faults if $u->{raw};
}

sub finish_case {
	my ($u, $why) = @_;
	my $s = delete $u->{cur};
	my $c = $s->{c};
	my $e = $c->{expect};
	log_poll($u);
	my @window = @{$u->{log}}[$s->{mark} .. $#{$u->{log}}];
	my $name = quotemeta $u->{name};
	my %r = (why => $why);
	$r{crash} = join "\n", grep { $_ =~ $CRASH } @window;
	my $pids = join(',', sort $u->{t}->worker_pids);
	$r{crash} .= "\nworker pids changed: $s->{pids} -> $pids" if $pids ne $s->{pids};
	my $section = section($u->{name});
	$r{show} = $section eq $u->{show} ? '' : "upstream_show:\n${section}expected:\n$u->{show}";
	my @errors = grep { $_ =~ $s->{any_err_re} } @window;
	if ($e->{err}) {
		$r{cause} = $s->{cause} ? '' : "no error line matching /$e->{err}/; lines: "
			. join(' | ', map { _esc(substr($_, 0, 300)) } grep { /upstream "$name"/ } @window);
		$r{cause} .= 'the error line is cut or split (it must end "...; keeping the current servers, retrying in Nms (further identical errors are not logged)")'
			if $s->{cause} && $s->{cause} !~ /; keeping the current servers, retrying in \d+ms \(further identical errors are not logged\)$/;
	} elsif ($e->{data}) {
		$r{cause} = $s->{cause} ? '' : "no error line matching /$e->{data}/; lines: "
			. join(' | ', map { _esc(substr($_, 0, 300)) } grep { /upstream "$name"/ } @window);
		$r{cause} .= 'the error line is cut or split (it must end "...; keeping the current servers, the next change is read as soon as the registry has one")'
			if $s->{cause} && $s->{cause} !~ /; keeping the current servers, the next change is read as soon as the registry has one$/;
	} elsif ($e->{skip}) {
		$r{cause} = !$s->{cause} ? "no line 'entry ... skipped: /$e->{skip}/'; lines: "
			. join(' | ', map { _esc(substr($_, 0, 300)) } grep { /upstream "$name"/ } @window)
			: @errors ? "unexpected error: $errors[0]" : '';
	} elsif ($e->{either}) {
		$r{cause} = $s->{cause} ? '' : "neither a skipped entry nor a data error /$e->{either}/";
	} elsif ($e->{log}) {
		$r{cause} = !$s->{cause} ? "no log line matching /$e->{log}/"
			: @errors ? "unexpected error: $errors[0]" : '';
	} elsif ($e->{any}) {
		$r{cause} = (!@errors || $s->{cause}) ? '' : "error not matching /$e->{any}/: $errors[0]";
		if ($e->{log_ok} && !@errors) {
			my $lo = expand_re($u, $e->{log_ok});
			$r{note} = (grep { /$lo/ } @window) . " lines /$e->{log_ok}/";
		}
	} else {
		$r{cause} = @errors ? "unexpected error: $errors[0]" : '';
	}
	if ($e->{next_request} && $u->{raw}) {
		my $from = $u->{raw}->consumed($s->{fault});
		my ($next) = grep { defined $from && $_->{seq} == $from + 1 } @{$u->{raw}->requests};
		$r{cause} .= " the request after the case's was not /$e->{next_request}/: "
			. ($next ? "$next->{method} $next->{target}" : 'none')
			unless $next && "$next->{method} $next->{target}" =~ $e->{next_request};
	}
	if ($e->{requests}) {
		my @later = grep { $_->{seq} > ($s->{settle_from} // $s->{c0}) } @{$u->{raw}->requests};
		$r{cause} .= " no later request matching $e->{requests}"
			unless grep { "$_->{method} $_->{target}" =~ $e->{requests} } @later;
	}
	if (my $ml = $e->{max_lines}) {
		my ($re, $max) = @$ml;
		my $n = grep { /upstream "$name"/ && /$re/ } @window;
		$r{cause} .= " $n lines /$re/ (at most $max: logged once per state change, not per attempt)" if $n > $max;
	}
	if ($e->{max_rate} && $u->{raw}) {
		# requests answered by the case's fault: no faster than the poll interval
		my @got = grep { $_->{fault} eq $s->{fault} } @{$u->{raw}->requests};
		if (@got > 2) {
			my $rate = (@got - 1) / (($got[-1]{time} - $got[0]{time}) || 0.001);
			$r{cause} .= sprintf(" %d identical answers at %.0f requests/s (at most %d/s)", scalar @got, $rate, $e->{max_rate})
				if $rate > $e->{max_rate};
		}
	}
	if ($e->{no_line}) {
		my @forged = grep { /$e->{no_line}/ } @window;
		$r{cause} .= " forged log line: $forged[0]" if @forged;
	}
	# every line about this upstream must be one clean line
	my @ctl = grep { /upstream "$name"/ && /[\x00-\x08\x0b-\x1f\x7f]/ } @window;
	$r{cause} .= ' control characters in a log line: ' . _esc($ctl[0]) if @ctl;
	# a case that timed out or crashed never passes
	$r{cause} = $why . ($r{cause} ne '' ? "; $r{cause}" : '') if $why;
	$r{line} = $s->{cause} // '';
	$r{elapsed} = time - $s->{t0};
	$c->{result} = \%r;
	# leave no fault behind (a hang is released by clearing it)
	if ($u->{raw}) {
		$u->{raw}->clear_faults;
		$u->{raw}->abort if $why;	# a drip or flood may still be running
	} else {
		$consul->control('clear_faults', { id => $s->{fault} });
	}
	# after a case that timed out or crashed, the next one waits until the
	# upstream is back (a good answer handled, or a new poller)
	$u->{cool} = { mark => scalar @{$u->{log}}, req => reqcount($u), t0 => time } if $why;
}

sub cooled {
	my ($u) = @_;
	my $k = $u->{cool} or return 1;
	log_poll($u);
	my $name = quotemeta $u->{name};
	if (time - $k->{t0} > 8
		|| defined log_find($u, $k->{mark}, qr/upstream "$name" .*(?:registry answers again|now polls)/)
		|| reqcount($u) >= $k->{req} + 2) {
		delete $u->{cool};
		return 1;
	}
	return 0;
}

sub _esc { (my $s = $_[0]) =~ s/([\x00-\x1f\x7f])/sprintf('\\x%02x', ord $1)/ge; $s }

sub run_cases {
	my ($timeout, @cases) = @_;
	my %queue;
	push @{$queue{$_->{u}}}, $_ for @cases;
	return wait_for(sub {
		my $busy = 0;
		for my $name (@ORDER) {
			my $u = $U{$name};
			if ($u->{cur}) {
				log_poll($u);
				step_case($u);
			}
			start_case(shift @{$queue{$name}}) if !$u->{cur} && @{$queue{$name} // []} && cooled($u);
			$busy++ if $u->{cur} || @{$queue{$name} // []};
		}
		return !$busy;
	}, timeout => $timeout, interval => 0.02);
}

my $t1 = time;
my $done = run_cases(150, @CASES);
ok($done, sprintf('all %d cases ran (%.1fs)', scalar @CASES, time - $t1));

for my $c (@CASES) {
	my $r = $c->{result} // { cause => 'did not run', crash => '', show => '' };
	my $label = "$c->{group}: $c->{u}: $c->{name}";
	ok(!$r->{crash}, "$label: no worker crashed") or diag($r->{crash});
	ok(!$r->{show}, "$label: upstream_show lists the last good set") or diag($r->{show});
	my $what = $c->{expect}{err} // $c->{expect}{data} // $c->{expect}{skip} // $c->{expect}{either}
		// $c->{expect}{log} // $c->{expect}{any};
	ok(!$r->{cause}, "$label: " . (defined $what ? "logged /$what/" : 'accepted quietly'))
		or diag("$r->{cause}" . ($r->{line} ? "\nline: $r->{line}" : ''));
	diag(sprintf("%-60s %5.2fs %s %s", $label, $r->{elapsed} // 0, _esc(substr($r->{line} // '', 0, 300)), $r->{note} // ''))
		if $ENV{TEST_NGINX_VERBOSE};
}

my $elapsed = time - $T0;
ok($elapsed < 90, sprintf('whole file in %.1fs (under 90s)', $elapsed));

###############################################################################
