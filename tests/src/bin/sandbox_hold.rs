//! `sandbox-hold [--real-node]`: builds a node sandbox with the real agent, two pods and a
//! process in each pod, prints `ready`, and waits to be signalled. With `--real-node`, a
//! private containerd makes the two pods instead (sandboxes, containers, snapshots, CNI). The
//! teardown suite kills it to prove a harness leaves nothing behind on SIGINT/SIGTERM, and
//! that `reap` sweeps up after SIGKILL.

use std::time::Duration;

use anyhow::Result;
use tests::agent::Agent;
use tests::cgroups::Driver;
use tests::realnode::RealNode;
use tests::sandbox::PodSpec;

fn main() -> Result<()> {
    let real = std::env::args().any(|a| a == "--real-node");
    let (mut sb, fake) = tests::fixtures::node(Driver::Cgroupfs)?;
    if real {
        let mut node = RealNode::start(sb).map_err(|b| b.0)?;
        for _ in 0..2 {
            node.run_pod("app", "reader", 1, false)?;
        }
        let _agent = Agent::start(&node, &fake, &[])?;
        println!("ready {}", node.name());
        hold()
    }
    let mut sleepers = Vec::new();
    for _ in 0..2 {
        let pod = sb.add_pod(PodSpec::new("app", "reader"))?;
        sleepers.push(sb.pod_command(pod, 0, "sleep")?.arg("600").spawn()?);
    }
    let _agent = Agent::start(&sb, &fake, &[])?;
    println!("ready {}", sb.name());
    hold()
}

fn hold() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
