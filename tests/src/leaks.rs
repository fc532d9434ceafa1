//! Finds anything a run left behind: namespaces, cgroups, scratch directories, pins,
//! processes and BPF links of our programs, sorted into this run's (a failure) and other
//! runs' (named, not failed on: a killed run of another harness is not this run's bug).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::teardown::{self, owned_by};

/// Names of the agent's BPF programs (as the kernel truncates them, 15 bytes).
const PROGRAM_NAMES: [&str; 7] = [
    "connect4",
    "connect6",
    "connect4_eperm",
    "connect6_eperm",
    "getpeername4",
    "getpeername6",
    "sock_ops",
];

/// What the leak check found.
#[derive(Debug, Default)]
pub struct Found {
    /// Leftovers of the run checked.
    pub own: Vec<String>,
    /// Leftovers of other runs (and links of our programs no run can be named for).
    pub others: Vec<String>,
}

/// Every leftover of run `prefix`, described; empty when clean.
pub fn leftovers(prefix: &str) -> Result<Vec<String>> {
    Ok(check(prefix)?.own)
}

/// Leftovers on this machine, split into run `prefix`'s and everybody else's.
pub fn check(prefix: &str) -> Result<Found> {
    let mut found = Found::default();
    let runs = teardown::runs_present();
    for run in runs.iter().map(String::as_str).chain([prefix]) {
        let own = run == prefix;
        if !own && (owned_by(run, prefix) || runs.iter().filter(|r| *r == run).count() > 1) {
            continue;
        }
        let state = if teardown::owner_dead(run) {
            "owner gone"
        } else {
            "owner running"
        };
        let mut items: Vec<String> = teardown::objects(run)
            .into_iter()
            .map(|(what, path)| format!("{what} {}", path.display()))
            .chain(
                teardown::processes(run)
                    .into_iter()
                    .map(|(pid, cmdline)| format!("process {pid}: {cmdline}")),
            )
            .collect();
        if own {
            found.own.append(&mut items);
        } else if !items.is_empty() {
            found.others.extend(
                items
                    .into_iter()
                    .map(|i| format!("run {run} ({state}): {i}")),
            );
        }
    }
    found.own.sort();
    found.own.dedup();
    // The run checked first: its names extend the name of the run that started it.
    let owners: Vec<RunFacts> = std::iter::once(prefix)
        .chain(runs.iter().map(String::as_str).filter(|r| *r != prefix))
        .map(RunFacts::of)
        .collect();
    let holders = link_holders();
    for link in bpf_links()? {
        match owners.iter().find(|o| o.owns(&link, &holders)) {
            Some(o) if o.run == prefix => found.own.push(link.describe()),
            Some(o) => found
                .others
                .push(format!("run {}: {}", o.run, link.describe())),
            None => found
                .others
                .push(format!("no run known: {}", link.describe())),
        }
    }
    Ok(found)
}

/// A cgroup link of one of our programs.
#[derive(Debug)]
pub struct Link {
    id: u64,
    program: String,
    cgroup_id: u64,
    pinned: Vec<String>,
}

impl Link {
    fn describe(&self) -> String {
        format!(
            "BPF link {} of program {} (cgroup {}, pinned {:?})",
            self.id, self.program, self.cgroup_id, self.pinned
        )
    }
}

/// What ties a BPF link to a run: its pin directories, cgroups and processes.
struct RunFacts {
    run: String,
    cgroup_ids: Vec<u64>,
    pids: Vec<u32>,
}

impl RunFacts {
    fn of(run: &str) -> Self {
        Self {
            run: run.to_owned(),
            cgroup_ids: teardown::objects(run)
                .iter()
                .filter(|(what, _)| *what == "cgroup")
                .flat_map(|(_, dir)| cgroup_ids(dir))
                .collect(),
            pids: teardown::processes(run)
                .into_iter()
                .map(|(pid, _)| pid)
                .collect(),
        }
    }

    /// Whether `link` is pinned in this run's bpffs directory, attached to one of its
    /// cgroups, or held open by one of its processes.
    fn owns(&self, link: &Link, holders: &HashMap<u64, Vec<u32>>) -> bool {
        let pinned = link.pinned.iter().any(|p| {
            Path::new(p)
                .strip_prefix("/sys/fs/bpf")
                .ok()
                .and_then(|rest| rest.iter().next())
                .is_some_and(|first| owned_by(&first.to_string_lossy(), &self.run))
        });
        let held = holders
            .get(&link.id)
            .is_some_and(|h| h.iter().any(|pid| self.pids.contains(pid)));
        pinned || held || self.cgroup_ids.contains(&link.cgroup_id)
    }
}

/// The cgroup ids (directory inodes on cgroup2) of `dir` and everything below it.
fn cgroup_ids(dir: &Path) -> Vec<u64> {
    let mut ids = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        if let Ok(m) = std::fs::metadata(&d) {
            ids.push(m.ino());
        }
        if let Ok(rd) = std::fs::read_dir(&d) {
            stack.extend(
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    ids
}

/// link id → processes holding an fd of it (from /proc/*/fdinfo).
fn link_holders() -> HashMap<u64, Vec<u32>> {
    let mut holders: HashMap<u64, Vec<u32>> = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return holders;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let is_link = std::fs::read_link(fd.path())
                .is_ok_and(|t| t.to_string_lossy() == "anon_inode:bpf_link");
            if !is_link {
                continue;
            }
            let info = std::fs::read_to_string(p.path().join("fdinfo").join(fd.file_name()))
                .unwrap_or_default();
            if let Some(id) = info
                .lines()
                .find_map(|l| l.strip_prefix("link_id:")?.trim().parse().ok())
            {
                holders.entry(id).or_default().push(pid);
            }
        }
    }
    holders
}

fn bpftool_json(args: &[&str]) -> Result<serde_json::Value> {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .context("running bpftool")?;
    anyhow::ensure!(
        out.status.success(),
        "bpftool {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).with_context(|| format!("bpftool {args:?} printed no JSON"))
}

/// cgroup links whose program is one of ours.
fn bpf_links() -> Result<Vec<Link>> {
    let links = bpftool_json(&["-f", "link", "show"])?;
    let links = links.as_array().context("bpftool link show: not a list")?;
    let mut found = Vec::new();
    for link in links {
        if link["type"] != "cgroup" {
            continue;
        }
        let prog_id = link["prog_id"].as_u64().context("link without prog_id")?;
        // The program may go away between the two calls: then the link has gone too.
        let Ok(prog) = bpftool_json(&["prog", "show", "id", &prog_id.to_string()]) else {
            continue;
        };
        // Ours are all named; an unnamed program is someone else's (the machine's).
        let Some(name) = prog["name"].as_str() else {
            continue;
        };
        if PROGRAM_NAMES.contains(&name) {
            found.push(Link {
                id: link["id"].as_u64().context("link without id")?,
                program: name.to_owned(),
                cgroup_id: link["cgroup_id"].as_u64().unwrap_or(0),
                pinned: link["pinned"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p.as_str().map(str::to_owned))
                    .collect(),
            });
        }
    }
    Ok(found)
}
