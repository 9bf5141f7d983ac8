#!/usr/bin/perl

# upsync_type=kubernetes against the API server emulator over TLS (CA checked,
# bearer token from token_file=), each behaviour checked where connections go
# and in what upstream_show, the dump, the error log and the emulator's
# counters say:
# - a Service with three slices is one set; a Pod going not ready leaves it,
#   ready again comes back;
# - a terminating (serving) endpoint is shown "down": its open session goes on,
#   new connections never reach it;
# - "too old resource version" as HTTP 410 and as an ERROR event in a 200
#   stream: a notice, a new list, changes keep arriving;
# - a watch the server ends quietly is started again at once from the last
#   resourceVersion (bookmarks included), without a new list or an error; a
#   watch cut mid-stream is an error, then a new list;
# - the token file replaced on disk: the next watch carries the new token,
#   with no 401; a revoked token: one error naming the file (never the
#   token), recovery once the file holds a new one; RBAC denial names the
#   namespace and what to grant; tokens appear in no log, dump or status
#   (text, JSON, Prometheus);
# - in-cluster/ from KUBERNETES_SERVICE_HOST/_PORT; a UDP port by name.
# Emulator-only steps skip against a real API server (TEST_NGINX_K8S_URL).

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;

use Test::Nginx qw/ :DEFAULT port wait_for http_get http_parse show_section /;
use Test::Nginx::Backend;
use Test::Nginx::Kubernetes;
use Test::Nginx::Stream;
use Test::Nginx::Tls;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 2)->has(qw/stream upsync/);
plan(skip_all => 'no python3 for the Kubernetes emulator') unless Test::Nginx::which('python3');
plan(skip_all => 'no openssl command') unless Test::Nginx::Tls->available;
plan(skip_all => 'needs the emulator (faults, tokens, in-cluster)')
	if Test::Nginx::Kubernetes::want_real();
$t->plan(49);

my $pki = Test::Nginx::Tls->make($t);
my $k = Test::Nginx::Kubernetes->start($t, port => port(8600), control_port => port(8601),
	tls => { cert => $pki->{'server.pem'}, key => $pki->{'server.key'}, ca => $pki->{'ca.pem'} },
	bookmark_interval => 0.5);
my $ns = $k->namespace;
my ($p1, $p2, $p3, $p4, $pu) = map { port($_) } 8081 .. 8085;
my @b = map { Test::Nginx::Backend->tcp($t, port => $_->[0], id => $_->[1]) }
	([$p1, 'b1'], [$p2, 'b2'], [$p3, 'b3'], [$p4, 'b4']);
my $u1 = Test::Nginx::Backend->udp($t, port => $pu, id => 'u1');

my $web = $k->upsync('web', 'upsync_interval=500ms upsync_timeout=20s');
my $dns = $k->upsync('dns', 'k8s_port=dns k8s_protocol=UDP upsync_interval=500ms');
my $incl = "upsync in-cluster/$ns/incl upsync_type=kubernetes token_file=" . $k->token_file
	. " ssl_trusted_certificate=$pki->{'ca.pem'} upsync_interval=500ms";
local $ENV{KUBERNETES_SERVICE_HOST} = '127.0.0.1';
local $ENV{KUBERNETES_SERVICE_PORT} = port(8600);

$t->write_file_expand('nginx.conf', <<"EOF");
%%TEST_GLOBALS%%
events { }
stream {
    upstream web {
        $web;
        upsync_dump_path %%TESTDIR%%/servers_web.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
    upstream dns {
        $dns;
        upsync_dump_path %%TESTDIR%%/servers_dns.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
    upstream incl {
        $incl;
        upsync_dump_path %%TESTDIR%%/servers_incl.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
    server { listen 127.0.0.1:%%PORT_8080%%; proxy_pass web; proxy_connect_timeout 2s; }
    server { listen 127.0.0.1:%%PORT_8086%% udp; proxy_pass dns; proxy_responses 1; proxy_timeout 2s; }
    server { listen 127.0.0.1:%%PORT_8087%%; proxy_pass incl; }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF

$t->run();

my $show_port = port(8088);
my $proxy = port(8080);
my $show = sub { show_section($show_port, $_[0] // 'web') };
my $count = sub { my ($n, $name) = @_; wait_for(sub { $show->($name) =~ /count: $n\n/ }, timeout => 5) };
my $line = sub { my ($p, $down) = @_;
	"server 127.0.0.1:$p weight=1 max_fails=2 fail_timeout=10s" . ($down ? ' down' : '') . ';' };
my $stats = sub { $k->stats };
my $lists = sub { $stats->()->{requests}{LIST} };
my $watches = sub { $stats->()->{watches_total} };

###############################################################################
# Three slices, one set; not ready, ready again

$k->put_endpoint('web', $p1, 'ready');
$k->put_endpoint('web', $p2, 'ready');
$k->put_endpoint('web', $p3, 'ready');
ok($count->(3), 'three slices: three servers');
my $w_first = $watches->();
is($show->(), "Upstream name: web; Backend server count: 3\n"
	. join('', map { "        " . $line->($_) . "\n" } sort { $a <=> $b } $p1, $p2, $p3) . "\n",
	'three slices: upstream_show lists each with the defaults');
is_deeply([sort keys %{ count_by_backend($t, $proxy, 30) }], [qw/b1 b2 b3/],
	'three slices: traffic reaches all three');
ok(wait_for(sub { ($t->read_file('servers_web.conf') // '') =~ /:$p3 / }, timeout => 5),
	'three slices: the dump has them');

$k->put_endpoint('web', $p2, 'notready');
ok(wait_for(sub { $show->() !~ /:$p2 / }, timeout => 5), 'not ready: the Pod leaves the set');
is_deeply([sort keys %{ count_by_backend($t, $proxy, 20) }], [qw/b1 b3/],
	'not ready: no connection reaches it');
$k->put_endpoint('web', $p2, 'ready');
ok($count->(3), 'ready again: back in the set');
ok((grep { $_ eq 'b2' } keys %{ count_by_backend($t, $proxy, 20) }), 'ready again: it takes connections');
is($watches->(), $w_first, 'the changes streamed on the open watches (no new watch)');

###############################################################################
# Terminating with an open session: kept, no new connections

my $s;
for (1 .. 6) {
	my $c = Test::Nginx::Stream->new(port => $proxy);
	if (($c->readline // '') eq "b3\n") { $s = $c; last }
	$c->close;
}
ok($s, 'a session on b3');
$k->put_endpoint('web', $p3, 'draining');
ok(wait_for(sub { index($show->(), $line->($p3, 1)) >= 0 }, timeout => 5),
	'terminating (serving): shown down');
$s->write("still here\n") if $s;
is($s && $s->readline, "still here\n", 'terminating: its open session goes on');
my $c = count_by_backend($t, $proxy, 20);
ok(!$c->{b3} && ($c->{b1} // 0) + ($c->{b2} // 0) == 20, 'terminating: no new connection reaches it')
	or diag(explain $c);
$s->close if $s;
ok(wait_for(sub { $b[2]->open_connections == 0 }, timeout => 5), 'terminating: the session ended cleanly');
$k->delete_endpoint('web', $p3);
ok($count->(2), 'the terminated Pod is gone');

###############################################################################
# 410 in both forms

# (the emulator answers the next watch 410 whatever its resourceVersion: a
# compaction alone would leave a watch from the newest version valid)
my $mark = $t->log_offset();
my $l0 = $lists->();
$k->fault({ mode => 'gone', form => 'status', verb => 'watch', count => 1 });
$k->end_watches('clean');
ok($t->wait_for_log(qr/upstream "\w+".*the watch from resourceVersion \d+ is too old for the API server \(Expired: too old resource version: \d+ \(\d+\)\); listing again/,
	5, from => $mark), '410 status: notice');
ok(wait_for(sub { $lists->() > $l0 }, timeout => 5), '410 status: listed again');
$k->put_endpoint('web', $p3, 'ready');
ok($count->(3), '410 status: changes arrive after it');
ok($stats->()->{expired_status} >= 1, '410 status: the emulator answered 410');

$mark = $t->log_offset();
$l0 = $lists->();
$k->compact(form => 'event', open_watches => 'expire');
ok($t->wait_for_log(qr/upstream "web".*is too old for the API server \(Expired: The resourceVersion for the provided watch is too old\.\); listing again/,
	5, from => $mark), '410 ERROR event in a 200 stream: notice');
ok(wait_for(sub { $lists->() > $l0 }, timeout => 5), '410 ERROR event: listed again');
$k->delete_endpoint('web', $p3);
ok($count->(2), '410 ERROR event: changes arrive after it');
is(scalar $t->grep_log(qr/\[error\].*upstream "web"/, from => $mark), 0, '410: no error logged');

###############################################################################
# Quiet watch end: again at once from the last resourceVersion

$mark = $t->log_offset();
$l0 = $lists->();
my $w0 = $watches->();
my $rv = $stats->()->{resource_version};
ok(wait_for(sub { ($stats->()->{watches_open} // 0) == 3 }, timeout => 5), 'three watches open (web, dns, incl)');
$k->end_watches('clean');
ok(wait_for(sub { $watches->() >= $w0 + 3 && $stats->()->{watches_open} == 3 }, timeout => 5),
	'quiet end: watches started again');
my ($again) = map { $_->{resourceVersion} }
	grep { $_->{labelSelector} eq 'kubernetes.io/service-name=web' } reverse @{ $stats->()->{watch_log} };
ok($again >= $rv, "quiet end: web watches again from its last resourceVersion ($rv or a later bookmark)")
	or diag("again from $again, rv $rv");
is($lists->(), $l0, 'quiet end: no new list');
$k->put_endpoint('web', $p4, 'ready');
ok($count->(3), 'quiet end: the next change arrives');
is(scalar $t->grep_log(qr/\[(?:error|warn)\]/, from => $mark), 0, 'quiet end: nothing logged');

# cut mid-stream: an error, then a new list
$mark = $t->log_offset();
$l0 = $lists->();
$k->fault({ mode => 'close_mid_stream', verb => 'watch', after_events => 0, count => 1 });
$k->end_watches('clean');
ok($t->wait_for_log(qr/\[error\].*upstream "web".*truncated/, 5, from => $mark),
	'cut mid-stream: one error line');
ok(wait_for(sub { $lists->() > $l0 }, timeout => 5), 'cut mid-stream: listed again');
$k->delete_endpoint('web', $p4);
ok($count->(2), 'cut mid-stream: changes arrive after it');
ok($t->wait_for_log(qr/upstream "web".*registry answers again/, 5, from => $mark), 'cut mid-stream: recovery logged');

###############################################################################
# Tokens

my $old = $k->token;
my $new = $k->rotate_token(revoke_old => 0);
$mark = $t->log_offset();
my $unauth = $stats->()->{unauthorized};
# the file is looked at when a request starts, at most once a second
my $web_token = sub {
	(map { $_->{token} } grep { $_->{labelSelector} eq 'kubernetes.io/service-name=web' }
		reverse @{ $stats->()->{watch_log} })[0] // '';
};
ok(wait_for(sub { $k->end_watches('clean'); wait_for(sub { $web_token->() eq $new }, timeout => 0.5) },
	timeout => 5, interval => 0), 'token file replaced: the next watch carries the new token');
ok($t->wait_for_log(qr/upstream "web".*token_file "[^"]+" changed on disk; requests from now on carry the new token/,
	5, from => $mark), 'token file replaced: notice');
is($stats->()->{unauthorized}, $unauth, 'token file replaced: no 401 on the way');

$mark = $t->log_offset();
$k->control('tokens', { tokens => ['someone-else'] });
$k->end_watches('clean');
ok($t->wait_for_log(qr/\[error\].*upstream "web".*authentication failed: the API server refused the bearer token of token_file "\Q${\ $k->token_file }\E" \(401 Unauthorized: Unauthorized\)/,
	5, from => $mark), 'revoked token: one error naming the file');
$k->put_endpoint('web', $p3, 'ready');
like($show->(), qr/count: 2\n/, 'revoked token: the last set stays');
my $newer = $k->rotate_token(revoke_old => 1);
ok($count->(3), 'revoked token: a new token in the file, the change arrives');
ok($t->wait_for_log(qr/upstream "web".*registry answers again/, 5, from => $mark), 'revoked token: recovery logged');

$mark = $t->log_offset();
$k->control('tokens', { tokens => [$newer], forbidden => [$newer] });
$k->end_watches('clean');
ok($t->wait_for_log(qr/upstream "web".*the API server forbids reading EndpointSlices in namespace "$ns" \(Forbidden: .*\): grant the service account list and watch on endpointslices/,
	5, from => $mark), 'RBAC denial: the error names the namespace and what to grant');
$k->control('tokens', { tokens => [$newer] });
$k->delete_endpoint('web', $p3);
ok($count->(2), 'RBAC granted: changes arrive again');

my (undef, undef, $json) = http_parse(http_get($show_port, '/?format=json') // '');
my (undef, undef, $metrics) = http_parse(http_get($show_port, '/metrics') // '');
like($metrics // '', qr/^upsync_upstream_servers\{upstream="web"\} 2$/m,
	'metrics: the web upstream is there (the secrecy check below reads a real answer)');
my $everything = join "\n", $t->error_log, $t->read_file('servers_web.conf') // '', $show->(), $json // '',
	$metrics // '';
ok(!grep({ index($everything, $_) >= 0 } $old, $new, $newer),
	'no token in the log, the dump or the status views (text, JSON, metrics)');

###############################################################################
# in-cluster/ and UDP

$k->put_endpoint('incl', $p4, 'ready');
ok(wait_for(sub { $show->('incl') =~ /count: 1\n.*:$p4 /s }, timeout => 5),
	'in-cluster/ (KUBERNETES_SERVICE_HOST/_PORT): synced');
is(Test::Nginx::Stream::stream_get(port(8087)), "b4\n", 'in-cluster/: proxied');

$k->put_slice('dns', 'dns-a', ports => [
	{ name => 'tcp', port => 0 + $p1, protocol => 'TCP' },
	{ name => 'dns', port => 0 + $pu, protocol => 'UDP' }],
	endpoints => [['127.0.0.1', 'ready']]);
ok(wait_for(sub { $show->('dns') =~ /count: 1\n.*:$pu /s }, timeout => 5), 'UDP port by name: synced');
is(Test::Nginx::Stream::stream_udp(port(8086), "q\n"), "u1\n", 'UDP port by name: proxied');

my @bad = $t->grep_log(qr/\[(alert|crit|emerg)\]/);
is(scalar @bad, 0, 'no alerts in the error log') or diag(join "\n", @bad);

$t->stop();
