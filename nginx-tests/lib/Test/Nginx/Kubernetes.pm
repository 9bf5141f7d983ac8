package Test::Nginx::Kubernetes;

# A Kubernetes API server for the tests: the project's emulator of the
# EndpointSlice API (nginx-tests/lib/k8s_emulator.py), or a real API server
# when TEST_NGINX_K8S_URL is set. The same tests drive both; emulator-only
# steps (counters, faults, token rotation, bad data the real server would
# refuse) ask ->is_emulator and skip otherwise.
#
#   my $k = Test::Nginx::Kubernetes->start($t, port => port(8600),
#       control_port => port(8601), [tls => { cert => F, key => F, ca => F }]);
#   $k->upsync('web')                  # "upsync http(s)://127.0.0.1:P/NS/web upsync_type=kubernetes token_file=..."
#   $k->put_endpoint('web', 8081, 'ready');       # slice web-8081: 127.0.0.1, port 8081
#   $k->put_endpoint('web', 8081, 'draining');    # serving + terminating
#   $k->put_endpoint('web', 8081, 'notready');
#   $k->put_slice('web', 'web-x', port => 8081, endpoints => [['127.0.0.1', 'ready']]);
#   $k->delete_endpoint('web', 8081);  $k->delete_service('web');
#   $k->rotate_token(revoke_old => 1);            # emulator: new token file, old one refused
#
# Real API server (the tests write EndpointSlices labelled
# kubernetes.io/service-name=<service> and endpointslice.kubernetes.io/managed-by=
# upsync-tests in one namespace, as for a Service without a selector, and
# delete them at the end):
#   TEST_NGINX_K8S_URL         https://HOST:PORT (or http://127.0.0.1:8001 for kubectl proxy)
#   TEST_NGINX_K8S_TOKEN       bearer token (or TEST_NGINX_K8S_TOKEN_FILE); none for kubectl proxy
#   TEST_NGINX_K8S_CA          CA file of the API server (else TEST_NGINX_K8S_INSECURE=1)
#   TEST_NGINX_K8S_NAMESPACE   default "default"
# The token needs create, get, update, delete, list and watch on endpointslices
# there. The backends are on 127.0.0.1: a server whose validation refuses
# loopback addresses in EndpointSlices cannot run these tests.

use strict;
use warnings;

use File::Basename qw/dirname/;
use File::Spec;
use HTTP::Tiny;
use JSON::PP;
use POSIX ();

use Test::Nginx qw/wait_for/;

my $EMULATOR = File::Spec->rel2abs(dirname(__FILE__) . '/../../k8s_emulator.py');
my $JSON = JSON::PP->new->utf8->canonical;
my $GROUP = '/apis/discovery.k8s.io/v1';

sub want_real { defined $ENV{TEST_NGINX_K8S_URL} && length $ENV{TEST_NGINX_K8S_URL} }

# start($t, port => N, control_port => M, [tls => {cert, key, [client_ca]}],
#       [bookmark_interval => S], [args => [...]])
sub start {
	my ($class, $t, %o) = @_;
	my $self = bless { t => $t, http => HTTP::Tiny->new(timeout => 10, keep_alive => 0),
		real => want_real(), serial => 1, created => {} }, $class;
	my $tokfile = $t->testdir . '/k8s.token';
	$self->{token_file} = $tokfile;

	if ($self->{real}) {
		($self->{url} = $ENV{TEST_NGINX_K8S_URL}) =~ s{/+$}{};
		$self->{namespace} = $ENV{TEST_NGINX_K8S_NAMESPACE} || 'default';
		my $tok = $ENV{TEST_NGINX_K8S_TOKEN};
		if (!defined $tok && $ENV{TEST_NGINX_K8S_TOKEN_FILE}) {
			open my $fh, '<', $ENV{TEST_NGINX_K8S_TOKEN_FILE}
				or die "TEST_NGINX_K8S_TOKEN_FILE: $!\n";
			local $/;
			$tok = <$fh>;
			$tok =~ s/\s+$//;
		}
		$self->{token} = $tok;
		$self->{ca} = $ENV{TEST_NGINX_K8S_CA};
		$self->{api} = $self->{url};
		_write_atomic($tokfile, "$tok\n") if defined $tok;
	} else {
		my $port = $o{port} or die "Kubernetes->start: port required\n";
		my $ctl = $o{control_port} or die "Kubernetes->start: control_port required\n";
		$self->{namespace} = 'upsync';
		$self->{token} = 'emu-token-' . $$ . '-1';
		$self->{port} = $port;
		my $scheme = $o{tls} ? 'https' : 'http';
		$self->{url} = "$scheme://127.0.0.1:$port";
		$self->{api} = "http://127.0.0.1:$ctl";
		$self->{ca} = $o{tls} ? $o{tls}{ca} : undef;
		_write_atomic($tokfile, "$self->{token}\n");
		my @tls = $o{tls} ? ('--tls-cert', $o{tls}{cert}, '--tls-key', $o{tls}{key},
			$o{tls}{client_ca} ? ('--tls-client-ca', $o{tls}{client_ca}) : ()) : ();
		$t->spawn('k8s', 'python3', $EMULATOR, '--listen', "127.0.0.1:$port",
			'--control-listen', "127.0.0.1:$ctl", '--token', $self->{token},
			'--bookmark-interval', $o{bookmark_interval} // 1, @tls, @{ $o{args} // [] });
		wait_for(sub { my $r = $self->{http}->get("$self->{api}/healthz"); $r->{success} },
			timeout => 20, desc => 'k8s emulator up')
			or die "the Kubernetes emulator did not start:\n" . ($t->read_file('k8s.log') // '');
	}
	return $self;
}

sub is_emulator { !$_[0]{real} }
sub namespace { $_[0]{namespace} }
sub token { $_[0]{token} }
sub token_file { $_[0]{token_file} }
sub url { $_[0]{url} }
sub label { $_[0]{real} ? 'kubernetes (API server)' : 'kubernetes (emulator)' }

sub _write_atomic {
	my ($path, $content) = @_;
	my $tmp = "$path.tmp.$$";
	open my $fh, '>', $tmp or die "$tmp: $!\n";
	print $fh $content;
	close $fh or die "$tmp: $!\n";
	rename $tmp, $path or die "rename $tmp: $!\n";
}

# The `upsync` line for a Service; $extra is appended.
sub upsync {
	my ($self, $service, $extra) = @_;
	my $line = "upsync $self->{url}/$self->{namespace}/$service upsync_type=kubernetes";
	$line .= " token_file=$self->{token_file}" if defined $self->{token};
	if ($self->{url} =~ /^https/) {
		$line .= defined $self->{ca} ? " ssl_trusted_certificate=$self->{ca}" : ' ssl_verify=off';
	}
	return $line . (defined $extra && length $extra ? " $extra" : '');
}

###############################################################################
# the API (through the emulator's plain control port, or the real server)

# api($method, $path, [$body]) -> ($status, $decoded_or_raw)
sub api {
	my ($self, $method, $path, $body) = @_;
	my $content = defined $body ? $JSON->encode($body) : undef;
	if ($self->{real} && $self->{url} =~ /^https/) {
		return $self->_curl($method, $path, $content);
	}
	my %h = ('Content-Type' => 'application/json', Accept => 'application/json');
	$h{Authorization} = "Bearer $self->{token}" if $self->{real} && defined $self->{token};
	my $r = $self->{http}->request($method, "$self->{api}$path",
		{ headers => \%h, defined $content ? (content => $content) : () });
	my $d = eval { $JSON->decode($r->{content}) } // $r->{content};
	return ($r->{status}, $d);
}

# HTTP::Tiny has no TLS here (no IO::Socket::SSL): real https servers through curl.
sub _curl {
	my ($self, $method, $path, $content) = @_;
	my @cmd = ('curl', '-sS', '-o', '-', '-w', '\n%{http_code}', '-X', $method,
		'-H', 'Content-Type: application/json', '-H', 'Accept: application/json');
	push @cmd, '-H', "Authorization: Bearer $self->{token}" if defined $self->{token};
	push @cmd, defined $self->{ca} ? ('--cacert', $self->{ca}) : ('-k');
	push @cmd, '--data-binary', '@-' if defined $content;
	my $dir = $self->{t}->testdir;
	my $in = "$dir/k8s-curl.in";
	_write_atomic($in, $content // '');
	my $pid = open(my $fh, '-|');
	die "fork: $!\n" unless defined $pid;
	if (!$pid) {
		open STDIN, '<', $in;
		{ no warnings 'exec'; exec @cmd, "$self->{url}$path"; }
		POSIX::_exit(127);
	}
	local $/;
	my $out = <$fh>;
	close $fh;
	my ($body, $code) = $out =~ /^(.*)\n(\d+)$/s or return (599, $out);
	my $d = eval { $JSON->decode($body) } // $body;
	return ($code, $d);
}

sub _slices { "$GROUP/namespaces/$_[0]{namespace}/endpointslices" }

sub _ok {
	my ($what, $status, $d) = @_;
	return $d if $status =~ /^2/;
	die "kubernetes $what: HTTP $status " . (ref $d ? $JSON->encode($d) : $d // '') . "\n";
}

# The EndpointSlice object for a Service.
#   endpoints => [[ip, state], ...]  state: ready | draining | notready | terminating
sub slice_object {
	my ($self, $service, $name, %o) = @_;
	my %cond = (
		ready => { ready => JSON::PP::true, serving => JSON::PP::true, terminating => JSON::PP::false },
		draining => { ready => JSON::PP::false, serving => JSON::PP::true, terminating => JSON::PP::true },
		notready => { ready => JSON::PP::false, serving => JSON::PP::false, terminating => JSON::PP::false },
		terminating => { ready => JSON::PP::false, serving => JSON::PP::false, terminating => JSON::PP::true },
	);
	my @eps = map {
		my ($ip, $state) = @$_;
		die "unknown endpoint state $state\n" unless $cond{$state // 'ready'};
		{ addresses => [$ip], conditions => $cond{$state // 'ready'},
		  targetRef => { kind => 'Pod', name => "$name-pod-" . $self->{serial}++ } }
	} @{ $o{endpoints} // [] };
	return {
		apiVersion => 'discovery.k8s.io/v1', kind => 'EndpointSlice',
		metadata => { name => $name, labels => {
			'kubernetes.io/service-name' => $service,
			'endpointslice.kubernetes.io/managed-by' => 'upsync-tests' } },
		addressType => $o{address_type} // 'IPv4',
		ports => $o{ports} // [{ name => $o{port_name} // 'tcp', port => 0 + $o{port},
			protocol => $o{protocol} // 'TCP' }],
		endpoints => \@eps,
	};
}

# put_slice($service, $name, port => N, endpoints => [...], ...): creates or replaces.
sub put_slice {
	my ($self, $service, $name, %o) = @_;
	my $obj = $self->slice_object($service, $name, %o);
	my ($st, $have) = $self->api('GET', $self->_slices . "/$name");
	$self->{created}{$name} = 1;
	if ($st == 404) {
		return _ok("create $name", $self->api('POST', $self->_slices, $obj));
	}
	_ok("get $name", $st, $have);
	$obj->{metadata}{resourceVersion} = $have->{metadata}{resourceVersion};
	return _ok("replace $name", $self->api('PUT', $self->_slices . "/$name", $obj));
}

sub delete_slice {
	my ($self, $name) = @_;
	my ($st, $d) = $self->api('DELETE', $self->_slices . "/$name");
	delete $self->{created}{$name};
	return 1 if $st == 404;
	_ok("delete $name", $st, $d);
}

# One backend as one slice (all backends share 127.0.0.1, so each needs its own
# port, and ports are per slice).
sub put_endpoint {
	my ($self, $service, $port, $state) = @_;
	return $self->put_slice($service, "$service-$port", port => $port,
		endpoints => [['127.0.0.1', $state // 'ready']]);
}

sub delete_endpoint {
	my ($self, $service, $port) = @_;
	return $self->delete_slice("$service-$port");
}

sub slices_of {
	my ($self, $service) = @_;
	my $d = _ok('list', $self->api('GET', $self->_slices
		. "?labelSelector=kubernetes.io%2Fservice-name%3D$service"));
	return map { $_->{metadata}{name} } @{ $d->{items} // [] };
}

# Deletes every slice of the Service in one request (DELETE on the collection),
# so a watch sees them go together, as when a Service loses all its endpoints.
sub delete_service {
	my ($self, $service) = @_;
	my @gone = $self->slices_of($service);
	_ok("delete slices of $service", $self->api('DELETE', $self->_slices
		. "?labelSelector=kubernetes.io%2Fservice-name%3D$service"));
	delete $self->{created}{$_} for @gone;
}

###############################################################################
# emulator control (see k8s_emulator.py)

sub control {
	my ($self, $what, $json) = @_;
	die "control API needs the emulator\n" unless $self->is_emulator;
	my $r = $self->{http}->request('POST', "$self->{api}/_emu/$what",
		{ content => $JSON->encode($json // {}),
		  headers => { 'Content-Type' => 'application/json' } });
	die "emulator $what: $r->{status} $r->{content}\n" unless $r->{success};
	return $r->{content} ? $JSON->decode($r->{content}) : {};
}

sub stats {
	my ($self) = @_;
	my $r = $self->{http}->get("$self->{api}/_emu/stats");
	die "emulator stats: $r->{status}\n" unless $r->{success};
	# the control port is not counted: these are nginx's requests
	return $JSON->decode($r->{content});
}

sub fault { $_[0]->control('fault', $_[1]) }
sub clear_faults { $_[0]->control('clear_faults') }
sub compact { my ($self, %o) = @_; $self->control('compact', \%o) }
sub end_watches { $_[0]->control('end_watches', { how => $_[1] // 'clean' }) }
sub raw_put { $_[0]->control('raw_put', { namespace => $_[0]{namespace}, object => $_[1] }) }

# rotate_token(revoke_old => 0|1, [forbidden => 1]): a new token replaces the
# file's (written beside it and renamed over it, as the kubelet does); the
# emulator accepts it, and the old one too unless revoke_old.
sub rotate_token {
	my ($self, %o) = @_;
	die "rotating tokens needs the emulator\n" unless $self->is_emulator;
	my $old = $self->{token};
	(my $new = $old) =~ s/-(\d+)$/'-' . ($1 + 1)/e;
	$self->control('tokens', { tokens => [ $new, $o{revoke_old} ? () : ($old) ],
		forbidden => $o{forbidden} ? [$new] : [] });
	_write_atomic($self->{token_file}, "$new\n");
	$self->{token} = $new;
	return $new;
}

# Removes what the tests created on a real server.
sub cleanup {
	my ($self) = @_;
	return unless $self->{real};
	eval { $self->delete_slice($_) } for keys %{ $self->{created} };
}

sub DESTROY { local $@; eval { $_[0]->cleanup } }

1;
