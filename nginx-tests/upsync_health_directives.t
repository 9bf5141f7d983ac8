#!/usr/bin/perl

# Configuration-time tests of the health-check directives (health_check,
# health_check_timeout, match): the documented forms pass "nginx -t", and every
# invalid one fails with a message naming the directive (and the upstream).
# Table driven: [name, config, expected]; expected is undef (the config must
# pass) or a regex the "[emerg]" line must match.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";
use lib 'nginx-tests/lib';

use Test::Nginx;

select STDERR; $| = 1;
select STDOUT; $| = 1;

my $t = Test::Nginx->new()->has(qw/stream upsync/);

# a stream {} block with an upsync upstream "u", its proxy server (with
# $server inside) and $main at stream level
sub conf {
	my ($server, $main) = @_;
	$main //= '';
	return <<"EOF";
%%TEST_GLOBALS%%
events { }

stream {
    %%TEST_GLOBALS_STREAM%%

    upstream u {
        upsync 127.0.0.1:8500/v1/kv/upstreams/u/ upsync_type=consul;
        upsync_dump_path %%TESTDIR%%/servers_u.conf;
        server 127.0.0.1:8081;
    }
    upstream plain {
        server 127.0.0.1:8081;
    }
$main
    server {
        listen 127.0.0.1:%%PORT_8080%%;
$server
    }
}
EOF
}

sub hc { conf("        proxy_pass u;\n        $_[0]", $_[1]) }

# "[emerg] TEXT in FILE:LINE"
sub emerg {
	my ($text) = @_;
	return qr/\[emerg\] \Q$text\E in \S+:\d+$/m;
}

# a bad match block no check uses: "match "m" (at FILE:LINE): TEXT"
sub mat {
	my ($text) = @_;
	return qr/\[emerg\] match "m" \(at \S+:\d+\): \Q$text\E in \S+:\d+$/m;
}

# a message from the postconfiguration check: "health_check (at FILE:LINE): TEXT"
sub at {
	my ($text) = @_;
	return qr/\[emerg\] health_check \(at \S+:\d+\): \Q$text\E in \S+:\d+$/m;
}

my $ACC = 'accepted: interval=, jitter=, fails=, passes=, port=, udp, match=, mandatory, persistent';
my $TIME = 'expected an nginx time such as 500ms, 5s or 1m, at most 7d';

my @good = (

['health_check with the defaults', hc('health_check;')],
['every parameter', hc('health_check interval=2s jitter=500ms fails=3 passes=2 port=9000 '
	. 'match=m mandatory persistent;', 'match m { send "PING\r\n"; expect "+PONG"; }')],
['udp, plain', hc('health_check udp;')],
['udp with a match that sends and expects',
	hc('health_check udp match=m;', 'match m { send "\x00\x01"; expect ~ "^\x80"; }')],
['regex expect, case-insensitive', hc('health_check match=m;',
	'match m { expect ~* "^(OK|READY)"; }')],
['a match that only sends', hc('health_check match=m;', 'match m { send "QUIT\r\n"; }')],
['health_check_timeout at stream and server level',
	hc("health_check;\n        health_check_timeout 1500ms;", 'health_check_timeout 2s;')],
['health_check before proxy_pass, match defined after use', conf(<<'EOF') . ''],
        health_check match=late;
        proxy_pass u;
    }
    match late { expect "ok"; }
    server {
        listen 127.0.0.1:%%PORT_8081%%;
        proxy_pass plain;
EOF

);

my @bad = (

['upstream not fed by upsync', conf("        proxy_pass plain;\n        health_check;"),
	at('upstream "plain" is not fed by "upsync"; this module checks upsync upstreams only')],
['proxy_pass to an address', conf("        proxy_pass 127.0.0.1:8081;\n        health_check;"),
	at('its server must proxy_pass to an upstream {} block by name (not an address or a variable)')],
['proxy_pass with a variable', conf("        proxy_pass \$remote_addr;\n        health_check;"),
	at('its server must proxy_pass to an upstream {} block by name (not an address or a variable)')],
['no proxy_pass', conf("        return ok;\n        health_check;"),
	at('its server must proxy_pass to an upstream {} block by name (not an address or a variable)')],
['a match that is not defined', hc('health_check match=nope;'),
	at('match "nope" of upstream "u" is not defined (match nope { ... } at stream level)')],
['udp with a match that does not send', hc('health_check udp match=m;', 'match m { expect "x"; }'),
	at('"udp" with match "m" needs "send" in the match block (a UDP check sends a datagram)')],
['two checks of one upstream', hc('health_check;') . '', qr/upstream "u" is already checked/,
	'second'],
['a bad regex', hc('health_check match=m;', 'match m { expect ~ "(unclosed"; }'),
	qr/\[emerg\] health_check \(at \S+:\d+\): upstream "u": match "m" \(at \S+:\d+\): invalid regex "\(unclosed": .*(parenthes|missing).* in \S+:\d+$/m],
['interval=0', hc('health_check interval=0;'),
	at(qq{upstream "u": invalid interval "0": $TIME, not 0})],
['jitter=soon', hc('health_check jitter=soon;'), at(qq{upstream "u": invalid jitter "soon": $TIME})],
['fails=0', hc('health_check fails=0;'),
	at('upstream "u": invalid fails "0": expected a number from 1 to 1000000')],
['passes=many', hc('health_check passes=many;'),
	at('upstream "u": invalid passes "many": expected a number from 1 to 1000000')],
['port=70000', hc('health_check port=70000;'),
	at('upstream "u": invalid port "70000": expected a number from 1 to 65535')],
['an unknown parameter', hc('health_check uri=/;'),
	at(qq{upstream "u": unknown parameter "uri=/"; $ACC})],
['persistent without mandatory', hc('health_check persistent;'),
	at('upstream "u": "persistent" needs "mandatory" (health_check ... mandatory persistent)')],
['a parameter twice', hc('health_check fails=1 fails=2;'), at('upstream "u": "fails=" is given twice')],
['a bad value before proxy_pass', conf("        health_check fails=0;\n        proxy_pass u;"),
	at('upstream "u": invalid fails "0": expected a number from 1 to 1000000')],
['health_check twice in a server', hc("health_check;\n        health_check;"),
	qr/\[emerg\] health_check: this server already has one \(at \S+:\d+\); one health_check per server in \S+:\d+$/m],
['health_check_timeout 0', hc("health_check;\n        health_check_timeout 0;"),
	emerg(qq{health_check_timeout: invalid timeout "0": $TIME, not 0})],
['a match name twice', hc('health_check;', "match m { expect \"a\"; }\n    match m { expect \"b\"; }"),
	qr/\[emerg\] match: "m" is already defined at \S+:\d+; match names are unique in \S+:\d+$/m],
['an unknown line in a match', hc('health_check;', 'match m { status 200; }'),
	mat('unknown directive "status" in match {}; accepted: send, expect')],
['an empty match', hc('health_check;', 'match m { }'),
	mat('has neither "send" nor "expect"; give at least one')],
['a bad \x escape', hc('health_check;', 'match m { send "\x4"; }'),
	mat('invalid \x escape in "\x4": expected \x followed by two hex digits, such as \x80')],
['an empty expect', hc('health_check;', 'match m { expect ""; }'),
	mat('empty expect string: it would match anything')],
['send twice', hc('health_check;', 'match m { send "a"; send "b"; }'),
	mat('"send" is given twice')],
['health_check in an upstream block', conf('        proxy_pass u;',
	"upstream v {\n        upsync 127.0.0.1:8500/v1/kv/upstreams/v/ upsync_type=consul;\n"
	. "        upsync_dump_path %%TESTDIR%%/servers_v.conf;\n        health_check;\n    }"),
	emerg('"health_check" directive is not allowed here')],
['match in a server', hc("health_check;\n        match m { expect \"a\"; }"),
	emerg('"match" directive is not allowed here')],

);

# "two checks of one upstream": a second server with its own health_check
for my $c (@bad) {
	next unless ($c->[3] // '') eq 'second';
	$c->[1] =~ s/(\n\}\n)$/\n    server {\n        listen 127.0.0.1:%%PORT_8081%%;\n        proxy_pass u;\n        health_check;\n    }$1/;
}

$t->plan(2 * (@good + @bad));

my $n = 0;
for my $c (@good, @bad) {
	my ($name, $conf, $re) = @$c;
	my $file = sprintf('case%03d.conf', ++$n);
	$t->write_file_expand($file, $conf);
	my ($ok, $out) = $t->test_config($file);

	if (defined $re) {
		ok(!$ok, "$name: rejected");
		like($out, $re, "$name: message");
	} else {
		ok($ok, "$name: accepted") or diag($out);
		unlike($out, qr/\[(?:emerg|alert|crit)\]/, "$name: no errors");
	}
}
