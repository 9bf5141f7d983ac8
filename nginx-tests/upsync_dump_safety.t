#!/usr/bin/perl

# Where the dump goes and that it cannot be turned against the host: without
# upsync_dump_path it goes to upsync/servers_NAME.conf next to nginx.conf (not
# /tmp), unless the C module's /tmp/servers_NAME.conf exists (kept, with a
# warning); a relative upsync_dump_path is read from the configuration's
# directory, like include. A symlink planted where the worker writes its
# temporary file, or at the dump path itself, never makes nginx write through
# it: the file it points at keeps its content and mode. A dump directory others
# may write to gets a warning.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;

use Test::Nginx qw/ :DEFAULT port wait_for show_section /;
use Test::Nginx::Backend;
use Test::Nginx::Consul;
use Test::Nginx::Stream;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 1)->has(qw/stream upsync/)->plan(20);
my $d = $t->testdir;
# a name no other test uses: the C module's default lives in /tmp
my $legacy_name = "dumplegacy$$";
my $legacy = "/tmp/servers_$legacy_name.conf";

$t->write_file_expand('nginx.conf', <<"EOF");
%%TEST_GLOBALS%%
events { }
stream {
    upstream plain {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/plain/ upsync_type=consul upsync_interval=200ms;
    }
    upstream rel {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/rel/ upsync_type=consul upsync_interval=200ms;
        upsync_dump_path dumps/rel.conf;
        include dumps/rel.conf;
    }
    upstream $legacy_name {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/legacy/ upsync_type=consul upsync_interval=200ms;
    }
    upstream link {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/link/ upsync_type=consul upsync_interval=200ms;
        upsync_dump_path %%TESTDIR%%/open/link.conf;
    }
    server { listen 127.0.0.1:%%PORT_8080%%; proxy_pass rel; }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF

my $consul = Test::Nginx::Consul->start($t, port => port(8500));
my @b = map { Test::Nginx::Backend->tcp($t, port => port(8081 + $_), id => "b$_") } 0 .. 1;
my ($p0, $p1) = map { $_->port } @b;
$consul->put("upstreams/$_/127.0.0.1:$p0", '') for qw/plain rel legacy link/;

# the C module's default dump of one upstream exists already
open my $fh, '>', $legacy or die "$legacy: $!";
print $fh "server 127.0.0.1:$p1;\n";
close $fh;

# a victim only its owner may read, and a directory anyone may write to
$t->write_file('victim', "secret\n");
chmod 0600, "$d/victim";
mkdir "$d/open";
chmod 01777, "$d/open";
symlink "$d/victim", "$d/open/link.conf" or die "symlink: $!";
chmod 0777, "$d/open";    # no sticky bit: others may replace the file

$t->run();

sub file { my $c = $t->read_file($_[0]); defined $c ? $c : '' }
sub victim_intact {
	my $mode = (stat "$d/victim")[2] & 07777;
	return file('victim') eq "secret\n" && $mode == 0600;
}

###############################################################################
# where the dump goes

ok(wait_for(sub { file('upsync/servers_plain.conf') =~ /127\.0\.0\.1:$p0/ }, timeout => 5),
	'no upsync_dump_path: the dump is upsync/servers_NAME.conf next to nginx.conf');
ok(!-e '/tmp/servers_plain.conf', 'and nothing is written to /tmp');
ok(wait_for(sub { file('dumps/rel.conf') =~ /127\.0\.0\.1:$p0/ }, timeout => 5),
	'a relative upsync_dump_path is read from the configuration directory');
ok(wait_for(sub { (do { local $/; open my $l, '<', $legacy; <$l> } // '') =~ /127\.0\.0\.1:$p0/ },
	timeout => 5), 'the C module\'s /tmp dump, when it exists, stays in use');
ok(scalar $t->grep_log(qr/\[warn\].*"$legacy_name" dumps to "\Q$legacy\E" \(the C module's default/),
	'with a warning naming it');

###############################################################################
# a symlink at the dump path, in a directory others may write to

ok(scalar $t->grep_log(qr/\[warn\].*open\/link\.conf" is a symlink/), 'a symlinked dump path is warned about');
ok(scalar $t->grep_log(qr/\[warn\].*directory ".*open" is writable by everyone and not sticky/), 'a directory others may write to is warned about');
ok(wait_for(sub { !-l "$d/open/link.conf" && file('open/link.conf') =~ /127\.0\.0\.1:$p0/ }, timeout => 5),
	'the dump replaced the link itself');
ok(victim_intact(), 'the file the link pointed at keeps its content and mode');

###############################################################################
# a symlink planted where the worker writes its temporary file

my ($w) = $t->worker_pids;
my $tmp = "$d/dumps/.rel.conf.tmp.$w";
symlink "$d/victim", $tmp or die "symlink: $!";
ok(-l $tmp, 'a symlink waits at the worker\'s temporary file');
$consul->put("upstreams/rel/127.0.0.1:$p1", '');
ok(wait_for(sub { file('dumps/rel.conf') =~ /127\.0\.0\.1:$p1/ }, timeout => 5),
	'the next change is dumped all the same');
ok(victim_intact(), 'the file the planted link pointed at keeps its content and mode');
ok(!-e $tmp && !-l $tmp, 'the planted link is gone, no temporary file is left');
my $mode = (stat "$d/dumps/rel.conf")[2] & 07777;
is(sprintf('%o', $mode), '644', 'the dump keeps its mode');

# and at the final path, between two changes
unlink "$d/dumps/rel.conf";
symlink "$d/victim", "$d/dumps/rel.conf" or die "symlink: $!";
$consul->delete("upstreams/rel/127.0.0.1:$p1");
ok(wait_for(sub { !-l "$d/dumps/rel.conf" && file('dumps/rel.conf') !~ /$p1/ }, timeout => 5),
	'a link planted at the dump path is replaced, not followed');
ok(victim_intact(), 'the victim is untouched');

###############################################################################
# nginx -t creates the default dump of a new upstream too, and the traffic flows

is($t->test_config, 1, 'nginx -t passes');
ok(-d "$d/upsync", 'the default dump directory exists');
is(Test::Nginx::Stream::stream_get(port(8080)), "b0\n", 'traffic through the upstream');
is(scalar $t->alerts, 0, 'no alert, crit or emerg lines');

unlink $legacy;
