//! The agent as the DaemonSet runs it: `deploy/daemonset.yaml` read as it is (so the manifest
//! is what is tested), its pod made over CRI on a [`RealNode`] with the manifest's host
//! network, init container, arguments, environment, security context, resources and host
//! paths, from the image `cargo xtask image` builds.
//!
//! The manifest's host paths are the node's; on this shared machine each maps to the run's own
//! equivalent ([`host_path`]): the cgroup tree to the run's cgroup subtree, bpffs to the run's
//! pin directory, the kubelet's pods directory and the handover socket's directory to the
//! run's.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_cri::v1 as cri;
use serde_json::Value;

use crate::realnode::RealNode;

/// The image name the manifest uses, and the reference the run imports it as.
pub const AGENT_IMAGE: &str = "localhost/eks-pod-identity-agent";
const AGENT_TAG: &str = "test";

/// `deploy/daemonset.yaml` as JSON (PyYAML from the test virtualenv reads the YAML).
pub fn manifest() -> Result<Value> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(repo.join("target/pyenv/bin/python"))
        .args([
            "-c",
            "import json,sys,yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
        ])
        .arg(repo.join("deploy/daemonset.yaml"))
        .output()
        .context("running the virtualenv python (cargo xtask setup)")?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The agent's pod on the real node.
#[derive(Debug, Clone)]
pub struct AgentPod {
    /// Pod UID.
    pub uid: String,
    /// Which of the run's agent pods this is (1: the first; a surge adds one).
    pub revision: usize,
    /// CRI sandbox id.
    pub sandbox_id: String,
    /// The running agent container.
    pub container_id: String,
    /// How the init container ended.
    pub init_exit_code: i32,
    /// Restarts so far.
    pub restarts: u32,
    config: cri::PodSandboxConfig,
    container: cri::ContainerConfig,
}

/// Where a manifest host path lives for this run.
pub fn host_path(node: &RealNode, path: &str) -> Result<PathBuf> {
    Ok(match path {
        "/sys/fs/cgroup" => node
            .cgroups()
            .pods_root()
            .parent()
            .context("pods cgroup has a parent")?
            .to_path_buf(),
        "/sys/fs/bpf" => {
            let dir = node.bpf_dir();
            std::fs::create_dir_all(&dir)?;
            dir
        }
        "/var/lib/kubelet/pods" => node.kubelet_root().join("pods"),
        // As the kubelet makes a DirectoryOrCreate path: 0755 (the agent narrows it).
        "/run/eks-pod-identity-agent" => {
            let dir = node.handover_socket();
            let dir = dir.parent().context("handover socket has a directory")?;
            std::fs::create_dir_all(dir)?;
            dir.to_path_buf()
        }
        other => bail!("the manifest mounts host path {other}, which this harness does not map"),
    })
}

/// `64Mi`, `1Gi`, `500M` → bytes.
fn quantity_bytes(q: &str) -> Result<i64> {
    let (digits, unit) = q.split_at(q.find(|c: char| !c.is_ascii_digit()).unwrap_or(q.len()));
    let n: i64 = digits.parse().with_context(|| format!("quantity {q}"))?;
    let mult = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        _ => bail!("quantity {q}: unknown unit {unit}"),
    };
    Ok(n * mult)
}

/// `25m`, `1` → CPU shares as the kubelet computes them (1 CPU = 1024, at least 2).
fn cpu_shares(q: &str) -> Result<i64> {
    let millis: i64 = match q.strip_suffix('m') {
        Some(m) => m.parse()?,
        None => q.parse::<i64>()? * 1000,
    };
    Ok((millis * 1024 / 1000).max(2))
}

/// A manifest container's securityContext as CRI's, with the pod's network mode.
fn security(c: &Value, network: i32) -> Result<cri::LinuxContainerSecurityContext> {
    let sc = &c["securityContext"];
    let list = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    let seccomp = match sc["seccompProfile"]["type"].as_str() {
        Some("RuntimeDefault") => Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
            localhost_ref: String::new(),
        }),
        None | Some("Unconfined") => None,
        Some(other) => bail!("seccompProfile {other} is not mapped"),
    };
    Ok(cri::LinuxContainerSecurityContext {
        capabilities: Some(cri::Capability {
            add_capabilities: list(&sc["capabilities"]["add"]),
            drop_capabilities: list(&sc["capabilities"]["drop"]),
            add_ambient_capabilities: Vec::new(),
        }),
        privileged: sc["privileged"].as_bool().unwrap_or(false),
        readonly_rootfs: sc["readOnlyRootFilesystem"].as_bool().unwrap_or(false),
        // The kubelet sets no_new_privs for allowPrivilegeEscalation: false.
        no_new_privs: sc["allowPrivilegeEscalation"].as_bool() == Some(false),
        seccomp,
        namespace_options: Some(cri::NamespaceOption {
            network,
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The image a manifest container runs: the one the run imported where the manifest names
/// the agent's image without a registry (kustomize's and the chart's defaults), else the
/// manifest's reference as it is (pulled from its registry).
fn image_ref(c: &Value) -> String {
    let named = c["image"].as_str().unwrap_or_default();
    let repository = named.rsplit_once(':').map_or(named, |(r, _)| r);
    if repository == "eks-pod-identity-agent" {
        format!("{AGENT_IMAGE}:{AGENT_TAG}")
    } else {
        named.to_owned()
    }
}

/// A manifest container as CRI's: image, command and arguments with `$(VAR)` expanded, environment (the
/// manifest's, then `env` overriding by name), resources, mounts and security context.
fn container_config(
    node: &RealNode,
    spec: &Value,
    c: &Value,
    env: &[(&str, &str)],
    attempt: u32,
) -> Result<cri::ContainerConfig> {
    let mut vars = crate::chart::container_env(c);
    for (k, v) in env {
        vars.retain(|(name, _)| name != k);
        vars.push(((*k).to_owned(), (*v).to_owned()));
    }
    // As the kubelet: `command` replaces the image's entrypoint, `args` its arguments.
    let expand = |key: &str| crate::chart::expand(c, key, &vars);
    let (command, args) = (expand("command"), expand("args"));
    let volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
    let mut mounts = Vec::new();
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let name = m["name"].as_str().unwrap_or_default();
        let volume = volumes
            .iter()
            .find(|v| v["name"] == name)
            .with_context(|| format!("volume {name} is not in the manifest"))?;
        let path = volume["hostPath"]["path"]
            .as_str()
            .with_context(|| format!("volume {name} is not a hostPath"))?;
        let propagation = match m["mountPropagation"].as_str() {
            Some("HostToContainer") => cri::MountPropagation::PropagationHostToContainer,
            Some("Bidirectional") => cri::MountPropagation::PropagationBidirectional,
            _ => cri::MountPropagation::PropagationPrivate,
        } as i32;
        mounts.push(cri::Mount {
            container_path: m["mountPath"].as_str().unwrap_or_default().to_owned(),
            host_path: host_path(node, path)?.display().to_string(),
            readonly: m["readOnly"].as_bool().unwrap_or(false),
            propagation,
            ..Default::default()
        });
    }
    let resources = &c["resources"];
    let linux_resources = cri::LinuxContainerResources {
        memory_limit_in_bytes: resources["limits"]["memory"]
            .as_str()
            .map(quantity_bytes)
            .transpose()?
            .unwrap_or(0),
        cpu_shares: resources["requests"]["cpu"]
            .as_str()
            .map(cpu_shares)
            .transpose()?
            .unwrap_or(2),
        ..Default::default()
    };
    let network = if spec["hostNetwork"].as_bool() == Some(true) {
        cri::NamespaceMode::Node
    } else {
        cri::NamespaceMode::Pod
    } as i32;
    let name = c["name"].as_str().unwrap_or("container").to_owned();
    Ok(cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata {
            name: name.clone(),
            attempt,
        }),
        image: Some(cri::ImageSpec {
            image: image_ref(c),
            ..Default::default()
        }),
        command,
        args,
        envs: vars
            .into_iter()
            .map(|(key, value)| cri::KeyValue { key, value })
            .collect(),
        mounts,
        log_path: format!("{name}-{attempt}.log"),
        linux: Some(cri::LinuxContainerConfig {
            resources: Some(linux_resources),
            security_context: Some(security(c, network)?),
        }),
        ..Default::default()
    })
}

impl RealNode {
    /// Builds the agent's image from `agent` and imports it.
    pub fn import_agent_image(&self, agent: &Path) -> Result<()> {
        let tar = crate::image::agent_image(agent, &self.scratch("agent-image"), AGENT_TAG)?;
        self.import_tar(&tar, AGENT_IMAGE)
    }

    /// Runs the DaemonSet's pod: its sandbox (host network, burstable QoS as its resources
    /// make it), the init container to completion, then the agent container. `env` overrides
    /// the manifest's environment (the cluster name, the sandbox's AWS settings).
    pub fn run_agent(&mut self, ds: &Value, env: &[(&str, &str)]) -> Result<AgentPod> {
        // A node the agent never ran on has no credential link: the init container makes it
        // (and refuses to route the addresses through another link).
        if ds["spec"]["template"]["spec"]["hostNetwork"].as_bool() == Some(true) {
            self.node()
                .ip(&["link", "del", crate::sandbox::CREDENTIAL_LINK])?;
        }
        self.start_agent_pod(ds, env, 1)
    }

    /// What a DaemonSet surge does on a node: the new revision's pod (init container, then
    /// the agent) starts while `old` still runs.
    pub fn surge_agent(
        &self,
        ds: &Value,
        env: &[(&str, &str)],
        old: &AgentPod,
    ) -> Result<AgentPod> {
        let pod = self.start_agent_pod(ds, env, old.revision + 1)?;
        anyhow::ensure!(pod.uid != old.uid);
        Ok(pod)
    }

    /// What the kubelet does to a deleted pod: SIGTERM its container (grace `grace_secs`),
    /// then removes it and its sandbox. The container's exit code.
    pub fn delete_agent(&self, pod: AgentPod, grace_secs: i64) -> Result<i32> {
        self.stop_container(&pod.container_id, grace_secs)?;
        let code = self.wait_exited(&pod.container_id, Duration::from_secs(5))?;
        self.remove_container_only(&pod.container_id)?;
        self.remove_sandbox(&pod.sandbox_id)?;
        Ok(code)
    }

    fn start_agent_pod(
        &self,
        ds: &Value,
        env: &[(&str, &str)],
        revision: usize,
    ) -> Result<AgentPod> {
        crate::teardown::check_not_stopping()?;
        let spec = &ds["spec"]["template"]["spec"];
        let host_network = spec["hostNetwork"].as_bool() == Some(true);
        // HostToContainer needs the source on a shared mount, as the kubelet's is on a node.
        std::fs::create_dir_all(self.kubelet_root().join("pods"))?;
        self.make_shared(&self.kubelet_root())?;
        let uid = crate::sandbox::uuid_like(&format!("{}-agent", self.name()), revision);
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: format!("eks-pod-identity-agent-{revision}"),
                uid: uid.clone(),
                namespace: ds["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("kube-system")
                    .into(),
                attempt: 0,
            }),
            log_directory: self.scratch("logs").join(&uid).display().to_string(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: self.pod_cgroup_parent("burstable", &uid),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: if host_network {
                            cri::NamespaceMode::Node
                        } else {
                            cri::NamespaceMode::Pod
                        } as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        // As the kubelet: an image the node does not have is pulled first (CRI PullImage).
        let local = format!("{AGENT_IMAGE}:{AGENT_TAG}");
        let mut pulled: Vec<String> = Vec::new();
        for c in ["initContainers", "containers"]
            .iter()
            .flat_map(|l| spec[*l].as_array().cloned().unwrap_or_default())
        {
            let image = image_ref(&c);
            if image != local && !pulled.contains(&image) {
                self.pull_image(&image)?;
                pulled.push(image);
            }
        }
        let sandbox_id = self.run_sandbox(config.clone())?;
        let mut init_exit_code = 0;
        for init in spec["initContainers"].as_array().into_iter().flatten() {
            let c = container_config(self, spec, init, env, 0)?;
            let id = self.create_and_start(&sandbox_id, &config, c)?;
            init_exit_code = self.wait_exited(&id, Duration::from_secs(20))?;
            anyhow::ensure!(
                init_exit_code == 0,
                "init container {} exited {init_exit_code}: {}",
                init["name"],
                self.pod_logs(&uid)
            );
        }
        let main = spec["containers"]
            .get(0)
            .context("the manifest has no container")?;
        let container = container_config(self, spec, main, env, 0)?;
        let container_id = self.create_and_start(&sandbox_id, &config, container.clone())?;
        Ok(AgentPod {
            uid,
            revision,
            sandbox_id,
            container_id,
            init_exit_code,
            restarts: 0,
            config,
            container,
        })
    }

    /// What the kubelet does when the agent container dies: a new container (attempt + 1) in
    /// the same pod. `kill` stops the old one with SIGKILL first (else SIGTERM, 30 s grace).
    pub fn restart_agent(&mut self, pod: &mut AgentPod, kill: bool) -> Result<()> {
        self.stop_container(&pod.container_id, if kill { 0 } else { 30 })?;
        self.remove_container_only(&pod.container_id)?;
        pod.restarts += 1;
        let mut container = pod.container.clone();
        if let Some(m) = container.metadata.as_mut() {
            m.attempt = pod.restarts;
        }
        container.log_path = format!("agent-{}.log", pod.restarts);
        pod.container_id = self.create_and_start(&pod.sandbox_id, &pod.config, container)?;
        Ok(())
    }

    /// Waits until container `id` has exited; its exit code.
    pub fn wait_exited(&self, id: &str, limit: Duration) -> Result<i32> {
        let deadline = Instant::now() + limit;
        loop {
            let status = self.container_status(id)?;
            if status.state == cri::ContainerState::ContainerExited as i32 {
                return Ok(status.exit_code);
            }
            anyhow::ensure!(Instant::now() < deadline, "container {id} still running");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The host pid of container `id`'s first process.
    pub fn container_pid(&self, id: &str) -> Result<u32> {
        let (mut cri, rt) = self.client();
        let info = rt
            .block_on(cri.container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: true,
            }))?
            .into_inner()
            .info;
        let v: Value = serde_json::from_str(info.get("info").context("no verbose info")?)?;
        v["pid"]
            .as_u64()
            .map(|p| p as u32)
            .context("no pid in the container's info")
    }

    /// What the containers of pod `uid` wrote (their CRI logs).
    pub fn pod_logs(&self, uid: &str) -> String {
        std::fs::read_dir(self.scratch("logs").join(uid))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .collect::<Vec<_>>()
            .join("\n")
    }
}
