//! Kernel side of the agent.
//!
//! * `connect4` / `connect6` steer TCP connects to the credential address's port to the
//!   agent's attributed listener (same address, other port) and mark the socket with the
//!   connecting cgroup id (socket-local storage, freed with the socket).
//! * `sock_ops` turns that mark into (4-tuple → cgroup id) when the connection is established,
//!   so the server can look its peer up right after `accept`, and deletes it at close so a
//!   reused tuple never inherits a stale pod.
//! * `getpeername4` / `getpeername6` keep the rewrite invisible to the client.
//!
//! The programs deny one thing only: a connect to the credential address from a pod over its
//! connect budget (`ECONNREFUSED`, counted per pod). Everything else, a map error or a full
//! map included, proceeds (fail open in the kernel, closed in HTTP).
#![no_std]
#![no_main]
// The bpfel target has no atomic read-modify-write types; the intrinsic lowers to BPF's xadd.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::intrinsics::AtomicOrdering;
use core::ptr::{self, read_volatile};

use agent_common::{
    BudgetConfig, Counter, PodBudget, SteerConfig, TupleKey, CONFIG_INDEX, COUNTER_SLOTS,
    MAX_CGROUP_LEVEL, POD_BUDGET_ENTRIES, TUPLE_MAP_ENTRIES,
};
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE,
    },
    btf_maps::SkStorage,
    helpers::{
        bpf_get_current_cgroup_id,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_ktime_get_ns, bpf_set_retval,
            bpf_sk_storage_get,
        },
    },
    macros::{btf_map, cgroup_sock_addr, map, sock_ops},
    maps::{Array, HashMap, PerCpuArray},
    programs::{SockAddrContext, SockOpsContext},
};

/// cgroup sock_addr programs: 1 lets the syscall proceed, 0 fails it.
const PROCEED: i32 = 1;
const DENY: i32 = 0;
/// What a connect over budget fails with: what a client sees when nothing listens, so SDKs
/// back off and retry as they already do.
const ECONNREFUSED: i32 = 111;
/// `BPF_NOEXIST`: create only.
const NOEXIST: u64 = 1;
const IPPROTO_TCP: u32 = 6;
const AF_INET: u32 = 2;
/// `::ffff:0:0/96` prefix word, network order.
const V4_MAPPED: u32 = u32::from_be(0x0000_ffff);

#[map]
static CONFIG: Array<SteerConfig> = Array::with_max_entries(1, 0);

/// Established steered connections: tuple → cgroup id. A plain hash (not LRU): LRU maps evict
/// fresh entries under churn; entries are deleted at close instead.
#[map]
static TUPLES: HashMap<TupleKey, u64> = HashMap::with_max_entries(TUPLE_MAP_ENTRIES, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[map]
static BUDGET: Array<BudgetConfig> = Array::with_max_entries(1, 0);

/// Pod cgroup id → connect budget. User space deletes the entries of pods that are gone.
#[map]
static POD_BUDGETS: HashMap<u64, PodBudget> = HashMap::with_max_entries(POD_BUDGET_ENTRIES, 0);

/// The cgroup id that connected this socket; its presence also means "we steered it".
#[btf_map]
static SK_CGROUP: SkStorage<u64> = SkStorage::new();

#[inline(always)]
fn bump(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}

/// Rewrites the destination port and marks the socket with the caller's cgroup.
#[inline(always)]
fn steer(ctx: &SockAddrContext, cfg: &SteerConfig, counter: Counter) {
    // SAFETY: ctx.sock_addr is the kernel-provided context; user_port is writable for connect.
    unsafe { (*ctx.sock_addr).user_port = cfg.attributed_port };
    // SAFETY: helper without arguments, allowed in cgroup sock_addr programs.
    let mut cgroup = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the helper reads the socket from the context the kernel gave us.
    let mark = unsafe { SK_CGROUP.get_or_insert_ptr_mut(ctx, Some(&mut cgroup)) };
    if mark.is_null() {
        bump(Counter::MarkFailed);
    } else {
        // SAFETY: non-null pointer into this socket's storage.
        unsafe { *mark = cgroup };
    }
    bump(counter);
}

/// The calling pod's cgroup id: the child of the pods cgroup, or the grandchild when the child
/// is a QoS-class cgroup. 0 when the caller is not inside a pod.
#[inline(always)]
fn caller_pod(budget: &BudgetConfig) -> u64 {
    // SAFETY (all helper calls below): no pointers, allowed in cgroup sock_addr programs.
    let ancestor = |level: i32| unsafe { bpf_get_current_ancestor_cgroup_id(level) };
    // The pods cgroup's level is found, not configured: it holds across cgroup namespaces.
    let mut level = 0;
    while level < MAX_CGROUP_LEVEL {
        let id = ancestor(level);
        if id == 0 {
            return 0;
        }
        if id == budget.pods_root {
            break;
        }
        level += 1;
    }
    let child = ancestor(level + 1);
    if child != 0 && (child == budget.qos[0] || child == budget.qos[1]) {
        ancestor(level + 2)
    } else {
        child
    }
}

/// Charges one connect to the caller's pod. False only for a pod found over its budget.
#[inline(always)]
fn within_budget() -> bool {
    let Some(budget) = BUDGET.get(CONFIG_INDEX) else {
        return true;
    };
    if budget.interval_ns == 0 {
        return true;
    }
    let pod = caller_pod(budget);
    if pod == 0 {
        bump(Counter::BudgetUntracked);
        return true;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let entry = match POD_BUDGETS.get_ptr_mut(&pod) {
        Some(entry) => entry,
        None => {
            let first = PodBudget {
                tat: budget.admit(0, now).unwrap_or(now),
                refused: 0,
            };
            if POD_BUDGETS.insert(&pod, &first, NOEXIST).is_ok() {
                return true;
            }
            // Another CPU made the entry first (charge this connect to it), or the map is
            // full (proceed unbudgeted).
            match POD_BUDGETS.get_ptr_mut(&pod) {
                Some(entry) => entry,
                None => {
                    bump(Counter::BudgetUntracked);
                    return true;
                }
            }
        }
    };
    // Unlocked read-modify-write (no spin lock or cmpxchg, which older kernels lack): two
    // CPUs charging one pod at the same instant may both be admitted, never wrongly refused.
    // Each such race admits one connect more; a few per burst at most.
    // SAFETY: non-null pointer into the map value.
    match budget.admit(unsafe { (*entry).tat }, now) {
        Some(next) => {
            // SAFETY: as above.
            unsafe { (*entry).tat = next };
            true
        }
        None => {
            // SAFETY: as above; an atomic add, so concurrent refusals are all counted.
            unsafe {
                core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(
                    &raw mut (*entry).refused,
                    1,
                )
            };
            bump(Counter::BudgetRefused);
            false
        }
    }
}

/// Steers a connect to the credential address, or refuses it when its pod is over budget.
#[inline(always)]
fn steer_or_refuse(ctx: &SockAddrContext, cfg: &SteerConfig, counter: Counter) -> i32 {
    if !within_budget() {
        // SAFETY: cgroup sock_addr programs may set the syscall's return value.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return DENY;
    }
    steer(ctx, cfg, counter);
    PROCEED
}

/// Reads (destination port, protocol) of a sock_addr context.
#[inline(always)]
fn port_and_proto(ctx: &SockAddrContext) -> (u32, u32) {
    let sa = ctx.sock_addr;
    // SAFETY: fixed-offset context reads.
    unsafe {
        (
            read_volatile(&raw const (*sa).user_port),
            read_volatile(&raw const (*sa).protocol),
        )
    }
}

fn config() -> Option<&'static SteerConfig> {
    CONFIG.get(CONFIG_INDEX)
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    if let Some(cfg) = config() {
        let (port, proto) = port_and_proto(&ctx);
        // SAFETY: fixed-offset context read.
        let ip = unsafe { read_volatile(&raw const (*ctx.sock_addr).user_ip4) };
        if proto == IPPROTO_TCP && port == cfg.port && cfg.addr4 != 0 && ip == cfg.addr4 {
            return steer_or_refuse(&ctx, cfg, Counter::Steered4);
        }
    }
    PROCEED
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    if let Some(cfg) = config() {
        let (port, proto) = port_and_proto(&ctx);
        if proto == IPPROTO_TCP && port == cfg.port {
            let ip = read_ip6(&ctx);
            let native = cfg.addr6 != [0; 4] && ip == cfg.addr6;
            // A dual-stack socket dialling 169.254.170.23 arrives here as ::ffff:169.254.170.23.
            let mapped = cfg.addr4 != 0 && ip == [0, 0, V4_MAPPED, cfg.addr4];
            if native || mapped {
                return steer_or_refuse(&ctx, cfg, Counter::Steered6);
            }
        }
    }
    PROCEED
}

#[inline(always)]
fn read_ip6(ctx: &SockAddrContext) -> [u32; 4] {
    let sa = ctx.sock_addr;
    // SAFETY: the verifier only allows 4-byte loads of user_ip6, one word at a time.
    unsafe {
        [
            read_volatile(&raw const (*sa).user_ip6[0]),
            read_volatile(&raw const (*sa).user_ip6[1]),
            read_volatile(&raw const (*sa).user_ip6[2]),
            read_volatile(&raw const (*sa).user_ip6[3]),
        ]
    }
}

/// Shows the client the port it dialled when the socket was one we steered.
#[inline(always)]
fn restore_peer_port(ctx: &SockAddrContext) -> i32 {
    if let Some(cfg) = config() {
        let (port, _) = port_and_proto(ctx);
        // SAFETY: lookup without create on the context's socket.
        if port == cfg.attributed_port && !unsafe { SK_CGROUP.get_ptr_mut(ctx) }.is_null() {
            // SAFETY: user_port is writable for getpeername.
            unsafe { (*ctx.sock_addr).user_port = cfg.port };
            bump(Counter::PeerNameRewritten);
        }
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    restore_peer_port(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    restore_peer_port(&ctx)
}

#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => record_tuple(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            if TUPLES.remove(&tuple_key(&ctx)).is_ok() {
                bump(Counter::TupleDeleted);
            }
        }
        _ => {}
    }
    1
}

/// On the client's established callback (before its final ACK, so before the server's
/// accept returns), publish tuple → cgroup for sockets the connect hook marked.
#[inline(always)]
fn record_tuple(ctx: &SockOpsContext) {
    // SAFETY: reading the sk pointer field of the context.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return;
    }
    // SAFETY: lookup without create; the map pointer is our own sk_storage map.
    let mark = unsafe {
        bpf_sk_storage_get(
            ptr::from_ref(&SK_CGROUP).cast_mut().cast(),
            sk.cast(),
            ptr::null_mut(),
            0,
        )
    } as *const u64;
    let key = tuple_key(ctx);
    if mark.is_null() {
        // Only connections to the attributed port matter; anything else is not ours.
        let to_attributed =
            config().is_some_and(|cfg| key.server_port == u16::from_be(cfg.attributed_port as u16));
        if to_attributed {
            bump(Counter::AttributionMiss);
        }
        return;
    }
    // SAFETY: non-null pointer into the socket's storage.
    let cgroup = unsafe { *mark };
    if TUPLES.insert(&key, &cgroup, 0).is_err() {
        bump(Counter::TupleInsertFailed);
        return;
    }
    bump(Counter::TupleRecorded);
    // Ask for state callbacks so the entry is deleted when this socket closes.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

/// The client socket's tuple, IPv4 as `::ffff:a.b.c.d`.
#[inline(always)]
fn tuple_key(ctx: &SockOpsContext) -> TupleKey {
    let o = ctx.ops;
    // Every field gets its own fixed-offset load before any branch: a computed ctx offset is
    // rejected by the verifier ("dereference of modified ctx ptr").
    // SAFETY: fixed-offset context reads.
    let (family, l4, r4, l6, r6, lport, rport) = unsafe {
        (
            read_volatile(&raw const (*o).family),
            read_volatile(&raw const (*o).local_ip4),
            read_volatile(&raw const (*o).remote_ip4),
            [
                read_volatile(&raw const (*o).local_ip6[0]),
                read_volatile(&raw const (*o).local_ip6[1]),
                read_volatile(&raw const (*o).local_ip6[2]),
                read_volatile(&raw const (*o).local_ip6[3]),
            ],
            [
                read_volatile(&raw const (*o).remote_ip6[0]),
                read_volatile(&raw const (*o).remote_ip6[1]),
                read_volatile(&raw const (*o).remote_ip6[2]),
                read_volatile(&raw const (*o).remote_ip6[3]),
            ],
            read_volatile(&raw const (*o).local_port),
            read_volatile(&raw const (*o).remote_port),
        )
    };
    let (client_ip, server_ip) = if family == AF_INET {
        ([0, 0, V4_MAPPED, l4], [0, 0, V4_MAPPED, r4])
    } else {
        (l6, r6)
    };
    TupleKey {
        client_ip,
        server_ip,
        // local_port is host order; remote_port is network order in the upper 16 bits.
        client_port: lport as u16,
        server_port: u32::from_be(rport) as u16,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
