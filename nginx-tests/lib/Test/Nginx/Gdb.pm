package Test::Nginx::Gdb;

# Freezes a running process (an nginx worker) at a chosen function with gdb,
# to make a race reproducible: the test lets other processes act while this
# one is held in the middle of its work, then lets it go on.
#
#   my $g = Test::Nginx::Gdb->freeze_at($t, $pid, 'crate::module::function',
#       ignore => 30) or skip ...;   # undef: no gdb, cannot attach, no symbol
#   ... make the process reach the function ...
#   if ($g->wait_hit(5)) { ... the process is stopped there ... }
#   $g->release;                     # detach; the process continues
#
# ignore => N: stop at the (N+1)-th call.  The gdb helper is registered with
# the harness, so it is stopped (and detaches) at cleanup at the latest.

use strict;
use warnings;

use Test::Nginx qw/wait_for/;

sub available { defined Test::Nginx::which('gdb') }

sub freeze_at {
	my ($class, $t, $pid, $symbol, %o) = @_;
	return undef unless available();
	my $dir = $t->testdir;
	my $n = ++$Test::Nginx::Gdb::SEQ;
	my %f = map { $_ => "$dir/gdb-$n.$_" } qw/ready hit go/;
	unlink values %f;

	my @ex = ('set pagination off', "break $symbol", 'ignore 1 ' . ($o{ignore} // 0),
		"shell touch $f{ready}", 'continue', "shell touch $f{hit}",
		"shell while [ ! -e $f{go} ]; do sleep 0.02; done", 'delete', 'detach');
	my $gpid = $t->spawn("gdb-$n", 'gdb', '-nx', '-batch', '-p', $pid, map { ('-ex', $_) } @ex);

	my $self = bless { t => $t, pid => $gpid, name => "gdb-$n", log => "gdb-$n.log", %f }, $class;
	unless (wait_for(sub { -e $f{ready} || Test::Nginx::_gone($gpid) }, timeout => 20)
		&& -e $f{ready} && $self->output =~ /^Breakpoint 1 at /m)
	{
		$self->release;
		return undef;
	}
	return $self;
}

sub output { $_[0]{t}->read_file($_[0]{log}) // '' }

# true once the process stopped at the breakpoint
sub wait_hit {
	my ($self, $timeout) = @_;
	return wait_for(sub { -e $self->{hit} && $self->output =~ /^Breakpoint 1, /m },
		timeout => $timeout // 5, interval => 0.02);
}

sub hit { -e $_[0]{hit} && $_[0]->output =~ /^Breakpoint 1, /m }

# detach (interrupting a "continue" still waiting for the breakpoint)
sub release {
	my ($self) = @_;
	return 1 if $self->{released}++;
	my $gpid = $self->{pid};
	if (open my $fh, ">", $self->{go}) { close $fh }
	kill 'INT', $gpid unless -e $self->{hit};
	my $done = wait_for(sub { Test::Nginx::_gone($gpid) }, timeout => 10);
	$self->{t}->kill_spawned($self->{name}) unless $done;
	return $done ? 1 : 0;
}

sub DESTROY {
	my ($self) = @_;
	local ($?, $!, $@);
	$self->release unless $self->{released};
}

1;
