//! Writeback hints for streaming large files to disk (Linux; no-ops elsewhere). Hints only:
//! errors are ignored here and surface at the fsync that makes the data durable.

use std::fs::File;

/// Starts writing `len` bytes of `file` from `offset` back to disk without waiting
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`: no journal commit, no helper thread).
pub fn start(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    sync_file_range(file, offset, len, libc::SYNC_FILE_RANGE_WRITE);
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// Waits until `len` bytes of `file` from `offset` are written back, then drops those clean
/// pages from the page cache (`posix_fadvise(POSIX_FADV_DONTNEED)`).
pub fn wait_and_drop(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        sync_file_range(
            file,
            offset,
            len,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        );
        drop_cached(file, offset, len);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // one FFI call on a borrowed, open descriptor
fn sync_file_range(file: &File, offset: u64, len: u64, flags: libc::c_uint) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: the descriptor stays open for the call (borrowed from `file`), and the call reads
    // or writes no memory of ours.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, flags);
    }
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // one FFI call on a borrowed, open descriptor
fn drop_cached(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: as for `sync_file_range`.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), offset, len, libc::POSIX_FADV_DONTNEED);
    }
}
