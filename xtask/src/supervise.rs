//! Children run under supervision: each in its own process group, so a SIGINT or SIGTERM sent
//! to xtask alone (a CI runner, `kill`) reaches the whole tree below it, and xtask waits for
//! the harnesses to tear down instead of leaving them orphaned.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Once;

use anyhow::{bail, Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};

/// Process group of the running child (0: none).
static CHILD_GROUP: AtomicI32 = AtomicI32::new(0);
/// The signal xtask received (0: none).
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// Forwards SIGINT and SIGTERM to the running child's process group from now on.
fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .expect("signal handlers install");
        std::thread::spawn(move || {
            for sig in signals.forever() {
                RECEIVED.store(sig, Ordering::SeqCst);
                forward(sig);
            }
        });
    });
}

fn forward(sig: i32) {
    let group = CHILD_GROUP.load(Ordering::SeqCst);
    if group > 0 {
        // SAFETY: kill(2) on our child's process group; no memory is involved.
        unsafe { libc::kill(-group, sig) };
    }
}

/// The signal that interrupted this xtask, if any.
pub fn interrupted() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        sig => Some(sig),
    }
}

/// Fails if a signal already interrupted this xtask (later steps must not start).
pub fn check() -> Result<()> {
    match interrupted() {
        Some(sig) => bail!("interrupted by signal {sig}"),
        None => Ok(()),
    }
}

/// A child running in a process group of its own; signals xtask receives are passed on to
/// that group until it has been waited for.
pub struct Supervised {
    child: Child,
}

impl Supervised {
    /// Starts `cmd` under supervision.
    pub fn spawn(cmd: &mut Command) -> Result<Self> {
        install();
        check()?;
        let child = cmd
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        CHILD_GROUP.store(child.id() as i32, Ordering::SeqCst);
        // A signal that arrived between the check and the store has not been forwarded yet.
        if let Some(sig) = interrupted() {
            forward(sig);
        }
        Ok(Self { child })
    }

    /// The child (for its pipes).
    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Waits for the child; fails if xtask was interrupted meanwhile.
    pub fn wait(mut self) -> Result<ExitStatus> {
        let status = self.child.wait()?;
        check()?;
        Ok(status)
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        CHILD_GROUP.store(0, Ordering::SeqCst);
    }
}

/// Runs `cmd` under supervision and waits for it.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    Supervised::spawn(cmd)?.wait()
}
