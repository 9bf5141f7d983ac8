#!/usr/bin/perl

# Active health checks on an upstream fed by ZooKeeper (real ZooKeeper 3.8):
# its servers are probed like those of any other registry, so with
# `mandatory` a server that answers comes out of "checking" and takes the
# connections, and one that refuses them becomes unhealthy.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;
use JSON::PP;

use Test::Nginx qw/ :DEFAULT port wait_for http_get http_parse /;
use Test::Nginx::Backend;
use Test::Nginx::ZooKeeper;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 2)->has(qw/stream upsync/);
my $why = Test::Nginx::ZooKeeper->missing;
$t->skip_all($why) if $why;
$t->plan(5);

my $zk = Test::Nginx::ZooKeeper->start($t, port => 8181, name => 'zk');
my $zport = $zk->client_port(1);
my ($live, $dead) = (port(8081), port(8082));

$t->write_file_expand('nginx.conf', <<"EOF");
%%TEST_GLOBALS%%
events { }
stream {
    upstream z {
        upsync 127.0.0.1:$zport/hc upsync_type=zookeeper;
        upsync_dump_path %%TESTDIR%%/servers_z.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
    server {
        listen 127.0.0.1:%%PORT_8080%%;
        proxy_pass z;
        health_check interval=300ms mandatory;
        health_check_timeout 1s;
    }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF

my $b1 = Test::Nginx::Backend->tcp($t, port => $live, id => 'b1');
$zk->ops([ ['create', '/hc', ''], ['create', "/hc/127.0.0.1:$live", ''],
	['create', "/hc/127.0.0.1:$dead", ''] ]);
$t->run();

sub state_of {
	my ($port) = @_;
	my (undef, undef, $b) = http_parse(http_get(port(8088), '/?format=json') // '');
	my $j = eval { decode_json($b // '') } or return '';
	my ($s) = grep { $_->{server} eq "127.0.0.1:$port" } @{ $j->{upstreams}{z}{servers} // [] };
	return $s && $s->{health} ? $s->{health}{state} // '' : '';
}

ok(wait_for(sub { state_of($live) eq 'up' }, timeout => 10), 'the answering server passed its check: up');
ok(wait_for(sub { state_of($dead) eq 'unhealthy' }, timeout => 10), 'the refusing one: unhealthy');
ok($t->wait_for_log(qr/upstream "z" server 127\.0\.0\.1:$dead is unhealthy: connect refused/, 5),
	'logged with the reason');
is_deeply(count_by_backend($t, port(8080), 10), { b1 => 10 }, 'connections go to the healthy server only');
is(scalar $t->grep_log(qr/\[(alert|crit)\]/), 0, 'no alerts');
