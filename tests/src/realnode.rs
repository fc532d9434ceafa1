//! A real node: a private containerd (its CRI plugin, runc and the CNI bridge) running inside
//! the sandbox's node network namespace, making pods over CRI the way the kubelet does.
//!
//! Everything it makes is the run's: containerd's root, state and socket live in the
//! sandbox's scratch directory (never the machine's default socket); pod cgroups sit under
//! the sandbox's own `kubepods` (cgroupfs driver); the CNI bridge and every pod interface live
//! in the node namespace. Images are built here from what Debian ships and imported: nothing
//! is pulled.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
pub use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::issuer::TokenSubject;
use crate::sandbox::{Sandbox, TOKEN_FILE_NAME, TOKEN_VOLUME};

/// The pause image, built from busybox-static and imported into every run's containerd.
pub const PAUSE_IMAGE: &str = "localhost/pia-pause:1";
/// Where the webhook mounts the token in a pod's containers.
pub const TOKEN_MOUNT: &str = "/var/run/secrets/pods.eks.amazonaws.com/serviceaccount";
/// The programs a real node needs, and the Debian package that ships each.
const TOOLS: [(&str, &str); 6] = [
    ("/usr/bin/containerd", "containerd"),
    ("/usr/bin/ctr", "containerd"),
    ("/usr/sbin/runc", "runc"),
    ("/usr/lib/cni/bridge", "containernetworking-plugins"),
    ("/bin/busybox", "busybox-static"),
    ("/usr/bin/umoci", "umoci"),
];
/// Host directories bind-mounted read-only into app containers: their programs are the
/// host's (curl, python, the harness's clients), their image only the pause skeleton.
const HOST_DIRS: [&str; 6] = ["/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc/ssl"];
/// How long containerd gets to open its socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a real node could not be made: the runtime is missing or would not start.
#[derive(Debug, thiserror::Error)]
#[error("real node unavailable: {0}")]
pub struct Unavailable(pub String);

/// Why the runtime did not start, and the sandbox back (to go on without it).
pub type NotStarted = Box<(anyhow::Error, Sandbox)>;

/// A pod made over CRI.
#[derive(Debug, Clone)]
pub struct CriPod {
    /// Pod name.
    pub name: String,
    /// Pod UID.
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// The CRI sandbox id.
    pub sandbox_id: String,
    /// Container ids, one per container.
    pub containers: Vec<String>,
    /// The token on the node, in the kubelet's layout.
    pub token_file: PathBuf,
    /// Shares the node's network namespace.
    pub host_network: bool,
    config: cri::PodSandboxConfig,
}

impl CriPod {
    /// Who the pod's token names.
    pub fn subject(&self) -> TokenSubject {
        TokenSubject::new(
            &self.namespace,
            &self.service_account,
            &self.name,
            &self.uid,
        )
    }
}

/// What a command run in a container printed.
#[derive(Debug)]
pub struct Exec {
    /// Exit code.
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// The private containerd and the pods it made, on the sandbox it owns (and drops last).
/// Derefs to that [`Sandbox`], so the agent, the fake EKS Auth and the leak check use it as
/// they use any sandbox.
pub struct RealNode {
    rt: tokio::runtime::Runtime,
    cri: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    containerd: Option<Child>,
    dir: PathBuf,
    socket: PathBuf,
    /// cgroup parent of the run's pods, relative to the cgroup root (`/<run>/kubepods`).
    pods_parent: String,
    pods_root: PathBuf,
    pods: Vec<CriPod>,
    /// The seccomp profile of the app containers made from now on (`None`: the runtime's
    /// default for CRI, Unconfined, as Kubernetes' default is).
    pub app_seccomp: Option<cri::SecurityProfile>,
    // Last: dropped after the runtime has been torn down in `drop`.
    sb: Option<Sandbox>,
}

/// What `prepare` made for `launch`.
struct Parts {
    rt: tokio::runtime::Runtime,
    cri: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
    pods_parent: String,
    pods_root: PathBuf,
}

impl std::ops::Deref for RealNode {
    type Target = Sandbox;

    fn deref(&self) -> &Sandbox {
        self.sb.as_ref().expect("present until dropped")
    }
}

impl std::fmt::Debug for RealNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealNode")
            .field("dir", &self.dir)
            .field("pods", &self.pods.len())
            .finish()
    }
}

/// The first missing program, with the package that ships it.
pub fn missing_tools() -> Option<String> {
    TOOLS
        .iter()
        .find(|(path, _)| !Path::new(path).exists())
        .map(|(path, pkg)| {
            format!("{path} is missing (Debian package {pkg}; `cargo xtask setup` installs it)")
        })
}

impl RealNode {
    /// Starts a private containerd in `sb`'s node namespace and imports the pause image.
    /// A missing or failing runtime is an [`Unavailable`] error that says why, never a hang;
    /// the sandbox comes back with it, so a caller can go on without the runtime.
    pub fn start(sb: Sandbox) -> Result<Self, NotStarted> {
        Self::start_with(sb, Path::new("/usr/bin/containerd"), START_TIMEOUT)
    }

    /// [`RealNode::start`] with another containerd binary, given `timeout` to answer CRI.
    pub fn start_with(
        sb: Sandbox,
        containerd: &Path,
        timeout: Duration,
    ) -> Result<Self, NotStarted> {
        match Self::prepare(&sb, containerd) {
            Ok(parts) => Self::launch(sb, parts, timeout),
            Err(e) => {
                // Whatever was started is the run's: its sweep removes it.
                crate::teardown::remove_runtime_leftovers(&sb.dir().join("containerd"));
                Err(Box::new((e, sb)))
            }
        }
    }

    /// Writes the configuration, starts containerd and computes where pods go.
    fn prepare(sb: &Sandbox, containerd: &Path) -> Result<Parts> {
        crate::teardown::check_not_stopping()?;
        if let Some(why) = missing_tools() {
            return Err(Unavailable(why).into());
        }
        if !containerd.is_file() {
            return Err(Unavailable(format!("{} is missing", containerd.display())).into());
        }
        let dir = sb.dir().join("containerd");
        for sub in ["cni", "logs", "ipam", "images"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let socket = dir.join("containerd.sock");
        std::fs::write(dir.join("config.toml"), config_toml(&dir))?;
        std::fs::write(
            dir.join("cni/10-pods.conflist"),
            cni_conflist(sb.name(), &dir),
        )?;
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        let runtime_cgroup = sb.cgroups().outside_pods("runtime")?;
        let child = sb
            .node_command(containerd, Some(&runtime_cgroup))?
            .arg("--config")
            .arg(dir.join("config.toml"))
            .args(["--log-level", "debug"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting containerd")?;
        let pods_root = sb.cgroups().pods_root().to_path_buf();
        let mount = crate::cgroups::cgroup2_mount()?;
        let pods_parent = format!(
            "/{}",
            pods_root
                .strip_prefix(&mount)
                .context("pods cgroup outside the cgroup2 mount")?
                .display()
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (cri, images) = rt.block_on(connect(&socket))?;
        Ok(Parts {
            rt,
            cri,
            images,
            child,
            dir,
            socket,
            pods_parent,
            pods_root,
        })
    }

    fn launch(sb: Sandbox, parts: Parts, timeout: Duration) -> Result<Self, NotStarted> {
        let mut node = Self {
            rt: parts.rt,
            cri: parts.cri,
            images: parts.images,
            containerd: Some(parts.child),
            dir: parts.dir,
            socket: parts.socket,
            pods_parent: parts.pods_parent,
            pods_root: parts.pods_root,
            pods: Vec::new(),
            app_seccomp: None,
            sb: Some(sb),
        };
        let ready = node.wait_ready(timeout).and_then(|()| {
            node.import(
                &pause_rootfs,
                &[
                    "--config.entrypoint",
                    "/bin/sleep",
                    "--config.cmd",
                    "infinity",
                ],
                PAUSE_IMAGE,
            )
        });
        match ready {
            Ok(()) => Ok(node),
            Err(e) => Err(Box::new((e, node.into_sandbox()))),
        }
    }

    /// Stops the runtime (removing everything it made) and hands back the sandbox.
    pub fn into_sandbox(mut self) -> Sandbox {
        self.teardown();
        self.sb.take().expect("present until dropped")
    }

    /// Waits until containerd answers CRI `Version`, or says why it did not.
    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self
                .containerd
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(Unavailable(format!(
                    "containerd exited ({status}) at start: {}",
                    self.log_tail()
                ))
                .into());
            }
            if self.socket.exists() {
                let mut cri = self.cri.clone();
                let version = self.rt.block_on(async {
                    tokio::time::timeout(
                        Duration::from_secs(2),
                        cri.version(cri::VersionRequest::default()),
                    )
                    .await
                });
                if let Ok(Ok(v)) = version {
                    let v = v.into_inner();
                    eprintln!(
                        "realnode: containerd ready: {} {} (CRI {})",
                        v.runtime_name, v.runtime_version, v.runtime_api_version
                    );
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(Unavailable(format!(
                    "containerd did not answer CRI within {timeout:?}: {}",
                    self.log_tail()
                ))
                .into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("level=error") || l.contains("level=fatal") || l.contains("runc")
            })
            .collect();
        lines[lines.len().saturating_sub(8)..].join(" | ")
    }

    /// The containerd socket of this run.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Builds an OCI image whose root file system `fill` writes (`config`: `umoci config`
    /// arguments), and imports it as `reference` (`name:tag`), unpacked for the CRI plugin.
    pub fn import(
        &self,
        fill: &dyn Fn(&Path) -> Result<()>,
        config: &[&str],
        reference: &str,
    ) -> Result<()> {
        let (name, tag) = reference
            .rsplit_once(':')
            .context("image reference without a tag")?;
        let work = self.dir.join("images").join(tag);
        let tar = crate::image::build(&work, tag, fill, config)?;
        self.import_tar(&tar, name)
    }

    /// Lets the runtime pull from `host` (`addr:port`) over plain HTTP, as a node's
    /// `certs.d/<host>/hosts.toml` does for a registry without TLS.
    pub fn trust_plain_http(&self, host: &str) -> Result<()> {
        let dir = self.dir.join("certs.d").join(host);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("hosts.toml"),
            format!(
                "server = \"http://{host}\"\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )?;
        Ok(())
    }

    /// Pulls `reference` through CRI's image service, as the kubelet does before it creates
    /// a container; the image's id.
    pub fn pull_image(&self, reference: &str) -> Result<String> {
        let mut images = self.images.clone();
        let reply = self.rt.block_on(async {
            images
                .pull_image(cri::PullImageRequest {
                    image: Some(cri::ImageSpec {
                        image: reference.to_owned(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .await
        });
        let reply = reply.with_context(|| format!("CRI PullImage {reference}"))?;
        Ok(reply.into_inner().image_ref)
    }

    /// Imports an OCI archive whose manifests are tagged under `base_name`.
    pub fn import_tar(&self, tar: &Path, base_name: &str) -> Result<()> {
        let out = Command::new("/usr/bin/ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(["-n", "k8s.io", "images", "import", "--base-name", base_name])
            .args(["--snapshotter", "native"])
            .arg(tar)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "ctr images import {} ({}): {}{}",
            tar.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// The pods made so far.
    pub fn pods(&self) -> &[CriPod] {
        &self.pods
    }

    /// Runs a pod as the kubelet does: its sandbox (pause) under the best-effort QoS cgroup,
    /// its token written in the kubelet's layout, then `containers` app containers with the
    /// webhook's environment and token mount, each sleeping until told otherwise.
    pub fn run_pod(
        &mut self,
        namespace: &str,
        service_account: &str,
        containers: usize,
        host_network: bool,
    ) -> Result<usize> {
        crate::teardown::check_not_stopping()?;
        let sb = self.sb.as_ref().expect("present until dropped");
        let n = self.pods.len() + 1;
        let uid = crate::sandbox::uuid_like(&format!("{}-cri", sb.name()), n);
        let name = format!("cri-pod{n}");
        let token_dir = sb
            .kubelet_root()
            .join("pods")
            .join(&uid)
            .join("volumes/kubernetes.io~projected")
            .join(TOKEN_VOLUME);
        std::fs::create_dir_all(&token_dir)?;
        let network = if host_network {
            cri::NamespaceMode::Node
        } else {
            cri::NamespaceMode::Pod
        } as i32;
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.clone(),
                uid: uid.clone(),
                namespace: namespace.into(),
                attempt: 0,
            }),
            // A hostNetwork pod has the node's name (and no UTS namespace of its own).
            hostname: if host_network {
                String::new()
            } else {
                name.clone()
            },
            log_directory: self.dir.join("logs").join(&uid).display().to_string(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: self.pod_cgroup_parent("besteffort", &uid),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut pod = CriPod {
            name,
            uid,
            namespace: namespace.into(),
            service_account: service_account.into(),
            sandbox_id: String::new(),
            containers: Vec::new(),
            token_file: token_dir.join(TOKEN_FILE_NAME),
            host_network,
            config: config.clone(),
        };
        std::fs::write(
            &pod.token_file,
            sb.issuer()
                .mint(&pod.subject(), Duration::from_secs(24 * 3600)),
        )?;
        pod.sandbox_id = self.run_sandbox(config)?;
        self.pods.push(pod);
        let i = self.pods.len() - 1;
        for c in 0..containers.max(1) {
            let id = self.start_app_container(i, c, 0)?;
            self.pods[i].containers.push(id);
        }
        Ok(i)
    }

    /// Creates and starts app container `c` of pod `i` (`attempt` counts restarts).
    fn start_app_container(&self, i: usize, c: usize, attempt: u32) -> Result<String> {
        let pod = &self.pods[i];
        let mut mounts: Vec<cri::Mount> = host_dirs()
            .into_iter()
            .map(|dir| cri::Mount {
                container_path: dir.display().to_string(),
                host_path: dir.display().to_string(),
                readonly: true,
                ..Default::default()
            })
            .collect();
        mounts.push(cri::Mount {
            container_path: format!("{TOKEN_MOUNT}/{TOKEN_FILE_NAME}"),
            host_path: pod.token_file.display().to_string(),
            readonly: true,
            ..Default::default()
        });
        let envs = [
            (
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                "http://169.254.170.23/v1/credentials".to_owned(),
            ),
            (
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                format!("{TOKEN_MOUNT}/{TOKEN_FILE_NAME}"),
            ),
            ("AWS_REGION", crate::fake_eks::REGION.to_owned()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
            ("PATH", "/usr/local/bin:/usr/bin:/bin".to_owned()),
        ]
        .map(|(key, value)| cri::KeyValue {
            key: key.into(),
            value,
        });
        let network = pod
            .config
            .linux
            .as_ref()
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.clone());
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: format!("app{c}"),
                attempt,
            }),
            image: Some(cri::ImageSpec {
                image: PAUSE_IMAGE.into(),
                ..Default::default()
            }),
            command: vec!["/bin/sleep".into(), "infinity".into()],
            envs: envs.into(),
            mounts,
            log_path: format!("app{c}-{attempt}.log"),
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: network,
                    seccomp: self.app_seccomp.clone(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.create_and_start(&pod.sandbox_id, &pod.config, config)
    }

    /// CreateContainer + StartContainer in sandbox `sandbox_id`; returns the container id.
    pub fn create_and_start(
        &self,
        sandbox_id: &str,
        sandbox_config: &cri::PodSandboxConfig,
        config: cri::ContainerConfig,
    ) -> Result<String> {
        let mut cri = self.cri.clone();
        self.rt.block_on(async {
            let id = cri
                .create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: sandbox_id.into(),
                    config: Some(config),
                    sandbox_config: Some(sandbox_config.clone()),
                })
                .await
                .context("CreateContainer")?
                .into_inner()
                .container_id;
            cri.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .context("StartContainer")?;
            Ok(id)
        })
    }

    /// Runs `cmd` inside container `c` of pod `i` (CRI `ExecSync`: the container's cgroup
    /// and namespaces), waiting at most `timeout`.
    pub fn exec(&self, i: usize, c: usize, cmd: &[&str], timeout: Duration) -> Result<Exec> {
        self.exec_in(&self.pods[i].containers[c], cmd, timeout)
    }

    /// Runs `cmd` inside container `id`.
    pub fn exec_in(&self, id: &str, cmd: &[&str], timeout: Duration) -> Result<Exec> {
        let mut cri = self.cri.clone();
        let out = self
            .rt
            .block_on(cri.exec_sync(cri::ExecSyncRequest {
                container_id: id.into(),
                cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
                timeout: timeout.as_secs().max(1) as i64,
            }))
            .with_context(|| format!("ExecSync {cmd:?}"))?
            .into_inner();
        Ok(Exec {
            code: out.exit_code,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// The cgroup v2 directory of container `c` of pod `i`.
    pub fn container_cgroup(&self, i: usize, c: usize) -> PathBuf {
        let pod = &self.pods[i];
        self.pods_root
            .join("besteffort")
            .join(format!("pod{}", pod.uid))
            .join(&pod.containers[c])
    }

    /// Stops and removes container `c` of pod `i`, and starts its replacement (a new
    /// container and cgroup in the same pod), as the kubelet does after a crash.
    pub fn restart_container(&mut self, i: usize, c: usize) -> Result<()> {
        let old = self.pods[i].containers[c].clone();
        self.remove_container(&old)?;
        let attempt = 1 + self.pods[i].containers.len() as u32;
        let id = self.start_app_container(i, c, attempt)?;
        self.pods[i].containers[c] = id;
        Ok(())
    }

    /// StopContainer (no grace) + RemoveContainer.
    pub fn remove_container(&self, id: &str) -> Result<()> {
        self.stop_container(id, 0)?;
        self.remove_container_only(id)
    }

    /// StopContainer: SIGTERM, then SIGKILL after `grace_secs` (0: SIGKILL at once).
    pub fn stop_container(&self, id: &str, grace_secs: i64) -> Result<()> {
        let mut cri = self.cri.clone();
        self.rt
            .block_on(cri.stop_container(cri::StopContainerRequest {
                container_id: id.into(),
                timeout: grace_secs,
            }))
            .context("StopContainer")?;
        Ok(())
    }

    /// RemoveContainer of a stopped container.
    pub fn remove_container_only(&self, id: &str) -> Result<()> {
        let mut cri = self.cri.clone();
        self.rt
            .block_on(cri.remove_container(cri::RemoveContainerRequest {
                container_id: id.into(),
            }))
            .context("RemoveContainer")?;
        Ok(())
    }

    /// ContainerStatus of container `id`.
    pub fn container_status(&self, id: &str) -> Result<cri::ContainerStatus> {
        let mut cri = self.cri.clone();
        self.rt
            .block_on(cri.container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            }))
            .context("ContainerStatus")?
            .into_inner()
            .status
            .context("no status")
    }

    /// RunPodSandbox; returns the sandbox id.
    pub fn run_sandbox(&self, config: cri::PodSandboxConfig) -> Result<String> {
        let mut cri = self.cri.clone();
        Ok(self
            .rt
            .block_on(cri.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            }))
            .with_context(|| format!("RunPodSandbox (containerd: {})", self.log_tail()))?
            .into_inner()
            .pod_sandbox_id)
    }

    /// The kubelet's cgroup parent (cgroupfs driver) for a pod of QoS class `qos`.
    pub fn pod_cgroup_parent(&self, qos: &str, uid: &str) -> String {
        format!("{}/{qos}/pod{uid}", self.pods_parent)
    }

    /// A directory of this run's runtime scratch space.
    pub fn scratch(&self, sub: &str) -> PathBuf {
        let dir = self.dir.join(sub);
        let _ = std::fs::create_dir_all(&dir);
        dir
    }

    /// Makes `dir` a shared mount (a bind onto itself), as the kubelet's directory is on a
    /// node, so containers can mount it with HostToContainer propagation. Unmounted with the
    /// run's scratch directory.
    pub fn make_shared(&self, dir: &Path) -> Result<()> {
        let is_mount = procfs::process::Process::myself()?
            .mountinfo()?
            .0
            .iter()
            .any(|m| m.mount_point == dir);
        if !is_mount {
            run(Command::new("mount").arg("--bind").arg(dir).arg(dir))?;
        }
        run(Command::new("mount").arg("--make-rshared").arg(dir))
    }

    /// Deletes pod `i` as the kubelet does: its sandbox and containers, then its volumes.
    pub fn remove_pod(&mut self, i: usize) -> Result<()> {
        let pod = self.pods[i].clone();
        self.remove_sandbox(&pod.sandbox_id)?;
        self.pods[i].containers.clear();
        // The kubelet, not the runtime, removes a deleted pod's cgroup (its pod container
        // manager): runc removes only the containers' cgroups below it.
        let pod_cgroup = self
            .pods_root
            .join("besteffort")
            .join(format!("pod{}", pod.uid));
        if pod_cgroup.exists() {
            std::fs::remove_dir(&pod_cgroup)
                .with_context(|| format!("removing {}", pod_cgroup.display()))?;
        }
        if let Some(pod_dir) = pod.token_file.ancestors().nth(4) {
            let _ = std::fs::remove_dir_all(pod_dir);
        }
        Ok(())
    }

    /// StopPodSandbox + RemovePodSandbox (its containers go with it).
    pub fn remove_sandbox(&self, id: &str) -> Result<()> {
        let mut cri = self.cri.clone();
        self.rt.block_on(async {
            cri.stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await
            .context("StopPodSandbox")?;
            cri.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await
            .context("RemovePodSandbox")?;
            Ok(())
        })
    }

    /// Every sandbox containerd knows (ready or not).
    pub fn sandboxes(&self) -> Result<Vec<cri::PodSandbox>> {
        let mut cri = self.cri.clone();
        Ok(self
            .rt
            .block_on(cri.list_pod_sandbox(cri::ListPodSandboxRequest::default()))?
            .into_inner()
            .items)
    }

    /// The runtime client, for what this module does not wrap.
    pub fn client(&self) -> (RuntimeServiceClient<Channel>, &tokio::runtime::Runtime) {
        (self.cri.clone(), &self.rt)
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        self.teardown();
    }
}

impl RealNode {
    /// Removes every sandbox through CRI, stops containerd, and sweeps what its shims left.
    fn teardown(&mut self) {
        if self.containerd.is_none() {
            return;
        }
        // Sandboxes through CRI first, so containerd unmounts and deletes what it made.
        if let Ok(sandboxes) = self.sandboxes() {
            for s in sandboxes {
                let _ = self.remove_sandbox(&s.id);
            }
        }
        if let Some(mut child) = self.containerd.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Shims and anything they left: the run's sweep (processes by path, mounts under the
        // scratch directory, cgroups in every hierarchy).
        // (The whole scratch directory: the kubelet directory's shared bind mount too.)
        if let Some(sb) = &self.sb {
            crate::teardown::remove_runtime_leftovers(sb.dir());
        }
    }
}

/// Host directories to mount into app containers (those that exist), plus the workspace
/// (the harness's clients) and the Python the client matrix uses.
fn host_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = HOST_DIRS
        .iter()
        .map(PathBuf::from)
        .filter(|d| d.exists())
        .collect();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf();
    let python = std::fs::canonicalize(workspace.join("target/pyenv/bin/python3")).ok();
    dirs.push(workspace);
    // <prefix>/bin/python3.x → <prefix>
    if let Some(prefix) = python.as_deref().and_then(|p| p.parent()?.parent()) {
        if !dirs.iter().any(|d| prefix.starts_with(d)) {
            dirs.push(prefix.to_path_buf());
        }
    }
    dirs
}

/// Writes the pause image's root file system: busybox, run as `sleep infinity`.
fn pause_rootfs(root: &Path) -> Result<()> {
    std::fs::create_dir_all(root.join("bin"))?;
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))?;
    std::os::unix::fs::symlink("busybox", root.join("bin/sleep"))?;
    std::os::unix::fs::symlink("busybox", root.join("bin/sh"))?;
    Ok(())
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

async fn connect(
    socket: &Path,
) -> Result<(RuntimeServiceClient<Channel>, ImageServiceClient<Channel>)> {
    let socket = socket.to_path_buf();
    // The URI is not used: every connection goes to the socket.
    let channel = Endpoint::try_from("http://[::]:50051")?
        .connect_timeout(Duration::from_secs(2))
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }));
    Ok((
        RuntimeServiceClient::new(channel.clone()),
        ImageServiceClient::new(channel),
    ))
}

/// containerd's configuration: every path under `dir`, the CRI plugin with the cgroupfs
/// driver, the native snapshotter, CNI from Debian's plugin directory, and the pause image.
fn config_toml(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"

  disable_apparmor = true
  # Lowering oom_score_adj below containerd's own needs CAP_SYS_RESOURCE, which a test may lack.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "/usr/sbin/runc"
        Root = "{d}/runc"
  # Per-registry settings (hosts.toml), as a node's /etc/containerd/certs.d.
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{d}/certs.d"
"#
    )
}

/// The CNI network: a bridge in the node namespace with host-local addresses (IPv4 and IPv6)
/// and a default route through it, so pods reach the credential addresses on the node. Named
/// for the run, so the CNI cache entries it leaves are the run's.
fn cni_conflist(run: &str, dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": run,
        "plugins": [{
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "dataDir": dir.join("ipam"),
                "ranges": [[{"subnet": "10.88.0.0/24"}], [{"subnet": "fd88::/64"}]],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]
            }
        }]
    })
    .to_string()
}
