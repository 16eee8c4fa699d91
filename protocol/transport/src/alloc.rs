//! Allocator policy for a process that moves MiB-sized URBs: the one `unsafe` of this crate.
//!
//! glibc serves a block above its mmap threshold from a mapping of its own and unmaps it on
//! free, but it raises that threshold to the largest such block freed so far. After the first
//! 1 MiB URB, later ones come from per-thread arenas, and what they free stays resident: in the
//! lab bench the server's peak RSS wandered between 19.5 and 24.3 MiB over runs of the same
//! load. A fixed threshold keeps every URB-sized buffer a mapping of its own, so peak RSS
//! follows what is live, for a page fault per 4 KiB of each new buffer.
#![allow(unsafe_code)]

/// Blocks this large or larger are mapped on their own; below it sit the frames of control
/// messages and small URBs, which the arenas recycle well.
const MMAP_THRESHOLD: i32 = 256 * 1024;

/// Fixes the allocator's mmap threshold (see the module docs). Call first thing in `main`,
/// before other threads allocate.
pub fn map_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt changes only glibc's allocation policy, takes no pointers, and is
    // documented to be callable at any time; it returns 0 when refused, which leaves the
    // default policy in place.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}
