#!/usr/bin/perl

# Sync scenarios (Test::Nginx::SyncScenario) against Consul KV: the project's
# emulator, or a real `consul agent -dev` when one is on PATH.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::Nginx::SyncScenario qw/run_sync TESTS/;

select STDERR; $| = 1;
select STDOUT; $| = 1;

run_sync(kind => 'consul', plan => TESTS);
