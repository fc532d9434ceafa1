//! Finds anything a run left behind: namespaces, cgroups, scratch directories, processes
//! and BPF links of our programs.

use std::path::Path;
use std::process::Command;

use anyhow::Result;

use crate::cgroups::cgroup2_mount;

/// Names of the agent's BPF programs (as the kernel truncates them, 15 bytes).
const PROGRAM_NAMES: [&str; 5] = [
    "connect4",
    "connect6",
    "getpeername4",
    "getpeername6",
    "sock_ops",
];

/// Every leftover of run `prefix`, described; empty when clean.
pub fn leftovers(prefix: &str) -> Result<Vec<String>> {
    let mut found = Vec::new();
    let starts = |name: &str| name == prefix || name.starts_with(&format!("{prefix}-"));
    for (what, dir) in [
        ("network namespace", Path::new("/run/netns").to_path_buf()),
        ("cgroup", cgroup2_mount()?),
        ("scratch directory", std::env::temp_dir()),
        (
            "bpffs pin directory",
            Path::new("/sys/fs/bpf").to_path_buf(),
        ),
    ] {
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if starts(&name) {
                    found.push(format!("{what} {}", e.path().display()));
                }
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&format!("/{prefix}-")) && !cmdline.contains("leaks") {
                found.push(format!(
                    "process {}: {cmdline}",
                    e.file_name().to_string_lossy()
                ));
            }
        }
    }
    found.extend(bpf_links()?);
    Ok(found)
}

/// cgroup links whose program is one of ours.
fn bpf_links() -> Result<Vec<String>> {
    let out = Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "bpftool link show failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let links: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    let mut found = Vec::new();
    for link in links.as_array().into_iter().flatten() {
        let prog_id = link["prog_id"].as_u64().unwrap_or(0);
        let prog = Command::new("bpftool")
            .args(["-j", "prog", "show", "id", &prog_id.to_string()])
            .output()?;
        let prog: serde_json::Value =
            serde_json::from_slice(&prog.stdout).unwrap_or(serde_json::Value::Null);
        let name = prog["name"].as_str().unwrap_or_default();
        if link["type"] == "cgroup" && PROGRAM_NAMES.contains(&name) {
            found.push(format!(
                "BPF link {} of program {name} (cgroup {})",
                link["id"], link["cgroup_id"]
            ));
        }
    }
    Ok(found)
}
