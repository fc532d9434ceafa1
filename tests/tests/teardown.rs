//! A killed harness leaves the machine clean: SIGTERM and SIGINT tear a running sandbox down
//! (namespaces, cgroups, pins and links, processes); what SIGKILL leaves is named by the
//! leak check as another run's (not failed on) and removed by `reap --dead`.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tests::clients::helper_bin;
use tests::leaks;
use tests::names::run_prefix;

/// A running `sandbox-hold`; on drop (a failed assertion) it is sent SIGTERM, so even a
/// failing test cleans up.
struct Hold(Child);

impl Drop for Hold {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: kill(2) of our own child.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            if wait_exit(&mut self.0, Duration::from_secs(30)).is_err() {
                let _ = self.0.wait();
            }
        }
    }
}

/// Starts `sandbox-hold` as run `prefix` (its own pid's run when `None`) and waits until its
/// sandbox, agent and pods are up.
fn hold(prefix: Option<&str>) -> Result<Hold> {
    hold_with(prefix, &[])
}

/// [`hold`] with `sandbox-hold`'s arguments (`--real-node`).
fn hold_with(prefix: Option<&str>, args: &[&str]) -> Result<Hold> {
    let mut cmd = Command::new(helper_bin("sandbox-hold")?);
    cmd.args(args);
    match prefix {
        Some(p) => cmd.env(tests::names::RUN_ENV, p),
        None => cmd.env_remove(tests::names::RUN_ENV),
    };
    let mut child = cmd.stdout(Stdio::piped()).spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(line) if line.starts_with("ready") => Ok(Hold(child)),
        other => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("sandbox-hold did not get ready: {other:?}")
        }
    }
}

fn wait_exit(child: &mut Child, limit: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("still running {limit:?} after the signal");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_and_sigint_tear_a_running_sandbox_down() -> Result<()> {
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let prefix = format!("{}-hold{sig}", run_prefix());
        let mut held = hold(Some(&prefix))?;
        let before = leaks::leftovers(&prefix)?;
        for kind in [
            "network namespace",
            "cgroup",
            "bpffs pin directory",
            "process",
            "BPF link",
        ] {
            ensure!(
                before.iter().any(|l| l.starts_with(kind)),
                "the running sandbox has no {kind}: {before:#?}"
            );
        }
        // SAFETY: kill(2) of our own child.
        unsafe { libc::kill(held.0.id() as i32, sig) };
        let status = wait_exit(&mut held.0, Duration::from_secs(30))?;
        assert_eq!(
            status.code(),
            Some(128 + sig),
            "exit status after signal {sig}"
        );
        let after = leaks::leftovers(&prefix)?;
        assert!(after.is_empty(), "signal {sig} left: {after:#?}");
    }
    Ok(())
}

#[test]
fn a_run_killed_outright_is_named_not_failed_by_the_leak_check_and_reaped() -> Result<()> {
    let mut held = hold(None)?;
    let dead = format!("pia{}", held.0.id());
    held.0.kill()?;
    held.0.wait()?;
    let found = leaks::check(&run_prefix())?;
    let theirs: Vec<&String> = found.others.iter().filter(|o| o.contains(&dead)).collect();
    assert!(
        theirs.iter().any(|o| o.contains("BPF link")),
        "the killed run's links are not named as its own: {found:#?}"
    );
    assert!(
        theirs.iter().any(|o| o.contains("network namespace")),
        "{found:#?}"
    );
    assert!(
        !found.own.iter().any(|o| o.contains(&dead)),
        "another run's leftovers counted as this run's: {:#?}",
        found.own
    );
    let out = Command::new(helper_bin("reap")?).arg("--dead").output()?;
    ensure!(out.status.success(), "reap --dead failed");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("dead run {dead}")),
        "reap said: {said}"
    );
    let after = leaks::check(&run_prefix())?;
    let left: Vec<&String> = after.others.iter().filter(|o| o.contains(&dead)).collect();
    assert!(left.is_empty(), "reap left: {left:#?}");
    Ok(())
}

#[test]
fn the_leak_check_fails_for_its_own_run_and_names_others() -> Result<()> {
    let cg = tests::cgroups::cgroup2_mount()?;
    // A run whose owner is gone: the pid of a process that has exited.
    let mut gone = Command::new("true").spawn()?;
    gone.wait()?;
    let other = cg.join(format!("pia{}-0", gone.id()));
    let own = cg.join(format!("{}-leakcheck", run_prefix()));
    for dir in [&other, &own] {
        std::fs::create_dir_all(dir)?;
    }
    let found = leaks::check(&run_prefix());
    for dir in [&other, &own] {
        std::fs::remove_dir(dir)?;
    }
    let found = found?;
    let named = |list: &[String], dir: &std::path::Path| {
        list.iter().any(|l| l.contains(&*dir.to_string_lossy()))
    };
    assert!(
        named(&found.own, &own),
        "own leftover not failed on: {found:#?}"
    );
    assert!(
        named(&found.others, &other),
        "other run not named: {found:#?}"
    );
    assert!(
        !named(&found.own, &other),
        "other run counted as own: {found:#?}"
    );
    Ok(())
}

/// The shim sockets containerd keeps in its fixed directory.
fn shim_sockets() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/run/containerd/s")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_real_node_leaves_nothing_on_sigterm_nor_after_sigkill_and_reap() -> Result<()> {
    let before_all = shim_sockets();
    // SIGTERM: the harness removes its run (containerd, shims, containers, sandboxes,
    // snapshots, mounts, CNI state, cgroups in every hierarchy) and exits.
    let prefix = format!("{}-holdreal", run_prefix());
    let mut held = hold_with(Some(&prefix), &["--real-node"])?;
    let running = leaks::leftovers(&prefix)?;
    for kind in [
        "scratch directory",
        "cgroup",
        "process",
        "CNI result",
        "BPF link",
    ] {
        ensure!(
            running.iter().any(|l| l.starts_with(kind)),
            "the running real node has no {kind}: {running:#?}"
        );
    }
    ensure!(
        running.iter().any(|l| l.contains("containerd-shim")),
        "no shim among {running:#?}"
    );
    ensure!(
        running
            .iter()
            .any(|l| l.starts_with("cgroup") && !l.contains("/unified/")),
        "runc made no v1 cgroups: {running:#?}"
    );
    ensure!(shim_sockets().len() > before_all.len(), "no shim socket");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    ensure!(
        mounts.contains(&format!("/{prefix}-")),
        "containerd mounted nothing"
    );
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(held.0.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut held.0, Duration::from_secs(30))?;
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    assert_eq!(leaks::leftovers(&prefix)?, Vec::<String>::new());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    assert!(!mounts.contains(&format!("/{prefix}-")), "mounts left");
    assert_eq!(shim_sockets(), before_all, "shim sockets left");

    // SIGKILL: nothing runs the teardown; `reap --dead` removes it all.
    let mut held = hold_with(None, &["--real-node"])?;
    let dead = format!("pia{}", held.0.id());
    held.0.kill()?;
    held.0.wait()?;
    let out = Command::new(helper_bin("reap")?).arg("--dead").output()?;
    ensure!(out.status.success(), "reap --dead failed");
    let after = leaks::check(&run_prefix())?;
    let left: Vec<&String> = after.others.iter().filter(|o| o.contains(&dead)).collect();
    assert!(left.is_empty(), "reap left: {left:#?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    assert!(
        !mounts.contains(&format!("/{dead}-")),
        "mounts left after reap"
    );
    assert_eq!(shim_sockets(), before_all, "shim sockets left after reap");
    Ok(())
}
