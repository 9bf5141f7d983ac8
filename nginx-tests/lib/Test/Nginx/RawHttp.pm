package Test::Nginx::RawHttp;

# A scripted HTTP server for hostile-registry tests: it answers each request
# with exactly the bytes, and the timing, a test asks for.  Perl core only.
#
#   my $raw = Test::Nginx::RawHttp->start($t, port => port(8601), name => 'raw2',
#       classify => sub { my ($req) = @_; $req->{target} =~ /wait=true/ ? 'watch' : 'read' },
#       good => sub { my ($req) = @_; [ [ send => "HTTP/1.1 200 OK\r\n..." ] ] });
#   my $id = $raw->fault({ on => 'read', count => 1,
#       steps => [ [ send => "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n" ], ['close'] ] });
#   $raw->consumed($id);        # the request sequence number that got it, or undef
#   $raw->request_count; $raw->requests;   # what the client asked, in order
#   $raw->clear_faults;
#   $raw->abort;                # cut off every response still being sent
#
# Every request is classified ('read', 'watch', or anything the test likes) by
# `classify`; the oldest fault whose `on` matches the class (or is 'any') and
# still has a count answers it, otherwise `good` does.  A fault's count is
# used up one request at a time (-1: until cleared).
#
# Steps (all bounded in time; the server process never lives past the test):
#   [ send => BYTES ]               write the bytes
#   [ repeat => BYTES, N ]          write BYTES N times (floods, 10 MB bodies)
#   [ drip => BYTES, MS ]           one byte every MS ms (at most 20 s in all)
#   [ sleep => MS ]                 pause (at most 10 s)
#   [ 'good' ]                      the steps `good` gives for this request
#   [ await => MS ]                 wait until the test changes the faults
#                                   (fault/clear_faults), the client closes, or
#                                   MS ms pass (at most 30 s) -- a parked watch
#   [ 'hang' ]                      wait until the client closes (at most 30 s),
#                                   then close
#   [ 'close' ]                     close the connection (FIN)
#   [ 'rst' ]                       reset the connection (RST)
# abort() cuts drips, floods, sleeps, awaits and hangs short (the connection is
# closed).
# After the steps the connection waits for the next request (keep-alive).
#
# RAWHTTP_DEBUG=1: each step is traced (time, pid, step) to NAME.log in the
# test directory.
#
# One process accepts; each connection is served by its own child, so a hung
# connection never blocks another.  The state (faults, counters) lives in
# files in the test directory, under a lock.

use strict;
use warnings;

use Fcntl qw/:flock O_RDWR O_CREAT/;
use IO::Select;
use IO::Socket::INET;
use POSIX ();
use Socket qw/SOL_SOCKET SO_LINGER IPPROTO_TCP TCP_NODELAY/;
use Storable qw/nstore retrieve/;
use Time::HiRes qw/time sleep/;

use Test::Nginx ();

use constant {
	MAX_DRIP_S => 20,
	MAX_SLEEP_MS => 10_000,
	MAX_AWAIT_MS => 30_000,
	MAX_HEAD => 256 * 1024,
	IDLE_S => 40,
};

sub start {
	my ($class, $t, %o) = @_;
	my $port = $o{port} or die "RawHttp->start: port required\n";
	my $name = $o{name} // "raw-$port";
	my $dir = $t->testdir;
	my $self = bless {
		t => $t, port => $port, name => $name,
		state => "$dir/$name.state", lock => "$dir/$name.lock",
		gen => "$dir/$name.gen", reqlog => "$dir/$name.requests", abort => "$dir/$name.abort",
		classify => $o{classify} // sub { 'read' },
		good => $o{good} // sub { [ [ send => "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n" ] ] },
	}, $class;

	$self->_write_state({ faults => [], seq => 0, next_id => 1, consumed => {} });
	_write_file($self->{gen}, "0\n");
	_write_file($self->{abort}, "0\n");
	_write_file($self->{reqlog}, '');

	my $listen = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $port,
		Listen => 128, ReuseAddr => 1, Proto => 'tcp')
		or die "RawHttp: cannot listen on 127.0.0.1:$port: $!\n";

	my $pid = fork();
	die "fork: $!\n" unless defined $pid;
	if (!$pid) {
		setpgrp(0, 0);
		open STDIN, '<', '/dev/null';
		open STDOUT, '>>', "$dir/$name.log";
		open STDERR, '>&', \*STDOUT;
		$SIG{CHLD} = 'IGNORE';
		$SIG{PIPE} = 'IGNORE';
		$SIG{TERM} = $SIG{INT} = sub { POSIX::_exit(0) };
		# the server lives no longer than its parent (the test)
		my $parent = getppid();
		while (1) {
			POSIX::_exit(0) if getppid() != $parent;
			next unless IO::Select->new($listen)->can_read(1);
			my $c = $listen->accept or next;
			my $kid = fork();
			if (defined $kid && !$kid) {
				close $listen;
				eval { $self->_serve($c); 1 }
					or print STDERR "connection: $@";
				POSIX::_exit(0);
			}
			close $c;
		}
	}
	close $listen;
	$t->register_helper($name, $pid, group => 1);
	$self->{pid} = $pid;
	return $self;
}

sub port { $_[0]{port} }
sub name { $_[0]{name} }

###############################################################################
# test side

# fault({ on => 'read'|'watch'|'any', count => 1, steps => [...],
#         match => 'text' }): its id.  With match, only requests whose target
# contains the text get it.
sub fault {
	my ($self, $f) = @_;
	_check_steps($f->{steps});
	my $id;
	$self->_locked(sub {
		my ($s) = @_;
		$id = $s->{next_id}++;
		push @{$s->{faults}}, { id => $id, on => $f->{on} // 'any',
			count => $f->{count} // 1, steps => $f->{steps}, match => $f->{match} };
	});
	$self->_bump_gen;
	return $id;
}

sub clear_faults {
	my ($self) = @_;
	$self->_locked(sub { $_[0]{faults} = [] });
	$self->_bump_gen;
	return $self;
}

# Ends every response still in progress (drips, floods, sleeps, hangs): their
# connections are closed.
sub abort {
	my ($self) = @_;
	_write_file($self->{abort}, ($self->_abort_gen + 1) . "\n");
	return $self;
}

sub _abort_gen {
	my ($self) = @_;
	open my $fh, '<', $self->{abort} or return 0;
	my $g = <$fh> // 0;
	chomp $g;
	return $g;
}

# The request sequence number that used up fault $id (its last use), or undef.
sub consumed {
	my ($self, $id) = @_;
	return $self->_read_state->{consumed}{$id};
}

# Whether fault $id still has requests to answer.
sub pending {
	my ($self, $id) = @_;
	return scalar grep { $_->{id} == $id } @{$self->_read_state->{faults}};
}

sub request_count { $_[0]->_read_state->{seq} }

# [ { seq, class, fault, method, target, time, body } ] in arrival order
sub requests {
	my ($self) = @_;
	open my $fh, '<', $self->{reqlog} or return [];
	my @r;
	while (my $l = <$fh>) {
		chomp $l;
		my ($seq, $class, $fault, $method, $target, $time, $body) = split /\t/, $l, 7;
		push @r, { seq => $seq, class => $class, fault => $fault, time => $time,
			method => $method, target => $target, body => $body // '' };
	}
	return \@r;
}

sub _check_steps {
	my ($steps) = @_;
	die "RawHttp: steps must be a list\n" unless ref $steps eq 'ARRAY';
	my $drip = 0;
	for my $s (@$steps) {
		my ($op, @a) = @$s;
		if ($op eq 'drip') {
			$drip += length($a[0]) * $a[1] / 1000;
		} elsif ($op eq 'sleep') {
			die "RawHttp: sleep over " . MAX_SLEEP_MS . " ms\n" if $a[0] > MAX_SLEEP_MS;
		} elsif ($op eq 'repeat') {
			die "RawHttp: repeat over 64 MB\n" if length($a[0]) * $a[1] > 64 << 20;
		} elsif ($op !~ /^(?:send|good|await|hang|close|rst)$/) {
			die "RawHttp: unknown step '$op'\n";
		}
	}
	die sprintf("RawHttp: drip of %.1fs is over %ds\n", $drip, MAX_DRIP_S) if $drip > MAX_DRIP_S;
}

###############################################################################
# state files

sub _write_file {
	my ($path, $text) = @_;
	open my $fh, '>', "$path.tmp" or die "$path.tmp: $!\n";
	print $fh $text;
	close $fh;
	rename "$path.tmp", $path or die "rename $path: $!\n";
}

sub _read_state {
	my ($self) = @_;
	my $s;
	$self->_with_lock(LOCK_SH, sub { $s = retrieve($self->{state}) });
	return $s;
}

sub _write_state {
	my ($self, $s) = @_;
	nstore($s, "$self->{state}.tmp");
	rename "$self->{state}.tmp", $self->{state} or die "rename: $!\n";
}

sub _with_lock {
	my ($self, $mode, $code) = @_;
	sysopen my $lk, $self->{lock}, O_RDWR | O_CREAT or die "$self->{lock}: $!\n";
	flock $lk, $mode or die "flock: $!\n";
	my @r = $code->();
	close $lk;
	return @r;
}

sub _locked {
	my ($self, $code) = @_;
	$self->_with_lock(LOCK_EX, sub {
		my $s = retrieve($self->{state});
		my @r = $code->($s);
		$self->_write_state($s);
		@r;
	});
}

sub _bump_gen {
	my ($self) = @_;
	$self->_with_lock(LOCK_EX, sub {
		_write_file($self->{gen}, ($self->_gen + 1) . "\n");
	});
}

sub _gen {
	my ($self) = @_;
	open my $fh, '<', $self->{gen} or return 0;
	my $g = <$fh> // 0;
	chomp $g;
	return $g;
}

###############################################################################
# server side (runs in a connection's child)

sub _serve {
	my ($self, $c) = @_;
	setsockopt($c, IPPROTO_TCP, TCP_NODELAY, 1);
	binmode $c;
	my $buf = '';
	while (1) {
		my $req = _read_request($c, \$buf) or return;
		my $class = $self->{classify}->($req) // 'read';
		my ($fault, $seq);
		$self->_locked(sub {
			my ($s) = @_;
			# changes after this point end an await of this request
			$self->{req_gen} = $self->_gen;
			$self->{req_abort} = $self->_abort_gen;
			$seq = ++$s->{seq};
			for my $f (@{$s->{faults}}) {
				next unless $f->{count} != 0 && ($f->{on} eq 'any' || $f->{on} eq $class);
				next if defined $f->{match} && index($req->{target}, $f->{match}) < 0;
				$f->{count}-- if $f->{count} > 0;
				$s->{consumed}{$f->{id}} = $seq;
				$fault = $f;
				last;
			}
			$s->{faults} = [ grep { $_->{count} != 0 } @{$s->{faults}} ];
			# the log line is written under the lock: the file order is the sequence
			(my $body = substr($req->{body}, 0, 200)) =~ s/[\t\r\n]/ /g;
			open my $fh, '>>', $self->{reqlog} or die "$self->{reqlog}: $!\n";
			print $fh join("\t", $seq, $class, $fault ? $fault->{id} : '-',
				$req->{method}, $req->{target}, sprintf('%.3f', time), $body), "\n";
			close $fh;
		});
		my $steps = $fault ? $fault->{steps} : $self->{good}->($req);
		$self->_run_steps($c, $req, $steps) or return;
	}
}

# Reads one request (head and Content-Length body); undef when the client
# closed or stayed idle too long.
sub _read_request {
	my ($c, $buf) = @_;
	my $deadline = time + IDLE_S;
	my $head_end;
	while (($head_end = index($$buf, "\r\n\r\n")) < 0) {
		return undef if length $$buf > MAX_HEAD || time > $deadline;
		next unless IO::Select->new($c)->can_read(1);
		my $n = sysread($c, $$buf, 65536, length $$buf);
		return undef unless $n;
	}
	my $head = substr($$buf, 0, $head_end);
	my ($method, $target) = $head =~ m{^(\S+) (\S+) HTTP/} or return undef;
	my %h;
	for (split /\r\n/, $head) {
		$h{lc $1} = $2 if /^([^:]+):\s*(.*?)\s*$/;
	}
	my $len = $h{'content-length'} // 0;
	while (length($$buf) < $head_end + 4 + $len) {
		return undef if time > $deadline;
		next unless IO::Select->new($c)->can_read(1);
		my $n = sysread($c, $$buf, 65536, length $$buf);
		return undef unless $n;
	}
	my $body = substr($$buf, $head_end + 4, $len);
	substr($$buf, 0, $head_end + 4 + $len) = '';
	return { method => $method, target => $target, headers => \%h, body => $body };
}

sub _write_all {
	my ($c, $data) = @_;
	my $off = 0;
	while ($off < length $data) {
		my $n = syswrite($c, $data, length($data) - $off, $off);
		return 0 unless defined $n && $n > 0;
		$off += $n;
	}
	return 1;
}

# Waits until the client closes (0), the test changes the faults since the
# request arrived or a fault is waiting for another request ('gen'), or the
# time is up ('time').
sub _wait {
	my ($self, $c, $ms, $on_gen) = @_;
	my $g0 = $self->{req_gen} // $self->_gen;
	return 'gen' if $on_gen && @{$self->_read_state->{faults}};
	my $deadline = time + $ms / 1000;
	while (time < $deadline) {
		if (IO::Select->new($c)->can_read(0.02)) {
			my $n = sysread($c, my $junk, 65536);
			return 0 unless $n;	# closed (or reset)
		}
		return 0 if $self->_aborted;
		return 'gen' if $on_gen && $self->_gen != $g0;
	}
	return 'time';
}

# Whether the test called abort() since this request arrived.
sub _aborted {
	my ($self) = @_;
	return $self->_abort_gen != ($self->{req_abort} // 0);
}

sub _close {
	my ($c) = @_;
	shutdown($c, 1);
	close $c;
	return 0;
}

# Runs the steps; false when the connection is finished.
sub _run_steps {
	my ($self, $c, $req, $steps) = @_;
	for my $s (@$steps) {
		my ($op, @a) = @$s;
		printf STDERR "%.3f %d %s %s\n", time, $$, $op, join(' ', map { length > 40 ? length($_) . ' bytes' : $_ } @a)
			if $ENV{RAWHTTP_DEBUG};
		if ($op eq 'send') {
			_write_all($c, $a[0]) or return 0;
		} elsif ($op eq 'repeat') {
			for my $i (1 .. $a[1]) {
				_write_all($c, $a[0]) or return 0;
				return _close($c) if $i % 64 == 0 && $self->_aborted;
			}
		} elsif ($op eq 'drip') {
			for my $i (0 .. length($a[0]) - 1) {
				_write_all($c, substr($a[0], $i, 1)) or return 0;
				sleep($a[1] / 1000);
				return _close($c) if $self->_aborted;
			}
		} elsif ($op eq 'sleep') {
			my $ms = $a[0] > MAX_SLEEP_MS ? MAX_SLEEP_MS : $a[0];
			$self->_wait($c, $ms, 0) or return 0;
		} elsif ($op eq 'good') {
			$self->_run_steps($c, $req, $self->{good}->($req)) or return 0;
		} elsif ($op eq 'await') {
			my $ms = $a[0] // MAX_AWAIT_MS;
			$self->_wait($c, $ms > MAX_AWAIT_MS ? MAX_AWAIT_MS : $ms, 1) or return 0;
		} elsif ($op eq 'hang') {
			$self->_wait($c, MAX_AWAIT_MS, 0);
			close $c;
			return 0;
		} elsif ($op eq 'close') {
			return _close($c);
		} elsif ($op eq 'rst') {
			setsockopt($c, SOL_SOCKET, SO_LINGER, pack('ii', 1, 0));
			close $c;
			return 0;
		}
	}
	return 1;
}

1;
