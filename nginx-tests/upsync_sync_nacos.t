#!/usr/bin/perl

# Sync scenarios (Test::Nginx::SyncScenario) against a real Nacos: rnacos, the
# Rust Nacos server (v1 naming API), installed by scripts/test into
# ~/.cache/ngx-stream-upsync/rnacos. Nacos is polled (no long poll): the
# scenario's upsync line polls every 100 ms.

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
plan(skip_all => 'no rnacos binary (scripts/test installs it; TEST_NACOS_BINARY)')
	unless Test::Nginx::Registry->available('nacos');

run_sync(kind => 'nacos', plan => TESTS);
