//! The node sandbox: a node network namespace holding the credential addresses, pod
//! namespaces joined to it by veth pairs, a kubelet-shaped cgroup tree, and per-pod token
//! files. Everything is removed on drop, in reverse order of creation.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use crate::cgroups::{CgroupTree, Driver};
use crate::issuer::{Issuer, TokenSubject};
use crate::names;
use crate::netns::{command_in, NetNs};

/// The IPv4 credential address.
pub const CRED_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 23);
/// The IPv6 credential address.
pub const CRED_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23);
/// The node's link holding the credential addresses (the agent's init container makes its
/// own, `pod-id-link0`, on a real node).
pub const CREDENTIAL_LINK: &str = "cred0";
/// The token file's name (in the pod, and in the kubelet's projected volume on the node).
pub const TOKEN_FILE_NAME: &str = "eks-pod-identity-token";
/// The projected volume the EKS webhook adds to pods.
pub const TOKEN_VOLUME: &str = "eks-pod-identity-token";

/// A pod of the sandbox.
#[derive(Debug)]
pub struct Pod {
    /// Pod name.
    pub name: String,
    /// Pod UID.
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// Its network namespace; `None` for a hostNetwork pod (it uses the node's).
    pub netns: Option<NetNs>,
    /// IPv4 address on its eth0 (the node's address for hostNetwork).
    pub ipv4: Ipv4Addr,
    /// IPv6 address on its eth0.
    pub ipv6: Ipv6Addr,
    /// cgroup directory of each container.
    pub containers: Vec<PathBuf>,
    /// The pod's projected token file, where the kubelet keeps it on the node:
    /// `<kubelet-root>/pods/<uid>/volumes/kubernetes.io~projected/<volume>/<file>`.
    pub token_file: PathBuf,
}

impl Pod {
    /// Who this pod's tokens name.
    pub fn subject(&self) -> TokenSubject {
        TokenSubject::new(
            &self.namespace,
            &self.service_account,
            &self.name,
            &self.uid,
        )
    }
}

/// How to make a pod.
#[derive(Debug, Clone)]
pub struct PodSpec {
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// Number of containers (each its own cgroup).
    pub containers: usize,
    /// Share the node's network namespace.
    pub host_network: bool,
}

impl PodSpec {
    /// One container, own network namespace.
    pub fn new(namespace: &str, service_account: &str) -> Self {
        Self {
            namespace: namespace.into(),
            service_account: service_account.into(),
            containers: 1,
            host_network: false,
        }
    }
}

/// A node with its pods.
#[derive(Debug)]
pub struct Sandbox {
    name: String,
    // Field order is drop order: pods (their netns) before the node, cgroups last.
    pods: Vec<Pod>,
    node: NetNs,
    cgroups: CgroupTree,
    dir: PathBuf,
    issuer: Issuer,
}

impl Sandbox {
    /// A node namespace with the credential addresses on a link inside it (a veth end: these
    /// kernels have no dummy driver), and an empty kubelet-shaped cgroup tree.
    pub fn new(driver: Driver) -> Result<Self> {
        crate::teardown::on_signal_remove_run();
        crate::teardown::check_not_stopping()?;
        let name = names::unique();
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir)?;
        let cgroups = CgroupTree::create(&name, driver)?;
        let node = NetNs::create(&format!("{name}-node"))?;
        node.ip(&[
            "link",
            "add",
            CREDENTIAL_LINK,
            "type",
            "veth",
            "peer",
            "name",
            "cred0p",
        ])?;
        node.ip(&["addr", "add", &format!("{CRED_V4}/32"), "dev", "cred0"])?;
        node.ip(&[
            "addr",
            "add",
            &format!("{CRED_V6}/128"),
            "dev",
            "cred0",
            "nodad",
        ])?;
        node.ip(&["link", "set", "cred0p", "up"])?;
        node.ip(&["link", "set", "cred0", "up"])?;
        Ok(Self {
            name,
            pods: Vec::new(),
            node,
            cgroups,
            dir,
            issuer: Issuer::new()?,
        })
    }

    /// This sandbox's unique name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node network namespace.
    pub fn node(&self) -> &NetNs {
        &self.node
    }

    /// The cgroup tree.
    pub fn cgroups(&self) -> &CgroupTree {
        &self.cgroups
    }

    /// The token issuer.
    pub fn issuer(&self) -> &Issuer {
        &self.issuer
    }

    /// The bpffs directory the sandbox's agents pin into (removed with the sandbox).
    pub fn bpf_dir(&self) -> PathBuf {
        PathBuf::from("/sys/fs/bpf").join(&self.name)
    }

    /// The handover socket the sandbox's agents pass their listeners and cache through (in
    /// a directory of the sandbox's own: each sandbox is a node).
    pub fn handover_socket(&self) -> PathBuf {
        self.dir.join("run/eks-pod-identity-agent/handover.sock")
    }

    /// The sandbox's kubelet root directory (`--prewarm` reads pods' tokens below it).
    pub fn kubelet_root(&self) -> PathBuf {
        self.dir.join("kubelet")
    }

    /// A scratch directory removed with the sandbox.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pods, in creation order.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Adds a pod: network namespace and veth (unless hostNetwork), container cgroups, and a
    /// token file with a fresh token. Returns its index.
    pub fn add_pod(&mut self, spec: PodSpec) -> Result<usize> {
        let n = self.pods.len() + 1;
        let uid = uuid_like(&self.name, n);
        let name = format!("pod{n}");
        let (netns, ipv4, ipv6) = if spec.host_network {
            (None, CRED_V4, CRED_V6)
        } else {
            let ns = NetNs::create(&format!("{}-{name}", self.name))?;
            let host_if = format!("vp{n}");
            let (v4_node, v4_pod) = (format!("10.200.{n}.1"), format!("10.200.{n}.2"));
            let (v6_node, v6_pod) = (format!("fd99:{n:x}::1"), format!("fd99:{n:x}::2"));
            self.node.ip(&[
                "link",
                "add",
                &host_if,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns.name(),
            ])?;
            self.node
                .ip(&["addr", "add", &format!("{v4_node}/24"), "dev", &host_if])?;
            self.node.ip(&[
                "addr",
                "add",
                &format!("{v6_node}/64"),
                "dev",
                &host_if,
                "nodad",
            ])?;
            self.node.ip(&["link", "set", &host_if, "up"])?;
            ns.ip(&["addr", "add", &format!("{v4_pod}/24"), "dev", "eth0"])?;
            ns.ip(&[
                "addr",
                "add",
                &format!("{v6_pod}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
            ns.ip(&["route", "add", "default", "via", &v4_node])?;
            ns.ip(&["-6", "route", "add", "default", "via", &v6_node])?;
            (Some(ns), v4_pod.parse()?, v6_pod.parse()?)
        };
        let containers = (0..spec.containers.max(1))
            .map(|c| {
                self.cgroups
                    .container(&uid, &format!("{:012x}{c:04x}", n * 7919))
            })
            .collect::<Result<Vec<_>>>()?;
        let token_dir = self
            .kubelet_root()
            .join("pods")
            .join(&uid)
            .join("volumes/kubernetes.io~projected")
            .join(TOKEN_VOLUME);
        std::fs::create_dir_all(&token_dir)?;
        let pod = Pod {
            name,
            uid,
            namespace: spec.namespace,
            service_account: spec.service_account,
            netns,
            ipv4,
            ipv6,
            containers,
            token_file: token_dir.join(TOKEN_FILE_NAME),
        };
        self.pods.push(pod);
        let i = self.pods.len() - 1;
        self.rotate_token(i, Duration::from_secs(24 * 3600))?;
        Ok(i)
    }

    /// Writes a fresh token into pod `i`'s token file (as kubelet does at rotation).
    pub fn rotate_token(&self, i: usize, lifetime: Duration) -> Result<String> {
        let pod = &self.pods[i];
        let token = self.issuer.mint(&pod.subject(), lifetime);
        // kubelet writes the JWT without a trailing newline.
        std::fs::write(&pod.token_file, &token)?;
        Ok(token)
    }

    /// A command that runs inside container `c` of pod `i`: joins the container's cgroup,
    /// then the pod's network namespace, before exec.
    pub fn pod_command(
        &self,
        i: usize,
        c: usize,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Result<Command> {
        let pod = &self.pods[i];
        let ns = match &pod.netns {
            Some(ns) => ns.open()?,
            None => self.node.open()?,
        };
        command_in(program, ns, Some(&pod.containers[c]))
    }

    /// A command in pod `i`'s network namespace but in another cgroup (e.g. one outside the
    /// pods cgroup, where no program is attached).
    pub fn pod_netns_command(
        &self,
        i: usize,
        cgroup: &Path,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Result<Command> {
        let ns = match &self.pods[i].netns {
            Some(ns) => ns.open()?,
            None => self.node.open()?,
        };
        command_in(program, ns, Some(cgroup))
    }

    /// A command in the node namespace, in the cgroup named (or the caller's).
    pub fn node_command(
        &self,
        program: impl AsRef<std::ffi::OsStr>,
        cgroup: Option<&Path>,
    ) -> Result<Command> {
        command_in(program, self.node.open()?, cgroup)
    }
}

/// A deterministic, UID-shaped pod id unique to this sandbox.
pub(crate) fn uuid_like(seed: &str, n: usize) -> String {
    let h = seed.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (h >> 32) as u32,
        (h >> 16) as u16,
        n & 0xfff,
        (h & 0xfff) as u16,
        (h.rotate_left(17) ^ n as u64) & 0xffff_ffff_ffff
    )
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Processes first (they hold cgroups busy), then pins (they keep programs attached),
        // then namespaces, then files.
        crate::cgroups::remove_tree(self.cgroups.pods_root());
        // A real runtime also made the pods' cgroups in every v1 hierarchy.
        for v1 in crate::cgroups::v1_mounts() {
            crate::cgroups::remove_tree(&v1.join(&self.name));
        }
        let _ = std::fs::remove_dir_all(self.bpf_dir());
        self.pods.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
