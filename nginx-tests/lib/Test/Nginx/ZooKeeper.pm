package Test::Nginx::ZooKeeper;

# Real ZooKeeper for the tests (Debian's `zookeeper` package, 3.8): one member
# or an ensemble of three on 127.0.0.1, started through the harness
# ($t->spawn, so they are stopped at cleanup), each with its data dir in the
# test dir, the AdminServer off and only the `srvr` four-letter word on (the
# readiness probe).  Data is seeded with lib/zk_seed.py (python kazoo).
#
#   my $why = Test::Nginx::ZooKeeper->missing and $t->skip_all($why);
#   my $zk = Test::Nginx::ZooKeeper->start($t, members => 3, port => 8181);
#   $zk->ops(['create', '/svc/127.0.0.1:8080', '{"weight":2}']);
#   $zk->pause(1); ... $zk->resume(1);        # SIGSTOP / SIGCONT member 1
#   $zk->stop_member(2); $zk->start_member(2);
#
# Ports: member N (1-based) uses the harness's logical ports PORT+3(N-1)
# (client), +1 (quorum), +2 (leader election).  tickTime is 200 ms by
# default, so sessions may be as short as 400 ms (minSessionTimeout) and at
# most max_session (60 s).

use strict;
use warnings;

use File::Basename qw/dirname/;
use File::Path qw/mkpath/;
use IO::Socket::INET;
use POSIX qw/WNOHANG/;
use Time::HiRes qw/time/;

use Test::Nginx qw/port wait_for/;

my $JAR = '/usr/share/java/zookeeper.jar';
my $LOG_JAR = '/usr/share/java/slf4j-simple.jar';
my $SEED = dirname(__FILE__) . '/../../zk_seed.py';

# missing(): why the tests cannot run (no java, no zookeeper.jar, no kazoo),
# or undef
sub missing {
	my $java = Test::Nginx::which('java')
		or return 'no java (apt install default-jre-headless)';
	-f $JAR or return "no $JAR (apt install zookeeper)";
	my $py = Test::Nginx::which('python3') or return 'no python3';
	system($py, '-c', 'import kazoo') == 0
		or return 'no python kazoo (pip install kazoo)';
	return undef;
}

# start($t, port => LOGICAL, [members => 1|3], [tick => 200],
#       [max_session => 60000], [name => 'zk'], [no_wait => 1])
sub start {
	my ($class, $t, %o) = @_;
	my $base = $o{port} or die "ZooKeeper->start: port required\n";
	my $n = $o{members} // 1;
	my $name = $o{name} // 'zk';
	my $self = bless {
		t => $t,
		name => $name,
		tick => $o{tick} // 200,
		max_session => $o{max_session} // 60000,
		members => [],
	}, $class;
	for my $i (1 .. $n) {
		my $l = $base + 3 * ($i - 1);
		push @{$self->{members}}, {
			id => $i,
			name => "$name$i",
			client => port($l),
			quorum => port($l + 1),
			election => port($l + 2),
			dir => $t->testdir . "/$name$i-data",
		};
	}
	$self->_write_config($_) for @{$self->{members}};
	$self->{t0} = time;
	$self->_spawn($_) for @{$self->{members}};
	$self->wait_up unless $o{no_wait};
	$self->{startup_time} = time - $self->{t0};
	return $self;
}

sub startup_time { $_[0]{startup_time} }
sub members { scalar @{$_[0]{members}} }
sub member { $_[0]{members}[$_[1] - 1] or die "ZooKeeper: no member $_[1]\n" }
sub client_port { $_[0]->member($_[1])->{client} }
sub pid { $_[0]->member($_[1])->{pid} }
sub read_log { $_[0]{t}->read_file($_[0]->member($_[1])->{name} . '.log') // '' }

# hosts([@ids]): "127.0.0.1:P1,127.0.0.1:P2,..." (all members by default)
sub hosts {
	my ($self, @ids) = @_;
	@ids = map { $_->{id} } @{$self->{members}} unless @ids;
	return join ',', map { '127.0.0.1:' . $self->client_port($_) } @ids;
}

# the members that are running and not paused
sub live_ids {
	my ($self) = @_;
	return map { $_->{id} }
		grep { $_->{pid} && !$_->{paused} } @{$self->{members}};
}

sub _write_config {
	my ($self, $m) = @_;
	mkpath($m->{dir});
	my $cfg = join "\n",
		"tickTime=$self->{tick}",
		'initLimit=25',
		'syncLimit=10',
		"dataDir=$m->{dir}",
		"clientPort=$m->{client}",
		'clientPortAddress=127.0.0.1',
		'admin.enableServer=false',
		'4lw.commands.whitelist=srvr',
		'minSessionTimeout=' . 2 * $self->{tick},
		"maxSessionTimeout=$self->{max_session}",
		'maxClientCnxns=0',
		'';
	if ($self->members > 1) {
		$cfg .= "server.$_->{id}=127.0.0.1:$_->{quorum}:$_->{election}\n"
			for @{$self->{members}};
		$self->{t}->write_file("$m->{name}-data/myid", "$m->{id}\n");
	}
	$self->{t}->write_file("$m->{name}.cfg", $cfg);
}

sub _spawn {
	my ($self, $m) = @_;
	my $cp = $JAR . (-f $LOG_JAR ? ":$LOG_JAR" : '');
	$m->{pid} = $self->{t}->spawn($m->{name},
		Test::Nginx::which('java'),
		'-Xmx128m', '-XX:+UseSerialGC', '-XX:TieredStopAtLevel=1',
		'-Dzookeeper.admin.enableServer=false',
		'-Dorg.slf4j.simpleLogger.defaultLogLevel=info',
		'-Dorg.slf4j.simpleLogger.showDateTime=true',
		'-cp', $cp, 'org.apache.zookeeper.server.quorum.QuorumPeerMain',
		$self->{t}->testdir . "/$m->{name}.cfg");
	delete $m->{paused};
}

# mode($id): 'standalone', 'leader' or 'follower' from `srvr`, or undef when
# the member does not serve (down, paused, no quorum)
sub mode {
	my ($self, $id) = @_;
	my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
		PeerPort => $self->client_port($id), Proto => 'tcp',
		Timeout => 1) or return undef;
	$s->autoflush(1);
	print $s 'srvr';
	my $out = '';
	my $deadline = time + 1;
	while (time < $deadline) {
		my $rin = '';
		vec($rin, fileno($s), 1) = 1;
		last unless select($rin, undef, undef, 0.2);
		my $n = sysread($s, my $buf, 4096);
		last unless $n;
		$out .= $buf;
	}
	close $s;
	return $out =~ /^Mode: (\w+)/m ? $1 : undef;
}

# wait_up([@ids], [timeout => 30]): every given (default: every running)
# member serves; with an ensemble, one of them leads
sub wait_up {
	my ($self, @args) = @_;
	my %o;
	%o = splice(@args, -2) if @args >= 2 && $args[-2] eq 'timeout';
	my @ids = @args ? @args : $self->live_ids;
	my $ok = wait_for(sub {
		for my $id (@ids) {
			my $m = $self->member($id);
			if (waitpid($m->{pid}, WNOHANG) == $m->{pid}) {
				die "ZooKeeper member $id exited:\n"
					. $self->read_log($id);
			}
		}
		my @modes = map { $self->mode($_) } @ids;
		return 0 if grep { !defined } @modes;
		return 1 if $self->members == 1;
		my @all = map { $self->mode($_) // '' } $self->live_ids;
		return scalar grep { $_ eq 'leader' } @all;
	}, timeout => $o{timeout} // 30, interval => 0.05);
	die "ZooKeeper members @ids not serving within "
		. ($o{timeout} // 30) . "s:\n" . join('', map {
			"--- member $_\n" . substr($self->read_log($_), -3000)
		} @ids) unless $ok;
	return $self;
}

# stop_member($id): TERM (a paused member is resumed first)
sub stop_member {
	my ($self, $id) = @_;
	my $m = $self->member($id);
	return $self unless $m->{pid};
	$self->resume($id) if $m->{paused};
	$self->{t}->kill_spawned($m->{name}, 'TERM')
		or die "ZooKeeper member $id (pid $m->{pid}) did not exit\n";
	delete $m->{pid};
	return $self;
}

# start_member($id, [no_wait => 1]): starts a stopped member again (same
# data dir and ports)
sub start_member {
	my ($self, $id, %o) = @_;
	my $m = $self->member($id);
	die "ZooKeeper member $id is running\n" if $m->{pid};
	$self->_spawn($m);
	$self->wait_up($id) unless $o{no_wait};
	return $self;
}

sub restart_member {
	my ($self, $id, %o) = @_;
	$self->stop_member($id);
	return $self->start_member($id, %o);
}

# pause($id) / resume($id): SIGSTOP / SIGCONT to the member's JVM; its
# sockets stay open and the kernel still accepts connections for it
sub pause {
	my ($self, $id) = @_;
	my $m = $self->member($id);
	kill 'STOP', $m->{pid} or die "ZooKeeper pause $id: $!\n";
	$m->{paused} = 1;
	return $self;
}

sub resume {
	my ($self, $id) = @_;
	my $m = $self->member($id);
	kill 'CONT', $m->{pid} or die "ZooKeeper resume $id: $!\n";
	delete $m->{paused};
	return $self;
}

sub stop {
	my ($self) = @_;
	$self->stop_member($_->{id}) for @{$self->{members}};
	return $self;
}

# ops([[OP, ARGS...], ...], [auth => 'u:p'], [hosts => '...'],
#     [timeout => 20]): runs zk_seed.py operations (see there) over one
# session.  Returns the output lines: "T_MS OP PATH" per operation and
# "= JSON" results.  Dies with the helper's message on an error.
sub ops {
	my ($self, $list, %o) = @_;
	my @cmd = (Test::Nginx::which('python3'), $SEED);
	push @cmd, '--auth', $o{auth} if $o{auth};
	push @cmd, '--timeout', $o{timeout} // 20;
	push @cmd, $o{hosts} // $self->hosts($self->live_ids),
		_json_ops(@$list);
	my $pid = open(my $fh, '-|');
	die "fork: $!\n" unless defined $pid;
	if (!$pid) {
		open STDERR, '>&', \*STDOUT;
		open STDIN, '<', '/dev/null';
		no warnings 'exec';
		exec { $cmd[0] } @cmd;
		POSIX::_exit(127);
	}
	my @lines = <$fh>;
	close $fh;
	chomp @lines;
	die "zk_seed.py failed ($?): @lines\n" if $?;
	return @lines;
}

# the stamp (ms) of the first line for operation $op
sub op_time {
	my ($class, $op, @lines) = @_;
	for (@lines) {
		return $1 if /^(\d+) \Q$op\E\b/;
	}
	return undef;
}

sub _json_str {
	my ($s) = @_;
	$s =~ s/(["\\])/\\$1/g;
	$s =~ s/([\x00-\x1f])/sprintf('\\u%04x', ord $1)/ge;
	return qq{"$s"};
}

sub _json_ops {
	return '[' . join(',', map {
		'[' . join(',', map { /^-?\d+(?:\.\d+)?$/ ? $_ : _json_str($_) } @$_) . ']'
	} @_) . ']';
}

1;
