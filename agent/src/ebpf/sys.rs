//! Raw `bpf(2)` commands aya 0.14 does not expose, on the kernel's own `bpf_attr` layout
//! (aya-obj's generated bindings: no hand-packed offsets or command numbers).

use std::io;
use std::os::fd::{AsFd, AsRawFd};

use aya_obj::generated::{
    bpf_attach_type, bpf_attr, bpf_cmd, bpf_link_info, BPF_F_QUERY_EFFECTIVE,
};

/// The cgroup hooks our programs use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachType {
    /// `BPF_CGROUP_SOCK_OPS`.
    SockOps,
    /// `BPF_CGROUP_INET4_CONNECT`.
    Connect4,
    /// `BPF_CGROUP_INET6_CONNECT`.
    Connect6,
}

impl AttachType {
    fn kernel(self) -> bpf_attach_type {
        match self {
            Self::SockOps => bpf_attach_type::BPF_CGROUP_SOCK_OPS,
            Self::Connect4 => bpf_attach_type::BPF_CGROUP_INET4_CONNECT,
            Self::Connect6 => bpf_attach_type::BPF_CGROUP_INET6_CONNECT,
        }
    }
}

/// A zeroed `bpf_attr`.
fn zeroed_attr() -> bpf_attr {
    // SAFETY: bpf_attr is a C union of plain integers; all-zero is valid (and what the kernel
    // requires of unused bytes).
    unsafe { std::mem::zeroed() }
}

/// Program ids in the effective set of `cgroup` for `kind`.
pub fn query_effective(cgroup: &impl AsFd, kind: AttachType) -> io::Result<Vec<u32>> {
    let mut ids = [0u32; 64];
    let mut attr = zeroed_attr();
    // Writing union members is safe; reading them is what needs care.
    attr.query.__bindgen_anon_1.target_fd = cgroup.as_fd().as_raw_fd() as u32;
    attr.query.attach_type = kind.kernel() as u32;
    attr.query.query_flags = BPF_F_QUERY_EFFECTIVE;
    attr.query.prog_ids = ids.as_mut_ptr() as u64;
    attr.query.__bindgen_anon_2.prog_cnt = ids.len() as u32;
    // SAFETY: prog_ids points to `ids`, which holds prog_cnt entries and outlives the call.
    unsafe { bpf(bpf_cmd::BPF_PROG_QUERY, &mut attr)? };
    // SAFETY: the kernel wrote the count back into the same member.
    let count = unsafe { attr.query.__bindgen_anon_2.prog_cnt } as usize;
    Ok(ids[..count.min(ids.len())].to_vec())
}

/// `bpf(cmd, attr)`.
///
/// # Safety
/// `attr` must be a valid `bpf_attr` for `cmd`: every pointer in it must refer to a buffer of
/// the size the command expects that outlives the call.
unsafe fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: the caller vouches for attr (see above); the size passed is attr's own.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            std::mem::size_of::<bpf_attr>(),
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
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_4.pathname = path.as_ptr() as u64;
    // SAFETY: obj_get's attr holds only the pathname, a NUL-terminated string alive here.
    let fd = unsafe { bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)? };
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// Deletes `key` from the map `map` (aya 0.14's `remove` wants `&mut`, which would put a
/// lock on the accept path for a syscall that needs none).
pub fn map_delete<K: aya::Pod>(map: &impl AsFd, key: &K) -> io::Result<()> {
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_2.map_fd = map.as_fd().as_raw_fd() as u32;
    attr.__bindgen_anon_2.key = std::ptr::from_ref(key) as u64;
    // SAFETY: key points to a K, the map's key type, alive for the call.
    unsafe { bpf(bpf_cmd::BPF_MAP_DELETE_ELEM, &mut attr) }.map(drop)
}

/// Reads and deletes `key` in one call (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`; hash maps from 5.14):
/// `Ok(None)` when the key is absent.
pub fn map_take<K: aya::Pod, V: aya::Pod>(map: &impl AsFd, key: &K) -> io::Result<Option<V>> {
    let mut value = std::mem::MaybeUninit::<V>::uninit();
    let mut attr = zeroed_attr();
    attr.__bindgen_anon_2.map_fd = map.as_fd().as_raw_fd() as u32;
    attr.__bindgen_anon_2.key = std::ptr::from_ref(key) as u64;
    attr.__bindgen_anon_2.__bindgen_anon_1.value = value.as_mut_ptr() as u64;
    // SAFETY: key points to a K and value to room for a V (the map's key and value types),
    // both alive for the call.
    match unsafe { bpf(bpf_cmd::BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr) } {
        // SAFETY: on success the kernel wrote a whole V.
        Ok(_) => Ok(Some(unsafe { value.assume_init() })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Atomically replaces the program of `link` (aya 0.14 has no call for it): connects keep
/// being steered throughout an upgrade.
pub fn link_update(link: &impl AsFd, new_prog: &impl AsFd) -> io::Result<()> {
    let mut attr = zeroed_attr();
    attr.link_update.link_fd = link.as_fd().as_raw_fd() as u32;
    attr.link_update.__bindgen_anon_1.new_prog_fd = new_prog.as_fd().as_raw_fd() as u32;
    // SAFETY: link_update's attr holds two fds and no pointers.
    unsafe { bpf(bpf_cmd::BPF_LINK_UPDATE, &mut attr) }.map(drop)
}

/// The cgroup id (inode) a cgroup link is attached to.
pub fn link_cgroup_id(link: &impl AsFd) -> io::Result<u64> {
    // SAFETY: bpf_link_info is plain integers; all-zero is valid.
    let mut info: bpf_link_info = unsafe { std::mem::zeroed() };
    let mut attr = zeroed_attr();
    attr.info.bpf_fd = link.as_fd().as_raw_fd() as u32;
    attr.info.info_len = std::mem::size_of::<bpf_link_info>() as u32;
    attr.info.info = std::ptr::from_mut(&mut info) as u64;
    // SAFETY: info points to `info`, whose size is info_len, alive for the call.
    unsafe { bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)? };
    // SAFETY: the kernel filled the cgroup member for a cgroup link.
    Ok(unsafe { info.__bindgen_anon_1.cgroup.cgroup_id })
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
    Ok(st.f_type == libc::BPF_FS_MAGIC)
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
