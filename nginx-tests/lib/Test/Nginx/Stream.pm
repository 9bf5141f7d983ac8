package Test::Nginx::Stream;

# Small TCP/UDP client helpers for nginx stream tests.
#
#   my $s = Test::Nginx::Stream->new(port => $p) or die;   # TCP
#   my $u = Test::Nginx::Stream->new(port => $p, udp => 1);
#   $s->readline;            # "b1\n"
#   $s->io("hello\n");       # write, then read what comes back
#   $s->closed(timeout => 3) # true once the peer closed the connection
#
# Functions (also re-exported by Test::Nginx):
#   stream_get($port, $send = '', %opts)  -> data read, undef on connect failure
#   stream_udp($port, $payload, %opts)    -> reply datagram, undef on timeout

use strict;
use warnings;

use Exporter qw/import/;
use IO::Socket::INET;
use IO::Select;
use Time::HiRes qw/time/;

our @EXPORT_OK = qw/stream_get stream_udp/;

sub new {
	my $class = shift;
	my %o = @_ == 1 ? (port => $_[0]) : @_;

	die "Test::Nginx::Stream->new: port required\n" unless defined $o{port};

	my $udp = $o{udp} ? 1 : 0;
	my $timeout = $o{timeout} // 2;

	my $sock = IO::Socket::INET->new(
		PeerAddr => $o{host} // '127.0.0.1',
		PeerPort => $o{port},
		Proto => $udp ? 'udp' : 'tcp',
		Timeout => $timeout,
	) or return undef;

	binmode $sock;
	$sock->autoflush(1);

	return bless {
		sock => $sock, port => $o{port}, udp => $udp,
		timeout => $timeout, buf => '', eof => 0,
	}, $class;
}

sub sock { $_[0]{sock} }
sub port { $_[0]{port} }
sub sockport { $_[0]{sock} ? $_[0]{sock}->sockport : undef }
sub eof { $_[0]{eof} }

# write($data): writes everything; returns bytes written or undef on error.
sub write {
	my ($self, $data) = @_;
	my $sock = $self->{sock} or return undef;

	if ($self->{udp}) {
		my $n = $sock->send($data);
		return defined $n ? $n : undef;
	}

	my $off = 0;
	local $SIG{PIPE} = 'IGNORE';
	while ($off < length $data) {
		my $n = syswrite($sock, $data, length($data) - $off, $off);
		return undef unless defined $n;
		$off += $n;
	}
	return $off;
}

# read(%opts): timeout => secs, until => qr//, length => N, eof => 1.
# Without until/length/eof returns the first data that arrives.
# Returns the data; '' if the peer closed with nothing buffered; undef on
# timeout with nothing read (partial data is returned on timeout).
sub read {
	my ($self, %o) = @_;
	my $sock = $self->{sock} or return undef;
	my $deadline = time + ($o{timeout} // $self->{timeout});

	if ($self->{udp}) {
		return undef unless IO::Select->new($sock)->can_read(
			_left($deadline));
		my $buf;
		return defined $sock->recv($buf, 65535) ? $buf : undef;
	}

	my $done = sub {
		my $b = \$self->{buf};
		return (length $$b >= $o{length} ? $o{length} : undef)
			if defined $o{length};
		return ($$b =~ $o{until} ? $+[0] : undef) if $o{until};
		return undef if $o{eof};
		return length $$b ? length $$b : undef;
	};

	while (1) {
		my $n = $done->();
		return substr($self->{buf}, 0, $n, '') if defined $n;
		last if $self->{eof};

		my $left = $deadline - time;
		last if $left <= 0;
		last unless IO::Select->new($sock)->can_read($left);

		my $r = sysread($sock, my $chunk, 65536);
		if ($r) {
			$self->{buf} .= $chunk;
		} else {
			$self->{eof} = 1;	# EOF or error (e.g. reset)
		}
	}

	return substr($self->{buf}, 0, length $self->{buf}, '')
		if length $self->{buf};
	return $self->{eof} ? '' : undef;
}

sub _left { my $l = $_[0] - time; $l > 0 ? $l : 0 }

sub readline {
	my ($self, %o) = @_;
	return $self->read(%o, until => qr/\n/);
}

# io($data, %read_opts): write then read.
sub io {
	my ($self, $data, %o) = @_;
	if (defined $data && length $data) {
		defined $self->write($data) or return undef;
	}
	return $self->read(%o);
}

# closed(timeout => N): true once EOF is seen (buffered data is discarded).
sub closed {
	my ($self, %o) = @_;
	return 1 if $self->{eof};
	$self->read(eof => 1, timeout => $o{timeout} // $self->{timeout});
	return $self->{eof} ? 1 : 0;
}

sub close {
	my ($self) = @_;
	if (my $s = delete $self->{sock}) {
		CORE::close($s);
	}
	return 1;
}

sub DESTROY { $_[0]->close }

###############################################################################

# stream_get($port, $send = '', timeout => 2, until => qr/\n/, eof => 0)
sub stream_get {
	my $port = shift;
	my $send = @_ % 2 ? shift : (@_ && $_[0] =~ /^(?:timeout|until|eof)$/
		? '' : shift);
	my %o = @_;
	$send //= '';

	my $timeout = $o{timeout} // 2;
	my $s = __PACKAGE__->new(port => $port, timeout => $timeout)
		or return undef;

	if (length $send) {
		defined $s->write($send) or return '';
	}

	my $r = $o{eof}
		? $s->read(eof => 1)
		: $s->read(until => $o{until} // qr/\n/);
	$s->close;
	return $r // '';
}

# stream_udp($port, $payload = "ping\n", timeout => 2)
sub stream_udp {
	my ($port, $payload, %o) = @_;
	$payload //= "ping\n";

	my $s = __PACKAGE__->new(port => $port, udp => 1,
		timeout => $o{timeout} // 2) or return undef;
	defined $s->write($payload) or return undef;
	my $r = $s->read;
	$s->close;
	return $r;
}

1;
