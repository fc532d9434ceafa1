//! Kernel side of the agent. Nothing on the wire changes: a pod's connect goes where it was
//! sent (the credential address, port 80).
//!
//! * `connect4` / `connect6` see every connect to a credential address from the pods cgroup,
//!   find the caller's *pod* by position (the pods cgroup's child, or a QoS cgroup's child;
//!   never a name a container could make), charge its connect budget and connection cap, and
//!   mark the socket with the pod's cgroup id (socket-local storage, freed with the socket).
//! * `sock_ops` counts a marked socket against its pod from the SYN until it closes, and when
//!   it is established publishes (4-tuple → pod cgroup id), so the server can look its peer
//!   up right after `accept` (it then deletes the entry); a socket that closes first deletes
//!   its own entry.
//!
//! The programs deny one thing only: a connect from a pod over its connect budget or its
//! connection cap (`ECONNREFUSED`, counted per pod). Everything else, a map error or a full
//! map included, proceeds (fail open in the kernel, closed in HTTP: an unrecorded pod
//! connection is refused by the server).
#![no_std]
#![no_main]
// The bpfel target has no atomic read-modify-write types; the intrinsic lowers to BPF's xadd.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::intrinsics::AtomicOrdering;
use core::ptr::{self, read_volatile};

use agent_common::{
    BudgetConfig, Counter, PodBudget, SocketMark, SteerConfig, TupleKey, CONFIG_INDEX,
    COUNTER_SLOTS, MAX_CGROUP_LEVEL, POD_BUDGET_ENTRIES, TUPLE_MAP_ENTRIES,
};
use aya_ebpf::{
    bindings::{
        BPF_F_NO_PREALLOC, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE,
    },
    btf_maps::SkStorage,
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_ktime_get_ns, bpf_set_retval, bpf_sk_storage_get,
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

/// Established attributed connections: tuple → pod cgroup id. A plain hash (not LRU): LRU maps
/// evict fresh entries under churn. The server deletes an entry once it has read it; a socket
/// closing first deletes its own. Allocated on insert: the bound costs nothing until used.
#[map]
static TUPLES: HashMap<TupleKey, u64> =
    HashMap::with_max_entries(TUPLE_MAP_ENTRIES, BPF_F_NO_PREALLOC);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[map]
static BUDGET: Array<BudgetConfig> = Array::with_max_entries(1, 0);

/// Pod cgroup id → connect budget. User space deletes the entries of pods that are gone.
#[map]
static POD_BUDGETS: HashMap<u64, PodBudget> = HashMap::with_max_entries(POD_BUDGET_ENTRIES, 0);

/// The pod that connected this socket; its presence also means "a pod dialled a credential
/// address".
#[btf_map]
static SK_CGROUP: SkStorage<SocketMark> = SkStorage::new();

#[inline(always)]
fn bump(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}

/// Marks the socket with the caller's pod.
#[inline(always)]
fn mark(ctx: &SockAddrContext, pod: u64, counter: Counter) {
    let mut value = SocketMark { pod, counted: 0 };
    // SAFETY: the helper reads the socket from the context the kernel gave us.
    let mark = unsafe { SK_CGROUP.get_or_insert_ptr_mut(ctx, Some(&mut value)) };
    if mark.is_null() {
        bump(Counter::MarkFailed);
        return;
    }
    // SAFETY: non-null pointer into this socket's storage (a reused socket overwrites).
    unsafe { *mark = value };
    bump(counter);
}

/// The calling pod's cgroup id: the child of the pods cgroup, or the grandchild when the child
/// is a QoS-class cgroup. 0 when the caller is not inside a pod. Found by position: whatever
/// a container nests below its own cgroup, whatever names it gives, is that pod.
#[inline(always)]
fn caller_pod(cfg: &BudgetConfig) -> u64 {
    // SAFETY (all helper calls below): no pointers, allowed in cgroup sock_addr programs.
    let ancestor = |level: i32| unsafe { bpf_get_current_ancestor_cgroup_id(level) };
    // The pods cgroup's level is found, not configured: it holds across cgroup namespaces.
    let mut level = 0;
    while level < MAX_CGROUP_LEVEL {
        let id = ancestor(level);
        if id == 0 {
            return 0;
        }
        if id == cfg.pods_root {
            break;
        }
        level += 1;
    }
    let child = ancestor(level + 1);
    if child != 0 && (child == cfg.qos[0] || child == cfg.qos[1]) {
        ancestor(level + 2)
    } else {
        child
    }
}

/// The pod's entry in `POD_BUDGETS`, made on its first connect (`None`: the map is full).
/// `fresh` tells whether this call made it.
#[inline(always)]
fn pod_entry(pod: u64, cfg: &BudgetConfig, now: u64) -> Option<(*mut PodBudget, bool)> {
    if let Some(entry) = POD_BUDGETS.get_ptr_mut(&pod) {
        return Some((entry, false));
    }
    let mut first = PodBudget::default();
    // Field by field, volatile: zeroing two adjacent words compiles to a memset loop whose
    // pointer arithmetic the verifier refuses without CAP_PERFMON (the DaemonSet has none).
    // SAFETY: writes into a local.
    unsafe {
        ptr::write_volatile(&raw mut first.tat, cfg.admit(0, now).unwrap_or(now));
        ptr::write_volatile(&raw mut first.refused, 0);
        ptr::write_volatile(&raw mut first.live, 0);
    }
    let fresh = POD_BUDGETS.insert(&pod, &first, NOEXIST).is_ok();
    // Made here, or by another CPU at the same instant (charge this connect to it).
    POD_BUDGETS.get_ptr_mut(&pod).map(|e| (e, fresh))
}

/// Charges one connect to `pod`. False for a pod over its connection cap or its budget.
#[inline(always)]
fn admit(pod: u64, cfg: &BudgetConfig) -> bool {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some((entry, fresh)) = pod_entry(pod, cfg, now) else {
        bump(Counter::BudgetUntracked);
        return true;
    };
    // SAFETY: non-null pointer into the map value (all dereferences below).
    let live = unsafe { read_volatile(&raw const (*entry).live) };
    let refusal = if cfg.max_connections != 0 && live >= cfg.max_connections {
        Some(Counter::ConnectionCapped)
    } else if fresh || cfg.interval_ns == 0 {
        None
    } else {
        // Unlocked read-modify-write (no spin lock or cmpxchg, which older kernels lack): two
        // CPUs charging one pod at the same instant may both be admitted, never wrongly
        // refused. Each such race admits one connect more; a few per burst at most.
        match cfg.admit(unsafe { (*entry).tat }, now) {
            Some(next) => {
                unsafe { (*entry).tat = next };
                None
            }
            None => Some(Counter::BudgetRefused),
        }
    };
    let Some(counter) = refusal else {
        return true;
    };
    // An atomic add, so concurrent refusals are all counted.
    xadd(unsafe { &raw mut (*entry).refused }, 1);
    bump(counter);
    false
}

/// Atomic add (wrapping: `u64::MAX` subtracts one); lowers to BPF's xadd.
#[inline(always)]
fn xadd(counter: *mut u64, delta: u64) {
    // SAFETY: callers pass a pointer into a map value.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, delta)
    };
}

/// A connect to a credential address: attributes it to the caller's pod, or refuses it when
/// the pod is over its budget or cap. A caller in no pod proceeds unmarked (the server then
/// serves it only from a node address). With `SET_RETVAL` (kernels with `bpf_set_retval`,
/// 5.18+) a refused `connect()` fails with `ECONNREFUSED`, else with the kernel's `EPERM`.
#[inline(always)]
fn attribute<const SET_RETVAL: bool>(ctx: &SockAddrContext, counter: Counter) -> i32 {
    let Some(cfg) = BUDGET.get(CONFIG_INDEX) else {
        return PROCEED;
    };
    let pod = caller_pod(cfg);
    if pod == 0 {
        bump(Counter::BudgetUntracked);
        return PROCEED;
    }
    if !admit(pod, cfg) {
        if SET_RETVAL {
            // SAFETY: cgroup sock_addr programs may set the syscall's return value.
            unsafe { bpf_set_retval(-ECONNREFUSED) };
        }
        return DENY;
    }
    mark(ctx, pod, counter);
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

/// `connect4`'s body: TCP connects to the IPv4 credential address and port.
#[inline(always)]
fn on_connect4<const SET_RETVAL: bool>(ctx: &SockAddrContext) -> i32 {
    if let Some(cfg) = config() {
        let (port, proto) = port_and_proto(ctx);
        // SAFETY: fixed-offset context read.
        let ip = unsafe { read_volatile(&raw const (*ctx.sock_addr).user_ip4) };
        if proto == IPPROTO_TCP && port == cfg.port && cfg.addr4 != 0 && ip == cfg.addr4 {
            return attribute::<SET_RETVAL>(ctx, Counter::Marked4);
        }
    }
    PROCEED
}

/// `connect6`'s body: TCP connects to the IPv6 credential address, or to the IPv4 one from a
/// dual-stack socket.
#[inline(always)]
fn on_connect6<const SET_RETVAL: bool>(ctx: &SockAddrContext) -> i32 {
    if let Some(cfg) = config() {
        let (port, proto) = port_and_proto(ctx);
        if proto == IPPROTO_TCP && port == cfg.port {
            let ip = read_ip6(ctx);
            let native = cfg.addr6 != [0; 4] && ip == cfg.addr6;
            // A dual-stack socket dialling 169.254.170.23 arrives here as ::ffff:169.254.170.23.
            let mapped = cfg.addr4 != 0 && ip == [0, 0, V4_MAPPED, cfg.addr4];
            if native || mapped {
                return attribute::<SET_RETVAL>(ctx, Counter::Marked6);
            }
        }
    }
    PROCEED
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    on_connect4::<true>(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    on_connect6::<true>(&ctx)
}

/// `connect4` for kernels without `bpf_set_retval` (before 5.18): refusals are `EPERM`.
#[cgroup_sock_addr(connect4)]
pub fn connect4_eperm(ctx: SockAddrContext) -> i32 {
    on_connect4::<false>(&ctx)
}

/// `connect6` for kernels without `bpf_set_retval` (before 5.18): refusals are `EPERM`.
#[cgroup_sock_addr(connect6)]
pub fn connect6_eperm(ctx: SockAddrContext) -> i32 {
    on_connect6::<false>(&ctx)
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

#[sock_ops]
pub fn sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => count_connection(&ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => record_tuple(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => closed(&ctx),
        _ => {}
    }
    1
}

/// The pod mark the connect hook left on this context's socket, if any.
#[inline(always)]
fn socket_mark(ctx: &SockOpsContext) -> Option<*mut SocketMark> {
    // SAFETY: reading the sk pointer field of the context.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: lookup without create; the map pointer is our own sk_storage map.
    let mark = unsafe {
        bpf_sk_storage_get(
            ptr::from_ref(&SK_CGROUP).cast_mut().cast(),
            sk.cast(),
            ptr::null_mut(),
            0,
        )
    } as *mut SocketMark;
    (!mark.is_null()).then_some(mark)
}

/// As the SYN leaves (still in the connecting process's syscall): the socket counts against
/// its pod's connection cap until it closes, and asks for the state callback that tells.
#[inline(always)]
fn count_connection(ctx: &SockOpsContext) {
    let Some(mark) = socket_mark(ctx) else { return };
    // SAFETY: non-null pointer into the socket's storage.
    let pod = unsafe { (*mark).pod };
    if let Some(entry) = POD_BUDGETS.get_ptr_mut(&pod) {
        // SAFETY: pointers into a map value and the socket's storage.
        xadd(unsafe { &raw mut (*entry).live }, 1);
        unsafe { (*mark).counted = 1 };
    }
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

/// The socket is closing: it no longer counts against its pod, and its tuple (if the server
/// has not read it) goes.
#[inline(always)]
fn closed(ctx: &SockOpsContext) {
    if TUPLES.remove(&tuple_key(ctx)).is_ok() {
        bump(Counter::TupleDeleted);
    }
    let Some(mark) = socket_mark(ctx) else { return };
    // SAFETY: non-null pointer into the socket's storage.
    let (pod, counted) = unsafe { ((*mark).pod, (*mark).counted) };
    if counted == 0 {
        return;
    }
    // SAFETY: as above.
    unsafe { (*mark).counted = 0 };
    if let Some(entry) = POD_BUDGETS.get_ptr_mut(&pod) {
        // SAFETY: pointer into a map value.
        xadd(unsafe { &raw mut (*entry).live }, u64::MAX);
    }
}

/// On the client's established callback (before its final ACK, so before the server's
/// accept returns), publish tuple → pod for sockets the connect hook marked.
#[inline(always)]
fn record_tuple(ctx: &SockOpsContext) {
    let key = tuple_key(ctx);
    let Some(mark) = socket_mark(ctx) else {
        // A connection to a credential address from the pods cgroup without a pod mark: the
        // server will refuse it (unless it comes from a node address).
        if config().is_some_and(|cfg| to_credential_address(cfg, &key)) {
            bump(Counter::AttributionMiss);
        }
        return;
    };
    // SAFETY: non-null pointer into the socket's storage.
    let pod = unsafe { (*mark).pod };
    if TUPLES.insert(&key, &pod, 0).is_err() {
        bump(Counter::TupleInsertFailed);
        return;
    }
    bump(Counter::TupleRecorded);
    // Ask for state callbacks (if the SYN callback did not) so the entry goes at close.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

/// Whether the client's tuple goes to a credential address and port.
#[inline(always)]
fn to_credential_address(cfg: &SteerConfig, key: &TupleKey) -> bool {
    let ip = key.server_ip;
    key.server_port == u16::from_be(cfg.port as u16)
        && ((cfg.addr6 != [0; 4] && ip == cfg.addr6)
            || (cfg.addr4 != 0 && ip == [0, 0, V4_MAPPED, cfg.addr4]))
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
