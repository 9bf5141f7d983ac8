#!/usr/bin/perl

# Configuration-time tests of the stream upsync directives: every example
# the users were promised passes "nginx -t", and every invalid form fails
# with its own message.  Table driven: [name, config, expected].
# expected is undef (the config must pass) or a regex the "[emerg]" line
# must match (the config must fail).

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';
use lib 'lib';

use Test::Nginx;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/stream upsync/);
my $d = $t->testdir;

# dump files the seed examples include

$t->write_file($_, "server 127.0.0.1:8080 weight=1 max_fails=2 "
	. "fail_timeout=10s;\n")
	for qw/my_tcp_backend.conf my_service.conf my_backend.conf
		mysql_pool.conf/;
$t->write_file('plain-token', "just-a-token\n");
$t->write_file('etcd-user', "upsync:pass\n");

# a stream {} block
sub stream_conf {
	my ($body) = @_;
	return <<"EOF";
%%TEST_GLOBALS%%
events { }

stream {
    %%TEST_GLOBALS_STREAM%%

$body
}
EOF
}

# upstream "u" with the given body, plus a server using it
sub ups {
	my ($body) = @_;
	return stream_conf(<<"EOF");
    upstream u {
        $body
    }

    server {
        listen 127.0.0.1:%%PORT_8080%%;
        proxy_pass u;
    }
EOF
}

# an upstream with a valid upsync line and $extra
sub ups_sync {
	my ($extra, $server) = @_;
	return ups("upsync 127.0.0.1:8500/v1/kv/upstreams/u/ "
		. "upsync_type=consul;\n        $extra\n        "
		. ($server // 'server 127.0.0.1:8081;'));
}

# an upsync line with the given arguments (upstream "u")
sub upsync {
	my ($args) = @_;
	return ups("upsync $args;\n        server 127.0.0.1:8081;");
}

# "[emerg] TEXT in FILE:LINE"
sub emerg {
	my ($text) = @_;
	return qr/\[emerg\] \Q$text\E in \S+:\d+$/m;
}

my $ACC_TYPES = 'accepted: consul, consul_services, consul_health, etcd, etcdv3, nacos, kubernetes, zookeeper';
my $ACC_PARAMS = 'accepted: upsync_type=, upsync_interval=, '
	. 'upsync_timeout=, strong_dependency=, zone_size=, token_file=, '
	. 'ssl_verify=, ssl_trusted_certificate=, ssl_certificate=, '
	. 'ssl_certificate_key=, ssl_name=; with upsync_type=nacos also '
	. 'nacos_namespace=, nacos_group=, nacos_clusters=, nacos_api=; '
	. 'with upsync_type=kubernetes also k8s_port=, k8s_protocol=, k8s_address_type=; '
	. 'with upsync_type=zookeeper also zk_chroot=, zk_layout=, zk_session_timeout=';
my $EXAMPLE = 'expected [https://]HOST[:PORT][,HOST[:PORT]...]/PATH, for example '
	. '127.0.0.1:8500/v1/kv/upstreams/NAME/';
my $PORT = 'expected a number from 1 to 65535';
my $TIME = 'expected an nginx time such as 500ms, 5s or 6m, at most 7d';
my $IN = 'in upstream "u"';

###############################################################################
# configurations that must pass

my @good = (

['seed: consul, consul_services and etcd examples', stream_conf(<<"EOF")],
    upstream my_tcp_backend {
        upsync 127.0.0.1:8500/v1/kv/upstreams/my_tcp_backend/
            upsync_type=consul
            upsync_interval=500ms
            upsync_timeout=6m
            strong_dependency=on;
        upsync_dump_path $d/my_tcp_backend.conf;
        include $d/my_tcp_backend.conf;
    }

    server {
        listen 127.0.0.1:%%PORT_8081%%;
        proxy_pass my_tcp_backend;
    }

    upstream my_service {
        upsync 127.0.0.1:8500/v1/health/service/my-service
            upsync_type=consul_services
            upsync_interval=5s
            upsync_timeout=6m;
        upsync_dump_path $d/my_service.conf;
        include $d/my_service.conf;
    }

    server {
        listen 127.0.0.1:%%PORT_8082%%;
        proxy_pass my_service;
    }

    upstream my_backend {
        upsync 127.0.0.1:2379/v2/keys/upstreams/my_backend
            upsync_type=etcd
            upsync_interval=5s
            upsync_timeout=6m;
        upsync_dump_path $d/my_backend.conf;
        include $d/my_backend.conf;
    }

    server {
        listen 127.0.0.1:%%PORT_8083%%;
        proxy_pass my_backend;
    }

    server {
        listen 127.0.0.1:%%PORT_8088%%;
        upstream_show;
    }
EOF

['seed: complete mysql example with upsync_lb least_conn',
	stream_conf(<<"EOF")],
    upstream mysql_pool {
        upsync 127.0.0.1:8500/v1/kv/upstreams/mysql_pool/
            upsync_type=consul
            upsync_interval=500ms
            upsync_timeout=6m
            strong_dependency=on;
        upsync_dump_path $d/mysql_pool.conf;
        upsync_lb least_conn;
        include $d/mysql_pool.conf;
    }

    server {
        listen 127.0.0.1:%%PORT_8084%%;
        proxy_pass mysql_pool;
        proxy_connect_timeout 5s;
        proxy_timeout 300s;
    }

    server {
        listen 127.0.0.1:%%PORT_8088%%;
        upstream_show;
    }
EOF

['seed: upsync_lb example', stream_conf(<<"EOF")],
    upstream my_tcp_backend {
        upsync 127.0.0.1:8500/v1/kv/upstreams/my_tcp_backend/
            upsync_type=consul
            upsync_interval=500ms;
        upsync_dump_path $d/my_tcp_backend.conf;
        upsync_lb least_conn;
        include $d/my_tcp_backend.conf;
    }

    server {
        listen 127.0.0.1:%%PORT_8081%%;
        proxy_pass my_tcp_backend;
    }
EOF

(map { ["upsync_lb $_", ups_sync("upsync_lb $_;")] }
	qw/roundrobin round_robin least_conn ip_hash hash_modula hash_ketama random/,
	'hash_ketama $remote_port', 'hash_modula $remote_addr',
	'hash $remote_port consistent', 'hash $remote_addr', 'random two',
	'random two least_conn'),

# the C module's drop-in form: the stock directive that matches upsync_lb
['least_conn; before upsync, with upsync_lb least_conn', ups("least_conn;\n        "
	. "upsync 127.0.0.1:8500/v1/kv/a/ upsync_type=consul;\n        upsync_lb least_conn;\n"
	. "        server 127.0.0.1:8081;")],
['least_conn; after upsync, with upsync_lb least_conn', ups_sync("least_conn;\n        upsync_lb least_conn;")],
['least_conn; alone next to upsync', ups_sync('least_conn;')],
['hash KEY consistent; with upsync_lb hash_ketama KEY',
	ups_sync("hash \$remote_addr consistent;\n        upsync_lb hash_ketama \$remote_addr;")],
['hash KEY; before upsync, with upsync_lb hash KEY', ups("hash \$remote_addr;\n        "
	. "upsync 127.0.0.1:8500/v1/kv/a/ upsync_type=consul;\n        upsync_lb hash \$remote_addr;\n"
	. "        server 127.0.0.1:8081;")],

['consul_health type', upsync('127.0.0.1:8500/v1/health/service/web upsync_type=consul_health')],
['etcdv3 type', upsync('127.0.0.1:2379/upstreams/v/ upsync_type=etcdv3')],
['nacos type with every nacos_ parameter',
	upsync('127.0.0.1:8848,127.0.0.1:8849/orders upsync_type=nacos nacos_namespace=dev '
		. 'nacos_group=PAY nacos_clusters=sh,bj nacos_api=v2')],
['nacos: an instance-list path copied from the console',
	upsync('"127.0.0.1:8848/nacos/v1/ns/instance/list?serviceName=orders&groupName=PAY'
		. '&namespaceId=dev&clusters=sh" upsync_type=nacos')],
['failover list of three registry addresses',
	upsync('127.0.0.1:2379,localhost:2379,[::1]:2379/upstreams/v/ upsync_type=etcdv3')],
['https with the system CA store',
	upsync('https://127.0.0.1:2379/upstreams/v/ upsync_type=etcdv3')],
['https without verification, a name for SNI',
	upsync('https://127.0.0.1:2379,127.0.0.1:2380/upstreams/v/ upsync_type=etcdv3 '
		. 'ssl_verify=off ssl_name=etcd.internal')],
['etcd user and password in token_file',
	upsync("127.0.0.1:2379/upstreams/v/ upsync_type=etcdv3 token_file=$d/etcd-user")],

['consul_services catalog path',
	upsync('127.0.0.1:8500/v1/catalog/service/web '
		. 'upsync_type=consul_services')],
['upsync_interval=0 means the default',
	upsync('127.0.0.1:8500/v1/kv/a/ upsync_type=consul upsync_interval=0')],
['strong_dependency=off',
	upsync('127.0.0.1:8500/v1/kv/a/ upsync_type=consul '
		. 'strong_dependency=off')],
['host name that resolves',
	upsync('localhost:8500/v1/kv/a/ upsync_type=consul')],
['parameters in any order',
	upsync('127.0.0.1:2379/v2/keys/upstreams/u upsync_timeout=1m '
		. 'strong_dependency=off upsync_type=etcd upsync_interval=1s')],

);

###############################################################################
# configurations that must fail

my @bad = (

# address

['no path', upsync('127.0.0.1:8500 upsync_type=consul'),
	emerg(qq{upsync: invalid address "127.0.0.1:8500": $EXAMPLE $IN})],
['empty path', upsync('127.0.0.1:8500/ upsync_type=consul'),
	emerg(qq{upsync: invalid address "127.0.0.1:8500/": $EXAMPLE $IN})],
['no host', upsync('/v1/kv/a/ upsync_type=consul'),
	emerg(qq{upsync: invalid address "/v1/kv/a/": $EXAMPLE $IN})],
['empty host', upsync(':8500/v1/kv/a/ upsync_type=consul'),
	emerg(qq{upsync: invalid address ":8500/v1/kv/a/": $EXAMPLE $IN})],
['port 0', upsync('127.0.0.1:0/v1/kv/a/ upsync_type=consul'),
	emerg(qq{upsync: invalid port in "127.0.0.1:0/v1/kv/a/": $PORT $IN})],
['port 70000', upsync('127.0.0.1:70000/v1/kv/a/ upsync_type=consul'),
	emerg(qq{upsync: invalid port in "127.0.0.1:70000/v1/kv/a/": $PORT $IN})],
['empty port', upsync('127.0.0.1:/v1/kv/a/ upsync_type=consul'),
	emerg(qq{upsync: invalid port in "127.0.0.1:/v1/kv/a/": $PORT $IN})],
['non-digit port', upsync('127.0.0.1:80a/v1/kv/a/ upsync_type=consul'),
	emerg(qq{upsync: invalid port in "127.0.0.1:80a/v1/kv/a/": $PORT $IN})],
['ssl_verify on http', upsync('127.0.0.1:8500/v1/kv/a/ upsync_type=consul ssl_verify=off'),
	emerg(qq{upsync: "ssl_verify=" applies to https:// registry addresses only $IN})],
['client certificate without key',
	upsync('https://127.0.0.1:8500/v1/kv/a/ upsync_type=consul ssl_certificate=/c.pem'),
	emerg(qq{upsync: ssl_certificate= and ssl_certificate_key= must be given together $IN})],
['bad ssl_name', upsync('https://127.0.0.1:8500/v1/kv/a/ upsync_type=consul ssl_name=a/b'),
	emerg(qq{upsync: invalid ssl_name "a/b": expected a host name or IP address $IN})],
['missing CA file',
	upsync('https://127.0.0.1:8500/v1/kv/a/ upsync_type=consul ssl_trusted_certificate=/nonexistent/ca.pem'),
	qr/\[emerg\] .*\/nonexistent\/ca\.pem.*$/m],
['empty address in a failover list',
	upsync('127.0.0.1:8500,/v1/kv/a/ upsync_type=consul'),
	emerg(qq{upsync: invalid address "127.0.0.1:8500,/v1/kv/a/": $EXAMPLE $IN})],
['bad port in a failover list',
	upsync('127.0.0.1:8500,127.0.0.1:x/v1/kv/a/ upsync_type=consul'),
	emerg(qq{upsync: invalid port in "127.0.0.1:8500,127.0.0.1:x/v1/kv/a/": $PORT $IN})],
['etcd token_file without a password',
	upsync("127.0.0.1:2379/v2/keys/a/ upsync_type=etcd token_file=$d/plain-token"),
	emerg(qq{upsync: token_file "$d/plain-token" of upstream "u" must hold USER:PASSWORD for etcd})],
['host not found',
	upsync('no-such-host.invalid:8500/v1/kv/a/ upsync_type=consul'),
	qr/\[emerg\] \Qupsync: host "no-such-host.invalid" of upstream "u" not found: \E.+ in \S+:\d+$/m],

# parameters

['missing upsync_type', upsync('127.0.0.1:8500/v1/kv/a/'),
	emerg(qq{upsync: missing upsync_type=; $ACC_TYPES $IN})],
['unknown upsync_type',
	upsync('127.0.0.1:8500/v1/kv/a/ upsync_type=eureka'),
	emerg(qq{upsync: unknown upsync_type "eureka"; $ACC_TYPES $IN})],
['empty upsync_type', upsync('127.0.0.1:8500/v1/kv/a/ upsync_type='),
	emerg(qq{upsync: unknown upsync_type ""; $ACC_TYPES $IN})],
['bad upsync_interval',
	upsync('127.0.0.1:8500/v1/kv/a/ upsync_type=consul upsync_interval=abc'),
	emerg(qq{upsync: invalid time "abc": $TIME $IN})],
['bad upsync_timeout',
	upsync('127.0.0.1:8500/v1/kv/a/ upsync_type=consul upsync_timeout=5x'),
	emerg(qq{upsync: invalid time "5x": $TIME $IN})],
['empty upsync_interval',
	upsync('127.0.0.1:8500/v1/kv/a/ upsync_type=consul upsync_interval='),
	emerg(qq{upsync: invalid time "": $TIME $IN})],
['bad strong_dependency',
	upsync('127.0.0.1:8500/v1/kv/a/ upsync_type=consul '
		. 'strong_dependency=yes'),
	emerg(qq{upsync: invalid value "yes": it must be "on" or "off" $IN})],
['nacos: bad nacos_api', upsync('127.0.0.1:8848/s upsync_type=nacos nacos_api=v4'),
	emerg(qq{upsync: invalid nacos_api "v4": expected auto, v1, v2 or v3 $IN})],
['nacos: unknown query parameter in a copied path',
	upsync('"127.0.0.1:8848/nacos/v1/ns/instance/list?serviceName=s&udpPort=9" upsync_type=nacos'),
	emerg(qq{upsync: unknown query parameter "udpPort" in the Nacos path; accepted: serviceName, groupName, namespaceId, clusters, clusterName, healthyOnly (ignored) $IN})],
['nacos: nacos_group on another type',
	upsync('127.0.0.1:8500/v1/kv/a/ upsync_type=consul nacos_group=G'),
	emerg(qq{upsync: "nacos_group=" applies to upsync_type=nacos only $IN})],
['unknown parameter',
	upsync('127.0.0.1:8500/v1/kv/a/ upsync_type=consul foo=bar'),
	emerg(qq{upsync: unknown parameter "foo=bar"; $ACC_PARAMS $IN})],
['bare strong_dependency',
	upsync('127.0.0.1:8500/v1/kv/a/ upsync_type=consul strong_dependency'),
	emerg(qq{upsync: unknown parameter "strong_dependency"; $ACC_PARAMS $IN})],
['upsync_type twice',
	upsync('127.0.0.1:8500/v1/kv/a/ upsync_type=consul upsync_type=etcd'),
	emerg(qq{upsync: "upsync_type" is given twice $IN})],
['upsync_interval twice',
	upsync('127.0.0.1:8500/v1/kv/a/ upsync_type=consul upsync_interval=1s '
		. 'upsync_interval=2s'),
	emerg(qq{upsync: "upsync_interval" is given twice $IN})],
['upsync without arguments', ups("upsync;\n        server 127.0.0.1:8081;"),
	emerg(q{invalid number of arguments in "upsync" directive})],

# path vs type

['etcd path for consul',
	upsync('127.0.0.1:8500/v2/keys/a/ upsync_type=consul'),
	emerg(qq{upsync: path "/v2/keys/a/" does not fit upsync_type=consul: }
	. qq{expected a path under /v1/kv/ $IN})],
['bare /v1/kv/ for consul', upsync('127.0.0.1:8500/v1/kv/ upsync_type=consul'),
	emerg(qq{upsync: path "/v1/kv/" does not fit upsync_type=consul: }
	. qq{expected a path under /v1/kv/ $IN})],
['kv path for etcd', upsync('127.0.0.1:2379/v1/kv/a/ upsync_type=etcd'),
	emerg(qq{upsync: path "/v1/kv/a/" does not fit upsync_type=etcd: }
	. qq{expected a path under /v2/keys/ $IN})],
['kv path for consul_services',
	upsync('127.0.0.1:8500/v1/kv/a/ upsync_type=consul_services'),
	emerg(qq{upsync: path "/v1/kv/a/" does not fit }
	. qq{upsync_type=consul_services: expected a path under }
	. qq{/v1/catalog/service/ or /v1/health/service/ $IN})],
['consul_services without a service name',
	upsync('127.0.0.1:8500/v1/health/service/ upsync_type=consul_services'),
	emerg(qq{upsync: path "/v1/health/service/" does not fit }
	. qq{upsync_type=consul_services: expected a path under }
	. qq{/v1/catalog/service/ or /v1/health/service/ $IN})],

# upstream-level conflicts

['upsync twice', ups_sync(
	'upsync 127.0.0.1:8500/v1/kv/b/ upsync_type=consul;'),
	emerg(qq{"upsync" is given twice $IN; one registry source per upstream})],
['least_conn before upsync, without upsync_lb (a method of its own)', ups("random;\n        "
	. "upsync 127.0.0.1:8500/v1/kv/a/ upsync_type=consul;\n"
	. "        server 127.0.0.1:8081;"),
	emerg(q{upsync: upstream "u" already has a load-balancing method }
	. q{(random, or one of another module); remove it and use "upsync_lb"})],
['hash after upsync without upsync_lb', ups_sync('hash $remote_addr;'),
	qr/\[emerg\] \Qupsync: upstream "u" has "hash KEY" without upsync_lb: add "upsync_lb hash KEY;" with the same key (upsync balances with upsync_lb)\E/],
['hash consistent with upsync_lb least_conn', ups_sync("hash \$remote_addr consistent;\n        upsync_lb least_conn;"),
	qr/\[emerg\] \Qupsync: upstream "u" has "hash KEY consistent" but "upsync_lb least_conn": keep one method (upsync balances with upsync_lb)\E/],
['least_conn with upsync_lb hash_ketama', ups_sync("least_conn;\n        upsync_lb hash_ketama;"),
	qr/\[emerg\] \Qupsync: upstream "u" has "least_conn" but "upsync_lb hash_ketama": keep one method\E/],
['random after upsync', ups_sync('random;'),
	emerg(q{upsync: upstream "u" also has a load-balancing directive }
	. q{(random, or one of another module) after "upsync"; remove it and use }
	. q{"upsync_lb"})],

# placement

['upsync in a stream server', stream_conf(<<'EOF'),
    upstream u { server 127.0.0.1:8081; }
    server {
        listen 127.0.0.1:%%PORT_8080%%;
        upsync 127.0.0.1:8500/v1/kv/a/ upsync_type=consul;
        proxy_pass u;
    }
EOF
	emerg(q{"upsync" directive is not allowed here})],
['upsync in stream main', stream_conf(<<'EOF'),
    upsync 127.0.0.1:8500/v1/kv/a/ upsync_type=consul;
    upstream u { server 127.0.0.1:8081; }
    server { listen 127.0.0.1:%%PORT_8080%%; proxy_pass u; }
EOF
	emerg(q{"upsync" directive is not allowed here})],
# nginx knows the directive (from a stream module), hence "not allowed
# here" rather than "unknown directive"
['upsync in an http upstream', <<'EOF',
%%TEST_GLOBALS%%
events { }
http {
    %%TEST_GLOBALS_HTTP%%
    upstream h {
        upsync 127.0.0.1:8500/v1/kv/a/ upsync_type=consul;
        server 127.0.0.1:8081;
    }
}
EOF
	emerg(q{"upsync" directive is not allowed here})],
['upsync_dump_path in a server', stream_conf(<<'EOF'),
    upstream u { server 127.0.0.1:8081; }
    server {
        listen 127.0.0.1:%%PORT_8080%%;
        upsync_dump_path /tmp/x.conf;
        proxy_pass u;
    }
EOF
	emerg(q{"upsync_dump_path" directive is not allowed here})],
['upsync_lb in a server', stream_conf(<<'EOF'),
    upstream u { server 127.0.0.1:8081; }
    server {
        listen 127.0.0.1:%%PORT_8080%%;
        upsync_lb roundrobin;
        proxy_pass u;
    }
EOF
	emerg(q{"upsync_lb" directive is not allowed here})],

# upsync_dump_path

['upsync_dump_path twice',
	ups_sync("upsync_dump_path $d/a.conf;\n"
		. "        upsync_dump_path $d/b.conf;"),
	emerg(q{"upsync_dump_path" directive is duplicate})],
['upsync_dump_path without argument', ups_sync('upsync_dump_path;'),
	emerg(q{invalid number of arguments in "upsync_dump_path" directive})],
['upsync_dump_path with two arguments',
	ups_sync("upsync_dump_path $d/a.conf $d/b.conf;"),
	emerg(q{invalid number of arguments in "upsync_dump_path" directive})],

# upsync_lb

['upsync_lb unknown method', ups_sync('upsync_lb fastest;'),
	emerg(q{upsync_lb: unknown method "fastest"; accepted: roundrobin, }
	. q{least_conn, ip_hash, hash_modula [KEY], hash_ketama [KEY], }
	. q{hash KEY [consistent], random [two [least_conn]]})],
['upsync_lb least_conn with a key', ups_sync('upsync_lb least_conn $remote_addr;'),
	emerg(q{upsync_lb: unknown method "least_conn $remote_addr"; accepted: roundrobin, least_conn, ip_hash, hash_modula [KEY], hash_ketama [KEY], hash KEY [consistent], random [two [least_conn]]})],
['upsync_lb hash without a key', ups_sync('upsync_lb hash;'),
	emerg(q{upsync_lb: unknown method "hash"; accepted: roundrobin, least_conn, ip_hash, hash_modula [KEY], hash_ketama [KEY], hash KEY [consistent], random [two [least_conn]]})],
['upsync_lb random three', ups_sync('upsync_lb random three;'),
	emerg(q{upsync_lb: unknown method "random three"; accepted: roundrobin, least_conn, ip_hash, hash_modula [KEY], hash_ketama [KEY], hash KEY [consistent], random [two [least_conn]]})],
['upsync_lb with an unknown variable', ups_sync('upsync_lb hash_ketama $no_such_var;'),
	qr/\[emerg\] unknown "no_such_var" variable$/m],
['upsync_lb without upsync', ups("upsync_lb least_conn;\n        server 127.0.0.1:8081;"),
	emerg(q{upsync_lb: upstream "u" has no "upsync"; upsync_lb only applies to upsync upstreams})],
['upsync_dump_path without upsync', ups("upsync_dump_path /tmp/x.conf;\n        server 127.0.0.1:8081;"),
	emerg(q{upsync_dump_path: upstream "u" has no "upsync"; upsync_dump_path only applies to upsync upstreams})],
['upsync_lb twice', ups_sync("upsync_lb roundrobin;\n"
	. "        upsync_lb roundrobin;"),
	emerg(q{"upsync_lb" directive is duplicate})],
['upsync_lb without argument', ups_sync('upsync_lb;'),
	emerg(q{invalid number of arguments in "upsync_lb" directive})],

# upstream_show

['upstream_show with an argument', stream_conf(<<'EOF'),
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show on; }
EOF
	emerg(q{invalid number of arguments in "upstream_show" directive})],
['upstream_show in an upstream', ups("upstream_show;\n"
	. "        server 127.0.0.1:8081;"),
	emerg(q{"upstream_show" directive is not allowed here})],
['upstream_show in stream main', stream_conf(<<'EOF'),
    upstream_show;
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
EOF
	emerg(q{"upstream_show" directive is not allowed here})],
['upstream_show after proxy_pass', stream_conf(<<'EOF'),
    upstream u { server 127.0.0.1:8081; }
    server {
        listen 127.0.0.1:%%PORT_8088%%;
        proxy_pass u;
        upstream_show;
    }
EOF
	emerg(q{upstream_show: this server already has a content handler }
	. q{(proxy_pass, return, pass or upstream_show)})],
['upstream_show twice', stream_conf(<<'EOF'),
    server {
        listen 127.0.0.1:%%PORT_8088%%;
        upstream_show;
        upstream_show;
    }
EOF
	emerg(q{upstream_show: this server already has a content handler }
	. q{(proxy_pass, return, pass or upstream_show)})],
# the seed: "It must be the only content handler in that server block --
# do not combine it with proxy_pass"; the order must not matter
['proxy_pass after upstream_show', stream_conf(<<'EOF'),
    upstream u { server 127.0.0.1:8081; }
    server {
        listen 127.0.0.1:%%PORT_8088%%;
        upstream_show;
        proxy_pass u;
    }
EOF
	qr/\[emerg\] .*(?:upstream_show|proxy_pass)/],
['return after upstream_show', stream_conf(<<'EOF'),
    server {
        listen 127.0.0.1:%%PORT_8088%%;
        upstream_show;
        return "x";
    }
EOF
	qr/\[emerg\] .*(?:upstream_show|return)/],

);

###############################################################################

$t->plan(2 * (@good + @bad) + 4);

my $n = 0;
for my $c (@good, @bad) {
	my ($name, $conf, $re) = @$c;
	my $file = sprintf('case%03d.conf', ++$n);
	$t->write_file_expand($file, $conf);
	my ($ok, $out) = $t->test_config($file);

	if (defined $re) {
		ok(!$ok, "$name: rejected");
		like($out, $re, "$name: message");
	} else {
		ok($ok, "$name: accepted") or diag($out);
		unlike($out, qr/\[(?:emerg|alert|crit)\]/, "$name: no errors");
	}
}

# warnings that do not stop nginx: what cannot be synced, and the drop-in notice
{
	$t->write_file_expand('warn.conf', ups_sync("least_conn;", "server 127.0.0.1:8081;\n        server unix:/tmp/upsync-left-out.sock;"));
	my ($ok, $out) = $t->test_config('warn.conf');
	ok($ok, 'a unix socket server next to upsync: accepted') or diag($out);
	like($out, qr/\[warn\] upsync: upstream "u": server "unix:\/tmp\/upsync-left-out\.sock" is left out: only IP addresses can be synced/,
		'and reported as left out');
	unlike($out, qr/upstream "u".*without upsync_lb/, 'least_conn; alone is upsync\'s method');
	unlike($out, qr/\[(?:emerg|alert|crit)\]/, 'no errors');
}

###############################################################################
