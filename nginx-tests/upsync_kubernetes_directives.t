#!/usr/bin/perl

# Configuration-time tests of upsync_type=kubernetes: the promised forms pass
# "nginx -t" (API server addresses with https, a failover list, kubectl
# proxy's plain http, in-cluster/ from the Pod's environment), and every
# invalid form fails naming the parameter and what is accepted.
# Table driven: [name, upsync arguments, expected, env]; expected is undef
# (must pass) or the text the "[emerg]" line must carry.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;

use Test::Nginx;
use Test::Nginx::Tls;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/stream upsync/);
plan(skip_all => 'no openssl command') unless Test::Nginx::Tls->available;
my $pki = Test::Nginx::Tls->make($t);
my $d = $t->testdir;
$t->write_file('k8s.token', "eyJhbGciOiJSUzI1NiJ9.payload.sig\n");
my $ca = "ssl_trusted_certificate=$pki->{'ca.pem'}";
my $tok = "token_file=$d/k8s.token";
my $pod = { KUBERNETES_SERVICE_HOST => '127.0.0.1', KUBERNETES_SERVICE_PORT => '6443' };
my $SERVICE = 'expected [https://]HOST[:PORT][,HOST[:PORT]...]/NAMESPACE/SERVICE '
	. 'or in-cluster/[NAMESPACE/]SERVICE';

my @cases = (
['out of cluster, https, token and CA',
	"https://127.0.0.1:6443/default/web upsync_type=kubernetes $tok $ca"],
['a failover list of API servers, port by name, UDP',
	"https://127.0.0.1:6443,localhost:6443/prod/dns upsync_type=kubernetes k8s_port=dns k8s_protocol=UDP $tok $ca"],
['kubectl proxy (plain http, no token), port by number, IPv6 only',
	"127.0.0.1:8001/default/web upsync_type=kubernetes k8s_port=8080 k8s_address_type=IPv6"],
['in-cluster with namespace, files given', "in-cluster/prod/web upsync_type=kubernetes $tok $ca", undef, $pod],
['in-cluster outside a Pod', "in-cluster/prod/web upsync_type=kubernetes $tok $ca",
	'in-cluster/: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set'],
['in-cluster without a namespace and no service account',
	"in-cluster/web upsync_type=kubernetes $tok $ca",
	'in-cluster/: cannot read the namespace from /var/run/secrets/kubernetes.io/serviceaccount/namespace', $pod],
['in-cluster, the default token file is missing', "in-cluster/prod/web upsync_type=kubernetes $ca",
	'cannot read token_file "/var/run/secrets/kubernetes.io/serviceaccount/token"', $pod],
['no namespace', "https://127.0.0.1:6443/web upsync_type=kubernetes $tok $ca",
	"invalid Kubernetes Service \"https://127.0.0.1:6443/web\": $SERVICE"],
['upper case', "https://127.0.0.1:6443/Prod/web upsync_type=kubernetes", 'invalid Kubernetes Service'],
['a query', "https://127.0.0.1:6443/prod/web?x=1 upsync_type=kubernetes", 'invalid Kubernetes Service'],
['bad k8s_port', "https://127.0.0.1:6443/prod/web upsync_type=kubernetes k8s_port=Http",
	'invalid k8s_port "Http": expected the Service port\'s name (lower-case letters, digits, \'-\') or the endpoints\' port number (1-65535)'],
['bad k8s_protocol', "https://127.0.0.1:6443/prod/web upsync_type=kubernetes k8s_protocol=SCTP",
	'invalid k8s_protocol "SCTP": expected TCP or UDP'],
['bad k8s_address_type', "https://127.0.0.1:6443/prod/web upsync_type=kubernetes k8s_address_type=v6",
	'invalid k8s_address_type "v6": expected IPv4, IPv6 or any'],
['k8s_port with consul', "127.0.0.1:8500/v1/kv/u/ upsync_type=consul k8s_port=http",
	'"k8s_port=" applies to upsync_type=kubernetes only'],
['in-cluster with etcd', "in-cluster/prod/web upsync_type=etcdv3",
	'"in-cluster/" applies to upsync_type=kubernetes only', $pod],
['an empty token file', "https://127.0.0.1:6443/prod/web upsync_type=kubernetes token_file=$d/empty $ca",
	"token_file \"$d/empty\" of upstream \"u\" must hold one non-empty line"],
);
$t->write_file('empty', "\n");

$t->plan(2 * @cases);

my $n = 0;
for my $c (@cases) {
	my ($name, $args, $want, $env) = @$c;
	my $file = sprintf('case%03d.conf', ++$n);
	$t->write_file_expand($file, <<"EOF");
%%TEST_GLOBALS%%
events { }
stream {
    upstream u {
        upsync $args;
        upsync_dump_path %%TESTDIR%%/servers_u.conf;
        server 127.0.0.1:8081;
    }
    server { listen 127.0.0.1:%%PORT_8080%%; proxy_pass u; }
}
EOF
	local @ENV{keys %$pod} = (undef) x keys %$pod;
	delete @ENV{keys %$pod};
	local @ENV{keys %$env} = values %$env if $env;
	my ($ok, $out) = $t->test_config($file);
	if (defined $want) {
		ok(!$ok, "$name: rejected");
		like($out, qr/\[emerg\] upsync: .*\Q$want\E/, "$name: message") or diag($out);
	} else {
		ok($ok, "$name: accepted") or diag($out);
		unlike($out, qr/\[(?:emerg|alert|crit)\]/, "$name: no errors");
	}
}
