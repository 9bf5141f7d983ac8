//! One server's health: its state (up, unhealthy, checking), the consecutive passes and
//! fails that move it between them (NGINX Plus's `fails=` / `passes=` rules), and its
//! counters. Plain data (`repr(C)`): the glue keeps it in the shared zone.

/// Where a server stands. `Checking` is `mandatory`'s state for a server whose first
/// check has not completed; neither it nor `Unhealthy` takes connections.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum HealthState {
    #[default]
    Up = 0,
    Unhealthy = 1,
    Checking = 2,
}

impl HealthState {
    pub fn name(self) -> &'static str {
        match self {
            HealthState::Up => "up",
            HealthState::Unhealthy => "unhealthy",
            HealthState::Checking => "checking",
        }
    }

    /// Whether the balancer may give the server connections.
    pub fn in_traffic(self) -> bool {
        self == HealthState::Up
    }

    /// The state a server starts in: `Checking` with `mandatory`, else `Up`.
    pub fn initial(mandatory: bool) -> HealthState {
        if mandatory {
            HealthState::Checking
        } else {
            HealthState::Up
        }
    }
}

/// `fails=` and `passes=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub fails: u32,
    pub passes: u32,
}

/// Why a probe failed. The texts end the log line "... is unhealthy: TEXT" and fill
/// `last_failure` in the status views.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeFailure {
    #[error("connect refused")]
    Refused,
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("connect failed: {0}")]
    Connect(String),
    #[error("port unreachable (ICMP)")]
    Unreachable,
    #[error("send failed: {0}")]
    Send(String),
    #[error("receive failed: {0}")]
    Recv(String),
    #[error("closed before a matching response")]
    Closed,
    #[error("the response does not match \"{0}\"")]
    Mismatch(String),
    #[error("no matching response within {0}ms")]
    Timeout(u64),
    /// An answer came, but did not match before the timeout.
    #[error("the response does not match \"{0}\" (within {1}ms)")]
    MismatchTimeout(String, u64),
    #[error("no match in the first {0} bytes")]
    TooLong(usize),
}

/// What one check result changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Unchanged,
    /// The server left traffic (from up: `fails` consecutive failures; from checking:
    /// its first check failed).
    Unhealthy,
    /// The server takes traffic again (from unhealthy: `passes` consecutive passes;
    /// from checking: its first check passed), after `after` checks in the old state.
    Healthy {
        after: u32,
        was: HealthState,
    },
}

/// One server's health record. Laid out without implicit padding (`reserved` is
/// explicit and zero), so a record copied whole into shared memory has no undefined
/// bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Health {
    pub checks: u64,
    pub failed: u64,
    /// When the last check completed (ms since the epoch; 0: never).
    pub last_check_ms: u64,
    /// Consecutive passed / failed checks (one of them is 0).
    pub passes: u32,
    pub fails: u32,
    /// Checks since the state last changed.
    pub since_change: u32,
    pub state: HealthState,
    pub reserved: [u8; 3],
}

impl Health {
    pub fn new(state: HealthState) -> Health {
        Health {
            state,
            ..Health::default()
        }
    }

    /// Starts over in `state` (a reload without `persistent`), keeping the totals.
    pub fn restart(&mut self, state: HealthState) {
        self.state = state;
        self.passes = 0;
        self.fails = 0;
        self.since_change = 0;
    }

    /// Records one completed check at `now_ms` (wall clock).
    pub fn record(&mut self, passed: bool, th: Thresholds, now_ms: u64) -> Change {
        self.checks += 1;
        self.since_change = self.since_change.saturating_add(1);
        self.last_check_ms = now_ms;
        let was = self.state;
        let next = if passed {
            self.passes = self.passes.saturating_add(1);
            self.fails = 0;
            match was {
                HealthState::Checking => HealthState::Up,
                HealthState::Unhealthy if self.passes >= th.passes.max(1) => HealthState::Up,
                s => s,
            }
        } else {
            self.failed += 1;
            self.fails = self.fails.saturating_add(1);
            self.passes = 0;
            match was {
                HealthState::Checking => HealthState::Unhealthy,
                HealthState::Up if self.fails >= th.fails.max(1) => HealthState::Unhealthy,
                s => s,
            }
        };
        if next == was {
            return Change::Unchanged;
        }
        let after = self.since_change;
        self.state = next;
        self.since_change = 0;
        match next {
            HealthState::Up => Change::Healthy { after, was },
            _ => Change::Unhealthy,
        }
    }
}
