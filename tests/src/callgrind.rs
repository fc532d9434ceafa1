//! Instructions a server executes per request, counted by valgrind's callgrind: the same count
//! for the same binary and requests whatever else the machine is doing, so a ratio of two
//! counts is a verdict that holds on any machine of the architecture (wall-clock ratios on a
//! shared 2-CPU VM move by 10 % between runs).
//!
//! The process runs under `valgrind --tool=callgrind`; `callgrind_control` (through valgrind's
//! gdbserver FIFOs, kept in the run's directory, not `/tmp`: a process killed leaves its FIFOs
//! behind) zeroes its counters before a load and dumps them after, so the count covers the
//! load alone, not the start-up.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// The wrapper a server is started with; its profiles go to `dir` as `callgrind.<pid>.<n>`.
pub fn wrapper(dir: &Path) -> Vec<String> {
    vec![
        "valgrind".into(),
        "--tool=callgrind".into(),
        "--quiet".into(),
        // Names in full in every dump: each dump is read on its own.
        "--compress-strings=no".into(),
        format!("--callgrind-out-file={}/callgrind.%p", dir.display()),
        vgdb_prefix(dir),
    ]
}

/// Where valgrind and `callgrind_control` meet: FIFOs in `dir`, removed with it.
fn vgdb_prefix(dir: &Path) -> String {
    format!("--vgdb-prefix={}/vgdb", dir.display())
}

/// A process running under callgrind.
pub struct Counted {
    pid: u32,
    dir: PathBuf,
}

impl Counted {
    /// The process `pid`, started with [`wrapper`]`(dir)`; waits until callgrind answers.
    pub fn attach(pid: u32, dir: &Path) -> Result<Self> {
        let me = Self {
            pid,
            dir: dir.to_owned(),
        };
        let until = Instant::now() + Duration::from_secs(30);
        while me.control("-s").is_err() {
            ensure!(
                Instant::now() < until,
                "callgrind never answered for pid {pid}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(me)
    }

    fn control(&self, verb: &str) -> Result<String> {
        let out = Command::new("callgrind_control")
            .arg(vgdb_prefix(&self.dir))
            .arg(verb)
            .arg(self.pid.to_string())
            .output()
            .context("callgrind_control (valgrind, installed by `cargo xtask setup`)")?;
        // It exits 0 whatever happened; a task it could not reach is an "Error:" line.
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || text.contains("Error:") || !text.contains(&self.pid.to_string())
        {
            bail!("callgrind_control {verb} {}: {text}", self.pid);
        }
        Ok(text)
    }

    /// Instructions executed (all threads) while `run` runs, and the profile they were
    /// dumped to.
    pub fn count(&self, run: impl FnOnce() -> Result<()>) -> Result<(u64, PathBuf)> {
        self.control("-z")?;
        run()?;
        let before = self.dumps()?;
        self.control("-d")?;
        let file = self
            .dumps()?
            .into_iter()
            .find(|f| !before.contains(f))
            .context("callgrind wrote no dump")?;
        Ok((total(&file)?, file))
    }

    fn dumps(&self) -> Result<Vec<PathBuf>> {
        let prefix = format!("callgrind.{}.", self.pid);
        Ok(std::fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix))
            })
            .collect())
    }
}

/// The instruction total a callgrind profile records.
pub fn total(file: &Path) -> Result<u64> {
    let text = std::fs::read_to_string(file)?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|n| n.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no total in {}", file.display()))
}

/// Instructions each function executed itself (its inlined code included, its calls not),
/// read from a callgrind dump.
pub fn self_costs(file: &Path) -> Result<HashMap<String, u64>> {
    Ok(parse_self_costs(&std::fs::read_to_string(file)?))
}

fn parse_self_costs(text: &str) -> HashMap<String, u64> {
    let mut costs = HashMap::new();
    let mut function = String::new();
    // The line after `calls=` is the call's inclusive cost, not the caller's own.
    let mut after_call = false;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("fn=") {
            // In full: the wrapper turns name compression off.
            function = name.to_owned();
        } else if line.starts_with("calls=") {
            after_call = true;
        } else if line.starts_with(|c: char| c.is_ascii_digit() || "+-*".contains(c)) {
            if !after_call {
                let cost: u64 = line
                    .split_whitespace()
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                *costs.entry(function.clone()).or_default() += cost;
            }
            after_call = false;
        }
    }
    costs
}

/// What `ours` executes per request beyond `base` (each measured over `requests`), function by
/// function, largest difference first: `lines` rows of "ours base difference function".
pub fn difference(
    ours: &HashMap<String, u64>,
    base: &HashMap<String, u64>,
    requests: usize,
    lines: usize,
) -> String {
    let per =
        |m: &HashMap<String, u64>, f: &str| m.get(f).copied().unwrap_or(0) as f64 / requests as f64;
    let names: std::collections::HashSet<&str> =
        ours.keys().chain(base.keys()).map(String::as_str).collect();
    let mut rows: Vec<(f64, f64, &str)> = names
        .into_iter()
        .map(|f| (per(ours, f), per(base, f), f))
        .collect();
    rows.sort_by(|a, b| (b.0 - b.1).total_cmp(&(a.0 - a.1)).then(a.2.cmp(b.2)));
    let mut out = format!(
        "{:>9} {:>9} {:>9}  function (instructions per request)\n",
        "ours", "base", "diff"
    );
    for (o, b, f) in rows.into_iter().take(lines) {
        out.push_str(&format!("{o:>9.1} {b:>9.1} {:>+9.1}  {f}\n", o - b));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_total_is_read_from_either_line_callgrind_writes() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("pia-cg-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let f = dir.join("callgrind.1.1");
        std::fs::write(&f, "events: Ir\nfn=main\n1 5\nsummary: 51803124\n")?;
        assert_eq!(total(&f)?, 51_803_124);
        std::fs::write(&f, "events: Ir\ntotals: 42\n")?;
        assert_eq!(total(&f)?, 42);
        std::fs::write(&f, "events: Ir\n")?;
        assert!(total(&f).is_err());
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn a_functions_own_cost_excludes_its_calls_and_sums_its_inlined_files() {
        let dump = "events: Ir\nfn=main\n16 5\n+1 2\ncfn=work\ncalls=2 29\n* 5000\n\
                    fi=inlined.rs\n-3 4\nfn=work\n29 5000\n";
        let costs = parse_self_costs(dump);
        assert_eq!(costs["main"], 11);
        assert_eq!(costs["work"], 5000);
        let base = HashMap::from([("main".to_owned(), 8), ("gone".to_owned(), 3)]);
        let table = difference(&costs, &base, 1, 10);
        let rows: Vec<&str> = table.lines().skip(1).collect();
        assert!(rows[0].ends_with("  work"), "{table}");
        assert!(
            rows[1].ends_with("  main") && rows[1].contains("+3.0"),
            "{table}"
        );
        assert!(
            rows[2].ends_with("  gone") && rows[2].contains("-3.0"),
            "{table}"
        );
        assert_eq!(rows.len(), 3, "{table}");
    }
}
