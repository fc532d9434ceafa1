//! Loads the embedded BPF object, configures it, attaches it to the pods cgroup and reads
//! its maps: which pod opened an accepted connection, and how far the programs got.

pub mod budget;
mod sys;

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use agent_common::{
    names, BudgetConfig, Counter, PodBudget, SteerConfig, TupleKey, CONFIG_INDEX, MAP_LAYOUT,
};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SockOps};
use aya::{Ebpf, EbpfLoader};

pub use budget::{ConnectBudget, PodLimits};
pub use sys::AttachType;

/// The BPF object built by `cargo xtask build-ebpf`, embedded at compile time.
#[cfg(not(agent_no_ebpf))]
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("AGENT_EBPF_OBJECT"));
/// Built without the BPF object (`cargo check` before `cargo xtask build-ebpf`): no programs;
/// the agent runs in fallback mode and says why.
#[cfg(agent_no_ebpf)]
static OBJECT: &[u8] = &[];

/// Why the programs could not be loaded or attached.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The object failed to load (verifier, missing BTF, no CAP_BPF).
    #[error("loading the BPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    /// This binary was built without the BPF object (`cargo xtask build` embeds it).
    #[error("this build has no BPF programs: it was built before `cargo xtask build-ebpf`; `cargo xtask build` embeds them")]
    NotEmbedded,
    /// A program or map the object must contain is missing or has another type.
    #[error("the BPF object has no usable {0}")]
    Missing(&'static str),
    /// Loading or attaching one program failed.
    #[error("program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// Cause.
        #[source]
        source: aya::programs::ProgramError,
    },
    /// Reading or writing a map failed.
    #[error("map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// Cause.
        #[source]
        source: aya::maps::MapError,
    },
    /// The attach cgroup could not be opened.
    #[error("cannot open cgroup {path}: {source}")]
    Cgroup {
        /// The cgroup directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Pinning, or re-opening a pin, failed.
    #[error("pin {path}: {source}")]
    Pin {
        /// The pin path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Querying the cgroup's effective programs failed.
    #[error("querying effective programs of {path}: {source}")]
    Query {
        /// The cgroup directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// What the connect hooks attribute: connects to the credential addresses and port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SteerTarget {
    /// IPv4 credential address, if served.
    pub addr4: Option<Ipv4Addr>,
    /// IPv6 credential address, if served.
    pub addr6: Option<Ipv6Addr>,
    /// Port pods dial.
    pub port: u16,
}

impl SteerTarget {
    fn to_kernel(self) -> SteerConfig {
        SteerConfig {
            addr4: self.addr4.map_or(0, |a| u32::from_ne_bytes(a.octets())),
            addr6: self.addr6.map_or([0; 4], |a| words(a.octets())),
            port: u32::from(self.port.to_be()),
            reserved: 0,
        }
    }
}

/// Network-order words of an IPv6 address, as the kernel's `__u32[4]` fields hold them.
fn words(octets: [u8; 16]) -> [u32; 4] {
    std::array::from_fn(|i| u32::from_ne_bytes(octets[i * 4..i * 4 + 4].try_into().unwrap()))
}

/// The kernel's key for a connection, from the server's (peer, local) view.
pub fn tuple_key(peer: SocketAddr, local: SocketAddr) -> TupleKey {
    let as_v6 = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    TupleKey {
        client_ip: words(as_v6(peer.ip()).octets()),
        server_ip: words(as_v6(local.ip()).octets()),
        client_port: peer.port(),
        server_port: local.port(),
    }
}

/// What the running kernel lets the programs do, probed before loading them: the agent loads
/// the variant of each program the kernel can verify, and says which (logs, `/metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// `bpf_set_retval` (5.18+): a refused connect fails with `ECONNREFUSED`; without it, with
    /// the kernel's `EPERM`.
    pub set_retval: bool,
    /// `BPF_MAP_LOOKUP_AND_DELETE_ELEM` on hash maps (5.14+): an accepted connection's record
    /// is taken in one syscall; without it, a lookup then a delete.
    pub lookup_and_delete: bool,
}

impl std::fmt::Display for Features {
    /// `set_retval=yes`, space-separated: what logs and `cargo xtask kernels` show.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: Vec<String> = self
            .list()
            .iter()
            .map(|(name, on)| format!("{name}={}", if *on { "yes" } else { "no" }))
            .collect();
        f.write_str(&shown.join(" "))
    }
}

impl Features {
    /// Asks the kernel (a probe load of a two-instruction program per helper).
    pub fn probe() -> Self {
        use aya::programs::ProgramType;
        use aya::sys::{is_helper_supported, BpfHelper};
        let set_retval = is_helper_supported(
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_set_retval,
        )
        .unwrap_or_else(|e| {
            tracing::warn!(error = %e, "probing bpf_set_retval failed; assuming it is missing");
            false
        });
        Self {
            set_retval,
            // Probed on the tuple map once it exists (`Features::probe_take`).
            lookup_and_delete: false,
        }
    }

    /// Whether `map` (a hash map) can be read and deleted in one call: taking a key no
    /// connection has (all zero) says `ENOENT` where it can.
    fn probe_take(map: &impl std::os::fd::AsFd) -> bool {
        sys::map_take::<TupleKey, u64>(map, &TupleKey::default()).is_ok()
    }

    /// Each feature by name, for logs and metrics.
    pub fn list(&self) -> [(&'static str, bool); 2] {
        [
            ("set_retval", self.set_retval),
            ("lookup_and_delete", self.lookup_and_delete),
        ]
    }

    /// The connect programs to load: (attach point, program name, attach type).
    fn connect_programs(&self) -> [(&'static str, &'static str, AttachType); 2] {
        let (v4, v6) = if self.set_retval {
            (names::CONNECT4, names::CONNECT6)
        } else {
            (names::CONNECT4_EPERM, names::CONNECT6_EPERM)
        };
        [
            (names::CONNECT4, v4, AttachType::Connect4),
            (names::CONNECT6, v6, AttachType::Connect6),
        ]
    }
}

/// Loaded and attached programs. Dropping it detaches them.
pub struct Steering {
    /// Owns the programs and their links.
    _bpf: Ebpf,
    tuples: HashMap<MapData, TupleKey, u64>,
    counters: PerCpuArray<MapData, u64>,
    budget_config: std::sync::Mutex<Array<MapData, BudgetConfig>>,
    pod_budgets: std::sync::Mutex<HashMap<MapData, u64, PodBudget>>,
    limits: PodLimits,
    features: Features,
    cgroup: PathBuf,
    program_ids: Vec<(AttachType, u32)>,
    /// The last count of live tuples and when it was taken (see [`Steering::live_tuples`]).
    live: std::sync::Mutex<Option<(std::time::Instant, usize)>>,
}

/// How long a count of live tuples is reused: counting walks the map, one syscall per key.
const LIVE_TUPLES_TTL: std::time::Duration = std::time::Duration::from_secs(2);

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering")
            .field("cgroup", &self.cgroup)
            .field("program_ids", &self.program_ids)
            .finish()
    }
}

/// Attaches `$prog` to `$cgroup` through a bpf_link, or, when a link pinned under `$pins`
/// from an earlier run exists on the same cgroup, swaps the program inside it atomically.
macro_rules! attach_or_update {
    ($prog:expr, $name:expr, $cgroup:expr, $pins:expr) => {{
        let wrap = |source| EbpfError::Program { name: $name, source };
        match pinned_link($pins, $name, $cgroup)? {
            Some(link) => {
                let fd = $prog.fd().map_err(wrap)?;
                sys::link_update(&link, fd).map_err(|source| EbpfError::Pin {
                    path: link_path($pins, $name),
                    source,
                })?;
                tracing::info!(program = $name, "replaced the program inside the pinned link");
            }
            None => {
                // `Single` is what makes a bpf_link; aya 0.14's AllowMultiple fails (docs/kernel-notes.md).
                let id = $prog.attach($cgroup.fd, CgroupAttachMode::Single).map_err(wrap)?;
                if let Some(dir) = $pins {
                    let link: FdLink = $prog
                        .take_link(id)
                        .map_err(wrap)?
                        .try_into()
                        .map_err(|_| EbpfError::Missing("an fd-based link"))?;
                    let path = dir.join(format!("link_{}", $name));
                    link.pin(&path).map_err(|e| EbpfError::Pin {
                        path,
                        source: std::io::Error::other(e.to_string()),
                    })?;
                }
            }
        }
        $prog.info().map_err(wrap)?.id()
    }};
}

/// The attach cgroup, open, with its id.
struct Cgroup<'a> {
    fd: &'a File,
    id: u64,
}

fn link_path(pins: Option<&Path>, name: &str) -> PathBuf {
    pins.map(|d| d.join(format!("link_{name}")))
        .unwrap_or_default()
}

/// The link pinned for program `name`, if one exists and is attached to `cgroup`. A link
/// pinned on another cgroup (the root changed) is unpinned, which detaches it.
fn pinned_link(
    pins: Option<&Path>,
    name: &'static str,
    cgroup: &Cgroup,
) -> Result<Option<std::os::fd::OwnedFd>, EbpfError> {
    let Some(dir) = pins else { return Ok(None) };
    let path = dir.join(format!("link_{name}"));
    if !path.exists() {
        return Ok(None);
    }
    let pin_err = |source| EbpfError::Pin {
        path: path.clone(),
        source,
    };
    let link = sys::obj_get(&path).map_err(pin_err)?;
    if sys::link_cgroup_id(&link).map_err(pin_err)? == cgroup.id {
        return Ok(Some(link));
    }
    tracing::warn!(link = %path.display(), "pinned link is attached to another cgroup; replacing it");
    std::fs::remove_file(&path).map_err(pin_err)?;
    Ok(None)
}

/// Makes sure `dir` exists on a bpf file system, mounting one on its parent if needed.
pub fn prepare_pin_dir(dir: &Path) -> Result<(), EbpfError> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let pin_err = |source| EbpfError::Pin {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(parent).map_err(pin_err)?;
    if !sys::is_bpffs(parent).map_err(pin_err)? {
        sys::mount_bpffs(parent).map_err(pin_err)?;
        tracing::info!(path = %parent.display(), "mounted a bpf file system");
    }
    std::fs::create_dir_all(dir).map_err(pin_err)
}

/// Detaches everything an agent pinned under `dir` and removes the pins. Returns how many
/// pins were removed.
pub fn uninstall(dir: &Path) -> std::io::Result<usize> {
    let mut removed = 0;
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries.flatten() {
                // Removing the last reference to a link detaches it.
                std::fs::remove_file(e.path())?;
                removed += 1;
            }
            std::fs::remove_dir(dir)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(removed)
}

/// Where map `name` is pinned under `dir`: the layout version is part of the name, so an
/// agent never re-opens a map an agent with another layout pinned.
fn map_pin(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("map_v{MAP_LAYOUT}_{name}"))
}

/// Removes what earlier versions pinned and this one does not use: maps of other layouts
/// (nothing references them once the programs are swapped) and links of retired programs
/// (unpinning detaches them).
fn remove_stale_pins(dir: &Path) -> Result<(), EbpfError> {
    let ours: Vec<PathBuf> = PINNED_MAPS.iter().map(|n| map_pin(dir, n)).collect();
    let retired: Vec<PathBuf> = names::RETIRED_PROGRAMS
        .iter()
        .map(|n| dir.join(format!("link_{n}")))
        .collect();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for path in entries.flatten().map(|e| e.path()) {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let stale_map = name.starts_with("map_") && !ours.contains(&path);
        if stale_map || retired.contains(&path) {
            std::fs::remove_file(&path).map_err(|source| EbpfError::Pin {
                path: path.clone(),
                source,
            })?;
            tracing::info!(pin = %path.display(), "removed a pin an earlier version left");
        }
    }
    Ok(())
}

/// Maps one program hands to another: pinned so a restarted agent's programs share them.
const PINNED_MAPS: [&str; 6] = [
    names::CONFIG,
    names::TUPLES,
    names::SK_CGROUP,
    names::COUNTERS,
    names::BUDGET,
    names::POD_BUDGETS,
];

impl Steering {
    /// Loads the object, writes `target` into its config map and attaches every program to
    /// `cgroup` through a `bpf_link` (multi-attach: other agents' programs keep running).
    ///
    /// With `pins`, maps and links are pinned there: they outlive this process, and a later
    /// run re-opens the maps and swaps its programs into the links with no unsteered window.
    ///
    /// `limits` bound each pod's connects to the credential addresses in the kernel (rate
    /// and open connections; what an earlier run configured is replaced).
    pub fn attach(
        cgroup: &Path,
        target: SteerTarget,
        limits: PodLimits,
        pins: Option<&Path>,
    ) -> Result<Self, EbpfError> {
        if OBJECT.is_empty() {
            return Err(EbpfError::NotEmbedded);
        }
        let mut loader = EbpfLoader::new();
        if let Some(dir) = pins {
            prepare_pin_dir(dir)?;
            for name in PINNED_MAPS {
                loader.map_pin_path(name, map_pin(dir, name));
            }
        }
        let mut bpf = loader.load(OBJECT)?;
        let mut config: Array<_, SteerConfig> = bpf
            .map_mut(names::CONFIG)
            .ok_or(EbpfError::Missing(names::CONFIG))?
            .try_into()
            .map_err(|source| EbpfError::Map {
                name: names::CONFIG,
                source,
            })?;
        config
            .set(CONFIG_INDEX, target.to_kernel(), 0)
            .map_err(|source| EbpfError::Map {
                name: names::CONFIG,
                source,
            })?;
        // Where pods are, before any program runs: a connect seen without it would find no pod.
        let mut budget_config = take_map(&mut bpf, names::BUDGET)?;
        write_pods_config(&mut budget_config, limits, cgroup)?;

        let cgroup_fd = File::open(cgroup).map_err(|source| EbpfError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        let cg = Cgroup {
            fd: &cgroup_fd,
            id: cgroup_fd
                .metadata()
                .map_err(|source| EbpfError::Cgroup {
                    path: cgroup.to_path_buf(),
                    source,
                })?
                .ino(),
        };
        let mut program_ids = Vec::new();
        let mut features = Features::probe();
        // sock_ops first: a connect marked before it is attached would never be recorded.
        let sock_ops: &mut SockOps = program(&mut bpf, names::SOCK_OPS)?;
        sock_ops.load().map_err(|source| EbpfError::Program {
            name: names::SOCK_OPS,
            source,
        })?;
        let id = attach_or_update!(sock_ops, names::SOCK_OPS, &cg, pins);
        program_ids.push((AttachType::SockOps, id));
        for (link, name, kind) in features.connect_programs() {
            let prog: &mut CgroupSockAddr = program(&mut bpf, name)?;
            prog.load()
                .map_err(|source| EbpfError::Program { name, source })?;
            // The link is named for its attach point, whichever variant runs in it.
            let id = attach_or_update!(prog, link, &cg, pins);
            program_ids.push((kind, id));
        }
        if let Some(dir) = pins {
            remove_stale_pins(dir)?;
        }

        let tuples: HashMap<MapData, TupleKey, u64> = take_map(&mut bpf, names::TUPLES)?;
        {
            use aya::maps::IterableMap as _;
            features.lookup_and_delete = Features::probe_take(tuples.map().fd());
        }
        tracing::info!(%features, "kernel features for the eBPF programs");
        let counters = take_map(&mut bpf, names::COUNTERS)?;
        let steering = Self {
            budget_config: std::sync::Mutex::new(budget_config),
            pod_budgets: std::sync::Mutex::new(take_map(&mut bpf, names::POD_BUDGETS)?),
            limits,
            features,
            _bpf: bpf,
            tuples,
            counters,
            cgroup: cgroup.to_path_buf(),
            program_ids,
            live: std::sync::Mutex::new(None),
        };
        Ok(steering)
    }

    /// Writes where pods are (the pods cgroup and its QoS cgroups as they are now) and their
    /// limits into the kernel. Called at attach, at every sweep, and when a connection was
    /// recorded for a QoS cgroup (one made after the last call: the kernel took it for a pod).
    pub fn configure_budget(&self) -> Result<(), EbpfError> {
        let mut map = self.budget_config.lock().expect("not poisoned");
        write_pods_config(&mut map, self.limits, &self.cgroup)
    }

    /// Forgets the connect budgets of pods whose cgroup is gone and picks up QoS cgroups made
    /// since the last call. Returns how many budgets were removed.
    pub fn sweep_budgets(&self) -> Result<usize, EbpfError> {
        self.configure_budget()?;
        let live = crate::cgroup::pod_level(&self.cgroup);
        let mut map = self.pod_budgets.lock().expect("not poisoned");
        let gone: Vec<u64> = map
            .keys()
            .flatten()
            .filter(|id| !live.contains_key(id))
            .collect();
        for id in &gone {
            // Already removed by a concurrent sweep is fine.
            let _ = map.remove(id);
        }
        Ok(gone.len())
    }

    /// Each budgeted pod's cgroup id and budget state.
    pub fn pod_budgets(&self) -> Vec<(u64, PodBudget)> {
        let map = self.pod_budgets.lock().expect("not poisoned");
        map.iter().flatten().collect()
    }

    /// The pod cgroup id that opened the connection the server sees as (peer, local), if a
    /// connect hook attributed it. The entry is removed: it is read once, right after accept.
    pub fn take(&self, peer: SocketAddr, local: SocketAddr) -> Option<u64> {
        let key = tuple_key(peer, local);
        if self.features.lookup_and_delete {
            use aya::maps::IterableMap as _;
            return sys::map_take(self.tuples.map().fd(), &key).ok()?;
        }
        let pod = self.tuples.get(&key, 0).ok()?;
        // Gone already is fine: the client closed it (and the kernel deleted it) meanwhile.
        let _ = self.tuples_remove(&key);
        Some(pod)
    }

    fn tuples_remove(&self, key: &TupleKey) -> std::io::Result<()> {
        use aya::maps::IterableMap as _;
        sys::map_delete(self.tuples.map().fd(), key)
    }

    /// Number of entries in the tuple map (connections recorded and not yet accepted).
    /// Counting walks the map, one syscall per key, so a count is reused for 2 s however
    /// often `/metrics` is scraped.
    pub fn live_tuples(&self) -> usize {
        let mut live = self.live.lock().expect("not poisoned");
        match *live {
            Some((at, n)) if at.elapsed() < LIVE_TUPLES_TTL => n,
            _ => {
                let n = self.tuples.keys().count();
                *live = Some((std::time::Instant::now(), n));
                n
            }
        }
    }

    /// Each kernel counter, summed over CPUs.
    pub fn counters(&self) -> Vec<(Counter, u64)> {
        Counter::ALL
            .iter()
            .map(|&c| {
                let sum = self
                    .counters
                    .get(&(c as u32), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (c, sum)
            })
            .collect()
    }

    /// The kernel features the loaded programs use.
    pub fn features(&self) -> Features {
        self.features
    }

    /// The cgroup the programs are attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Checks that each of our programs is in the *effective* set of `cgroup` (the attach
    /// cgroup or any pod cgroup below it), i.e. that the kernel really runs it there.
    pub fn verify_effective(&self, cgroup: &Path) -> Result<Vec<AttachType>, EbpfError> {
        let fd = File::open(cgroup).map_err(|source| EbpfError::Cgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        let mut missing = Vec::new();
        for &(kind, id) in &self.program_ids {
            let ids = sys::query_effective(&fd, kind).map_err(|source| EbpfError::Query {
                path: cgroup.to_path_buf(),
                source,
            })?;
            if !ids.contains(&id) {
                missing.push(kind);
            }
        }
        Ok(missing)
    }
}

/// Writes the pods cgroup under `pods_root`, its QoS cgroups as they are now, and `limits`
/// into the kernel's one-entry `BUDGET` array (unless it holds that already).
fn write_pods_config(
    map: &mut Array<MapData, BudgetConfig>,
    limits: PodLimits,
    pods_root: &Path,
) -> Result<(), EbpfError> {
    let config = limits.to_kernel(budget::cgroup_id(pods_root), budget::qos_ids(pods_root));
    if map.get(&CONFIG_INDEX, 0).ok() == Some(config) {
        return Ok(());
    }
    map.set(CONFIG_INDEX, config, 0)
        .map_err(|source| EbpfError::Map {
            name: names::BUDGET,
            source,
        })
}

fn program<'a, T>(bpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, EbpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    bpf.program_mut(name)
        .ok_or(EbpfError::Missing(name))?
        .try_into()
        .map_err(|_| EbpfError::Missing(name))
}

fn take_map<T>(bpf: &mut Ebpf, name: &'static str) -> Result<T, EbpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = bpf.take_map(name).ok_or(EbpfError::Missing(name))?;
    T::try_from(map).map_err(|source| EbpfError::Map { name, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuple_keys_match_the_kernel_layout() {
        let k = tuple_key(
            "10.0.0.2:40000".parse().unwrap(),
            "169.254.170.23:80".parse().unwrap(),
        );
        assert_eq!(k.client_ip[..3], [0, 0, u32::from_be(0xffff)]);
        assert_eq!(k.server_ip[3], u32::from_ne_bytes([169, 254, 170, 23]));
        assert_eq!((k.client_port, k.server_port), (40000, 80));
        let k6 = tuple_key(
            "[fd99::2]:1".parse().unwrap(),
            "[fd00:ec2::23]:80".parse().unwrap(),
        );
        assert_eq!(k6.server_ip[0], u32::from_ne_bytes([0xfd, 0, 0x0e, 0xc2]));
        assert_eq!(k6.server_ip[3], u32::from_ne_bytes([0, 0, 0, 0x23]));
    }

    #[test]
    fn config_is_in_network_order() {
        let c = SteerTarget {
            addr4: Some(Ipv4Addr::new(169, 254, 170, 23)),
            addr6: None,
            port: 80,
        }
        .to_kernel();
        assert_eq!(c.addr4.to_ne_bytes(), [169, 254, 170, 23]);
        assert_eq!(c.addr6, [0; 4]);
        assert_eq!((c.port as u16).to_ne_bytes(), 80u16.to_be_bytes());
    }
}
