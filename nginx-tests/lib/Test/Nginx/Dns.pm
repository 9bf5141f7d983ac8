package Test::Nginx::Dns;

# A tiny DNS server on 127.0.0.1 (UDP) for nginx's resolver: A queries for the
# names it knows get a list of addresses that changes with every query.
#
#   my $dns = Test::Nginx::Dns->start($t, port => port(8053),
#       names => { 'backend.test' => [ ['127.0.0.1'], [('127.0.0.1') x 50] ] },
#       ttl => 1);
#   $dns->queries;     # A queries answered so far
#   $dns->stop;
#
# Each known name has a list of answers (each a list of IPv4 addresses); the
# n-th A query for the name gets answer n modulo their number.  Addresses may
# repeat (nginx's resolver keeps duplicates, one upstream peer each), which
# makes large answers possible with 127.0.0.1 alone.  AAAA and other types of
# a known name: no data.  Unknown names: NXDOMAIN.  Answers are plain UDP up to
# 4096 bytes (nginx reads that much; about 250 addresses).

use strict;
use warnings;

use IO::Socket::INET;
use POSIX ();
use Socket qw/inet_aton/;

use Test::Nginx ();

sub start {
	my ($class, $t, %o) = @_;
	my $port = $o{port} // die "Test::Nginx::Dns: port required\n";
	my %names = map { lc($_) => $o{names}{$_} } keys %{ $o{names} // {} };
	my $ttl = $o{ttl} // 1;
	my $state = $t->testdir . "/dns-$port.state";
	_write_state($state, 0);

	my $sock = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $port,
		Proto => 'udp') or die "Test::Nginx::Dns: cannot bind 127.0.0.1:$port/udp: $!\n";

	my $pid = fork();
	die "fork: $!\n" unless defined $pid;
	if (!$pid) {
		$SIG{$_} = 'DEFAULT' for qw/INT TERM HUP CHLD/;
		open STDIN, '<', '/dev/null';
		open STDOUT, '>>', $t->testdir . "/dns-$port.log";
		open STDERR, '>&', \*STDOUT;
		eval { _serve($sock, \%names, $ttl, $state) };
		print STDERR "dns: $@" if $@;
		POSIX::_exit(0);
	}
	close $sock;

	my $self = bless { t => $t, pid => $pid, port => $port, state => $state, owner => $$ }, $class;
	$t->register_helper("dns $port", $pid);
	return $self;
}

sub port { $_[0]{port} }

sub queries {
	my ($self) = @_;
	open my $fh, '<', $self->{state} or return 0;
	my $n = <$fh> // 0;
	chomp $n;
	return $n + 0;
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
	my ($file, $n) = @_;
	open my $fh, '>', "$file.tmp" or return;
	print $fh "$n\n";
	close $fh;
	rename "$file.tmp", $file;
}

# the query's name (lowercase, dotted), type, and the end of its question
sub _question {
	my ($pkt) = @_;
	my ($off, @labels) = (12);
	while (1) {
		return if $off >= length $pkt;
		my $len = ord substr($pkt, $off, 1);
		$off++;
		last if $len == 0;
		return if $len > 63 || $off + $len > length $pkt;
		push @labels, substr($pkt, $off, $len);
		$off += $len;
	}
	return if $off + 4 > length $pkt;
	my ($type) = unpack 'n', substr($pkt, $off, 2);
	return (lc join('.', @labels), $type, $off + 4);
}

sub _serve {
	my ($sock, $names, $ttl, $state) = @_;
	my %seq;
	my $answered = 0;
	while (1) {
		my $peer = $sock->recv(my $pkt, 65535);
		next unless defined $peer && length $pkt >= 12;
		my ($id, $flags, $qd) = unpack 'n n n', $pkt;
		next if $flags & 0x8000 || $qd != 1;	# a response, or not one question
		my ($name, $type, $qend) = _question($pkt) or next;
		my $question = substr($pkt, 12, $qend - 12);

		my @addrs;
		my $rcode = 0;
		if (!exists $names->{$name}) {
			$rcode = 3;	# NXDOMAIN
		} elsif ($type == 1) {
			my $list = $names->{$name};
			@addrs = @{ $list->[ $seq{$name}++ % @$list ] };
			_write_state($state, ++$answered);
		}

		# response, opcode 0, recursion desired/available copied/set
		my $rflags = 0x8000 | ($flags & 0x0100) | 0x0080 | $rcode;
		my $out = pack('n n n n n n', $id, $rflags, 1, scalar @addrs, 0, 0) . $question;
		for my $a (@addrs) {
			# name: pointer to the question's name at offset 12
			$out .= pack('n n n N n', 0xC00C, 1, 1, $ttl, 4) . inet_aton($a);
		}
		$sock->send($out, 0, $peer);
	}
}

1;
