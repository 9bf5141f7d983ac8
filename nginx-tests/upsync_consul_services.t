#!/usr/bin/perl

# Consul services: consul_services on the catalog (every instance, settings
# from tags) and on the health endpoint as in the C module's documentation,
# and consul_health (passing instances only), driven through the agent API:
# registration, TTL check changes, deregistration.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;

use Test::Nginx qw/ :DEFAULT port wait_for http_get http_parse show_section /;
use Test::Nginx::Backend;
use Test::Nginx::Consul;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 2)->has(qw/stream upsync/)->plan(13);

my ($p1, $p2) = (port(8081), port(8082));

$t->write_file_expand('nginx.conf', <<'EOF');
%%TEST_GLOBALS%%
events { }
stream {
    upstream catalog {
        upsync 127.0.0.1:%%PORT_8500%%/v1/catalog/service/web upsync_type=consul_services
               upsync_interval=200ms;
        upsync_dump_path %%TESTDIR%%/servers_catalog.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
    upstream health {
        upsync 127.0.0.1:%%PORT_8500%%/v1/health/service/web upsync_type=consul_health
               upsync_interval=200ms;
        upsync_dump_path %%TESTDIR%%/servers_health.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
    upstream c_style {
        upsync 127.0.0.1:%%PORT_8500%%/v1/health/service/web?passing upsync_type=consul_services
               upsync_interval=200ms;
        upsync_dump_path %%TESTDIR%%/servers_c_style.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
    server { listen 127.0.0.1:%%PORT_8084%%; proxy_pass health; }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF

my $consul = Test::Nginx::Consul->start($t, port => port(8500));
my @backends = (Test::Nginx::Backend->tcp($t, port => $p1, id => 'web1'),
	Test::Nginx::Backend->tcp($t, port => $p2, id => 'web2'));

# web1: no check (passing), settings from tags; web2: a TTL check, critical at first
$consul->register_service({ ID => 'web1', Name => 'web', Address => '127.0.0.1', Port => $p1,
	Tags => ['weight=3', 'max_fails=5', 'fail_timeout=20s', 'primary'] });
$consul->register_service({ ID => 'web2', Name => 'web', Address => '127.0.0.1', Port => $p2,
	Tags => [], Check => { TTL => '60s' } });

$t->run();

sub section { show_section(port(8088), $_[0]) }

my $web1 = "server 127.0.0.1:$p1 weight=3 max_fails=5 fail_timeout=20s;";
my $web2 = "server 127.0.0.1:$p2 weight=1 max_fails=2 fail_timeout=10s;";

ok(wait_for(sub { section('catalog') =~ /count: 2\n/ }, timeout => 5), 'catalog: both instances');
like(section('catalog'), qr/\Q$web1\E/, 'catalog: settings from tags');
like(section('catalog'), qr/\Q$web2\E/, 'catalog: defaults without tags');
ok(wait_for(sub { section('health') =~ /count: 1\n\s+\Q$web1\E/ }, timeout => 5),
	'health: only the passing instance');
ok(wait_for(sub { section('c_style') =~ /count: 1\n/ }, timeout => 5),
	'consul_services on the health path with ?passing (C module style)');
is_deeply(count_by_backend($t, port(8084), 10), { web1 => 10 }, 'traffic only to passing instances');

$consul->check('service:web2', 'pass');
ok(wait_for(sub { section('health') =~ /count: 2\n/ }, timeout => 5), 'check passes: instance added');
my $c = count_by_backend($t, port(8084), 40);
is_deeply([sort keys %$c], ['web1', 'web2'], 'traffic to both');
ok(abs(($c->{web1} // 0) - 30) <= 2, 'weight 3:1 from tags') or diag(explain $c);

$consul->check('service:web2', 'fail');
ok(wait_for(sub { section('health') =~ /count: 1\n/ }, timeout => 5), 'check fails: instance removed');

$consul->deregister_service('web1');
ok(wait_for(sub { section('catalog') =~ /count: 1\n\s+\Q$web2\E/ }, timeout => 5),
	'deregistered: gone from the catalog');
ok(wait_for(sub { $t->grep_log(qr/upstream "health".*lists no servers; keeping the last 1/) }, timeout => 5),
	'health: no passing instance left keeps the last set');

my @bad = $t->grep_log(qr/\[(alert|crit|emerg)\]/);
is(scalar @bad, 0, 'no alerts') or diag(join '', @bad);
