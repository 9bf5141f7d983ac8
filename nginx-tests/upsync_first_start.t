#!/usr/bin/perl

# First start from the registry alone: an upsync upstream with no `server` line
# and no dump file passes `nginx -t` (the dump and its directory are created,
# so the `include` of it works), starts, and takes its servers from the
# registry (within milliseconds; with strong_dependency=on before the workers
# accept). A connection that comes while the set is still empty fails at once,
# with one line that says why.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;
use Time::HiRes qw/time/;

use Test::Nginx qw/ :DEFAULT port wait_for show_section /;
use Test::Nginx::Backend;
use Test::Nginx::Consul;
use Test::Nginx::Stream qw/ stream_get /;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 2)->has(qw/stream upsync/)->plan(17);
my $d = $t->testdir;
my $root = $> == 0;
# the workers run as nobody (when the test runs as root): they must be able to
# reach the dump directory nginx creates
chmod 0755, $d if $root;
my $user = $root ? "user nobody nogroup;\n" : '';
my ($nobody_uid) = $root ? (getpwnam('nobody'))[2] : ($>);

sub conf {
	my ($extra) = @_;
	return <<"EOF";
%%TEST_GLOBALS%%
$user
events { }
stream {
    upstream db {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/db/ upsync_type=consul $extra;
        upsync_dump_path %%TESTDIR%%/upsync/db.conf;
        include %%TESTDIR%%/upsync/db.conf;
    }
    server { listen 127.0.0.1:%%PORT_8080%%; proxy_pass db; proxy_connect_timeout 1s; }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF
}

my $consul = Test::Nginx::Consul->start($t, port => port(8500));
my @b = map { Test::Nginx::Backend->tcp($t, port => port(8081 + $_), id => "b$_") } 0 .. 1;

###############################################################################
# nginx -t: two config lines, no server, no file

$t->write_file_expand('nginx.conf', conf(''));
ok(!-e "$d/upsync", 'no dump directory before');
my ($ok, $out) = $t->test_config();
ok($ok, 'nginx -t passes with no server line and no dump file') or diag($out);
ok(-f "$d/upsync/db.conf" && -s _ == 0, 'the dump file is created, empty');
is(sprintf('%o', (stat "$d/upsync/db.conf")[2] & 07777), '644', 'mode 0644');

###############################################################################
# start: the registry's servers arrive within milliseconds

$consul->put('upstreams/db/127.0.0.1:' . port(8081), '');
$consul->put('upstreams/db/127.0.0.1:' . port(8082), '');
$t->run();
my $t0 = time;
ok(wait_for(sub { show_section(port(8088), 'db') =~ /count: 2\n/ }, timeout => 5), 'the set comes from the registry');
note(sprintf('synced %.3fs after start', time - $t0));
my %seen;
for (1 .. 6) { my $g = stream_get(port(8080)) // ''; chomp $g; $seen{$g}++ }
is_deeply([sort grep { /^b/ } keys %seen], ['b0', 'b1'], 'connections reach the registry\'s servers');
ok(wait_for(sub { ($t->read_file('upsync/db.conf') // '') =~ /server 127\.0\.0\.1:\d+ .*\n.*server/s }, timeout => 5),
	'the workers write the dump');
is((stat "$d/upsync/db.conf")[4], $nobody_uid, 'the dump belongs to the worker user');
is((stat "$d/upsync")[4], $nobody_uid, 'so does the directory nginx made for it');
$t->stop_nginx;

###############################################################################
# the registry is down at start: a connection fails at once, one clear line

unlink "$d/upsync/db.conf";
my $mark = $t->log_offset();
$consul->stop;
$t->run();
$t0 = time;
my $got = stream_get(port(8080)) // ''; chomp $got;
my $took = time - $t0;
is($got, '', 'a connection before the registry answers gets no server');
ok($took < 1, sprintf('and fails at once (%.2fs)', $took));
ok($t->wait_for_log(qr/\[error\].*upsync: upstream "db" has no servers yet: waiting for the registry's first answer/, 3, from => $mark),
	'one line says why');
ok($t->grep_log(qr/no live upstreams/, from => $mark), 'next to nginx\'s own line');
$consul = Test::Nginx::Consul->start($t, port => port(8500));
$consul->put('upstreams/db/127.0.0.1:' . port(8082), '');
ok(wait_for(sub { (stream_get(port(8080)) // '') =~ /^b1/ }, timeout => 10), 'the registry answers: traffic flows');
$t->stop_nginx;

###############################################################################
# strong_dependency=on: the registry's servers before the workers accept

unlink "$d/upsync/db.conf";
$t->write_file_expand('nginx.conf', conf('strong_dependency=on'));
$mark = $t->log_offset();
$t->run();
like(stream_get(port(8080)) // '', qr/^b1$/, 'strong_dependency=on: the very first connection has a server');
ok($t->grep_log(qr/strong_dependency=on: starting with 1 servers from the registry/, from => $mark),
	'the master read the registry');
my @bad = grep { !/no live upstreams|no servers yet/ } $t->grep_log(qr/\[(alert|crit|emerg)\]/);
is(scalar @bad, 0, 'no alerts') or diag(join '', @bad);

###############################################################################
