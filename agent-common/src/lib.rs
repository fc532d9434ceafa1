//! Types shared by the kernel programs (`agent-ebpf`) and the agent's user space.
//!
//! Everything here is `#[repr(C)]` with no implicit padding, so both sides agree on the
//! byte layout of map keys and values.
#![no_std]
#![deny(missing_docs)]

/// Index of the single entry in the `CONFIG` array map.
pub const CONFIG_INDEX: u32 = 0;

/// Which connects the hooks attribute, written by user space before the programs are attached.
///
/// Addresses and ports are in network byte order, as the kernel presents them in
/// `bpf_sock_addr`. A zero address turns attribution off for that family. Nothing is
/// rewritten: the connect goes where the pod sent it (port 80).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteerConfig {
    /// The IPv4 credential address (169.254.170.23), network order.
    pub addr4: u32,
    /// The IPv6 credential address (fd00:ec2::23), as four network-order words.
    pub addr6: [u32; 4],
    /// The port pods dial (80), network order in the low 16 bits.
    pub port: u32,
    /// Explicit padding (zero), so the layout has no implicit holes.
    pub reserved: u32,
}

/// What the connect hooks store on a socket they attributed (socket-local storage, freed with
/// the socket).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketMark {
    /// cgroup id of the connecting *pod* (the pod-level cgroup, found by position).
    pub pod: u64,
    /// 1 while the socket counts against its pod's connection cap.
    pub counted: u64,
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

/// Most connections recorded and not yet looked up at once. The map allocates on insert, so
/// the bound costs nothing until used; each pod holds at most its connection cap of them.
pub const TUPLE_MAP_ENTRIES: u32 = 262_144;

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
    /// Most connections one pod may hold open to the credential addresses; 0: no cap.
    pub max_connections: u64,
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
    /// Connects refused since the entry was made (over the budget or the connection cap).
    pub refused: u64,
    /// Connections the pod holds open to the credential addresses now.
    pub live: u64,
}

/// Most pods with a connect budget at once; beyond, connects proceed unbudgeted (counted).
pub const POD_BUDGET_ENTRIES: u32 = 16_384;

/// Deepest cgroup level searched for the pods cgroup (the kernel's root is level 0).
pub const MAX_CGROUP_LEVEL: i32 = 32;

/// Slots of the per-CPU `COUNTERS` array: how far the programs got.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// IPv4 connects to the credential address attributed to a pod.
    Marked4 = 0,
    /// IPv6 (and IPv4-mapped) connects to the credential address attributed to a pod.
    Marked6 = 1,
    /// Established connections whose tuple was recorded.
    TupleRecorded = 2,
    /// Established connections from the pods cgroup to a credential address that carried no
    /// pod mark: the server will refuse them (a caller in no pod, or a lost mark).
    AttributionMiss = 3,
    /// Tuple map inserts that failed (map full).
    TupleInsertFailed = 4,
    /// Tuples deleted when their socket closed before the server looked them up.
    TupleDeleted = 5,
    /// Connects over the caller pod's connection cap, refused in the kernel.
    ConnectionCapped = 6,
    /// Connects that could not store their pod mark on the socket.
    MarkFailed = 7,
    /// Connects refused in the kernel: their pod was over its connect budget.
    BudgetRefused = 8,
    /// Connects let through without a budget: no pod cgroup found, or the budget map full.
    BudgetUntracked = 9,
}

impl Counter {
    /// Every counter, in slot order.
    pub const ALL: [Counter; 10] = [
        Counter::Marked4,
        Counter::Marked6,
        Counter::TupleRecorded,
        Counter::AttributionMiss,
        Counter::TupleInsertFailed,
        Counter::TupleDeleted,
        Counter::ConnectionCapped,
        Counter::MarkFailed,
        Counter::BudgetRefused,
        Counter::BudgetUntracked,
    ];

    /// Stable snake_case name for metrics and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Marked4 => "marked4",
            Counter::Marked6 => "marked6",
            Counter::TupleRecorded => "tuple_recorded",
            Counter::AttributionMiss => "attribution_miss",
            Counter::TupleInsertFailed => "tuple_insert_failed",
            Counter::TupleDeleted => "tuple_deleted",
            Counter::ConnectionCapped => "connection_capped",
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
    /// Attribution configuration (array, one entry).
    pub const CONFIG: &str = "CONFIG";
    /// Connection tuple → cgroup id (hash).
    pub const TUPLES: &str = "TUPLES";
    /// Per-socket pod mark (sk_storage).
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
    /// `cgroup/connect4` for kernels without `bpf_set_retval` (refusals are `EPERM`).
    pub const CONNECT4_EPERM: &str = "connect4_eperm";
    /// `cgroup/connect6` for kernels without `bpf_set_retval` (refusals are `EPERM`).
    pub const CONNECT6_EPERM: &str = "connect6_eperm";
    /// `sockops` program.
    pub const SOCK_OPS: &str = "sock_ops";
    /// Programs of earlier versions whose pinned links a new agent removes.
    pub const RETIRED_PROGRAMS: [&str; 2] = ["getpeername4", "getpeername6"];
}

/// Version of the maps' layout, part of their pin names: an agent never re-opens a map pinned
/// with another layout (it makes its own and removes the old pins).
pub const MAP_LAYOUT: u32 = 2;

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
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SocketMark {}
}
