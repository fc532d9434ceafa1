//! Locates the BPF object built by `cargo xtask build-ebpf` and hands its path to the crate,
//! which embeds it. Building without it fails with a message naming the command.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=AGENT_EBPF_OBJECT");
    let path = match std::env::var_os("AGENT_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"))
            .join("../agent-ebpf/target/bpfel-unknown-none/release/agent-ebpf"),
    };
    println!("cargo:rerun-if-changed={}", path.display());
    if !path.is_file() {
        panic!(
            "\n\nThe agent's BPF object is missing: {}\nBuild it first with `cargo xtask build-ebpf` \
             (or run `cargo xtask build`, which does both).\n\n",
            path.display()
        );
    }
    let path = path.canonicalize().expect("object path resolves");
    println!("cargo:rustc-env=AGENT_EBPF_OBJECT={}", path.display());
}
