package Test::Nginx::Backend;

# Real TCP / UDP backends on 127.0.0.1 for stream tests.
#
#   my $b1 = Test::Nginx::Backend->tcp($t, port => port(8081), id => 'b1');
#   my $u1 = Test::Nginx::Backend->udp($t, port => port(8082), id => 'u1');
#   $b1->connections_total; $b1->open_connections; $b1->stop;
#   my $c = count_by_backend($t, port(8080), 100);   # { b1 => 75, b2 => 25 }
#
# TCP: each accepted connection gets the greeting ("$id\n" by default), then
# everything received is echoed back until the client closes.
# UDP: each datagram is answered with the reply ("$id\n" by default).
#
# Options of tcp()/udp():
#   port     (required) port on 127.0.0.1
#   id       (default "tcp-PORT" / "udp-PORT")
#   greeting TCP: sent on accept (default "$id\n"; '' for none)
#   echo     TCP: echo received data (default 1)
#   close    TCP: close right after the greeting (default 0)
#   delay    TCP: seconds to wait before the greeting (default 0: at once);
#            other connections are served meanwhile (a slow server)
#   reply    UDP: reply datagram (default "$id\n")
#   silent   UDP: count datagrams but never answer (default 0)
#   echo     UDP: answer each datagram with itself instead of the reply
#
# A backend that stops answering and comes back: ->stop, then a new tcp()/udp()
# on the same port (with other options for a wrong banner or a slow one).
#
# The socket is bound in the parent before fork, so the backend accepts
# connections as soon as tcp()/udp() returns.  The child keeps its counters
# in a small state file in the test directory ("total open\n").

use strict;
use warnings;

use Exporter qw/import/;
use IO::Socket::INET;
use IO::Select;
use POSIX ();
use Time::HiRes ();

use Test::Nginx ();
use Test::Nginx::Stream ();

our @EXPORT = qw/count_by_backend/;
our @EXPORT_OK = @EXPORT;

my $SEQ = 0;

sub tcp { my $class = shift; $class->_start('tcp', @_) }
sub udp { my $class = shift; $class->_start('udp', @_) }

sub _start {
	my ($class, $proto, $t, %o) = @_;

	my $port = $o{port} // die "Test::Nginx::Backend: port required\n";
	my $id = $o{id} // "$proto-$port";
	my $dir = $t->testdir;
	my $state = sprintf("%s/backend-%s-%d-%d.state", $dir, $proto, $port,
		++$SEQ);
	_write_state($state, 0, 0);

	my $sock = IO::Socket::INET->new(
		LocalAddr => '127.0.0.1',
		LocalPort => $port,
		Proto => $proto,
		($proto eq 'tcp' ? (Listen => 128, ReuseAddr => 1) : ()),
	) or die "Test::Nginx::Backend: cannot bind 127.0.0.1:$port/$proto"
		. " for '$id': $!\n";

	my $pid = fork();
	die "fork: $!\n" unless defined $pid;

	if (!$pid) {
		eval {
			_child_init($sock, "$dir/backend-$id.log");
			if ($proto eq 'tcp') {
				_serve_tcp($sock, $state,
					exists $o{greeting} ? $o{greeting} : "$id\n",
					$o{echo} // 1, $o{close} // 0, $o{delay} // 0);
			} else {
				_serve_udp($sock, $state,
					exists $o{reply} ? $o{reply} : "$id\n",
					$o{silent} // 0, $o{echo} // 0);
			}
		};
		print STDERR "backend $id: $@" if $@;
		POSIX::_exit(0);
	}

	close $sock;	# only the child holds the listening socket

	my $self = bless {
		t => $t, pid => $pid, port => $port, id => $id,
		proto => $proto, state => $state, owner => $$,
	}, $class;
	$t->register_helper("backend $id", $pid);
	return $self;
}

sub port { $_[0]{port} }
sub id { $_[0]{id} }
sub pid { $_[0]{pid} }
sub proto { $_[0]{proto} }

sub _read_state {
	my ($self) = @_;
	open my $fh, '<', $self->{state} or return (0, 0);
	my $l = <$fh> // '';
	my ($total, $open) = split ' ', $l;
	return ($total // 0, $open // 0);
}

sub connections_total { ($_[0]->_read_state)[0] }
sub open_connections { ($_[0]->_read_state)[1] }

sub running {
	my ($self) = @_;
	return 0 unless $self->{pid};
	return Test::Nginx::_gone($self->{pid}) ? 0 : 1;
}

sub stop {
	my ($self) = @_;
	my $pid = delete $self->{pid} or return 1;
	return 1 if $self->{owner} != $$;
	Test::Nginx::_stop_pid($pid);
	$self->{t}->unregister_helper($pid) if $self->{t};
	return 1;
}

sub DESTROY {
	my ($self) = @_;
	local ($?, $!, $@);
	$self->stop if $self->{pid} && $self->{owner} == $$;
}

###############################################################################
# child side

sub _write_state {
	my ($file, $total, $open) = @_;
	my $tmp = "$file.tmp";
	open my $fh, '>', $tmp or return;
	print $fh "$total $open\n";
	close $fh;
	rename $tmp, $file;
}

sub _child_init {
	my ($sock, $log) = @_;

	$SIG{$_} = 'DEFAULT' for qw/INT TERM HUP CHLD/;
	$SIG{PIPE} = 'IGNORE';

	# drop every inherited descriptor but stdio and our socket, so that
	# client sockets of the test process are not kept open by us
	my %keep = map { $_ => 1 } (0, 1, 2, fileno($sock));
	if (opendir my $d, '/proc/self/fd') {
		my @fds = grep { /^\d+$/ && !$keep{$_} } readdir $d;
		closedir $d;
		POSIX::close($_) for @fds;
	}

	open STDIN, '<', '/dev/null';
	open STDOUT, '>>', $log;
	open STDERR, '>&', \*STDOUT;
}

sub _serve_tcp {
	my ($listen, $state, $greeting, $echo, $close, $delay) = @_;
	my $sel = IO::Select->new($listen);
	my ($total, $open) = (0, 0);
	my @pending;	# [socket, when] waiting for a delayed greeting

	my $greet = sub {
		my ($c) = @_;
		_send($c, $greeting) if length $greeting;
		if ($close) {
			close $c;
			_write_state($state, $total, --$open);
			return;
		}
		$sel->add($c);
	};

	while (1) {
		my $wait;
		if (@pending) {
			$wait = $pending[0][1] - Time::HiRes::time();
			$wait = 0 if $wait < 0;
		}
		for my $fh ($sel->can_read($wait)) {
			if ($fh == $listen) {
				my $c = $listen->accept or next;
				binmode $c;
				$total++;
				$open++;
				_write_state($state, $total, $open);
				if ($delay) {
					push @pending, [$c, Time::HiRes::time() + $delay];
					next;
				}
				$greet->($c);
				next;
			}

			my $n = sysread($fh, my $buf, 65536);
			if (!$n) {
				$sel->remove($fh);
				close $fh;
				_write_state($state, $total, --$open);
				next;
			}
			_send($fh, $buf) if $echo;
		}
		while (@pending && $pending[0][1] <= Time::HiRes::time()) {
			$greet->((shift @pending)->[0]);
		}
	}
}

sub _send {
	my ($fh, $data) = @_;
	my $off = 0;
	while ($off < length $data) {
		my $n = syswrite($fh, $data, length($data) - $off, $off);
		return unless defined $n;
		$off += $n;
	}
}

sub _serve_udp {
	my ($sock, $state, $reply, $silent, $echo) = @_;
	my $total = 0;
	while (1) {
		my $peer = $sock->recv(my $buf, 65535);
		next unless defined $peer;
		$total++;
		_write_state($state, $total, 0);
		$sock->send($echo ? $buf : $reply, 0, $peer) unless $silent;
	}
}

###############################################################################

# count_by_backend($t, $port, $n, timeout => 2): $n sequential connections
# to nginx on $port; first line of each answer => count.  Connections that
# produced nothing are counted under '_fail'.
sub count_by_backend {
	my ($t, $port, $n, %o) = @_;
	my %c;
	for (1 .. $n) {
		my $r = Test::Nginx::Stream::stream_get($port, '',
			timeout => $o{timeout} // 2);
		my ($id) = defined $r ? split(/\n/, $r) : ();
		$c{(defined $id && length $id) ? $id : '_fail'}++;
	}
	return \%c;
}

1;
