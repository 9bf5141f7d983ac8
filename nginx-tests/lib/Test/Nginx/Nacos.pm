package Test::Nginx::Nacos;

# A Nacos for the tests: the real rnacos server (a Rust Nacos: v1 naming API and
# login), or the project's emulator (nacos_emulator.py: the 2.x and 3.x answer
# shapes rnacos does not serve). Started through the harness ($t->spawn, stopped at
# cleanup) on 127.0.0.1 only, with a temp data dir.
#
#   my $bin = Test::Nginx::Nacos->binary or skip ...;
#   my $n = Test::Nginx::Nacos->start($t, port => port(8848), grpc_port => port(8849),
#       console_port => port(8850), [auth => 'USER:PASSWORD', token_ttl => SECONDS]);
#   my $n = Test::Nginx::Nacos->start($t, emulator => 1, port => port(8848),
#       [auth => ..., token_ttl => ..., login_apis => 'v3', args => ['--apis', 'v3']]);
#   (login_apis: the emulator's --login-apis; the helper logs in through the v1 path
#   when it is served, else the 3.x one, /nacos/v3/auth/user/login)
#   $n->register('svc', '127.0.0.1', 8081, weight => 0.5, healthy => 1, enabled => 1,
#       metadata => { max_fails => '3' }, cluster => 'A');   # also updates
#   $n->deregister('svc', '127.0.0.1', 8081);  $n->deregister_all('svc');
#
# Instances are persistent (ephemeral=false, no heartbeats; rnacos's own probing of
# persistent instances is turned off), so they change only when a test says so;
# register(..., ephemeral => 1) makes one that is never sent a heartbeat: rnacos
# marks it unhealthy after health_timeout => S (+3 s) and drops it much later.
# (rnacos ignores healthy= on registration and leaves disabled instances out of
# its answers; the emulator keeps both, as Nacos does.) The rnacos binary: TEST_NACOS_BINARY ("none" disables), the cache that
# scripts/test fills (~/.cache/ngx-stream-upsync/rnacos/bin/rnacos), rnacos on PATH.

use strict;
use warnings;

use File::Basename qw/dirname/;
use File::Spec;
use HTTP::Tiny;
use JSON::PP;

use Test::Nginx qw/wait_for/;

my $EMULATOR = File::Spec->rel2abs(dirname(__FILE__) . '/../../nacos_emulator.py');

sub binary {
	my $env = $ENV{TEST_NACOS_BINARY};
	if (defined $env) {
		return undef if $env eq 'none' || !-x $env;
		return $env;
	}
	my $home = $ENV{HOME} // '/root';
	for my $c ("$home/.cache/ngx-stream-upsync/rnacos/bin/rnacos", Test::Nginx::which('rnacos')) {
		return $c if defined $c && -f $c && -x _;
	}
	return undef;
}

sub start {
	my ($class, $t, %o) = @_;
	my $port = $o{port} or die "Nacos->start: port required\n";
	my ($user, $pass) = defined $o{auth} ? split(/:/, $o{auth}, 2) : ();
	my $name = $o{name} // 'nacos';
	my $login = defined $o{login_apis} && $o{login_apis} !~ /\bv1\b/
		? '/nacos/v3/auth/user/login' : '/nacos/v1/auth/login';
	my $self = bless { t => $t, port => $port, name => $name, user => $user, pass => $pass,
		login_path => $login,
		emulator => $o{emulator} ? 1 : 0, known => {},
		http => HTTP::Tiny->new(timeout => 10, keep_alive => 0) }, $class;

	if ($self->{emulator}) {
		$t->spawn($name, 'python3', $EMULATOR, '--listen', "127.0.0.1:$port",
			(defined $o{auth} ? ('--auth', $o{auth}) : ()),
			(defined $o{token_ttl} ? ('--token-ttl', $o{token_ttl}) : ()),
			(defined $o{login_apis} ? ('--login-apis', $o{login_apis}) : ()),
			@{ $o{args} // [] });
	} else {
		my $bin = $class->binary or die "no rnacos binary\n";
		my $grpc = $o{grpc_port} or die "Nacos->start: grpc_port required\n";
		my $console = $o{console_port} or die "Nacos->start: console_port required\n";
		my $data = $t->testdir . "/$name-data";
		mkdir $data;
		local %ENV = (%ENV,
			RNACOS_HTTP_PORT => $port,
			RNACOS_GRPC_PORT => $grpc,
			RNACOS_HTTP_CONSOLE_PORT => $console,
			RNACOS_SDK_HOST => '127.0.0.1',
			RNACOS_CONSOLE_HOST => '127.0.0.1',
			RNACOS_RAFT_NODE_ADDR => "127.0.0.1:$grpc",
			RNACOS_DATA_DIR => $data,
			RNACOS_HTTP_WORKERS => 2,
			RNACOS_ENABLE_OPEN_API_AUTH => defined $o{auth} ? 'true' : 'false',
			RNACOS_INIT_ADMIN_USERNAME => $user // 'admin',
			RNACOS_INIT_ADMIN_PASSWORD => $pass // 'admin',
			RNACOS_API_LOGIN_TIMEOUT => $o{token_ttl} // 3600,
			RNACOS_API_LOGIN_ONE_MINUTE_LIMIT => 100000,
			RNACOS_NAMING_PERPETUAL_INSTANCE_PROBE_INTERVAL_SECOND => 0,
			RNACOS_ENABLE_METRICS => 'false',
			RNACOS_NAMING_HEALTH_TIMEOUT_SECOND => $o{health_timeout} // 15,
			RNACOS_NAMING_INSTANCE_TIMEOUT_SECOND => 600,
			# rnacos would otherwise put back an instance's old metadata when it is
			# registered again, over the metadata the test registers
			RNACOS_NAMING_INSTANCE_METADATA_PERSISTENCE_ENABLE => 'false',
			RUST_LOG => 'warn',
		);
		$t->spawn($name, $bin);
	}
	wait_for(sub { $self->_up }, timeout => 30, desc => "$name up")
		or die "$name did not start:\n" . ($t->read_file("$name.log") // '');
	return $self;
}

sub _up {
	my ($self) = @_;
	# with auth on, up means the user can log in (rnacos adds it after starting)
	if (defined $self->{user}) {
		my $r = $self->{http}->post_form($self->url($self->{login_path}),
			{ username => $self->{user}, password => $self->{pass} });
		return $r->{status} == 200;
	}
	my $r = $self->{http}->get($self->url('/nacos/v1/ns/instance/list?serviceName=_probe&healthyOnly=false'));
	return $r->{status} == 200 || $r->{status} == 403;
}

sub port { $_[0]{port} }
sub is_emulator { $_[0]{emulator} }
sub url { "http://127.0.0.1:$_[0]{port}$_[1]" }

# A fresh token for the helper's own writes (auth on), else none.
sub _token {
	my ($self) = @_;
	return undef unless defined $self->{user};
	my $r = $self->{http}->post_form($self->url($self->{login_path}),
		{ username => $self->{user}, password => $self->{pass} });
	die "nacos login: $r->{status} $r->{content}\n" unless $r->{success};
	my $a = decode_json($r->{content});
	# the 3.x login answers inside {code, message, data}
	$a = $a->{data} if ref $a->{data} eq 'HASH';
	return $a->{accessToken};
}

sub _call {
	my ($self, $method, $path, $params) = @_;
	for my $try (1, 2) {
		my %p = %$params;
		$self->{token} = $self->_token if $try == 2 || !exists $self->{token};
		$p{accessToken} = $self->{token} if defined $self->{token};
		my $q = $self->{http}->www_form_urlencode(\%p);
		my $r = $self->{http}->request($method, $self->url("$path?$q"));
		return $r->{content} if $r->{success};
		next if $r->{status} == 403 && $try == 1 && defined $self->{user};
		die "nacos $method $path: $r->{status} $r->{content}\n";
	}
}

# register($service, $ip, $port, %attrs): registers or replaces an instance with
# exactly these attributes (weight 1.0, healthy, enabled, no metadata by default).
sub register {
	my ($self, $svc, $ip, $port, %a) = @_;
	my %p = (serviceName => $svc, groupName => $a{group} // 'DEFAULT_GROUP',
		namespaceId => $a{namespace} // 'public', ip => $ip, port => $port,
		weight => $a{weight} // 1, ephemeral => $a{ephemeral} ? 'true' : 'false',
		healthy => ($a{healthy} // 1) ? 'true' : 'false',
		enabled => ($a{enabled} // 1) ? 'true' : 'false',
		clusterName => $a{cluster} // 'DEFAULT',
		metadata => encode_json($a{metadata} // {}));
	$self->{known}{$svc}{"$ip:$port"} = \%p;
	$self->_call(exists $a{update} ? 'PUT' : 'POST', '/nacos/v1/ns/instance', \%p);
}

# update($service, $ip, $port, %attrs): the instance's attributes changed in place.
sub update {
	my ($self, $svc, $ip, $port, %a) = @_;
	$self->register($svc, $ip, $port, %a, update => 1);
}

sub deregister {
	my ($self, $svc, $ip, $port, %a) = @_;
	my $known = delete $self->{known}{$svc}{"$ip:$port"} // {};
	$self->_call('DELETE', '/nacos/v1/ns/instance', { serviceName => $svc,
		groupName => $known->{groupName} // 'DEFAULT_GROUP',
		namespaceId => $known->{namespaceId} // 'public',
		clusterName => $known->{clusterName} // 'DEFAULT',
		ip => $ip, port => $port, ephemeral => $known->{ephemeral} // 'false' });
}

sub deregister_all {
	my ($self, $svc) = @_;
	for my $k (sort keys %{ $self->{known}{$svc} // {} }) {
		my ($ip, $port) = $k =~ /^(.*):(\d+)$/;
		$self->deregister($svc, $ip, $port);
	}
}

# The v1 instance list as the server answers it (all instances).
sub instances {
	my ($self, $svc) = @_;
	my $c = $self->_call('GET', '/nacos/v1/ns/instance/list',
		{ serviceName => $svc, healthyOnly => 'false' });
	return decode_json($c)->{hosts} // [];
}

# Emulator control API (see nacos_emulator.py).
sub control {
	my ($self, $what, $json) = @_;
	die "control API needs the emulator\n" unless $self->{emulator};
	my $r = $self->{http}->request('POST', $self->url("/_emu/$what"),
		{ content => encode_json($json // {}),
		  headers => { 'Content-Type' => 'application/json' } });
	die "emulator $what: $r->{status} $r->{content}\n" unless $r->{success};
	return $r->{content} ? decode_json($r->{content}) : {};
}

sub stats {
	my ($self) = @_;
	my $r = $self->{http}->get($self->url('/_emu/stats'));
	die "emulator stats: $r->{status}\n" unless $r->{success};
	return decode_json($r->{content});
}

1;
