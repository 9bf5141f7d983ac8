#!/usr/bin/perl

# proxy_ssl to an upsync upstream with proxy_ssl_session_reuse on: the session a
# handshake produces is kept with the server (in the upstream's zone), so later
# connections resume it, in any worker, as with nginx's own upstreams; with
# proxy_ssl_session_reuse off, every connection is a full handshake.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::More;
use IO::Socket::INET;
use IO::Select;

use Test::Nginx qw/ :DEFAULT port wait_for show_section /;
use Test::Nginx::Consul;
use Test::Nginx::Tls;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new(workers => 2)->has(qw/stream upsync/);
plan(skip_all => 'no openssl command') unless Test::Nginx::Tls->available;
plan(skip_all => 'nginx without stream ssl') unless $t->has_feature('stream_ssl');
$t->plan(7);

my $pki = Test::Nginx::Tls->make($t);

$t->write_file_expand('nginx.conf', <<"EOF");
%%TEST_GLOBALS%%
events { }
stream {
    upstream reuse {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/reuse/ upsync_type=consul upsync_interval=200ms;
        upsync_dump_path %%TESTDIR%%/servers_reuse.conf;
        server 127.0.0.1:%%PORT_8443%%;
    }
    upstream fresh {
        upsync 127.0.0.1:%%PORT_8500%%/v1/kv/upstreams/fresh/ upsync_type=consul upsync_interval=200ms;
        upsync_dump_path %%TESTDIR%%/servers_fresh.conf;
        server 127.0.0.1:%%PORT_8443%%;
    }
    server {
        listen 127.0.0.1:%%PORT_8081%%;
        proxy_pass reuse;
        proxy_ssl on;
        proxy_ssl_session_reuse on;
    }
    server {
        listen 127.0.0.1:%%PORT_8082%%;
        proxy_pass fresh;
        proxy_ssl on;
        proxy_ssl_session_reuse off;
    }
    # the TLS backend says whether the handshake resumed a session ("r") or not (".")
    server {
        listen 127.0.0.1:%%PORT_8443%% ssl;
        ssl_certificate $pki->{'server.pem'};
        ssl_certificate_key $pki->{'server.key'};
        ssl_session_cache shared:backend:1m;
        return "\$ssl_session_reused\\n";
    }
    server { listen 127.0.0.1:%%PORT_8088%%; upstream_show; }
}
EOF

my $consul = Test::Nginx::Consul->start($t, port => port(8500));
$consul->put('upstreams/reuse/127.0.0.1:' . port(8443), '');
$consul->put('upstreams/fresh/127.0.0.1:' . port(8443), '');
$t->run();

ok(wait_for(sub { show_section(port(8088), 'reuse') =~ /count: 1\n/
	&& $t->grep_log(qr/upstream "fresh".* servers now/) }, timeout => 5), 'synced');

sub greet {
	my ($port) = @_;
	my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$port", Timeout => 5) or return '';
	my $l = IO::Select->new($s)->can_read(5) ? (<$s> // '') : '';
	close $s;
	chomp $l;
	return $l;
}

my @reuse = map { greet(port(8081)) } 1 .. 8;
is($reuse[0], '.', 'the first connection is a full handshake');
ok((grep { $_ eq 'r' } @reuse[1 .. 7]) == 7, 'later connections resume the session (proxy_ssl_session_reuse on)')
	or diag("@reuse");

# both workers took connections, and both resumed: the session is the zone's
my @fresh = map { greet(port(8082)) } 1 .. 4;
is(scalar(grep { $_ eq '.' } @fresh), 4, 'proxy_ssl_session_reuse off: full handshakes only')
	or diag("@fresh");

# the session follows the server: it is dropped with the server when the
# registry removes it, and a re-added server starts with a full handshake
$consul->delete('upstreams/reuse/127.0.0.1:' . port(8443));
$consul->put('upstreams/reuse/127.0.0.1:' . port(8444), '');
ok(wait_for(sub { show_section(port(8088), 'reuse') =~ /:${\ port(8444)} / }, timeout => 5),
	'the server is replaced');
$consul->put('upstreams/reuse/127.0.0.1:' . port(8443), '');
$consul->delete('upstreams/reuse/127.0.0.1:' . port(8444));
ok(wait_for(sub { show_section(port(8088), 'reuse') =~ /count: 1\n.*:${\ port(8443)} /s }, timeout => 5),
	'and comes back');
is(greet(port(8081)), '.', 'a server that left and came back starts with a full handshake');

###############################################################################
