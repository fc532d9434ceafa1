//! Locates the BPF object built by `cargo xtask build-ebpf` and hands its path to the crate,
//! which embeds it. Without it (a fresh clone, `cargo check`, an editor), the agent builds with
//! no programs and runs in fallback mode, saying so; `cargo xtask build` sets
//! `AGENT_EBPF_REQUIRED=1`, and then a missing object fails the build.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=AGENT_EBPF_OBJECT");
    println!("cargo:rerun-if-env-changed=AGENT_EBPF_REQUIRED");
    println!("cargo:rustc-check-cfg=cfg(agent_no_ebpf)");
    let path = match std::env::var_os("AGENT_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
            .join("../agent-ebpf/target/bpfel-unknown-none/release/agent-ebpf"),
    };
    println!("cargo:rerun-if-changed={}", path.display());
    if !path.is_file() {
        if std::env::var_os("AGENT_EBPF_REQUIRED").is_some_and(|v| v == "1") {
            panic!(
                "\n\nThe agent's BPF object is missing: {}\nBuild it first with `cargo xtask build-ebpf` \
                 (or run `cargo xtask build`, which does both).\n\n",
                path.display()
            );
        }
        println!(
            "cargo:warning=no BPF object at {}: building the agent without eBPF programs (it will run in fallback mode); `cargo xtask build` embeds them",
            path.display()
        );
        println!("cargo:rustc-cfg=agent_no_ebpf");
        return;
    }
    let path = path.canonicalize().expect("object path resolves");
    println!("cargo:rustc-env=AGENT_EBPF_OBJECT={}", path.display());
}
