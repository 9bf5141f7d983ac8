#!/usr/bin/perl

# etcd authentication, against real etcd (3.4, and 3.5 when installed) with
# auth enabled:
# - v3: token_file= holds USER:PASSWORD; the module authenticates through
#   /v3/auth/authenticate and sends the token; when etcd stops accepting it
#   (here: the user's password was set again, which revokes its tokens) it
#   authenticates again and the change still arrives; no credentials, or a wrong password, keep the configured servers
#   with one clear line;
# - v2: the same file gives HTTP basic auth; a wrong password or none is
#   refused with a clear line;
# - the password never appears in the error log, the dump or upstream_show.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;
use HTTP::Tiny;
use JSON::PP;
use MIME::Base64;

use Test::Nginx qw/ :DEFAULT port wait_for http_get http_parse show_section upsync_upstreams /;
use Test::Nginx::Etcd;

select STDERR; $| = 1;
select STDOUT; $| = 1;

use constant PER_RUN => 16;

Test::Nginx->new()->has(qw/stream upsync/);
my @versions = grep { Test::Nginx::Etcd->available($_) } qw/3.4 3.5/;
plan(skip_all => 'no etcd binary') unless @versions;
plan(tests => PER_RUN * @versions);

my $SECRET = 'pw-6d0c91f2';
my $ROOTPW = 'root-5a1e';
my $http = HTTP::Tiny->new(timeout => 10, keep_alive => 0);

sub call {
	my ($method, $url, $body, %h) = @_;
	my $r = $http->request($method, $url, {
		headers => { 'Content-Type' => 'application/json', %h },
		(defined $body ? (content => encode_json($body)) : ()) });
	die "$method $url: $r->{status} $r->{content}\n" unless $r->{success};
	return $r->{content} ? decode_json($r->{content}) : {};
}

for my $version (@versions) {
	my $t = Test::Nginx->new(workers => 2);
	my $etcd = Test::Nginx::Etcd->start($t, version => $version,
		port => port(8500), peer_port => port(8600));
	my $url = $etcd->url;
	my ($p1, $p2) = (port(8081), port(8082));
	my $L = "etcd $version";

	# data first, then users and roles, then auth on
	$etcd->v3_put("/v3u/127.0.0.1:$p1", '{"weight":4}');
	$etcd->v2_put("upstreams/v2u/127.0.0.1:$p1", '{"weight":5}');
	my $b64 = sub { encode_base64($_[0], '') };
	call(POST => "$url/v3/auth/user/add", { name => 'root', password => $ROOTPW });
	call(POST => "$url/v3/auth/role/add", { name => 'root' });
	call(POST => "$url/v3/auth/user/grant", { user => 'root', role => 'root' });
	call(POST => "$url/v3/auth/user/add", { name => 'upsync', password => $SECRET });
	call(POST => "$url/v3/auth/role/add", { name => 'reader' });
	call(POST => "$url/v3/auth/role/grant", { name => 'reader',
		perm => { permType => 'READ', key => $b64->('/v3u/'), range_end => $b64->('/v3u0') } });
	call(POST => "$url/v3/auth/user/grant", { user => 'upsync', role => 'reader' });
	call(POST => "$url/v3/auth/enable", {});

	my $v2root = 'Basic ' . $b64->("root:$ROOTPW");
	call(PUT => "$url/v2/auth/users/root", { user => 'root', password => $ROOTPW });
	call(PUT => "$url/v2/auth/enable", undef);
	call(PUT => "$url/v2/auth/roles/reader", { role => 'reader',
		permissions => { kv => { read => ['/upstreams/*'], write => [] } } },
		Authorization => $v2root);
	call(PUT => "$url/v2/auth/users/upsync", { user => 'upsync', password => $SECRET,
		roles => ['reader'] }, Authorization => $v2root);
	call(PUT => "$url/v2/auth/roles/guest", { role => 'guest',
		revoke => { kv => { read => ['/*'], write => ['/*'] } } },
		Authorization => $v2root);

	$t->write_file('good', "upsync:$SECRET\n");
	$t->write_file('wrong', "upsync:not-the-password\n");
	my $v3 = "127.0.0.1:%%PORT_8500%%/v3u/ upsync_type=etcdv3 upsync_interval=200ms";
	my $v2 = "127.0.0.1:%%PORT_8500%%/v2/keys/upstreams/v2u/ upsync_type=etcd upsync_interval=200ms";
	my %ups = (
		v3good => "$v3 token_file=%%TESTDIR%%/good strong_dependency=on",
		v2strong => "$v2 token_file=%%TESTDIR%%/good strong_dependency=on",
		v3none => $v3,
		v3wrong => "$v3 token_file=%%TESTDIR%%/wrong",
		v2good => "$v2 token_file=%%TESTDIR%%/good",
		v2none => $v2,
		v2wrong => "$v2 token_file=%%TESTDIR%%/wrong",
	);
	my $conf = upsync_upstreams(\%ups);
	$t->write_file_expand('nginx.conf', <<"EOF");
%%TEST_GLOBALS%%
events { }
stream {
$conf
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF
	$t->run();
	my $section = sub { show_section(port(8088), @_) };

	for my $name (qw/v3good v2strong/) {
		ok($t->grep_log(qr/upstream "$name".*strong_dependency=on: starting with 1 servers from the registry/),
			"$L: $name: the master's first read authenticates too");
	}
	ok(wait_for(sub { $section->('v3good') =~ /:$p1 weight=4 / }, timeout => 5),
		"$L: v3 token auth: synced");
	ok($t->wait_for_log(qr/upstream "v3none".*authentication failed: etcd requires authentication: set token_file=/, 5),
		"$L: v3 without credentials: refused, logged");
	ok($t->wait_for_log(qr/upstream "v3wrong".*authentication failed: etcd refused user "upsync" of token_file=: .*authentication failed, invalid user ID or password/, 5),
		"$L: v3 wrong password: refused, logged");
	ok(wait_for(sub { $section->('v2good') =~ /:$p1 weight=5 / }, timeout => 5),
		"$L: v2 basic auth: synced");
	ok($t->wait_for_log(qr/upstream "v2none".*authentication failed: etcd requires a user and password: set token_file=/, 5),
		"$L: v2 without credentials: refused, logged");
	ok($t->wait_for_log(qr/upstream "v2wrong".*authentication failed: the user and password of token_file= were refused \(HTTP 401/, 5),
		"$L: v2 wrong password: refused, logged");
	for my $name (qw/v3none v3wrong v2wrong/) {
		like($section->($name), qr/count: 1\n.*:${\ port(8089)} /s, "$L: $name: configured server kept");
	}

	# setting the user's password (to the same value) makes etcd drop the
	# user's tokens: the module's next request is refused for its token, and
	# it authenticates again at once
	my $mark = $t->log_offset();
	my $root = call(POST => "$url/v3/auth/authenticate", { name => 'root', password => $ROOTPW })->{token};
	call(POST => "$url/v3/auth/user/changepw", { name => 'upsync', password => $SECRET },
		Authorization => $root);
	call(POST => "$url/v3/kv/put", { key => $b64->("/v3u/127.0.0.1:$p2"), value => $b64->('') },
		Authorization => $root);
	ok(wait_for(sub { $section->('v3good') =~ /:$p2 / }, timeout => 5),
		"$L: the change arrives after etcd dropped the module's token");
	ok($t->wait_for_log(qr/upstream "v3good".*auth token is no longer accepted \(expired or revoked\); authenticating again/, 3, from => $mark),
		"$L: re-authentication logged as a notice");

	my $log = $t->error_log;
	unlike($log, qr/\Q$SECRET\E|not-the-password/, "$L: no password in the error log");
	unlike(join('', map { $t->read_file("servers_$_.conf") // '' } keys %ups),
		qr/\Q$SECRET\E/, "$L: nor in the dumps");
	my $all = join '', map { (http_parse(http_get(port(8088), $_)))[2] // '' }
		'/', '/?format=json', '/metrics';
	unlike($all, qr/\Q$SECRET\E|upsync:/, "$L: nor in upstream_show (text, JSON, metrics)");

	$t->stop();
}
