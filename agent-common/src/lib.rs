//! Types shared by the kernel programs (`agent-ebpf`) and the agent's user space.
//!
//! Everything here is `#[repr(C)]` with no implicit padding, so both sides agree on the
//! byte layout of map keys and values.
#![no_std]
#![deny(missing_docs)]

/// Index of the single entry in the `CONFIG` array map.
pub const CONFIG_INDEX: u32 = 0;

/// What the connect hooks steer, written by user space before the programs are attached.
///
/// Addresses and ports are in network byte order, as the kernel presents them in
/// `bpf_sock_addr`. A zero address disables steering for that family.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteerConfig {
    /// The IPv4 credential address (169.254.170.23), network order.
    pub addr4: u32,
    /// The IPv6 credential address (fd00:ec2::23), as four network-order words.
    pub addr6: [u32; 4],
    /// The port pods dial (80), network order in the low 16 bits.
    pub port: u32,
    /// The attributed listener's port the connect is rewritten to, network order in the low 16 bits.
    pub attributed_port: u32,
}

/// A TCP connection seen from the client: addresses as IPv6 (IPv4 as `::ffff:a.b.c.d`).
///
/// The server builds the same key from (peer, local) after accept.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TupleKey {
    /// Client address, four network-order words.
    pub client_ip: [u32; 4],
    /// Server address, four network-order words.
    pub server_ip: [u32; 4],
    /// Client port, host order.
    pub client_port: u16,
    /// Server port, host order.
    pub server_port: u16,
}

/// Maximum number of live attributed connections tracked at once.
pub const TUPLE_MAP_ENTRIES: u32 = 65_536;

/// The per-pod connect budget (the `BUDGET` array's one entry), written by user space.
///
/// A generic cell rate algorithm: each pod has one "theoretical arrival time" and a connect is
/// admitted while that time is at most `tolerance_ns` ahead of now. It is a token bucket of
/// `tolerance_ns / interval_ns + 1` tokens refilled one per `interval_ns`, kept in one word.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BudgetConfig {
    /// cgroup id of the pods cgroup the programs are attached to.
    pub pods_root: u64,
    /// cgroup ids of the QoS-class cgroups directly under it (`besteffort`, `burstable`);
    /// pods in them sit one level deeper. 0: none.
    pub qos: [u64; 2],
    /// Nanoseconds per connect at the sustained rate; 0 disables the budget.
    pub interval_ns: u64,
    /// How far ahead of now a pod's arrival time may run: (burst - 1) × interval.
    pub tolerance_ns: u64,
}

impl BudgetConfig {
    /// Whether a connect at `now` (ns) from a pod whose arrival time is `tat` is admitted;
    /// if so, the pod's new arrival time. No division, no overflow for any sane setting:
    /// the kernel and the user-side tests run this same arithmetic.
    #[inline(always)]
    pub fn admit(&self, tat: u64, now: u64) -> Option<u64> {
        let start = if tat > now { tat } else { now };
        if start - now > self.tolerance_ns {
            None
        } else {
            Some(start.saturating_add(self.interval_ns))
        }
    }
}

/// One pod's connect budget in the `POD_BUDGETS` map, keyed by the pod cgroup's id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodBudget {
    /// Theoretical arrival time of the pod's next connect (kernel monotonic ns).
    pub tat: u64,
    /// Connects refused since the entry was made.
    pub refused: u64,
}

/// Most pods with a connect budget at once; beyond, connects proceed unbudgeted (counted).
pub const POD_BUDGET_ENTRIES: u32 = 16_384;

/// Deepest cgroup level searched for the pods cgroup (the kernel's root is level 0).
pub const MAX_CGROUP_LEVEL: i32 = 32;

/// Slots of the per-CPU `COUNTERS` array: how far the programs got.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// IPv4 connects steered to the attributed listener.
    Steered4 = 0,
    /// IPv6 (and IPv4-mapped) connects steered to the attributed listener.
    Steered6 = 1,
    /// Established connections whose tuple was recorded.
    TupleRecorded = 2,
    /// Established connections to the attributed port that carried no cgroup mark: the
    /// server will refuse them (a direct dial of the port, or a lost mark).
    AttributionMiss = 3,
    /// Tuple map inserts that failed (map full).
    TupleInsertFailed = 4,
    /// Tuples deleted when their socket closed.
    TupleDeleted = 5,
    /// getpeername calls rewritten back to the credential port.
    PeerNameRewritten = 6,
    /// Connects that could not store their cgroup mark on the socket.
    MarkFailed = 7,
    /// Connects refused in the kernel: their pod was over its connect budget.
    BudgetRefused = 8,
    /// Connects let through without a budget: no pod cgroup found, or the budget map full.
    BudgetUntracked = 9,
}

impl Counter {
    /// Every counter, in slot order.
    pub const ALL: [Counter; 10] = [
        Counter::Steered4,
        Counter::Steered6,
        Counter::TupleRecorded,
        Counter::AttributionMiss,
        Counter::TupleInsertFailed,
        Counter::TupleDeleted,
        Counter::PeerNameRewritten,
        Counter::MarkFailed,
        Counter::BudgetRefused,
        Counter::BudgetUntracked,
    ];

    /// Stable snake_case name for metrics and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Steered4 => "steered4",
            Counter::Steered6 => "steered6",
            Counter::TupleRecorded => "tuple_recorded",
            Counter::AttributionMiss => "attribution_miss",
            Counter::TupleInsertFailed => "tuple_insert_failed",
            Counter::TupleDeleted => "tuple_deleted",
            Counter::PeerNameRewritten => "peername_rewritten",
            Counter::MarkFailed => "mark_failed",
            Counter::BudgetRefused => "budget_refused",
            Counter::BudgetUntracked => "budget_untracked",
        }
    }
}

/// Number of slots in the `COUNTERS` map.
pub const COUNTER_SLOTS: u32 = Counter::ALL.len() as u32;

/// Names of the maps and programs in the BPF object, shared so neither side drifts.
pub mod names {
    /// Steering configuration (array, one entry).
    pub const CONFIG: &str = "CONFIG";
    /// Connection tuple → cgroup id (hash).
    pub const TUPLES: &str = "TUPLES";
    /// Per-socket cgroup mark (sk_storage).
    pub const SK_CGROUP: &str = "SK_CGROUP";
    /// Per-CPU counters.
    pub const COUNTERS: &str = "COUNTERS";
    /// Per-pod connect budget settings (array, one entry).
    pub const BUDGET: &str = "BUDGET";
    /// Pod cgroup id → its connect budget (hash).
    pub const POD_BUDGETS: &str = "POD_BUDGETS";
    /// `cgroup/connect4` program.
    pub const CONNECT4: &str = "connect4";
    /// `cgroup/connect6` program.
    pub const CONNECT6: &str = "connect6";
    /// `cgroup/getpeername4` program.
    pub const GETPEERNAME4: &str = "getpeername4";
    /// `cgroup/getpeername6` program.
    pub const GETPEERNAME6: &str = "getpeername6";
    /// `sockops` program.
    pub const SOCK_OPS: &str = "sock_ops";
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain-old-data, repr(C), no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::SteerConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::TupleKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BudgetConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PodBudget {}
}
