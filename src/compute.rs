//! CPU thread budgets. Training and inference each run inside their own rayon pool, so a
//! job cannot take every core from predict (or the other way round); every parallel
//! kernel (gemm, our fused ops) runs on the pool of the thread that calls it.

use std::sync::Arc;

/// A named rayon pool of `threads` threads (0 = one per core).
pub fn pool(name: &'static str, threads: usize) -> anyhow::Result<Arc<rayon::ThreadPool>> {
    let threads = if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).thread_name(move |i| format!("{name}-{i}")).build()?;
    Ok(Arc::new(pool))
}

/// Call first thing in `main`, before any thread starts. candle runs its own element-wise
/// ops on a second pool of threads that spin for a while after each op; beside gemm's
/// rayon threads (and a training job beside predict) those spinning threads took the cores
/// the real work needed (training ran at half speed on a busy machine). Our heavy
/// element-wise work is in our own rayon kernels, so candle's pool is turned off unless
/// `CANDLE_NUM_THREADS` is set.
pub fn init_process() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY (of the environment write): no other thread exists yet.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    keep_freed_memory();
}

/// Training allocates and frees tensors of up to tens of MiB every step. By default glibc gives
/// blocks over 32 MiB (and the heap's free top) back to the kernel, so each step faults the same
/// memory in again as fresh zeroed pages. Keeping freed memory in the heap for reuse avoids that;
/// peak memory is unchanged, as the same blocks are needed again on the next step.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 512 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
