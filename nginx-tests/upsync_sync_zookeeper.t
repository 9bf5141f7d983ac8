#!/usr/bin/perl

# Sync scenarios (Test::Nginx::SyncScenario) against a real ZooKeeper 3.8
# (Debian's zookeeper package, Test::Nginx::ZooKeeper): one znode per server
# under /upstreams/NAME, watched over the one session the instance keeps.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;
use Test::Nginx;
use Test::Nginx::Registry;
use Test::Nginx::SyncScenario qw/run_sync TESTS/;

select STDERR; $| = 1;
select STDOUT; $| = 1;

Test::Nginx->new()->has(qw/stream upsync/);
unless (Test::Nginx::Registry->available('zookeeper')) {
	require Test::Nginx::ZooKeeper;
	plan(skip_all => Test::Nginx::ZooKeeper->missing);
}

run_sync(kind => 'zookeeper', plan => TESTS);
