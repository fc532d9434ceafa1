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

/// `BPF_OBJ_GET` command number.
const BPF_OBJ_GET: libc::c_long = 7;
/// `BPF_OBJ_GET_INFO_BY_FD` command number.
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `BPF_LINK_UPDATE` command number.
const BPF_LINK_UPDATE: libc::c_long = 29;
/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// `bpf(cmd, attr)`.
///
/// # Safety
/// `attr` must be a valid `bpf_attr` for `cmd`: every pointer in it must refer to a buffer of
/// the size the command expects that outlives the call.
unsafe fn bpf(cmd: libc::c_long, attr: &mut [u64; 16]) -> io::Result<i64> {
    // SAFETY: the caller vouches for attr (see above); the size passed is attr's own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            std::mem::size_of_val(attr),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn c_path(path: &std::path::Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// Opens a pinned BPF object (here: a link).
pub fn obj_get(path: &std::path::Path) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let path = c_path(path)?;
    let mut attr = [0u64; 16];
    attr[0] = path.as_ptr() as u64;
    // SAFETY: obj_get's attr holds only the pathname, a NUL-terminated string alive here.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr)? };
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Atomically replaces the program of `link` (aya 0.14 has no call for it): connects keep
/// being steered throughout an upgrade.
pub fn link_update(link: &impl AsFd, new_prog: &impl AsFd) -> io::Result<()> {
    let mut attr = [0u64; 16];
    // link_update: link_fd u32 @0, new_prog_fd u32 @4, flags u32 @8, old_prog_fd u32 @12.
    attr[0] = u64::from(link.as_fd().as_raw_fd() as u32)
        | (u64::from(new_prog.as_fd().as_raw_fd() as u32) << 32);
    // SAFETY: link_update's attr holds two fds and no pointers.
    unsafe { bpf(BPF_LINK_UPDATE, &mut attr) }.map(drop)
}

/// The cgroup id (inode) a cgroup link is attached to.
pub fn link_cgroup_id(link: &impl AsFd) -> io::Result<u64> {
    // bpf_link_info: type u32 @0, id u32 @4, prog_id u32 @8, union @16 { cgroup { cgroup_id u64 } }.
    let mut info = [0u64; 8];
    let mut attr = [0u64; 16];
    // info: bpf_fd u32 @0, info_len u32 @4, info u64 @8.
    attr[0] =
        u64::from(link.as_fd().as_raw_fd() as u32) | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: info points to `info`, whose size is info_len, alive for the call.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)? };
    Ok(info[2])
}

/// Whether `dir` is on a bpf file system.
pub fn is_bpffs(dir: &std::path::Path) -> io::Result<bool> {
    let path = c_path(dir)?;
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs fills the struct; path is NUL-terminated and alive.
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Mounts a bpf file system on `dir`.
pub fn mount_bpffs(dir: &std::path::Path) -> io::Result<()> {
    let path = c_path(dir)?;
    // SAFETY: plain mount(2) with NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            path.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
