#!/usr/bin/perl

# Sync scenarios (Test::Nginx::SyncScenario) against Kubernetes EndpointSlices:
# the project's API server emulator, or a real API server when
# TEST_NGINX_K8S_URL is set (see Test::Nginx::Kubernetes). One slice per
# backend (the backends share 127.0.0.1 and ports are per slice); "down" is a
# draining endpoint (serving and terminating); endpoints carry no weights, so
# every server has the defaults.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;
use Test::Nginx;
use Test::Nginx::SyncScenario qw/run_sync TESTS/;

select STDERR; $| = 1;
select STDOUT; $| = 1;

plan(skip_all => 'no python3 for the Kubernetes emulator')
	unless defined Test::Nginx::which('python3') || $ENV{TEST_NGINX_K8S_URL};

run_sync(kind => 'kubernetes', plan => TESTS);
