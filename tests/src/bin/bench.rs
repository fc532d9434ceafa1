//! `cargo xtask bench`: the agent against its limits, in the node sandbox, every figure a
//! ratio against a baseline measured in the same run (absolute times on a shared 2-CPU VM are
//! noise). Writes `target/bench/results.md` and `target/bench/results.json`.
//!
//! Every case has its own time budget: one that runs out stops its clients, reports what it
//! measured so far as "did not finish", and the next case starts. The bench fails only for a
//! real failure (a wrong answer, a client or agent that cannot start).

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::json;
use tests::agent::{Agent, CLUSTER};
use tests::budget::{is_out_of_time, Deadline, OutOfTime};
use tests::cgroups::Driver;
use tests::clients::{
    credentials_url, curl, helper_bin, spawn_cold_burst, spawn_load_with, LoadResult,
};
use tests::fake_eks::{FakeEksAuth, Fault};
use tests::fixtures::metric;
use tests::issuer::TokenSubject;
use tests::plots::{cdf, Chart, Series};
use tests::sandbox::{PodSpec, Sandbox};
use tests::spread::{verdict, Bound, Spread, Verdict};

/// Rounds per comparison; medians are reported.
const ROUNDS: usize = 3;
/// Rounds of case 1 (agent against bare hyper, with a bare-against-bare control): enough for
/// a median and a range that say something.
const CASE1_ROUNDS: usize = 7;

struct Report {
    md: String,
    json: Vec<serde_json::Value>,
    /// SVG charts written into the bench directory, with what each shows.
    charts: Vec<(String, String)>,
}

impl Report {
    #[allow(clippy::too_many_arguments)] // reason: one table row, column by column
    fn row(
        &mut self,
        case: &str,
        figure: &str,
        ours: f64,
        baseline: f64,
        ratio: f64,
        target: &str,
        met: bool,
    ) {
        let _ = writeln!(
            self.md,
            "| {case} | {figure} | {ours:.1} | {baseline:.1} | **{ratio:.3}** | {target} | {} |",
            if met { "met" } else { "missed" }
        );
        self.json.push(
            json!({"case": case, "figure": figure, "ours": ours, "baseline": baseline,
            "ratio": ratio, "target": target, "met": met}),
        );
        eprintln!("{case} / {figure}: ours {ours:.1}, baseline {baseline:.1}, ratio {ratio:.3} ({target})");
    }

    /// A figure over rounds: medians of ours and the baseline, the per-round ratio's median
    /// and range, the control's (the baseline against itself), and the verdict on `bound`
    /// (`None`: for information).
    #[allow(clippy::too_many_arguments)] // reason: one table row, column by column
    fn spread_row(
        &mut self,
        case: &str,
        figure: &str,
        ours: f64,
        baseline: f64,
        ratio: Spread,
        control: Spread,
        bound: Option<Bound>,
    ) {
        let verdict = bound.map(|b| verdict(&ratio, b, Some(&control)));
        let target = bound.map_or("(info)".to_owned(), |b| b.to_string());
        let shown = verdict.map_or("".to_owned(), |v| v.to_string());
        let _ = writeln!(
            self.md,
            "| {case} | {figure} | {ours:.1} | {baseline:.1} | **{ratio}**; control {control} | {target} | {shown} |"
        );
        self.json.push(
            json!({"case": case, "figure": figure, "ours": ours, "baseline": baseline,
            "ratio": ratio.median, "ratio_min": ratio.min, "ratio_max": ratio.max,
            "control": control.median, "control_min": control.min, "control_max": control.max,
            "target": target, "verdict": shown, "met": verdict == Some(Verdict::Met)}),
        );
        eprintln!(
            "{case} / {figure}: ours {ours:.1}, baseline {baseline:.1}, ratio {ratio}, control {control} ({target}: {shown})"
        );
    }

    /// A figure over interleaved rounds of (ours, baseline, baseline again): ours against the
    /// geometric mean of the baseline runs around it, and the control (the second baseline
    /// run against the first), as [`Report::spread_row`] reports them.
    fn interleaved_row(
        &mut self,
        case: &str,
        figure: &str,
        rounds: &[(f64, f64, f64)],
        bound: Option<Bound>,
    ) -> Result<()> {
        let spread = |pick: &dyn Fn(&(f64, f64, f64)) -> f64| {
            Spread::of(&rounds.iter().map(pick).collect::<Vec<_>>()).context("no rounds")
        };
        let ratio = spread(&|(o, b, a)| o / (b * a).sqrt())?;
        let control = spread(&|(_, b, a)| a / b)?;
        let (ours, base) = (spread(&|(o, _, _)| *o)?, spread(&|(_, b, _)| *b)?);
        self.spread_row(
            case,
            figure,
            ours.median,
            base.median,
            ratio,
            control,
            bound,
        );
        Ok(())
    }

    /// Draws a chart into the bench directory; a chart that cannot be drawn is a note, not
    /// a failed case.
    fn chart(&mut self, file: &str, chart: &Chart, series: &[Series]) {
        match tests::plots::lines(&bench_dir().join(file), chart, series) {
            Ok(()) => self.charts.push((file.to_owned(), chart.title.clone())),
            Err(e) => self.note("charts", file, format!("not drawn: {e:#}")),
        }
    }

    fn note(&mut self, case: &str, figure: &str, value: String) {
        let _ = writeln!(self.md, "| {case} | {figure} | {value} | | | | |");
        self.json
            .push(json!({"case": case, "figure": figure, "value": value}));
        eprintln!("{case} / {figure}: {value}");
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// "" when every round ran, else how many did (a case that ran out of time).
fn partial(done: usize, all: bool) -> String {
    partial_of(done, ROUNDS, all)
}

/// "" when all `of` rounds ran, else how many did.
fn partial_of(done: usize, of: usize, all: bool) -> String {
    if all {
        String::new()
    } else {
        format!(" ({done} of {of} rounds)")
    }
}

/// Ends a case that ran out of time after it reported what it had.
fn finished(all: bool, deadline: &Deadline) -> Result<()> {
    if all {
        Ok(())
    } else {
        Err(OutOfTime {
            budget: deadline.budget(),
        }
        .into())
    }
}

fn node(driver: Driver, pods: usize) -> Result<(Sandbox, FakeEksAuth)> {
    let mut sb = Sandbox::new(driver)?;
    let fake = FakeEksAuth::start(sb.node(), CLUSTER, sb.issuer().decoding_key())?;
    fake.associate("app", "reader", "ReaderRole");
    for _ in 0..pods {
        sb.add_pod(PodSpec::new("app", "reader"))?;
    }
    Ok((sb, fake))
}

/// The agent as an operator runs it (info logs), with no per-pod budgets (most cases load one
/// pod) unless `extra` sets them.
fn agent(sb: &Sandbox, fake: &FakeEksAuth, extra: &[&str]) -> Result<Agent> {
    let mut a = launch_agent(sb, fake, extra)?;
    a.wait_ready(sb, Duration::from_secs(20))?;
    Ok(a)
}

/// As [`agent`], without waiting.
fn launch_agent(sb: &Sandbox, fake: &FakeEksAuth, extra: &[&str]) -> Result<Agent> {
    launch_agent_wrapped(sb, fake, &[], extra)
}

/// As [`launch_agent`], the agent run by `wrapper` (e.g. valgrind).
fn launch_agent_wrapped(
    sb: &Sandbox,
    fake: &FakeEksAuth,
    wrapper: &[&str],
    extra: &[&str],
) -> Result<Agent> {
    let root = sb.cgroups().pods_root().display().to_string();
    let mut args = vec![
        "server",
        "-c",
        CLUSTER,
        "-v",
        "info",
        "--cgroup-root",
        &root,
    ];
    // Unlimited unless the case sets a budget itself.
    for flag in ["--pod-request-rate", "--pod-connect-rate"] {
        if !extra.contains(&flag) {
            args.extend([flag, "0"]);
        }
    }
    args.extend_from_slice(extra);
    Agent::launch_wrapped(sb, fake, wrapper, &args, &[])
}

/// Runs the load client (new connections, or as `env` says) from pod `pod` and waits for it
/// within `deadline`.
#[allow(clippy::too_many_arguments)] // reason: the load client's argv, plus the budget
fn load(
    sb: &Sandbox,
    deadline: &Deadline,
    pod: usize,
    addr: &str,
    count: usize,
    conc: usize,
    env: &[(&str, &str)],
) -> Result<LoadResult> {
    let child = spawn_load_with(sb, pod, 0, addr, "/v1/credentials", count, conc, env)?;
    let out = deadline.wait(child)?;
    ensure!(
        out.status.success(),
        "load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("load output")
}

fn rps(r: &LoadResult) -> f64 {
    r.statuses.values().sum::<u64>() as f64 / (r.elapsed_ms.max(1) as f64 / 1000.0)
}

/// Waits until something accepts on `addr` inside the node namespace.
fn wait_listening(sb: &Sandbox, addr: &str) -> Result<()> {
    let addr = addr.to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sb.node().run_in({
        let a = addr.clone();
        move || std::net::TcpStream::connect(a).is_ok()
    })? {
        ensure!(Instant::now() < deadline, "{addr} never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Case 1: Warm credential requests through the eBPF path against a bare hyper server.
fn warm_vs_bare(report: &mut Report, deadline: &Deadline) -> Result<()> {
    let (sb, fake) = node(Driver::Cgroupfs, 1)?;
    // Tens of thousands of new connections a round from one pod: every port, and TIME_WAIT
    // ports reused, or the later runs wait on SYN retransmits for a free port (seen: a
    // control's p99 12× its baseline).
    let pod_ns = sb.pods()[0].netns.as_ref().context("the pod's netns")?;
    for setting in [
        "net.ipv4.ip_local_port_range=1024 65535",
        "net.ipv4.tcp_tw_reuse=1",
    ] {
        tests::netns::run(pod_ns.command("sysctl")?.args(["-qw", setting]))?;
    }
    let agent = agent(&sb, &fake, &[])?;
    let first = curl(&sb, 0, 0, credentials_url(false), &[])?;
    ensure!(first.status == 200, "warm-up: {}", first.body);
    let body = sb.dir().join("body.json");
    std::fs::write(&body, &first.body)?;
    let mut bare = sb
        .node_command(helper_bin("bare-server")?, None)?
        .arg("169.254.170.23:8080")
        .arg(&body)
        .spawn()?;
    wait_listening(&sb, "169.254.170.23:8080")?;
    // BENCH_CANDIDATE_BARE=timer,drain: a bare server with those of the agent's connection
    // settings stands in the agent's place (what each setting costs; docs/benchmarks.md).
    let candidate = std::env::var("BENCH_CANDIDATE_BARE").ok();
    let mut cand = match &candidate {
        Some(like) => {
            let c = sb
                .node_command(helper_bin("bare-server")?, None)?
                .env("BARE_AS_AGENT", like)
                .arg("169.254.170.23:8081")
                .arg(&body)
                .spawn()?;
            wait_listening(&sb, "169.254.170.23:8081")?;
            Some(c)
        }
        None => None,
    };
    let ours_addr = if cand.is_some() {
        "169.254.170.23:8081"
    } else {
        "169.254.170.23:80"
    };
    let mut all_done = true;
    let mut cdfs = Vec::new();
    for (mode, count, env, throughput_target, p99_target) in [
        ("new connection per request", 16_000, &[][..], 0.97, 1.3),
        (
            "keep-alive",
            90_000,
            &[("LOAD_KEEPALIVE", "1")][..],
            0.95,
            1.3,
        ),
    ] {
        // Each round traces every request; the last round's traces are charted.
        let traces = (sb.dir().join("trace-agent"), sb.dir().join("trace-bare"));
        let (ours_trace, base_trace) = (
            traces.0.display().to_string(),
            traces.1.display().to_string(),
        );
        let (ours_env, base_env) = (with_trace(env, &ours_trace), with_trace(env, &base_trace));
        // The control's second run traces too (to its own file): the same client work in all
        // three runs of a round.
        let again_trace = sb.dir().join("trace-again").display().to_string();
        let again_env = with_trace(env, &again_trace);
        // Interleaved: bare, agent, bare again. The agent is set against both bare runs
        // (their geometric mean: a drift across the round cancels); the second bare run
        // against the first is the control, what noise alone does to a ratio in this run.
        let (rounds, done) = deadline.rounds(CASE1_ROUNDS, || {
            let base = load(&sb, deadline, 0, "169.254.170.23:8080", count, 4, &base_env)?;
            let ours = load(&sb, deadline, 0, ours_addr, count, 4, &ours_env)?;
            let again = load(
                &sb,
                deadline,
                0,
                "169.254.170.23:8080",
                count,
                4,
                &again_env,
            )?;
            for r in [&ours, &base, &again] {
                ensure!(r.count(200) as usize == count, "{r:?}");
            }
            Ok((ours, base, again))
        })?;
        all_done &= done;
        if rounds.is_empty() {
            break;
        }
        for (who, file) in [("agent", &traces.0), ("bare hyper", &traces.1)] {
            let latencies: Vec<u64> = read_trace(file)?
                .into_iter()
                .filter(|(_, _, o)| o == "ok")
                .map(|(_, us, _)| us)
                .collect();
            cdfs.push(Series {
                name: format!("{who}, {mode}"),
                points: cdf(&latencies),
            });
        }
        let stand_in = candidate
            .as_ref()
            .map(|like| format!(" (in the agent's place: bare hyper with {like})"))
            .unwrap_or_default();
        let case = format!(
            "1. warm request, {mode}{stand_in}{}",
            partial_of(rounds.len(), CASE1_ROUNDS, done)
        );
        for (figure, f, bound) in [
            (
                "throughput req/s",
                &rps as &dyn Fn(&LoadResult) -> f64,
                Some(Bound::AtLeast(throughput_target)),
            ),
            (
                "p99 µs",
                &|r: &LoadResult| r.p99_us as f64,
                Some(Bound::AtMost(p99_target)),
            ),
            ("p50 µs", &|r: &LoadResult| r.p50_us as f64, None),
        ] {
            let values: Vec<_> = rounds.iter().map(|(o, b, a)| (f(o), f(b), f(a))).collect();
            report.interleaved_row(&case, figure, &values, bound)?;
        }
        // The same load against each, under the same profiler: what the agent does per
        // request that the bare server does not.
        if std::env::var_os("BENCH_PROFILE").is_some() {
            for (who, pid, addr) in [
                ("agent", agent.pid(), "169.254.170.23:80"),
                ("bare", bare.id(), "169.254.170.23:8080"),
            ] {
                let out = profile(pid, || {
                    load(&sb, deadline, 0, addr, count, 4, env).map(drop)
                })?;
                let file = format!("profile-{who}-{}.txt", mode.replace(' ', "-"));
                std::fs::write(bench_dir().join(&file), out)?;
                report.note(
                    &case,
                    &format!("perf profile of the {who}"),
                    format!("target/bench/{file}"),
                );
            }
        }
    }
    let _ = bare.kill();
    let _ = bare.wait();
    if let Some(c) = cand.as_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    if !cdfs.is_empty() {
        report.chart(
            "1-latency.svg",
            &Chart {
                title: "Case 1: warm requests, agent against bare hyper (last round)".into(),
                x_label: "latency, µs (log scale)".into(),
                y_label: "fraction of requests at or under".into(),
                x_log: true,
                y_log: false,
            },
            &cdfs,
        );
    }
    finished(all_done, deadline)
}

/// Case 9: instructions per warm request, the agent against bare hyper, both run by
/// callgrind: a count that is the same whatever else the machine does, so its ratio is a
/// verdict case 1's wall-clock ratios cannot give on a noisy machine (its control, bare
/// against bare, shows how far the count itself moves).
fn instructions(report: &mut Report, deadline: &Deadline) -> Result<()> {
    let (sb, fake) = node(Driver::Cgroupfs, 1)?;
    let dir = sb.dir().join("callgrind");
    std::fs::create_dir_all(&dir)?;
    let wrapper = tests::callgrind::wrapper(&dir);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    // The first request's EKS Auth call under callgrind may outlast the 900 ms deadline on a
    // slow machine (then 503 "retry"): it waits for the call instead.
    let mut agent = launch_agent_wrapped(&sb, &fake, &wrapper, &["--response-deadline", "60s"])?;
    // Start-up under callgrind (the BPF object and the kernel's BTF parsed) is slow.
    agent.wait_ready(&sb, Duration::from_secs(90))?;
    let first = curl(&sb, 0, 0, credentials_url(false), &[])?;
    ensure!(first.status == 200, "warm-up: {}", first.body);
    let body = sb.dir().join("body.json");
    std::fs::write(&body, &first.body)?;
    let (program, rest) = wrapper.split_first().context("a wrapper")?;
    let mut bare = sb
        .node_command(program, None)?
        .args(rest)
        .arg(helper_bin("bare-server")?)
        .arg("169.254.170.23:8080")
        .arg(&body)
        .spawn()?;
    let counted = (|| {
        wait_listening(&sb, "169.254.170.23:8080")?;
        let ours = tests::callgrind::Counted::attach(agent.pid(), &dir)?;
        let base = tests::callgrind::Counted::attach(bare.id(), &dir)?;
        let mut all_done = true;
        for (mode, count, env) in [
            ("keep-alive", 3_000, &[("LOAD_KEEPALIVE", "1")][..]),
            ("new connection per request", 600, &[][..]),
        ] {
            let per_request = |who: &tests::callgrind::Counted, addr: &str| {
                let (n, file) = who.count(|| {
                    let r = load(&sb, deadline, 0, addr, count, 4, env)?;
                    ensure!(r.count(200) as usize == count, "{r:?}");
                    Ok(())
                })?;
                Ok::<_, anyhow::Error>((n as f64 / count as f64, file))
            };
            // Interleaved as in case 1: bare, agent, bare again.
            let (rounds, done) = deadline.rounds(ROUNDS, || {
                let b = per_request(&base, "169.254.170.23:8080")?;
                let o = per_request(&ours, "169.254.170.23:80")?;
                let a = per_request(&base, "169.254.170.23:8080")?;
                Ok((o, b, a))
            })?;
            all_done &= done;
            let Some(((_, ours_file), (_, base_file), _)) = rounds.last() else {
                break;
            };
            let case = format!(
                "9. warm request, {mode}{}",
                partial_of(rounds.len(), ROUNDS, done)
            );
            let values: Vec<_> = rounds
                .iter()
                .map(|((o, _), (b, _), (a, _))| (*o, *b, *a))
                .collect();
            report.interleaved_row(
                &case,
                "instructions per request (callgrind, all threads, user space)",
                &values,
                None,
            )?;
            // Where the agent's instructions go that the bare server's do not, function by
            // function (the last round's dumps).
            let name = format!("callgrind-{}.txt", mode.replace(' ', "-"));
            std::fs::write(
                bench_dir().join(&name),
                tests::callgrind::difference(
                    &tests::callgrind::self_costs(ours_file)?,
                    &tests::callgrind::self_costs(base_file)?,
                    count,
                    60,
                ),
            )?;
            report.note(
                &case,
                "the agent's instructions beyond the bare server's, by function",
                format!("target/bench/{name}"),
            );
            // The dumps themselves, for callgrind_annotate or a closer look.
            for (who, file) in [("agent", ours_file), ("bare", base_file)] {
                let dump = format!("callgrind-{who}-{}.out", mode.replace(' ', "-"));
                std::fs::copy(file, bench_dir().join(dump))?;
            }
        }
        finished(all_done, deadline)
    })();
    let _ = bare.kill();
    let _ = bare.wait();
    drop(agent);
    counted
}

/// Where the bench writes its results.
fn bench_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench")
}

/// `perf record` of the agent while `run` runs; returns `perf report`'s flat profile
/// (symbols over 0.5 % of samples, self time).
fn profile(pid: u32, run: impl FnOnce() -> Result<()>) -> Result<String> {
    let dir = bench_dir();
    std::fs::create_dir_all(&dir)?;
    let data = dir.join(format!("perf-{pid}.data"));
    let mut perf = std::process::Command::new("perf")
        .args(["record", "-q", "-F", "2000", "-g", "-o"])
        .arg(&data)
        .args(["-p", &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("perf (installed by `cargo xtask setup`)")?;
    // Beside the samples, how often the process slept and woke: a request answered later
    // with little more CPU is a scheduling difference, which samples do not show.
    let stat_file = dir.join(format!("perf-stat-{pid}.txt"));
    let mut stat = std::process::Command::new("perf")
        .args(["stat", "-e", "task-clock,context-switches,cpu-migrations"])
        .args(["-p", &pid.to_string(), "-o"])
        .arg(&stat_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("perf stat")?;
    std::thread::sleep(Duration::from_millis(300));
    let ran = run();
    for p in [&perf, &stat] {
        // SAFETY: signalling our own children; SIGINT makes perf write its data and exit.
        unsafe { libc::kill(p.id() as i32, libc::SIGINT) };
    }
    perf.wait()?;
    stat.wait()?;
    ran?;
    let mut text = std::fs::read_to_string(&stat_file).unwrap_or_default();
    // Where the time went (kernel, agent, libc), then by symbol.
    for sort in ["dso", "symbol"] {
        let report = std::process::Command::new("perf")
            .args(["report", "--stdio", "--no-children", "--sort", sort])
            .args(["--percent-limit", "0.2", "-g", "none", "-i"])
            .arg(&data)
            .output()?;
        ensure!(
            report.status.success(),
            "perf report: {}",
            String::from_utf8_lossy(&report.stderr)
        );
        text.push_str(&String::from_utf8_lossy(&report.stdout));
    }
    Ok(text)
}

/// What one connect-bench run measured.
struct Connects {
    per_sec: f64,
    /// Connects that took over 900 ms (a dropped SYN's retransmit).
    slow: u64,
    /// `TcpExt:ListenOverflows` in the node namespace during the run.
    overflows: u64,
}

#[allow(clippy::too_many_arguments)] // reason: where the client runs, what it dials, and the budget
fn connects(
    sb: &Sandbox,
    deadline: &Deadline,
    pod: usize,
    cgroup: Option<&Path>,
    addr: &str,
    count: usize,
    threads: usize,
) -> Result<Connects> {
    let bin = helper_bin("connect-bench")?;
    let mut cmd = match cgroup {
        Some(cg) => sb.pod_netns_command(pod, cg, bin)?,
        None => sb.pod_command(pod, 0, bin)?,
    };
    cmd.arg(addr)
        .arg(count.to_string())
        .arg(threads.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let overflows = || -> Result<u64> { Ok(sb.node().counters()?["TcpExt:ListenOverflows"]) };
    let before = overflows()?;
    let out = deadline.wait(cmd.spawn()?)?;
    ensure!(
        out.status.success(),
        "connect-bench: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(v["failed"] == 0, "connect-bench failures: {v}");
    Ok(Connects {
        per_sec: v["per_sec"].as_f64().context("per_sec")?,
        slow: v["slow"].as_u64().context("slow")?,
        overflows: overflows()? - before,
    })
}

/// Case 2: New connections per second a pod makes through the connect hooks (marked, counted,
/// recorded; nothing rewritten) against the same connects from a cgroup no hook runs in; what
/// the programs cost a pod's other connects; and the connect rate the agent's accept path
/// (taking each record from the kernel) sustains beside a bare accept loop, with the node's
/// listen overflows.
fn steering(report: &mut Report, deadline: &Deadline) -> Result<()> {
    let (sb, fake) = node(Driver::Cgroupfs, 1)?;
    // The agent's listener on port 80 is the server of the first variants.
    let _agent = agent(&sb, &fake, &[])?;
    let outside = sb.cgroups().outside_pods("bench-unsteered")?;
    let mut other = sb
        .node_command(helper_bin("bare-server")?, None)?
        .args(["10.200.1.1:7002", "--accept-only"])
        .spawn()?;
    wait_listening(&sb, "10.200.1.1:7002")?;
    let n = 10_000;
    // (label, cgroup, address, threads)
    let variants: [(&str, Option<&Path>, &str, usize); 6] = [
        ("attributed", None, "169.254.170.23:80", 1),
        ("no hook", Some(&outside), "169.254.170.23:80", 1),
        ("attached", None, "10.200.1.1:7002", 1),
        ("bare", Some(&outside), "10.200.1.1:7002", 1),
        ("agent, 4 threads", None, "169.254.170.23:80", 4),
        ("bare, 4 threads", Some(&outside), "10.200.1.1:7002", 4),
    ];
    let (rounds, done) = deadline.rounds(ROUNDS, || {
        variants
            .iter()
            .map(|(_, cg, addr, threads)| connects(&sb, deadline, 0, *cg, addr, n, *threads))
            .collect::<Result<Vec<_>>>()
    })?;
    let _ = other.kill();
    let _ = other.wait();
    if rounds.is_empty() {
        return finished(false, deadline);
    }
    let rate = |i: usize| median(rounds.iter().map(|r| r[i].per_sec).collect());
    let case = format!("2. attribution{}", partial(rounds.len(), done));
    let (s, d) = (rate(0), rate(1));
    report.row(
        &case,
        "connects/s through the hooks vs the same connects with no hook",
        s,
        d,
        s / d,
        ">= 0.9",
        s / d >= 0.9,
    );
    let (a, b) = (rate(2), rate(3));
    report.row(
        &case,
        "other connects: time with programs / without",
        b,
        a,
        b / a,
        "<= 1.02",
        b / a <= 1.02,
    );
    let (agent4, bare4) = (rate(4), rate(5));
    report.row(
        &case,
        "agent accept path, 4 connecting threads: connects/s vs bare accept loop",
        agent4,
        bare4,
        agent4 / bare4,
        ">= 0.9",
        agent4 / bare4 >= 0.9,
    );
    let counts: Vec<String> = variants
        .iter()
        .enumerate()
        .map(|(i, (label, ..))| {
            let sum = |f: fn(&Connects) -> u64| rounds.iter().map(|r| f(&r[i])).sum::<u64>();
            format!("{label} {}/{}", sum(|c| c.overflows), sum(|c| c.slow))
        })
        .collect();
    report.note(
        &case,
        &format!(
            "listen overflows (node namespace) / connects over 900 ms, {n} connects per variant and round"
        ),
        counts.join(", "),
    );
    finished(done, deadline)
}

/// Case 3: 100 pods × 10 concurrent first requests while EKS Auth throttles above 20 calls/s.
fn cold_burst(report: &mut Report, deadline: &Deadline) -> Result<()> {
    let (sb, fake) = node(Driver::Systemd, 100)?;
    // The default kernel connect budget: a cold start must never meet it.
    let _agent = agent(
        &sb,
        &fake,
        &["--pod-connect-rate", "100", "--pod-connect-burst", "200"],
    )?;
    fake.set_fault(Fault::RateLimit(20));
    let started = Instant::now();
    // SDK-like clients: retry 5xx up to 3 times, 1 s apart.
    let children = spawn_cold_burst(&sb, 100, 3)?;
    let mut failures = 0;
    let mut retries = 0;
    let mut waited = 0;
    let mut out_of_time = None;
    for child in children {
        // After the budget ran out, the rest are killed at once.
        match deadline.wait(child) {
            Ok(out) => {
                let r: serde_json::Value = serde_json::from_slice(&out.stdout)?;
                failures += 10 - r["statuses"]["200"].as_u64().unwrap_or(0);
                retries += r["retries"].as_u64().unwrap_or(0);
                waited += 1;
            }
            Err(e) if is_out_of_time(&e) => out_of_time = Some(e),
            Err(e) => return Err(e),
        }
    }
    let took = started.elapsed();
    let case = format!(
        "3. cold burst 100×10, EKS Auth throttling > 20/s{}",
        if waited < 100 {
            format!(" ({waited} of 100 pods finished)")
        } else {
            String::new()
        }
    );
    report.note(
        &case,
        "successful upstream calls (must be 100)",
        fake.issued().len().to_string(),
    );
    report.note(
        &case,
        "upstream calls incl. throttled",
        fake.calls().to_string(),
    );
    report.note(
        &case,
        "pod-visible failures after 3 SDK retries (must be 0)",
        failures.to_string(),
    );
    report.note(
        &case,
        "SDK retries / time to all served",
        format!("{retries} / {:.1} s", took.as_secs_f64()),
    );
    let text = tests::agent::scrape(&sb)?;
    report.note(
        &case,
        "connects refused by the default kernel budget (must be 0)",
        metric(&text, "pod_identity_ebpf_events{event=\"budget_refused\"}")?.to_string(),
    );
    out_of_time.map_or(Ok(()), Err)
}

/// Case 4: RSS and warm latency with 100, 1,000 and 10,000 cached identities (fallback-mode
/// tokens: one cache entry per token).
fn scale(report: &mut Report, deadline: &Deadline) -> Result<()> {
    let (sb, fake) = node(Driver::Cgroupfs, 1)?;
    let agent = agent(&sb, &fake, &["--no-ebpf", "--max-cache-size", "20000"])?;
    let base_rss = agent.rss_kib();
    let mut first_p50 = None;
    let mut rss_points = Vec::new();
    for n in [100usize, 1_000, 10_000] {
        let tokens: Vec<String> = (0..n)
            .map(|i| {
                sb.issuer().mint(
                    &TokenSubject {
                        namespace: "app".into(),
                        service_account: "reader".into(),
                        pod_name: format!("scale-{i}"),
                        pod_uid: format!("00000000-0000-4000-8000-{i:012}"),
                    },
                    Duration::from_secs(24 * 3600),
                )
            })
            .collect();
        let file = sb.dir().join(format!("tokens-{n}"));
        std::fs::write(&file, tokens.join("\n"))?;
        let file = file.display().to_string();
        let tokens_env = [("LOAD_TOKENS", file.as_str())];
        // Populate the entries not there yet (one upstream call each), then measure hits.
        let fill = load(&sb, deadline, 0, "169.254.170.23:80", n, 8, &tokens_env)?;
        ensure!(fill.count(200) as usize == n, "fill {n}: {fill:?}");
        let warm = load(&sb, deadline, 0, "169.254.170.23:80", 4000, 1, &tokens_env)?;
        ensure!(warm.count(200) == 4000, "{warm:?}");
        let rss = agent.rss_kib();
        rss_points.push((n as f64, rss as f64 / 1024.0));
        let p50 = warm.p50_us as f64;
        let first = *first_p50.get_or_insert(p50);
        let case = format!("4. scale, {n} identities");
        report.note(
            &case,
            "agent RSS",
            format!(
                "{:.1} MiB (idle {:.1} MiB)",
                rss as f64 / 1024.0,
                base_rss as f64 / 1024.0
            ),
        );
        report.row(
            &case,
            "warm p50 µs vs 100 identities",
            p50,
            first,
            p50 / first,
            "<= 1.2",
            p50 / first <= 1.2,
        );
        if n == 10_000 {
            let per_entry = (rss.saturating_sub(base_rss) as f64 * 1024.0) / n as f64;
            report.note(
                &case,
                "memory per cached identity",
                format!("{per_entry:.0} bytes"),
            );
            report.row(
                &case,
                "RSS MiB (target 40)",
                rss as f64 / 1024.0,
                40.0,
                rss as f64 / 1024.0 / 40.0,
                "<= 1.0",
                rss <= 40 * 1024,
            );
        }
    }
    let idle = base_rss as f64 / 1024.0;
    let idle_line = rss_points.iter().map(|(n, _)| (*n, idle)).collect();
    report.chart(
        "4-rss.svg",
        &Chart {
            title: "Case 4: agent memory against cached identities".into(),
            x_label: "cached identities (log scale)".into(),
            y_label: "resident set, MiB".into(),
            x_log: true,
            y_log: false,
        },
        &[
            Series {
                name: "RSS after the warm load".into(),
                points: rss_points,
            },
            Series {
                name: "RSS idle, before the first identity".into(),
                points: idle_line,
            },
        ],
    );
    Ok(())
}

/// Case 5: Attribution and cross-check: warm requests on the eBPF path against `--no-ebpf`.
fn attribution_cost(report: &mut Report, deadline: &Deadline) -> Result<()> {
    let (sb, fake) = node(Driver::Cgroupfs, 1)?;
    let (pairs, done) = deadline.rounds(ROUNDS, || {
        let mut pair = Vec::new();
        for extra in [&[][..], &["--no-ebpf"][..]] {
            let a = agent(&sb, &fake, extra)?;
            ensure!(curl(&sb, 0, 0, credentials_url(false), &[])?.status == 200);
            let r = load(&sb, deadline, 0, "169.254.170.23:80", 8000, 4, &[])?;
            ensure!(r.count(200) == 8000, "{r:?}");
            pair.push(r);
            a.stop()?;
        }
        Ok(pair)
    })?;
    if pairs.is_empty() {
        return finished(false, deadline);
    }
    let case = format!("5. attribution + cross-check{}", partial(pairs.len(), done));
    let of = |f: &dyn Fn(&LoadResult) -> f64| {
        (
            median(pairs.iter().map(|p| f(&p[0])).collect()),
            median(pairs.iter().map(|p| f(&p[1])).collect()),
        )
    };
    let (e, p) = of(&rps);
    report.row(
        &case,
        "throughput req/s vs --no-ebpf",
        e,
        p,
        e / p,
        "(info)",
        true,
    );
    let (e, p) = of(&|r| r.p50_us as f64);
    report.row(&case, "p50 µs vs --no-ebpf", e, p, e / p, "(info)", true);
    finished(done, deadline)
}

/// Case 6: a new pod's first request with EKS Auth answering in 50 ms, `--prewarm` on and
/// off, against a warm hit. The pod's container asks 200 ms after the kubelet wrote its token
/// (starting a container takes longer than that).
fn first_request(report: &mut Report, deadline: &Deadline) -> Result<()> {
    const PODS: usize = 12;
    let (mut sb, fake) = node(Driver::Cgroupfs, 0)?;
    fake.set_fault(Fault::Latency(Duration::from_millis(50)));
    let kubelet = sb.kubelet_root().display().to_string();
    let mut first = [Vec::new(), Vec::new()];
    let mut warm = Vec::new();
    let mut all_done = true;
    for (mode, extra) in [
        (
            0,
            vec!["--prewarm", kubelet.as_str(), "--max-service-qps", "50"],
        ),
        (1, vec!["--max-service-qps", "50"]),
    ] {
        let a = agent(&sb, &fake, &extra)?;
        let (rounds, done) = deadline.rounds(PODS, || {
            let pod = sb.add_pod(PodSpec::new("app", "reader"))?;
            std::thread::sleep(Duration::from_millis(200));
            let cold = load(&sb, deadline, pod, "169.254.170.23:80", 1, 1, &[])?;
            let hit = load(&sb, deadline, pod, "169.254.170.23:80", 1, 1, &[])?;
            ensure!(
                cold.count(200) == 1 && hit.count(200) == 1,
                "{cold:?} {hit:?}"
            );
            Ok((cold.p50_us as f64, hit.p50_us as f64))
        })?;
        all_done &= done;
        first[mode].extend(rounds.iter().map(|r| r.0));
        warm.extend(rounds.iter().map(|r| r.1));
        a.stop()?;
    }
    let (n_on, n_off) = (first[0].len(), first[1].len());
    let [on, off] = first.map(median);
    let hit = median(warm);
    let case = format!("6. first request of a new pod, EKS Auth 50 ms ({n_on}/{n_off} pods)");
    report.row(
        &case,
        "p50 µs, --prewarm vs a warm hit",
        on,
        hit,
        on / hit,
        "<= 1.5",
        on / hit <= 1.5,
    );
    report.row(
        &case,
        "p50 µs, without --prewarm vs 50 ms",
        off,
        50_000.0,
        off / 50_000.0,
        ">= 1.0 (info)",
        true,
    );
    finished(all_done, deadline)
}

/// Case 7: one pod flooding new connections (16 threads) beside a quiet pod asking 50 times a
/// second, with the kernel's connect budget (its defaults) and without it (the user-space
/// request budget alone, the baseline). The quiet pod's p99 beside the flood against alone,
/// and the agent's CPU time over the flood.
fn fairness(report: &mut Report, deadline: &Deadline) -> Result<()> {
    let case = "7. one pod flooding beside a quiet pod";
    let mut figures = Vec::new();
    let mut timelines = Vec::new();
    for connect_rate in ["100", "0"] {
        let (sb, fake) = node(Driver::Cgroupfs, 2)?;
        let agent = agent(
            &sb,
            &fake,
            &[
                "--pod-connect-rate",
                connect_rate,
                "--pod-request-rate",
                "200",
            ],
        )?;
        let (flooder, quiet) = (0, 1);
        // The quiet pod asks every 20 ms and traces each request (charted over time).
        let trace = sb.dir().join("trace-quiet");
        let trace_env = trace.display().to_string();
        let quiet_env: &[(&str, &str)] = &[("LOAD_INTERVAL_MS", "20"), ("LOAD_TRACE", &trace_env)];
        // Both pods cached, then the quiet pod alone.
        load(&sb, deadline, flooder, "169.254.170.23:80", 1, 1, &[])?;
        let began = now_us();
        let alone = load(&sb, deadline, quiet, "169.254.170.23:80", 150, 1, quiet_env)?;
        let alone_trace = read_trace(&trace)?;
        let flood = spawn_load_with(
            &sb,
            flooder,
            0,
            "169.254.170.23:80",
            "/v1/credentials",
            100_000_000,
            16,
            // Long enough that one scheduler hiccup cannot move the CPU figure much.
            &[("LOAD_SECONDS", "10")],
        )?;
        let flood_began = now_us();
        std::thread::sleep(Duration::from_millis(300));
        let (cpu0, t0) = (agent.cpu_time()?, Instant::now());
        let beside = load(&sb, deadline, quiet, "169.254.170.23:80", 150, 1, quiet_env);
        // The agent's CPU over the whole flood (about 9.7 s), not only the quiet pod's 3 s.
        let flood = deadline.wait(flood)?;
        let cpu = (agent.cpu_time()? - cpu0).as_secs_f64() / t0.elapsed().as_secs_f64();
        let flood: LoadResult = serde_json::from_slice(&flood.stdout).context("flood output")?;
        let beside = beside?;
        ensure!(
            beside.count(200) == 150,
            "the quiet pod was not served: {beside:?}"
        );
        let budget = if connect_rate == "0" {
            "no kernel budget"
        } else {
            "kernel budget"
        };
        if connect_rate != "0" {
            timelines.push(Series {
                name: "quiet pod alone".into(),
                points: over_time(&alone_trace, began),
            });
        }
        // Beside the flood, on the same time axis from the flood's start.
        timelines.push(Series {
            name: format!("quiet pod beside the flood, {budget}"),
            points: over_time(&read_trace(&trace)?, flood_began),
        });
        let refused = metric(
            &tests::agent::scrape(&sb)?,
            "pod_identity_ebpf_events{event=\"budget_refused\"}",
        )?;
        report.note(
            case,
            &format!(
                "--pod-connect-rate {connect_rate}: flood answered / 503 / refused at connect"
            ),
            format!(
                "{} / {} / {} (kernel: {refused}) in {:.1} s",
                flood.count(200),
                flood.count(503),
                flood.refused,
                flood.elapsed_ms as f64 / 1000.0
            ),
        );
        figures.push((alone.p99_us as f64, beside.p99_us as f64, cpu));
    }
    let [(alone, beside, cpu), (alone_off, beside_off, cpu_off)] = figures[..] else {
        unreachable!("two runs")
    };
    report.row(
        case,
        "quiet p99 µs beside the flood vs alone (kernel budget)",
        beside,
        alone,
        beside / alone,
        "<= 2",
        beside / alone <= 2.0,
    );
    report.row(
        case,
        "same, without the kernel budget (user-space budget only)",
        beside_off,
        alone_off,
        beside_off / alone_off,
        "info",
        true,
    );
    report.row(
        case,
        "agent CPU % of one CPU over the flood, kernel budget vs without",
        cpu * 100.0,
        cpu_off * 100.0,
        cpu / cpu_off,
        "<= 5 %",
        cpu <= 0.05,
    );
    report.chart(
        "7-flood.svg",
        &Chart {
            title: "Case 7: a quiet pod's requests, alone and beside a pod flooding (16 threads)"
                .into(),
            x_label: "seconds since its load began (beside: since the flood began)".into(),
            y_label: "latency, ms (log scale)".into(),
            x_log: false,
            y_log: true,
        },
        &timelines,
    );
    Ok(())
}

/// A bench case: name, time budget, body.
type Case = (
    &'static str,
    Duration,
    fn(&mut Report, &Deadline) -> Result<()>,
);

/// The cases and their budgets (together under nine minutes; most cases finish well inside).
const CASES: [Case; 9] = [
    (
        "1. warm request vs bare hyper",
        Duration::from_secs(150),
        warm_vs_bare,
    ),
    (
        "2. steering and the accept path",
        Duration::from_secs(60),
        steering,
    ),
    (
        "3. cold burst under throttling",
        Duration::from_secs(40),
        cold_burst,
    ),
    ("4. scale", Duration::from_secs(50), scale),
    (
        "5. attribution cost",
        Duration::from_secs(40),
        attribution_cost,
    ),
    (
        "6. first request of a new pod",
        Duration::from_secs(40),
        first_request,
    ),
    (
        "7. one pod flooding beside a quiet pod",
        Duration::from_secs(60),
        fairness,
    ),
    (
        "8. upgrade under steady load",
        Duration::from_secs(75),
        upgrade,
    ),
    (
        "9. instructions per warm request",
        Duration::from_secs(150),
        instructions,
    ),
];

/// One request of a traced load: (start, µs since the epoch; latency µs; outcome).
type Traced = (u128, u64, String);

/// What one run of case 8 measured: its trace, and the window (µs since the epoch) of the
/// upgrade or restart inside it.
struct Window {
    trace: Vec<Traced>,
    /// When the load started.
    began: u128,
    from: u128,
    to: u128,
}

impl Window {
    /// Requests that started inside the window (and up to 100 ms after: the last of them
    /// still wait on the new agent).
    fn inside(&self) -> impl Iterator<Item = &Traced> {
        let to = self.to + 100_000;
        self.trace
            .iter()
            .filter(move |(at, _, _)| (self.from..=to).contains(at))
    }

    fn p99_us(&self) -> f64 {
        let mut l: Vec<u64> = self
            .inside()
            .filter(|(_, _, o)| o == "ok")
            .map(|(_, us, _)| *us)
            .collect();
        l.sort_unstable();
        l.get((l.len() * 99 / 100).min(l.len().saturating_sub(1)))
            .map_or(f64::NAN, |v| *v as f64)
    }

    fn failed(&self, outcome: &str) -> usize {
        self.trace.iter().filter(|(_, _, o)| o == outcome).count()
    }
}

/// The requests a load client traced into `file` (`LOAD_TRACE`); the file is removed.
fn read_trace(file: &Path) -> Result<Vec<Traced>> {
    let trace = std::fs::read_to_string(file)
        .with_context(|| format!("trace {}", file.display()))?
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            Some((
                f.next()?.parse().ok()?,
                f.next()?.parse().ok()?,
                f.next()?.to_owned(),
            ))
        })
        .collect();
    let _ = std::fs::remove_file(file);
    Ok(trace)
}

/// `env` and `LOAD_TRACE=file`.
fn with_trace<'a>(env: &[(&'a str, &'a str)], file: &'a str) -> Vec<(&'a str, &'a str)> {
    env.iter().copied().chain([("LOAD_TRACE", file)]).collect()
}

/// A trace as (seconds since `began`, latency ms) of its answered requests.
fn over_time(trace: &[Traced], began: u128) -> Vec<(f64, f64)> {
    trace
        .iter()
        .filter(|(_, _, o)| o == "ok")
        .map(|(at, us, _)| (at.saturating_sub(began) as f64 / 1e6, *us as f64 / 1000.0))
        .collect()
}

fn now_us() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

/// How case 8 changes the agent while the load runs.
#[derive(Clone, Copy, PartialEq)]
enum Change {
    /// Nothing: the baseline, its window at the upgrade's offsets.
    Steady,
    /// The new agent starts beside the old and takes over; then the old one is stopped.
    Upgrade,
    /// Stop, then start: how upgrades went before the handover.
    Restart,
}

/// One run of case 8: a paced load on new connections from one pod, and `change` 1 s into it.
fn upgrade_run(
    sb: &Sandbox,
    fake: &FakeEksAuth,
    deadline: &Deadline,
    change: Change,
    offsets: Option<(u128, u128)>,
) -> Result<Window> {
    let old = agent(sb, fake, &[])?;
    ensure!(curl(sb, 0, 0, credentials_url(false), &[])?.status == 200);
    let trace_file = sb.dir().join(format!("trace-{}", tests::names::unique()));
    let trace_env = trace_file.display().to_string();
    let began = now_us();
    let child = spawn_load_with(
        sb,
        0,
        0,
        "169.254.170.23:80",
        "/v1/credentials",
        5000,
        4,
        &[("LOAD_INTERVAL_MS", "2"), ("LOAD_TRACE", &trace_env)],
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let from = now_us();
    let serving = match change {
        Change::Steady => {
            let (a, b) = offsets.context("the steady run takes the upgrade's window")?;
            std::thread::sleep(Duration::from_micros((b - a) as u64));
            old
        }
        Change::Upgrade => {
            let mut old = old;
            let mut new = launch_agent(sb, fake, &[])?;
            new.wait_log(tests::agent::STARTED, Duration::from_secs(20))?;
            old.wait_log("handed over: idle until stopped", Duration::from_secs(20))?;
            ensure!(
                old.terminate()?.success(),
                "the old agent failed at SIGTERM"
            );
            new
        }
        Change::Restart => {
            ensure!(old.stop()?.success(), "the agent failed at SIGTERM");
            agent(sb, fake, &[])?
        }
    };
    let to = now_us();
    let out = deadline.wait(child)?;
    ensure!(out.status.success(), "load failed");
    let result: LoadResult = serde_json::from_slice(&out.stdout)?;
    ensure!(
        result.statuses.keys().all(|s| s == "200"),
        "answers other than 200: {result:?}"
    );
    drop(serving);
    let trace = read_trace(&trace_file)?;
    let (from, to) = match (change, offsets) {
        (Change::Steady, Some((a, b))) => (began + a, began + b),
        _ => (from, to),
    };
    Ok(Window {
        trace,
        began,
        from,
        to,
    })
}

/// Case 8: an upgrade (handover) under a steady load of new connections, against the same
/// load with no upgrade and with a stop-then-start restart: refused and broken connections,
/// and the p99 of the requests that started during the change.
fn upgrade(report: &mut Report, deadline: &Deadline) -> Result<()> {
    let (sb, fake) = node(Driver::Cgroupfs, 1)?;
    let (rounds, done) = deadline.rounds(ROUNDS, || {
        let upgraded = upgrade_run(&sb, &fake, deadline, Change::Upgrade, None)?;
        let restarted = upgrade_run(&sb, &fake, deadline, Change::Restart, None)?;
        // The steady run's window: the upgrade's, at the same offset from its load's start.
        let offsets = (upgraded.from - upgraded.began, upgraded.to - upgraded.began);
        let steady = upgrade_run(&sb, &fake, deadline, Change::Steady, Some(offsets))?;
        Ok([upgraded, restarted, steady])
    })?;
    if rounds.is_empty() {
        return finished(false, deadline);
    }
    let case = format!("8. upgrade under load{}", partial(rounds.len(), done));
    let of =
        |i: usize, f: &dyn Fn(&Window) -> f64| median(rounds.iter().map(|r| f(&r[i])).collect());
    for (i, name) in [(0, "upgrade (handover)"), (1, "restart (stop, start)")] {
        let (refused, broken) = (
            of(i, &|w| w.failed("refused") as f64),
            of(i, &|w| w.failed("broken") as f64),
        );
        let window = of(i, &|w| (w.to - w.from) as f64 / 1000.0);
        report.note(
            &case,
            &format!("{name}: refused / broken connections, change took"),
            format!("{refused} / {broken}, {window:.0} ms"),
        );
    }
    let (upgrade_refused, upgrade_broken) = (
        rounds
            .iter()
            .map(|r| r[0].failed("refused"))
            .max()
            .unwrap_or(0),
        rounds
            .iter()
            .map(|r| r[0].failed("broken"))
            .max()
            .unwrap_or(0),
    );
    let worst = upgrade_refused + upgrade_broken;
    report.note(
        &case,
        "refused + broken, worst upgrade (target 0)",
        format!("{worst} ({})", if worst == 0 { "met" } else { "missed" }),
    );
    let (u, s) = (of(0, &Window::p99_us), of(2, &Window::p99_us));
    report.row(
        &case,
        "p99 µs during the upgrade vs steady",
        u,
        s,
        u / s,
        "<= 2.0",
        u / s <= 2.0,
    );
    let r = of(1, &Window::p99_us);
    report.row(
        &case,
        "p99 µs during a restart vs steady",
        r,
        s,
        r / s,
        "(info)",
        true,
    );
    if let Some(last) = rounds.last() {
        let series: Vec<Series> = [
            "upgrade (handover)",
            "restart (stop, start)",
            "steady (no change)",
        ]
        .iter()
        .zip(last)
        .map(|(name, w)| Series {
            name: format!("{name}, change at {:.2} s", (w.from - w.began) as f64 / 1e6),
            points: over_time(&w.trace, w.began),
        })
        .collect();
        report.chart(
            "8-upgrade.svg",
            &Chart {
                title: "Case 8: requests on new connections across an upgrade (last round)".into(),
                x_label: "seconds since the load began".into(),
                y_label: "latency, ms (log scale)".into(),
                x_log: false,
                y_log: true,
            },
            &series,
        );
    }
    finished(done, deadline)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")?
                .split(':')
                .nth(1)
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_default();
    let uname = std::process::Command::new("uname")
        .arg("-sr")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{uname}, {cpus} CPUs ({cpu})")
}

fn main() -> Result<()> {
    let started = Instant::now();
    let mut report = Report {
        md: String::new(),
        json: Vec::new(),
        charts: Vec::new(),
    };
    std::fs::create_dir_all(bench_dir())?;
    let machine = machine();
    let _ = writeln!(
        report.md,
        "Machine: {machine}. Medians of {ROUNDS} interleaved rounds where compared ({CASE1_ROUNDS} \
         in case 1, each figure there the median and [min–max] of its per-round ratios against the \
         bare runs before and after it, beside the control's: bare hyper against itself in the \
         same rounds; a verdict within the \
         control's noise of its target is \"undecided\").\n"
    );
    let _ = writeln!(
        report.md,
        "| case | figure | ours | baseline | ratio | target | |"
    );
    let _ = writeln!(report.md, "|---|---|---|---|---|---|---|");
    let mut failed = Vec::new();
    // BENCH_BUDGET_SCALE=0.1 shrinks every budget (to see "did not finish" reported).
    let scale: f64 = std::env::var("BENCH_BUDGET_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    // BENCH_ONLY=1,7 runs those cases only.
    let only: Option<Vec<String>> = std::env::var("BENCH_ONLY")
        .ok()
        .map(|s| s.split(',').map(|c| format!("{}.", c.trim())).collect());
    for (name, budget, case) in CASES {
        if only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|p| name.starts_with(p.as_str())))
        {
            continue;
        }
        let budget = budget.mul_f64(scale);
        let deadline = Deadline::after(budget);
        let t = Instant::now();
        match case(&mut report, &deadline) {
            Ok(()) => eprintln!("{name}: finished in {:.1} s", t.elapsed().as_secs_f64()),
            Err(e) if is_out_of_time(&e) => report.note(
                name,
                "DID NOT FINISH",
                format!(
                    "budget of {} s spent; rows above are what it measured",
                    budget.as_secs()
                ),
            ),
            Err(e) => {
                report.note(name, "FAILED", format!("{e:#}"));
                failed.push(name);
            }
        }
    }
    let _ = writeln!(
        report.md,
        "\nBench wall time: {:.0} s.",
        started.elapsed().as_secs_f64()
    );
    let dir = bench_dir();
    // The charts, also where docs/benchmarks.md shows them.
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/bench");
    std::fs::create_dir_all(&docs)?;
    if !report.charts.is_empty() {
        let _ = writeln!(report.md, "\nCharts:");
    }
    for (file, title) in &report.charts {
        std::fs::copy(dir.join(file), docs.join(file))?;
        let _ = writeln!(report.md, "- `{file}`: {title}");
    }
    std::fs::write(dir.join("results.md"), &report.md)?;
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&json!({"machine": machine, "results": report.json}))?,
    )?;
    println!("{}", report.md);
    println!("written to {}", dir.display());
    anyhow::ensure!(failed.is_empty(), "bench cases failed: {failed:?}");
    Ok(())
}
