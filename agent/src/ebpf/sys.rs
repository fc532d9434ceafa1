//! Raw `bpf(2)` commands aya 0.14 does not expose.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// `BPF_PROG_QUERY` command number.
const BPF_PROG_QUERY: libc::c_long = 16;
/// Include programs inherited from ancestors.
const BPF_F_QUERY_EFFECTIVE: u32 = 1;

/// The cgroup hooks our programs use, with their kernel `bpf_attach_type` numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum AttachType {
    /// `BPF_CGROUP_SOCK_OPS`.
    SockOps = 3,
    /// `BPF_CGROUP_INET4_CONNECT`.
    Connect4 = 10,
    /// `BPF_CGROUP_INET6_CONNECT`.
    Connect6 = 11,
    /// `BPF_CGROUP_INET4_GETPEERNAME`.
    GetPeerName4 = 29,
    /// `BPF_CGROUP_INET6_GETPEERNAME`.
    GetPeerName6 = 30,
}

/// Program ids in the effective set of `cgroup` for `kind`.
pub fn query_effective(cgroup: &impl AsFd, kind: AttachType) -> io::Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    // union bpf_attr, query member: target_fd u32 @0, attach_type u32 @4, query_flags u32 @8,
    // attach_flags u32 @12, prog_ids u64 @16, prog_cnt u32 @24.
    let mut attr = [0u64; 16];
    attr[0] = u64::from(cgroup.as_fd().as_raw_fd() as u32) | (u64::from(kind as u32) << 32);
    attr[1] = u64::from(BPF_F_QUERY_EFFECTIVE);
    attr[2] = ids.as_mut_ptr() as u64;
    attr[3] = ids.len() as u64;
    // SAFETY: attr is a zeroed, correctly laid out bpf_attr of 128 bytes; prog_ids points to
    // `ids`, which outlives the call and holds prog_cnt entries.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let count = (attr[3] as u32 as usize).min(ids.len());
    Ok(ids[..count].to_vec())
}
