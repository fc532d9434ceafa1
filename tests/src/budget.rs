//! Time budgets: a bench case that runs out of time stops its clients, keeps what it measured,
//! and is reported as "did not finish" instead of holding up every case after it.

use std::io::Read;
use std::process::{Child, Output};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// The error a budget ends a step with.
#[derive(Debug)]
pub struct OutOfTime {
    /// The budget that ran out.
    pub budget: Duration,
}

impl std::fmt::Display for OutOfTime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "out of time (budget {:?})", self.budget)
    }
}

impl std::error::Error for OutOfTime {}

/// Whether `e` is a budget running out (rather than a real failure).
pub fn is_out_of_time(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<OutOfTime>())
}

/// The moment a budget ends.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    end: Instant,
    budget: Duration,
}

impl Deadline {
    /// A budget of `budget` from now.
    pub fn after(budget: Duration) -> Self {
        Self {
            end: Instant::now() + budget,
            budget,
        }
    }

    /// The budget it was made with.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// Fails with [`OutOfTime`] once the budget is spent.
    pub fn check(&self) -> Result<()> {
        if Instant::now() >= self.end {
            return Err(OutOfTime {
                budget: self.budget,
            }
            .into());
        }
        Ok(())
    }

    /// Waits for `child` and collects its output; kills it and fails with [`OutOfTime`] when
    /// the budget ends first.
    pub fn wait(&self, mut child: Child) -> Result<Output> {
        let readers = [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .map(|pipe| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_end(&mut buf);
                }
                buf
            })
        });
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if Instant::now() >= self.end {
                let _ = child.kill();
                let _ = child.wait();
                return Err(OutOfTime {
                    budget: self.budget,
                }
                .into());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let [stdout, stderr] = readers.map(|r| r.join().unwrap_or_default());
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }

    /// Runs `f` up to `n` times while the budget lasts; returns the results and whether all
    /// `n` rounds finished. Real failures end it with the error.
    pub fn rounds<T>(&self, n: usize, mut f: impl FnMut() -> Result<T>) -> Result<(Vec<T>, bool)> {
        let mut done = Vec::with_capacity(n);
        for _ in 0..n {
            match self.check().and_then(|()| f()) {
                Ok(v) => done.push(v),
                Err(e) if is_out_of_time(&e) => return Ok((done, false)),
                Err(e) => return Err(e).context("bench round failed"),
            }
        }
        Ok((done, true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_outliving_its_budget_is_killed_and_reported_out_of_time() {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let started = Instant::now();
        let err = Deadline::after(Duration::from_millis(200))
            .wait(child)
            .unwrap_err();
        assert!(is_out_of_time(&err), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists() || {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                stat.contains(") Z")
            }
        );
    }

    #[test]
    fn a_finished_child_gives_its_output() {
        let child = std::process::Command::new("echo")
            .arg("hello")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = Deadline::after(Duration::from_secs(10))
            .wait(child)
            .unwrap();
        assert_eq!(out.stdout, b"hello\n");
    }

    #[test]
    fn rounds_stop_when_the_budget_is_spent_and_keep_what_they_measured() {
        let deadline = Deadline::after(Duration::from_millis(250));
        let (done, all) = deadline
            .rounds(10, || {
                std::thread::sleep(Duration::from_millis(100));
                Ok(1)
            })
            .unwrap();
        assert!(!all);
        assert!((2..=3).contains(&done.len()), "{}", done.len());
        let failed = Deadline::after(Duration::from_secs(10))
            .rounds(3, || -> Result<()> { anyhow::bail!("a real failure") });
        assert!(failed.is_err_and(|e| !is_out_of_time(&e)));
    }
}
