//! Process and thread-pool tuning for running the network, and the device to run it on: how
//! the allocator keeps freed memory, how candle's own thread pool leaves the cores to rayon's
//! compute pool, and how a command runs on that pool.

use candle_core::Device;

/// Makes the C allocator keep freed memory in the process (Linux with glibc; elsewhere a
/// no-op). candle allocates a new buffer for every tensor operation; glibc returns large
/// buffers to the kernel when they are freed (mmap threshold, heap trimming), so every
/// training step faulted its whole working set in again and the kernel zeroed it page by
/// page — about a quarter of a CPU training step in a profile. Called by the commands that
/// run the network (train, generate, bench); the memory kept is the step's working set.
#[allow(unsafe_code)] // the crate's one FFI call: libc::mallopt
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20); // glibc's maximum
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

/// Keeps candle's own thread pool for element-wise ops (its "barrier pool": one worker per
/// thread but one, each spinning 25 000 rounds after every op, besides rayon's) from taking
/// the cores from the compute pool: unless the user set `CANDLE_NUM_THREADS`, it is set to a
/// quarter of the compute threads (`RAYON_NUM_THREADS`, else one per core), at least 1. The
/// heavy work (convolutions, fused kernels) runs on rayon; what candle still runs itself in a
/// training step is mostly gradient accumulation (a zero tensor plus an add per graph node).
/// Measured (BENCHMARKS.md), training step with 2 threads on 2 cores: candle's default 0.27–
/// 0.33 s, one candle thread 0.25 s, a lower spin limit instead 0.26–0.31 s; with 16 threads
/// on 16 cores: 16 candle threads 0.19–0.20 s, 4 threads 0.13–0.14 s, 1 thread 0.15–0.16 s.
/// Call it at the start of `main`, before any thread is spawned (it sets an environment
/// variable); candle reads it when its pool is first used.
pub fn leave_cores_to_the_compute_pool() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_some() {
        return;
    }
    let compute = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    std::env::set_var("CANDLE_NUM_THREADS", (compute / 4).max(1).to_string());
}

/// Runs `work` with the calling thread's compute on a fresh rayon pool of the configured size
/// (`RAYON_NUM_THREADS`, else one per core), as one of that pool's workers. The model's CPU
/// kernels are short parallel sections between serial ones; called from outside a pool, the
/// serial parts would run on an extra thread while every worker spins waiting for the next
/// section, and on a machine with as many cores as workers the spinning workers take the
/// cores from it (measured: 8% of a training step on 2 cores).
pub fn on_compute_pool<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    match rayon::ThreadPoolBuilder::new()
        .num_threads(rayon::current_num_threads())
        .thread_name(|i| format!("compute-{i}"))
        .build()
    {
        Ok(pool) => pool.install(work),
        // No threads to be had: the global pool, as before.
        Err(_) => work(),
    }
}

/// The device to compute on: CUDA 0 with the `cuda` feature when available, else the CPU.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    if let Ok(d) = Device::new_cuda(0) {
        return d;
    }
    Device::Cpu
}
