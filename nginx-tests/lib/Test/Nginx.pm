package Test::Nginx;

# Minimal nginx test harness in the style of nginx-tests (written from
# scratch for ngx-stream-upsync).  Perl core modules only.
#
#   use Test::Nginx qw/ :DEFAULT port wait_for http_get stream_get /;
#   my $t = Test::Nginx->new()->has(qw/stream/)->plan(5)
#       ->write_file_expand('nginx.conf', $conf);
#   $t->run();
#
# Environment:
#   TEST_NGINX_BINARY   nginx binary (required, else skip_all)
#   TEST_NGINX_MODULE   ngx_stream_upsync_module.so (load_module'd by
#                       %%TEST_GLOBALS%%; enables has('upsync'))
#   TEST_NGINX_GLOBALS  extra main-context lines, emitted before load_module
#   TEST_NGINX_GLOBALS_STREAM / TEST_NGINX_GLOBALS_HTTP  extra block lines
#   TEST_NGINX_WORKERS  default worker_processes (1)
#   TEST_NGINX_LEAVE    keep the test directory
#   TEST_NGINX_VERBOSE  more diagnostics
#   TEST_NGINX_CATLOG   print error.log at the end
#   TEST_NGINX_START_TIMEOUT  seconds to wait for nginx to start (default 5)
#   TEST_ETCD_BINARY    etcd binary for has('etcd')
#
# nginx is always started in the foreground ("-g 'daemon off;'" unless the
# config has its own daemon directive) as a child of the test process; the
# master PID is read from the pid file.

use strict;
use warnings;

use parent qw/Exporter/;

use Test::More ();
use Errno ();
use File::Path qw/mkpath rmtree/;
use File::Spec ();
use File::Temp ();
use IO::Socket::INET;
use IO::Select;
use POSIX qw/WNOHANG/;
use Scalar::Util qw/weaken blessed/;
use Time::HiRes qw/time sleep/;

use Test::Nginx::Stream ();

our $VERSION = '0.01';

our @EXPORT = qw/port wait_for http_get http_parse stream_get stream_udp/;
our @EXPORT_OK = (@EXPORT, qw/http_request which show_section upsync_upstreams/);
our %EXPORT_TAGS = (all => \@EXPORT_OK);

# The caller also gets Test::More's functions (as if it said "use Test::More").
sub import {
	my ($class, @args) = @_;
	my $caller = caller;
	eval "package $caller; Test::More->import(); 1" or die $@;
	$class->export_to_level(1, $class, @args);
}

*stream_get = \&Test::Nginx::Stream::stream_get;
*stream_udp = \&Test::Nginx::Stream::stream_udp;

###############################################################################
# globals

my $PORT_DIR = '/tmp/nginx-test-ports';
my %PORTS;		# logical number => real port
my %PORT_OWNED;		# real port => owner pid
my @INSTANCES;		# weak refs to live harness objects
my %V_CACHE;		# binary => nginx -V output

sub _verbose { $ENV{TEST_NGINX_VERBOSE} }
sub _diag { Test::More::diag(@_) }

###############################################################################
# construction, features, plan

sub new {
	my ($class, %o) = @_;

	my $bin = $ENV{TEST_NGINX_BINARY};
	Test::More::plan(skip_all => 'TEST_NGINX_BINARY is not set')
		unless defined $bin && length $bin;
	Test::More::plan(skip_all => "TEST_NGINX_BINARY=$bin is not executable")
		unless -f $bin && -x _;
	$bin = File::Spec->rel2abs($bin);

	my $base = (defined $ENV{TMPDIR} && -d $ENV{TMPDIR})
		? $ENV{TMPDIR} : '/tmp';
	my $dir = File::Temp::tempdir('nginx-test-XXXXXXXX', DIR => $base,
		CLEANUP => 0);
	chmod 0755, $dir;
	mkpath("$dir/logs");

	my $self = bless {
		_owner => $$,
		_binary => $bin,
		_testdir => $dir,
		_helpers => [],
		_spawned => {},
		conf => $o{conf} // 'nginx.conf',
		workers => $o{workers} // $ENV{TEST_NGINX_WORKERS} // 1,
		log_level => $o{log_level} // 'info',
		graceful => $o{graceful} // 0,
		start_timeout => $o{start_timeout} // $ENV{TEST_NGINX_START_TIMEOUT} // 5,
		stop_timeout => $o{stop_timeout} // 10,
	}, $class;

	push @INSTANCES, $self;
	weaken($INSTANCES[-1]);

	# make sure END blocks run (and clean up) on ^C / TERM
	for my $sig (qw/INT TERM HUP/) {
		next if defined $SIG{$sig} && $SIG{$sig} ne 'DEFAULT';
		$SIG{$sig} = sub { exit 1 };
	}

	_diag("testdir: $dir") if _verbose();
	return $self;
}

sub testdir { $_[0]{_testdir} }
sub binary { $_[0]{_binary} }
sub conf_path { "$_[0]{_testdir}/$_[0]{conf}" }

sub workers {
	my ($self, $n) = @_;
	return $self->{workers} unless defined $n;
	$self->{workers} = $n;
	return $self;
}

sub plan {
	my ($self, $n) = @_;
	Test::More::plan(tests => $n);
	return $self;
}

sub skip_all {
	my ($self, $why) = @_;
	Test::More::plan(skip_all => $why);
	return $self;	# not reached
}

sub which {
	my ($name) = @_;
	$name = $_[1] if blessed($name);
	return undef unless defined $name && length $name;
	if ($name =~ m{/}) {
		return (-f $name && -x _) ? $name : undef;
	}
	for my $d (split /:/, $ENV{PATH} // '') {
		next unless length $d;
		my $p = "$d/$name";
		return $p if -f $p && -x _;
	}
	return undef;
}

sub nginx_V {
	my ($self) = @_;
	my $bin = $self->{_binary};
	return $V_CACHE{$bin} //= _capture($bin, '-V');
}

sub etcd_binary {
	my $e = $ENV{TEST_ETCD_BINARY};
	return $e if defined $e && -f $e && -x _;
	return which('etcd');
}

sub _has_stream {
	my ($self) = @_;
	return 1 if $self->nginx_V =~ /--with-stream(?:\s|$)/m;
	return 1 if ($ENV{TEST_NGINX_GLOBALS} // '') =~ /ngx_stream_module/;
	return 0;
}

my %FEATURES = (
	stream => [ sub { $_[0]->_has_stream },
		'no stream module (--with-stream or TEST_NGINX_GLOBALS)' ],
	stream_ssl => [ sub { $_[0]->_has_stream
			&& $_[0]->nginx_V =~ /--with-stream_ssl_module/ },
		'no stream_ssl module' ],
	http => [ sub { $_[0]->nginx_V !~ /--without-http(?:\s|$)/m },
		'no http module' ],
	upsync => [ sub { my $m = $ENV{TEST_NGINX_MODULE};
			defined $m && length $m && -f $m },
		'TEST_NGINX_MODULE is not set or does not exist' ],
	etcd => [ sub { etcd_binary() }, 'no etcd binary' ],
	etcd_v2 => [ sub { etcd_binary() }, 'no etcd binary' ],
	consul_real => [ sub { which('consul') }, 'no consul binary' ],
	valgrind => [ sub { which('valgrind') }, 'no valgrind' ],
);

sub has_feature {
	my ($self, $f) = @_;
	my $def = $FEATURES{$f}
		or die "Test::Nginx::has: unknown feature '$f' (known: "
			. join(', ', sort keys %FEATURES) . ")\n";
	return $def->[0]->($self) ? 1 : 0;
}

sub has {
	my ($self, @features) = @_;
	for my $f (@features) {
		next if $self->has_feature($f);
		$self->skip_all("$f: $FEATURES{$f}[1]");
	}
	return $self;
}

sub has_daemon {
	my ($self, $name) = @_;
	$self->skip_all("$name not found in PATH") unless which($name);
	return $self;
}

###############################################################################
# files and config expansion

sub _path {
	my ($self, $name) = @_;
	return $name if $name =~ m{^/};
	return "$self->{_testdir}/$name";
}

sub write_file {
	my ($self, $name, $content) = @_;
	my $path = $self->_path($name);
	(my $dir = $path) =~ s{/[^/]*$}{};
	mkpath($dir) unless -d $dir;
	open my $fh, '>', $path or die "cannot write $path: $!\n";
	binmode $fh;
	print $fh $content;
	close $fh or die "cannot write $path: $!\n";
	return $self;
}

sub write_file_expand {
	my ($self, $name, $content) = @_;
	return $self->write_file($name, $self->expand($content));
}

sub expand {
	my ($self, $c) = @_;
	my $orig = $c;
	$c =~ s/%%TEST_GLOBALS%%/$self->test_globals($orig)/ge;
	$c =~ s/%%TEST_GLOBALS_STREAM%%/$self->test_globals_stream/ge;
	$c =~ s/%%TEST_GLOBALS_HTTP%%/$self->test_globals_http/ge;
	$c =~ s/%%TESTDIR%%/$self->{_testdir}/g;
	$c =~ s/%%PORT_(\d+)(?:_UDP)?%%/port($1)/ge;
	return $c;
}

# Main-context lines.  Directives the config already has at the start of a
# line (worker_processes, pid, user; error_log in column 0) are not emitted.
sub test_globals {
	my ($self, $conf) = @_;
	$conf //= '';
	my $d = $self->{_testdir};
	my $s = "# test globals\n";

	if (defined $ENV{TEST_NGINX_GLOBALS} && length $ENV{TEST_NGINX_GLOBALS}) {
		$s .= "$ENV{TEST_NGINX_GLOBALS}\n";
	}
	if (defined $ENV{TEST_NGINX_MODULE} && length $ENV{TEST_NGINX_MODULE}) {
		$s .= "load_module $ENV{TEST_NGINX_MODULE};\n";
	}
	$s .= "pid $d/nginx.pid;\n" unless $conf =~ /^\s*pid\s/m;
	$s .= "error_log $d/error.log $self->{log_level};\n"
		unless $conf =~ /^error_log\s/m;
	$s .= "worker_processes $self->{workers};\n"
		unless $conf =~ /^\s*worker_processes\s/m;
	# as root, workers would run as nobody and could not write to testdir
	$s .= "user root;\n" if $> == 0 && $conf !~ /^\s*user\s/m;

	return $s;
}

sub test_globals_stream {
	my $s = "# test globals stream\n";
	$s .= "$ENV{TEST_NGINX_GLOBALS_STREAM}\n"
		if defined $ENV{TEST_NGINX_GLOBALS_STREAM};
	return $s;
}

sub test_globals_http {
	my ($self) = @_;
	my $d = $self->{_testdir};
	my $s = "# test globals http\n";
	$s .= "access_log $d/access.log;\n";
	$s .= "client_body_temp_path $d/client_body_temp;\n";
	$s .= "proxy_temp_path $d/proxy_temp;\n";
	$s .= "fastcgi_temp_path $d/fastcgi_temp;\n";
	$s .= "uwsgi_temp_path $d/uwsgi_temp;\n";
	$s .= "scgi_temp_path $d/scgi_temp;\n";
	$s .= "$ENV{TEST_NGINX_GLOBALS_HTTP}\n"
		if defined $ENV{TEST_NGINX_GLOBALS_HTTP};
	return $s;
}

sub read_file {
	my ($self, $name) = @_;
	my $path = $self->_path($name);
	open my $fh, '<', $path or return undef;
	binmode $fh;
	local $/;
	my $c = <$fh>;
	return $c // '';
}

###############################################################################
# logs

sub error_log { $_[0]->read_file('error.log') // '' }

sub log_offset {
	my ($self, $name) = @_;
	return -s $self->_path($name // 'error.log') // 0;
}

# grep_log(qr//, file => 'error.log', from => $offset)
sub grep_log {
	my ($self, $re, %o) = @_;
	my $text = $self->read_file($o{file} // 'error.log') // '';
	$text = length $text > $o{from} ? substr($text, $o{from}) : ''
		if $o{from};
	my @l = grep { $_ =~ $re } split /\n/, $text;
	return wantarray ? @l : scalar @l;
}

# wait_for_log(qr//, $timeout = 5, %grep_opts): first matching line or undef
sub wait_for_log {
	my ($self, $re, $timeout, %o) = @_;
	return wait_for(sub { ($self->grep_log($re, %o))[0] },
		timeout => $timeout // 5, interval => 0.02,
		desc => "log line matching $re");
}

sub tail_log {
	my ($self, $n, $name) = @_;
	$n //= 30;
	my @l = split /\n/, ($self->read_file($name // 'error.log') // '');
	@l = @l[-$n .. -1] if @l > $n;
	return join("\n", @l) . (@l ? "\n" : '');
}

sub alerts {
	my ($self) = @_;
	return $self->grep_log(qr/\[(?:alert|crit|emerg)\]/);
}

###############################################################################
# waiting

# wait_for(sub { ... }, timeout => 5, interval => 0.01, desc => '...')
sub wait_for {
	shift if blessed($_[0]);
	my ($cond, %o) = @_;
	my $timeout = $o{timeout} // 5;
	my $interval = $o{interval} // 0.01;
	my $deadline = time + $timeout;

	while (1) {
		my $r = $cond->();
		return $r if $r;
		last if time >= $deadline;
		my $left = $deadline - time;
		sleep($left < $interval ? ($left > 0 ? $left : 0) : $interval);
	}

	_diag("wait_for: timed out after ${timeout}s: $o{desc}")
		if defined $o{desc} && _verbose();
	return undef;
}

###############################################################################
# ports

sub _port_range {
	my ($lo, $hi) = (20000, 32767);
	if (open my $fh, '<', '/proc/sys/net/ipv4/ip_local_port_range') {
		my ($elo) = split ' ', (<$fh> // '');
		$hi = $elo - 1 if defined $elo && $elo =~ /^\d+$/ && $elo <= 32768;
	}
	return $hi - $lo >= 1000 ? ($lo, $hi) : ();
}

sub _port_free {
	my ($p) = @_;
	my $tcp = IO::Socket::INET->new(LocalAddr => '127.0.0.1',
		LocalPort => $p, Proto => 'tcp', ReuseAddr => 1, Listen => 1)
		or return 0;
	my $udp = IO::Socket::INET->new(LocalAddr => '127.0.0.1',
		LocalPort => $p, Proto => 'udp')
		or return 0;
	close $tcp;
	close $udp;
	return 1;
}

sub _pid_alive {
	my ($pid) = @_;
	return 0 unless defined $pid && $pid =~ /^\d+$/ && $pid > 0;
	return 1 if kill 0, $pid;
	return $!{EPERM} ? 1 : 0;
}

sub _claim {
	my ($p) = @_;
	my $entry = "$PORT_DIR/$p";
	return 1 if symlink($$, $entry);
	return 0 unless $!{EEXIST};

	# stale claim?  Move it aside atomically, so that only one process
	# collects it; put it back if its owner turns out to be alive.
	my $owner = readlink($entry);
	return 0 if !defined $owner || _pid_alive($owner);
	my $aside = "$entry.gc.$$";
	return 0 unless rename($entry, $aside);
	my $was = readlink($aside);
	if (defined $was && _pid_alive($was)) {
		symlink($was, $entry);
		unlink $aside;
		return 0;
	}
	unlink $aside;
	return symlink($$, $entry) ? 1 : 0;
}

sub _new_port {
	unless (-d $PORT_DIR) {
		mkdir $PORT_DIR;
		chmod 01777, $PORT_DIR;
	}
	my @range = _port_range();

	for (1 .. 2000) {
		my $p;
		if (@range) {
			$p = $range[0] + int(rand($range[1] - $range[0] + 1));
		} else {
			my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1',
				LocalPort => 0, Proto => 'tcp', Listen => 1) or next;
			$p = $s->sockport;
			close $s;
		}
		next if $PORT_OWNED{$p};
		next unless _port_free($p);
		next unless _claim($p);
		unless (_port_free($p)) {	# lost a race with a non-harness user
			unlink "$PORT_DIR/$p";
			next;
		}
		$PORT_OWNED{$p} = $$;
		return $p;
	}
	die "Test::Nginx: cannot find a free port\n";
}

# port($n): a free TCP+UDP port on 127.0.0.1, stable for $n in this process
sub port {
	shift if blessed($_[0]) || (defined $_[0] && $_[0] eq __PACKAGE__);
	my ($n) = @_;
	die "port: number required\n" unless defined $n;
	return $PORTS{$n} //= _new_port();
}

sub _release_ports {
	for my $p (keys %PORT_OWNED) {
		next unless $PORT_OWNED{$p} == $$;
		my $entry = "$PORT_DIR/$p";
		my $o = readlink($entry);
		unlink $entry if defined $o && $o eq $$;
		delete $PORT_OWNED{$p};
	}
}

###############################################################################
# processes

sub _capture {
	my (@cmd) = @_;
	my $pid = open(my $fh, '-|');
	die "fork: $!\n" unless defined $pid;
	if (!$pid) {
		open STDERR, '>&', \*STDOUT;
		open STDIN, '<', '/dev/null';
		no warnings 'exec';
		exec { $cmd[0] } @cmd;
		print "exec $cmd[0]: $!\n";
		POSIX::_exit(127);
	}
	local $/;
	my $out = <$fh> // '';
	close $fh;
	return wantarray ? ($out, $?) : $out;
}

sub _child_setup {
	$SIG{$_} = 'DEFAULT' for qw/INT TERM HUP PIPE CHLD/;
}

sub _stat_fields {
	my ($pid) = @_;
	open my $fh, '<', "/proc/$pid/stat" or return;
	my $s = <$fh> // return;
	my $i = rindex($s, ')');
	return if $i < 0;
	return split ' ', substr($s, $i + 2);	# state, ppid, ...
}

# dead = gone, or a zombie; reaps it if it is our child
sub _gone {
	my ($pid) = @_;
	return 1 unless defined $pid;
	my $r = waitpid($pid, WNOHANG);
	return 1 if $r == $pid;
	return 1 unless _pid_alive($pid);
	my ($state) = _stat_fields($pid);
	return 1 if defined $state && $state eq 'Z' && $r == -1;
	return 0;
}

sub _wait_gone {
	my ($pids, $timeout) = @_;
	return wait_for(sub { !grep { !_gone($_) } @$pids },
		timeout => $timeout, interval => 0.01);
}

sub _children {
	my ($ppid) = @_;
	my @kids;
	opendir my $d, '/proc' or return;
	for my $pid (grep { /^\d+$/ } readdir $d) {
		my (undef, $pp) = _stat_fields($pid);
		push @kids, $pid if defined $pp && $pp == $ppid;
	}
	return sort { $a <=> $b } @kids;
}

sub _cmdline {
	my ($pid) = @_;
	open my $fh, '<', "/proc/$pid/cmdline" or return undef;
	local $/;
	my $c = <$fh> // '';
	$c =~ s/\0+$//;
	$c =~ s/\0/ /g;
	return $c;
}

sub master_pid {
	my ($self) = @_;
	my $pf = $self->{_pidfile} // "$self->{_testdir}/nginx.pid";
	if (open my $fh, '<', $pf) {
		my $pid = <$fh>;
		if (defined $pid && $pid =~ /^(\d+)/) {
			my $p = $1;
			return $p if _pid_alive($p) && !_zombie($p);
		}
	}
	return undef;
}

sub _zombie {
	my ($state) = _stat_fields($_[0]);
	return defined $state && $state eq 'Z';
}

# worker_pids(all => 1): also workers that are shutting down
sub worker_pids {
	my ($self, %o) = @_;
	my $m = $self->master_pid or return ();
	my @w;
	for my $pid (_children($m)) {
		my $cmd = _cmdline($pid);
		next unless defined $cmd;
		if ($cmd =~ /worker process/) {
			next if !$o{all} && $cmd =~ /shutting down/;
			push @w, $pid;
		} elsif ($cmd !~ /^nginx: /) {
			push @w, $pid;	# no process title support: count it
		}
	}
	$self->{_seen_workers}{$_} //= _start_time($_) for @w;
	return @w;
}

sub _start_time { (_stat_fields($_[0]))[19] // -1 }

# Workers seen earlier that still run without their master (it exited while
# they were alive): they are ours to stop.  The start time tells a reused pid.
sub _orphan_workers {
	my ($self) = @_;
	my $m = $self->master_pid;
	my $seen = $self->{_seen_workers} // {};
	return grep {
		my $pid = $_;
		my (undef, $ppid) = _stat_fields($pid);
		!_gone($pid) && defined $ppid && (!$m || $ppid != $m)
			&& _start_time($pid) eq $seen->{$pid}
			&& (_cmdline($pid) // '') =~ /^nginx: worker process/;
	} sort { $a <=> $b } keys %$seen;
}

# connection_owner($listen_port, $client_port): the worker that holds the
# accepted side of the client connection 127.0.0.1:$client_port ->
# 127.0.0.1:$listen_port (read from /proc), or undef.
sub connection_owner {
	my ($self, $lport, $cport) = @_;
	my $want = sprintf '0100007F:%04X 0100007F:%04X', $lport, $cport;
	my $inode;
	if (open my $fh, '<', '/proc/net/tcp') {
		<$fh>;
		while (<$fh>) {
			my @f = split ' ';
			next unless @f > 9 && "$f[1] $f[2]" eq $want;
			$inode = $f[9];
			last;
		}
	}
	return undef unless $inode;
	for my $pid ($self->worker_pids(all => 1)) {
		opendir my $d, "/proc/$pid/fd" or next;
		for my $fd (readdir $d) {
			my $l = readlink("/proc/$pid/fd/$fd") // next;
			return $pid if $l eq "socket:[$inode]";
		}
	}
	return undef;
}

# limit_address_space($bytes): RLIMIT_AS of the master and its workers (the
# master's limit is inherited by the workers it forks later), with
# prlimit(1).  A worker that needs more memory fails its allocation instead
# of taking the machine's memory.  Returns false without prlimit.
sub limit_address_space {
	my ($self, $bytes) = @_;
	my $prlimit = which('prlimit') or return 0;
	my $ok = 1;
	for my $pid (grep { defined } $self->master_pid, $self->worker_pids(all => 1)) {
		my (undef, $st) = _capture($prlimit, "--pid=$pid", "--as=$bytes:$bytes");
		$ok = 0 if $st != 0;
	}
	return $ok;
}

# vm_size($pid): VmSize of a process in bytes (0 if unknown)
sub vm_size {
	shift if blessed($_[0]);
	my ($pid) = @_;
	open my $fh, '<', "/proc/$pid/status" or return 0;
	while (<$fh>) {
		return $1 * 1024 if /^VmSize:\s+(\d+)\s+kB/;
	}
	return 0;
}

# a few facts from the written config (comments stripped)
sub _conf_info {
	my ($self) = @_;
	my $text = $self->read_file($self->{conf}) // '';
	$text =~ s/#[^\n]*//g;

	my %i = (daemon => undef, master => 1, workers => undef, listens => []);

	if ($text =~ /^\s*pid\s+([^;\s]+)\s*;/m) {
		my $p = $1;
		$i{pidfile} = $p =~ m{^/} ? $p : "$self->{_testdir}/$p";
	} else {
		$i{pidfile} = "$self->{_testdir}/nginx.pid";
	}
	$i{daemon} = $1 if $text =~ /^\s*daemon\s+(\w+)\s*;/m;
	$i{master} = 0 if $text =~ /^\s*master_process\s+off\s*;/m;
	$i{workers} = $1 if $text =~ /^\s*worker_processes\s+(\d+)\s*;/m;

	while ($text =~ /(?:^|[;{}\s])listen\s+([^;]+);/g) {
		my ($addr, @params) = split ' ', $1;
		next if $addr =~ /^unix:/;
		next unless $addr =~ /(?:^|:)(\d+)$/;
		my $proto = (grep { $_ eq 'udp' } @params) ? 'udp' : 'tcp';
		push @{$i{listens}}, [$1, $proto];
	}
	return \%i;
}

sub _proc_sockets {
	my ($proto) = @_;
	my %ports;
	my $any = 0;
	for my $f ("/proc/net/$proto", "/proc/net/${proto}6") {
		open my $fh, '<', $f or next;
		$any = 1;
		<$fh>;
		while (<$fh>) {
			my @f = split ' ';
			next unless @f > 3;
			my (undef, $hp) = split /:/, $f[1];
			next if $proto eq 'tcp' && $f[3] ne '0A';	# LISTEN
			$ports{hex $hp} = 1;
		}
	}
	return $any ? \%ports : undef;
}

sub _listening {
	my ($listens) = @_;
	return 1 unless @$listens;
	my %tab = (tcp => _proc_sockets('tcp'), udp => _proc_sockets('udp'));
	for my $l (@$listens) {
		my ($port, $proto) = @$l;
		if ($tab{$proto}) {
			return 0 unless $tab{$proto}{$port};
		} elsif ($proto eq 'tcp') {
			my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
				PeerPort => $port, Proto => 'tcp') or return 0;
			close $s;
		}
	}
	return 1;
}

sub _fail_diag {
	my ($self, $what) = @_;
	_diag("$what; testdir $self->{_testdir}");
	my $err = $self->read_file('nginx.stderr') // '';
	_diag("nginx stderr:\n$err") if length $err;
	_diag("error.log tail:\n" . $self->tail_log(30));
}

sub run {
	my ($self, %o) = @_;
	die "Test::Nginx::run: nginx is already running\n"
		if $self->{_started};

	my $conf = $self->conf_path;
	die "Test::Nginx::run: $conf does not exist\n" unless -f $conf;

	my $info = $self->_conf_info;
	$self->{_pidfile} = $info->{pidfile};
	unlink $info->{pidfile};

	my $d = $self->{_testdir};
	my @cmd = ($self->{_binary}, '-p', "$d/", '-c', $conf,
		'-e', "$d/error.log");
	push @cmd, '-g', 'daemon off;' unless defined $info->{daemon};

	_diag("starting: @cmd") if _verbose();

	my $pid = fork();
	die "fork: $!\n" unless defined $pid;
	if (!$pid) {
		_child_setup();
		open STDIN, '<', '/dev/null';
		open STDOUT, '>>', "$d/nginx.stderr";
		open STDERR, '>&', \*STDOUT;
		no warnings 'exec';
		exec { $cmd[0] } @cmd;
		print STDERR "exec $cmd[0]: $!\n";
		POSIX::_exit(127);
	}
	$self->{_child} = $pid;

	my $want = $info->{master} ? ($info->{workers} // 1) : 0;
	my $start = time;
	my ($exited, $status);

	my $ok = wait_for(sub {
		if (!$exited && waitpid($pid, WNOHANG) == $pid) {
			($exited, $status) = (1, $?);
			delete $self->{_child};
			# a daemonizing nginx exits 0 here; anything else failed
			return 'failed' if $status != 0
				|| ($info->{daemon} // 'off') ne 'on';
		}
		my $m = $self->master_pid or return 0;
		return 0 unless _listening($info->{listens});
		return 0 if $want && $self->worker_pids < $want;
		return 'up';
	}, timeout => $o{timeout} // $self->{start_timeout}, interval => 0.01);

	if (!$ok || $ok ne 'up') {
		my $why = $exited
			? sprintf("nginx exited with status %d", $status >> 8)
			: "nginx did not come up within "
				. ($o{timeout} // $self->{start_timeout}) . "s";
		$self->_fail_diag("nginx failed to start: $why");
		$self->stop_nginx;
		die "Test::Nginx::run: nginx failed to start ($why)\n"
			unless $o{no_die};
		return undef;
	}

	$self->{_started} = 1;
	_diag(sprintf("nginx up in %.3fs, master %d, workers %s",
		time - $start, $self->master_pid, join(',', $self->worker_pids)))
		if _verbose();
	return $self;
}

# try_run($reason): like run(), but skip_all($reason) if nginx does not
# start (only meaningful before the plan is printed)
sub try_run {
	my ($self, $reason, %o) = @_;
	return $self if $self->run(%o, no_die => 1);
	$self->skip_all($reason // 'nginx failed to start');
}

# test_config($name = conf): ($ok, $stderr_text) from "nginx -t"
sub test_config {
	my ($self, $name) = @_;
	my $d = $self->{_testdir};
	my $conf = $self->_path($name // $self->{conf});
	my ($out, $status) = _capture($self->{_binary}, '-t', '-p', "$d/",
		'-c', $conf, '-e', "$d/error.log");
	my $ok = $status == 0 ? 1 : 0;
	return wantarray ? ($ok, $out) : $ok;
}

*nginx_t = \&test_config;

# reload(conf => TEXT, timeout => 5, quiet => 0): HUP the master (after
# writing TEXT, expanded, as the config) and wait for new workers; undef on
# failure (an [emerg], the master gone, or no new workers in time).
sub reload {
	my ($self, %o) = @_;
	$self->write_file_expand($self->{conf}, $o{conf}) if defined $o{conf};
	my $m = $self->master_pid;
	unless ($m) {
		$self->_fail_diag('reload: nginx is not running');
		return undef;
	}

	my %old = map { $_ => 1 } $self->worker_pids(all => 1);
	my $info = $self->_conf_info;
	my $want = $info->{master} ? ($info->{workers} // 1) : 0;
	my $off = $self->log_offset;

	kill 'HUP', $m;

	my $r = wait_for(sub {
		return 'failed' if $self->grep_log(qr/\[emerg\]/, from => $off);
		return 'failed' unless $self->master_pid;
		# new workers up, old ones gone or "shutting down"
		my @cur = $self->worker_pids;
		my @new = grep { !$old{$_} } @cur;
		return 0 if @new < ($want || 1) || @new != @cur;
		return 0 unless _listening($info->{listens});
		return 'ok';
	}, timeout => $o{timeout} // 5, interval => 0.01);

	if (!$r || $r ne 'ok') {
		$self->_fail_diag('reload failed') unless $o{quiet};
		return undef;
	}
	_diag("reloaded, workers " . join(',', $self->worker_pids))
		if _verbose();
	return $self;
}

# reload_rejected(conf => TEXT, timeout => 10, watch => CODE): HUP the
# master (after writing TEXT, expanded, as the config) expecting nginx to
# refuse the new configuration.  Waits for an [emerg], then until the master
# is done with the attempt (a SIGUSR1 sent after the [emerg] is handled only
# then: its "reopening logs" line marks the end), calling CODE (if given)
# again and again meanwhile.  True when the master is alive and runs the
# same workers as before; undef otherwise.
sub reload_rejected {
	my ($self, %o) = @_;
	my $m = $self->master_pid;
	unless ($m) {
		$self->_fail_diag('reload_rejected: nginx is not running');
		return undef;
	}
	my $timeout = $o{timeout} // 10;
	my $before = join ',', $self->worker_pids;
	$self->write_file_expand($self->{conf}, $o{conf}) if defined $o{conf};
	my $off = $self->log_offset;

	my $watch = $o{watch} // sub {};

	kill 'HUP', $m;
	my $emerg = wait_for(sub { $watch->();
		$self->grep_log(qr/\[emerg\]/, from => $off) || !$self->master_pid },
		timeout => $timeout, interval => 0.01);
	my $done = $emerg && $self->master_pid && do {
		kill 'USR1', $m;
		wait_for(sub { $watch->(); $self->grep_log(
			qr/\[notice\] $m#\d+: reopening logs/, from => $off)
			|| !$self->master_pid }, timeout => $timeout, interval => 0.01);
	};
	my $ok = $done && ($self->master_pid // 0) == $m
		&& join(',', $self->worker_pids) eq $before;
	unless ($ok) {
		$self->_fail_diag('reload_rejected: '
			. (!$emerg ? 'no [emerg] after the reload'
			: !$self->master_pid ? 'the master exited'
			: !$done ? 'the master did not finish the reload'
			: 'the workers changed'));
		return undef;
	}
	return $self;
}

sub stop_nginx {
	my ($self) = @_;
	my $m = $self->master_pid;
	my $child = $self->{_child};
	my @pids = grep { defined } ($m, $child);
	my @workers = $m ? $self->worker_pids(all => 1) : ();
	my @orphans = $self->_orphan_workers;

	if (@pids) {
		my $sig = $self->{graceful} ? 'QUIT' : 'TERM';
		kill $sig, $m // $child;
		unless (_wait_gone([@pids], $self->{stop_timeout})) {
			_diag("nginx did not exit on $sig, killing");
			kill 'KILL', @pids, @workers;
			_wait_gone([@pids], 5);
		}
		# workers normally exit before the master; make sure
		unless (_wait_gone([@workers], 2)) {
			kill 'KILL', @workers;
			_wait_gone([@workers], 2);
		}
	}

	if (@orphans) {
		kill 'TERM', @orphans;
		unless (_wait_gone([@orphans], 5)) {
			kill 'KILL', @orphans;
			_wait_gone([@orphans], 2);
		}
	}

	delete $self->{_child};
	delete $self->{_seen_workers};
	$self->{_started} = 0;
	return $self;
}

sub stop {
	my ($self) = @_;
	$self->stop_nginx;
	$self->stop_helpers;
	return $self;
}

sub restart {
	my ($self, %o) = @_;
	$self->stop_nginx;
	return $self->run(%o);
}

###############################################################################
# helper processes

# register_helper($name, $pid, group => 1): stopped (by pid) at cleanup
sub register_helper {
	my ($self, $name, $pid, %o) = @_;
	push @{$self->{_helpers}}, { name => $name, pid => $pid, %o };
	return $self;
}

sub unregister_helper {
	my ($self, $pid) = @_;
	$self->{_helpers} = [ grep { $_->{pid} != $pid } @{$self->{_helpers}} ];
	return $self;
}

sub _stop_pid {
	my ($pid, $group, $sig) = @_;
	return 1 if _gone($pid);
	kill $sig // 'TERM', $pid;
	kill $sig // 'TERM', -$pid if $group;
	return 1 if _wait_gone([$pid], 5);
	kill 'KILL', $pid;
	kill 'KILL', -$pid if $group;
	return _wait_gone([$pid], 2) ? 1 : 0;
}

sub stop_helpers {
	my ($self) = @_;
	for my $h (reverse @{$self->{_helpers}}) {
		_stop_pid($h->{pid}, $h->{group});
	}
	$self->{_helpers} = [];
	$self->{_spawned} = {};
	return $self;
}

# spawn($name, @cmd): background helper, output to testdir/$name.log
sub spawn {
	my ($self, $name, @cmd) = @_;
	die "spawn: command required\n" unless @cmd;
	if (my $old = $self->{_spawned}{$name}) {
		die "spawn: '$name' is already running (pid $old)\n"
			unless _gone($old);
	}

	my $d = $self->{_testdir};
	my $log = "$d/$name.log";
	_diag("spawn $name: @cmd") if _verbose();

	my $pid = fork();
	die "fork: $!\n" unless defined $pid;
	if (!$pid) {
		_child_setup();
		setpgrp(0, 0);
		chdir $d;
		open STDIN, '<', '/dev/null';
		open STDOUT, '>>', $log;
		open STDERR, '>&', \*STDOUT;
		no warnings 'exec';
		exec { $cmd[0] } @cmd;
		print STDERR "exec $cmd[0]: $!\n";
		POSIX::_exit(127);
	}

	$self->{_spawned}{$name} = $pid;
	$self->register_helper($name, $pid, group => 1);
	return $pid;
}

sub spawned_pid { $_[0]{_spawned}{$_[1]} }

# kill_spawned($name, $signal = 'TERM'): for TERM/INT/QUIT/KILL waits for
# the exit (KILL after 5 s) and forgets the helper; other signals are just
# sent.  Returns true on success.
sub kill_spawned {
	my ($self, $name, $sig) = @_;
	$sig //= 'TERM';
	my $pid = $self->{_spawned}{$name} or return 0;

	if ($sig =~ /^(?:TERM|INT|QUIT|KILL|15|2|3|9)$/) {
		my $ok = _stop_pid($pid, 1, $sig);
		delete $self->{_spawned}{$name};
		$self->unregister_helper($pid);
		return $ok;
	}
	return kill $sig, $pid;
}

###############################################################################
# HTTP client

# http_get($port, $path = '/', timeout => 5, host => 'localhost',
#          method => 'GET', headers => {...}, body => '...')
sub http_get {
	shift if blessed($_[0]);
	my ($port, $path, %o) = @_;
	$path //= '/';
	my $method = $o{method} // 'GET';
	my $req = "$method $path HTTP/1.0\r\nHost: " . ($o{host} // 'localhost')
		. "\r\n";
	if (ref $o{headers} eq 'HASH') {
		$req .= "$_: $o{headers}{$_}\r\n" for sort keys %{$o{headers}};
	} elsif (defined $o{headers}) {
		(my $h = $o{headers}) =~ s/\r?\n?$//;
		$req .= "$h\r\n" if length $h;
	}
	if (defined $o{body}) {
		$req .= "Content-Length: " . length($o{body}) . "\r\n";
	}
	$req .= "\r\n";
	$req .= $o{body} if defined $o{body};
	return http_request($port, $req, %o);
}

# http_request($port, $raw_request, timeout => 5): raw response or undef
sub http_request {
	shift if blessed($_[0]);
	my ($port, $req, %o) = @_;
	my $timeout = $o{timeout} // 5;
	my $s = Test::Nginx::Stream->new(port => $port, timeout => $timeout)
		or return undef;
	defined $s->write($req) or return undef;
	my $r = $s->read(eof => 1);
	$s->close;
	return $r // '';
}

# http_parse($raw): ($status, \%headers (lowercase names), $body)
# show_section($port, $name, [$path]): the block of upstream $name in the
# upstream_show text report on $port ('' when it is not there).
sub show_section {
	my ($port, $name, $path) = @_;
	my (undef, undef, $body) = http_parse(http_get($port, $path // '/') // '');
	my ($s) = ($body // '') =~ /(Upstream name: \Q$name\E;.*?\n\n)/s;
	return $s // '';
}

# upsync_upstreams(\%ups, [$extra]): one stream upstream block per name, in
# name order: "upsync $ups{NAME} $extra;", a dump file servers_NAME.conf in
# the test directory, and 127.0.0.1:%%PORT_8089%% as the configured server.
sub upsync_upstreams {
	my ($ups, $extra) = @_;
	$extra = defined $extra ? " $extra" : '';
	return join '', map {
		"    upstream $_ {\n"
		. "        upsync $ups->{$_}$extra;\n"
		. "        upsync_dump_path %%TESTDIR%%/servers_$_.conf;\n"
		. "        server 127.0.0.1:%%PORT_8089%%;\n"
		. "    }\n"
	} sort keys %$ups;
}

sub http_parse {
	my ($raw) = @_;
	return () unless defined $raw && length $raw;
	my ($head, $body) = split /\r?\n\r?\n/, $raw, 2;
	my @lines = split /\r?\n/, $head;
	my $sl = shift @lines // '';
	my ($status) = $sl =~ m{^HTTP/\d(?:\.\d)?\s+(\d{3})};
	my %h;
	for (@lines) {
		next unless /^([^:]+):\s*(.*?)\s*$/;
		my $k = lc $1;
		$h{$k} = exists $h{$k} ? "$h{$k}, $2" : $2;
	}
	return ($status, \%h, $body // '');
}

###############################################################################
# cleanup

sub _cleanup {
	my ($self) = @_;
	return if $self->{_cleaned} || $self->{_owner} != $$;
	$self->{_cleaned} = 1;

	eval { $self->stop; 1 } or _diag("cleanup: $@");

	if ($ENV{TEST_NGINX_CATLOG}) {
		_diag("error.log:\n" . $self->error_log);
	}
	if ($ENV{TEST_NGINX_LEAVE}) {
		_diag("leaving test directory $self->{_testdir}");
	} else {
		rmtree($self->{_testdir});
	}
}

sub DESTROY {
	my ($self) = @_;
	local ($?, $!, $@);
	$self->_cleanup;
}

END {
	local ($?, $!, $@);
	for my $t (grep { defined } @INSTANCES) {
		$t->_cleanup;
	}
	_release_ports();
}

1;
