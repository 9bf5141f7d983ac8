#!/usr/bin/perl

# Configuration-time tests of upsync_type=zookeeper: the documented forms pass
# "nginx -t" (an ensemble as a failover list, the default port 2181, a chroot,
# both layouts, a session timeout, digest credentials from token_file=), and
# every invalid form fails naming the parameter and what is accepted.
# Table driven: [name, upsync arguments, expected]; expected is undef (must
# pass) or the text the "[emerg]" line must carry.  No ZooKeeper is needed.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;

use Test::Nginx;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/stream upsync/);
my $d = $t->testdir;
$t->write_file('zk.secret', "upsync:s3cret-pass\n");
$t->write_file('zk.bad', "no-colon-here\n");
my $PATH = 'expected HOST[:PORT][,HOST[:PORT]...]/PATH, PATH being the znode whose '
	. 'children are the servers, such as 127.0.0.1:2181/services/web';

my @cases = (
['one member', '127.0.0.1:2181/services/web upsync_type=zookeeper'],
['an ensemble, default port, chroot, curator, timeout, credentials',
	"127.0.0.1:2181,localhost,[::1]:2182/services/web/ upsync_type=zookeeper zk_chroot=/prod "
	. "zk_layout=curator zk_session_timeout=4s token_file=$d/zk.secret"],
['ipport spelled without the underscore', '127.0.0.1/svc upsync_type=zookeeper zk_layout=ipport'],
['strong_dependency is accepted', '127.0.0.1:2181/svc upsync_type=zookeeper strong_dependency=off'],
['unknown layout', '127.0.0.1:2181/svc upsync_type=zookeeper zk_layout=dubbo',
	'invalid zk_layout "dubbo": expected ip_port (children named IP:PORT; also written ipport) '
	. 'or curator (Curator/Spring Cloud ServiceInstance JSON) in upstream "u"'],
['session timeout too short', '127.0.0.1:2181/svc upsync_type=zookeeper zk_session_timeout=50ms',
	'invalid zk_session_timeout "50ms": expected a time from 200ms to 10m'],
['session timeout not a time', '127.0.0.1:2181/svc upsync_type=zookeeper zk_session_timeout=soon',
	'invalid zk_session_timeout "soon"'],
['relative chroot', '127.0.0.1:2181/svc upsync_type=zookeeper zk_chroot=prod',
	'invalid zk_chroot "prod": expected an absolute znode path'],
['empty path component', '127.0.0.1:2181/a//b upsync_type=zookeeper',
	"invalid ZooKeeper path \"/a//b\": empty component (//); $PATH"],
['dot component', '127.0.0.1:2181/a/../b upsync_type=zookeeper',
	'invalid ZooKeeper path "/a/../b": relative components (. or ..) are not allowed'],
['a query', '127.0.0.1:2181/a?watch=1 upsync_type=zookeeper',
	'invalid ZooKeeper path "/a?watch=1": a query (?...) has no meaning here'],
['no path', '127.0.0.1:2181 upsync_type=zookeeper', 'invalid address "127.0.0.1:2181"'],
['bad port', '127.0.0.1:21x81/svc upsync_type=zookeeper', 'invalid port in "127.0.0.1:21x81/svc"'],
['https', 'https://127.0.0.1:2281/svc upsync_type=zookeeper',
	'TLS to ZooKeeper (https://) is not supported'],
['zk_layout with etcd', '127.0.0.1:2379/u/ upsync_type=etcdv3 zk_layout=curator',
	'"zk_layout=" applies to upsync_type=zookeeper only'],
['twice', '127.0.0.1:2181/svc upsync_type=zookeeper zk_chroot=/a zk_chroot=/b',
	'"zk_chroot=" is given twice'],
['token file without a colon', "127.0.0.1:2181/svc upsync_type=zookeeper token_file=$d/zk.bad",
	"token_file \"$d/zk.bad\" of upstream \"u\" must hold USER:PASSWORD for ZooKeeper digest authentication"],
);

$t->plan(2 * @cases + 1);

my $n = 0;
my $all = '';
for my $c (@cases) {
	my ($name, $args, $want) = @$c;
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
	my ($ok, $out) = $t->test_config($file);
	$all .= $out;
	if (defined $want) {
		ok(!$ok, "$name: rejected");
		like($out, qr/\[emerg\] upsync: .*\Q$want\E/, "$name: message") or diag($out);
	} else {
		ok($ok, "$name: accepted") or diag($out);
		unlike($out, qr/\[(?:emerg|alert|crit)\]/, "$name: no errors");
	}
}
unlike($all, qr/s3cret/, 'the password never appears in nginx -t output');
