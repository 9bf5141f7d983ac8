package Test::Nginx::Consul;

# A Consul registry for the tests: the project's emulator of Consul's HTTP API
# (nginx-tests/lib/consul_emulator.py), or a real `consul agent -dev` when
# TEST_NGINX_CONSUL=real (or a consul binary on PATH and TEST_NGINX_CONSUL is
# unset). The same tests run against both; emulator-only checks (request
# counters, fault injection) ask ->is_emulator and skip otherwise.

use strict;
use warnings;

use File::Basename qw/dirname/;
use File::Spec;
use HTTP::Tiny;
use JSON::PP;
use MIME::Base64 ();

use Test::Nginx qw/wait_for/;

my $EMULATOR = File::Spec->rel2abs(dirname(__FILE__) . '/../../consul_emulator.py');

sub want_real {
	my $mode = $ENV{TEST_NGINX_CONSUL} // '';
	return 0 if $mode eq 'emulator';
	return 1 if $mode eq 'real';
	return defined Test::Nginx::which('consul') ? 1 : 0;
}

# start($t, port => N, [args => [...]], [name => 'consul']): starts the
# registry on 127.0.0.1:N and waits until it answers; a second one needs its
# own name (its log is NAME.log).
sub start {
	my ($class, $t, %o) = @_;
	my $port = $o{port} or die "Consul->start: port required\n";
	my $name = $o{name} // 'consul';
	my $self = bless { t => $t, port => $port, real => want_real(), name => $name,
		http => HTTP::Tiny->new(timeout => 10, keep_alive => 0) }, $class;

	if ($self->{real}) {
		my $d = $t->testdir . "/$name-data";
		mkdir $d;
		$t->spawn($name, 'consul', 'agent', '-dev', '-bind', '127.0.0.1',
			'-client', '127.0.0.1', "-http-port=$port", '-grpc-port=-1',
			'-dns-port=-1', "-data-dir=$d", @{ $o{args} // [] });
	} else {
		$t->spawn($name, 'python3', $EMULATOR,
			'--listen', "127.0.0.1:$port", @{ $o{args} // [] });
	}

	wait_for(sub { $self->get('/v1/status/leader')->{success} },
		timeout => 30, desc => 'consul up')
		or die "Consul did not start:\n" . ($t->read_file("$name.log") // '');
	return $self;
}

# stop(): ends the registry (start it again with start()).
sub stop { $_[0]{t}->kill_spawned($_[0]{name}) }

sub is_emulator { !$_[0]{real} }
sub port { $_[0]{port} }
sub url { "http://127.0.0.1:$_[0]{port}$_[1]" }

sub get { $_[0]{http}->get($_[0]->url($_[1])) }

sub request {
	my ($self, $method, $path, $body) = @_;
	my $r = $self->{http}->request($method, $self->url($path),
		defined $body ? { content => $body } : {});
	die "consul $method $path: $r->{status} $r->{content}\n"
		unless $r->{success};
	return $r;
}

sub put { my ($self, $key, $value) = @_; $self->request('PUT', "/v1/kv/$key", $value // '') }
sub delete { my ($self, $key) = @_; $self->request('DELETE', "/v1/kv/$key") }
sub delete_tree { my ($self, $key) = @_; $self->request('DELETE', "/v1/kv/$key?recurse") }

# txn([set => KEY, VALUE], [delete => KEY], [delete-tree => PREFIX], ...): KV
# operations applied at once (one index); Consul takes at most 64 per call
sub txn {
	my ($self, @ops) = @_;
	my @body = map {
		my ($verb, $key, $value) = @$_;
		{ KV => { Verb => $verb, Key => $key,
			defined $value ? (Value => MIME::Base64::encode_base64($value, '')) : () } }
	} @ops;
	$self->request('PUT', '/v1/txn', encode_json(\@body));
}

# Agent API: services and checks (the same calls on the emulator and a real agent).
sub register_service {
	my ($self, $def) = @_;
	$self->request('PUT', '/v1/agent/service/register', encode_json($def));
}
sub deregister_service { $_[0]->request('PUT', "/v1/agent/service/deregister/$_[1]") }
# check($check_id, 'pass'|'warn'|'fail'); a service's TTL check is "service:ID"
sub check { $_[0]->request('PUT', "/v1/agent/check/$_[2]/$_[1]") }

# Emulator control API (see consul_emulator.py).
sub control {
	my ($self, $what, $json) = @_;
	die "control API needs the emulator\n" unless $self->is_emulator;
	my $r = $self->{http}->request('POST', $self->url("/_emu/$what"),
		{ content => encode_json($json // {}),
		  headers => { 'Content-Type' => 'application/json' } });
	die "emulator $what: $r->{status} $r->{content}\n" unless $r->{success};
	return $r->{content} ? decode_json($r->{content}) : {};
}

sub stats {
	my ($self) = @_;
	my $r = $self->get('/_emu/stats');
	die "emulator stats: $r->{status}\n" unless $r->{success};
	return decode_json($r->{content});
}

sub fault { $_[0]->control('fault', $_[1]) }
sub clear_faults { $_[0]->control('clear_faults') }

1;
