#!/usr/bin/perl

# $upstream_addr after a retry: a session that failed on one server and was
# served by another logs "DEAD, LIVE" - every address it tried, in order - the
# same as a stock upstream with the same two servers does. And a session that
# outlives its server (removed from the registry while it was open) logs that
# server's address when it ends; the server's memory is given back after that.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;

use Test::Nginx qw/ :DEFAULT port wait_for http_get http_parse show_section /;
use Test::Nginx::Stream;
use JSON::PP;
use Test::Nginx::Backend;
use Test::Nginx::Consul;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 1)->has(qw/stream upsync/)->plan(15);

my ($live, $dead) = (port(8081), port(8082));	# nothing ever listens on $dead
my ($up_port, $stock_port) = (port(8060), port(8061));

$t->write_file_expand('nginx.conf', <<'EOF');
%%TEST_GLOBALS%%
events { }
stream {
    log_format addr '$server_port $upstream_addr';

    upstream u {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/u/ upsync_type=consul upsync_interval=200ms;
        upsync_dump_path %%TESTDIR%%/servers_u.conf;
        server 127.0.0.1:%%PORT_8089%%;
    }
    upstream stock {
        server 127.0.0.1:%%PORT_8082%%;
        server 127.0.0.1:%%PORT_8081%%;
    }
    server {
        listen 127.0.0.1:%%PORT_8060%%;
        proxy_pass u;
        proxy_next_upstream on;
        proxy_next_upstream_tries 2;
        access_log %%TESTDIR%%/addr.log addr;
    }
    server {
        listen 127.0.0.1:%%PORT_8061%%;
        proxy_pass stock;
        proxy_next_upstream on;
        proxy_next_upstream_tries 2;
        access_log %%TESTDIR%%/addr.log addr;
    }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF

my $consul = Test::Nginx::Consul->start($t, port => port(8500));
my $b = Test::Nginx::Backend->tcp($t, port => $live, id => 'live');
$consul->put("upstreams/u/127.0.0.1:$dead", '');
$consul->put("upstreams/u/127.0.0.1:$live", '');
$t->run();

ok(wait_for(sub { show_section(port(8088), 'u') =~ /count: 2\n/ }, timeout => 5), 'u: both servers synced');

# 10 sessions to each; round robin sends some of them to the dead one first
my %got;
for my $port ($up_port, $stock_port) {
	$got{$port}{ (stream_get($port, timeout => 3) // '') =~ s/\n.*//sr }++ for 1 .. 10;
}
is_deeply($got{$stock_port}, { live => 10 }, 'stock: every session served by the live server');
is_deeply($got{$up_port}, { live => 10 }, 'upsync: every session served by the live server');

ok(wait_for(sub { ($t->read_file('addr.log') // '') =~ tr/\n// >= 20 }, timeout => 5),
	'20 access log lines');

my @lines = split /\n/, $t->read_file('addr.log') // '';
my %retried;	# listen port => [ [addresses], ... ] of sessions with a retry
for (@lines) {
	my ($port, $addrs) = /^(\d+) (.*)$/ or next;
	next unless $addrs =~ /,/;
	push @{ $retried{$port} }, [ split /, /, $addrs ];
}

for my $case ([stock => $stock_port], [upsync => $up_port]) {
	my ($name, $port) = @$case;
	my @r = @{ $retried{$port} // [] };
	ok(@r >= 1, "$name: some session was retried (" . scalar(@r) . ')');
	my @wrong = grep { @$_ != 2 || $_->[0] ne "127.0.0.1:$dead" || $_->[1] ne "127.0.0.1:$live" } @r;
	is(scalar @wrong, 0, "$name: a retried session logs \"127.0.0.1:DEAD, 127.0.0.1:LIVE\"")
		or diag("$name: " . join(' | ', map { join ', ', @$_ } @wrong) . " (dead $dead, live $live)");
	my @same = grep { @$_ == 2 && $_->[0] eq $_->[1] } @r;
	is(scalar @same, 0, "$name: the two addresses of a retried session differ");
}

# a session whose server is removed while it is open, then ends
{
	my $used = sub {
		my (undef, undef, $b) = http_parse(http_get(port(8088), '/?format=json', timeout => 3) // '');
		my $j = eval { decode_json($b // '') } or return undef;
		return $j->{upstreams}{u}{upsync}{memory}{used};
	};
	$consul->delete("upstreams/u/127.0.0.1:$dead");
	ok(wait_for(sub { show_section(port(8088), 'u') =~ /count: 1\n/ }, timeout => 5), 'u: only the live server');
	my $before = $used->();
	my $s = Test::Nginx::Stream->new(port => $up_port);
	$s->readline;
	my $mark = () = ($t->read_file('addr.log') // '') =~ /\n/g;
	$consul->delete("upstreams/u/127.0.0.1:$live");
	$consul->put("upstreams/u/127.0.0.1:$dead", '');
	ok(wait_for(sub { show_section(port(8088), 'u') =~ /count: 1\n.*:$dead /s }, timeout => 5),
		'its server was removed while the session is open');
	$s->close;
	ok(wait_for(sub { (() = ($t->read_file('addr.log') // '') =~ /\n/g) > $mark }, timeout => 5)
		&& (split /\n/, $t->read_file('addr.log'))[-1] eq "$up_port 127.0.0.1:$live",
		'the session ends and logs the removed server\'s address');
	ok(wait_for(sub { my $u = $used->(); defined $u && $u <= $before }, timeout => 10),
		'the removed server\'s memory is given back once every worker passed a quiet point');
}

my @bad = $t->grep_log(qr/\[(alert|crit|emerg)\]/);
is(scalar @bad, 0, 'no alerts') or diag(join "\n", @bad);
