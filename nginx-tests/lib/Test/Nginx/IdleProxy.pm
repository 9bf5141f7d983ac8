package Test::Nginx::IdleProxy;

# A TCP proxy on 127.0.0.1 that closes connections that stay quiet too long, as
# cloud load balancers, corporate proxies and NAT boxes do:
#
#   my $p = Test::Nginx::IdleProxy->start($t, port => $listen, to => $target,
#       idle => 2);
#   $p->cuts    # connections closed for idleness so far
#
# Each accepted connection is relayed to 127.0.0.1:$to; when neither side has
# sent a byte for `idle` seconds, both are closed (no reset, no answer). One
# process with a select loop; it ends with the test (a registered helper).

use strict;
use warnings;

use IO::Select;
use IO::Socket::INET;
use POSIX ();
use Time::HiRes qw/time/;

sub start {
	my ($class, $t, %o) = @_;
	my $port = $o{port} // die "IdleProxy: port required\n";
	my $to = $o{to} // die "IdleProxy: to required\n";
	my $idle = $o{idle} // 2;
	my $state = $t->testdir . "/idle-proxy-$port.cuts";
	open my $fh, '>', $state or die "$state: $!\n";
	print $fh "0\n";
	close $fh;
	my $listen = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => $port,
		Listen => 128, ReuseAddr => 1) or die "IdleProxy: cannot bind 127.0.0.1:$port: $!\n";
	my $pid = fork();
	die "fork: $!\n" unless defined $pid;
	if (!$pid) {
		eval { _serve($listen, $to, $idle, $state) };
		POSIX::_exit(0);
	}
	close $listen;
	$t->register_helper("idle proxy $port", $pid);
	return bless { state => $state, pid => $pid }, $class;
}

sub cuts {
	my ($self) = @_;
	open my $fh, '<', $self->{state} or return 0;
	my $n = <$fh> // 0;
	chomp $n;
	return $n + 0;
}

sub _serve {
	my ($listen, $to, $idle, $state) = @_;
	my $sel = IO::Select->new($listen);
	my %peer;	# fileno => [ socket, peer socket, pair ]
	my $cuts = 0;
	while (1) {
		for my $s ($sel->can_read(0.05)) {
			if ($s == $listen) {
				my $c = $listen->accept or next;
				my $u = IO::Socket::INET->new(PeerAddr => "127.0.0.1:$to", Timeout => 2);
				if (!$u) { close $c; next; }
				my $pair = { last => time, socks => [ $c, $u ] };
				$peer{fileno $c} = [ $c, $u, $pair ];
				$peer{fileno $u} = [ $u, $c, $pair ];
				$sel->add($c, $u);
				next;
			}
			my $e = $peer{fileno $s} or next;
			my $n = sysread($s, my $buf, 65536);
			if (!$n) {
				_close_pair(\%peer, $sel, $e->[2]);
				next;
			}
			$e->[2]{last} = time;
			my $off = 0;
			while ($off < length $buf) {
				my $w = syswrite($e->[1], $buf, length($buf) - $off, $off);
				last unless defined $w;
				$off += $w;
			}
		}
		my %pairs = map { ($_->[2] + 0) => $_->[2] } values %peer;
		for my $pair (values %pairs) {
			next if time - $pair->{last} < $idle;
			_close_pair(\%peer, $sel, $pair);
			$cuts++;
			if (open my $fh, '>', "$state.tmp") {
				print $fh "$cuts\n";
				close $fh;
				rename "$state.tmp", $state;
			}
		}
	}
}

sub _close_pair {
	my ($peer, $sel, $pair) = @_;
	for my $s (@{$pair->{socks}}) {
		next unless defined fileno $s;
		delete $peer->{fileno $s};
		$sel->remove($s);
		close $s;
	}
}

1;
