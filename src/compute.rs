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
    // Serving: glibc's adaptive mmap threshold tops out at 32 MiB, and it hands the heap's free
    // top back to the kernel past 128 KiB, so each request grew and shrank the heap again
    // (page faults on every predict). Keep up to 32 MiB of free top; blocks under 32 MiB come
    // from the heap, as the adaptive threshold would settle on.
    set_malloc(32 << 20, 32 << 20);
}

#[allow(unused_variables)]
fn set_malloc(mmap_threshold: i32, trim_threshold: i32) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters, under glibc's own lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, mmap_threshold);
        libc::mallopt(libc::M_TRIM_THRESHOLD, trim_threshold);
    }
}

/// Training allocates and frees tensors of up to tens of MiB every step. By default glibc gives
/// blocks over 32 MiB (and the heap's free top) back to the kernel, so each step faults the same
/// memory in again as fresh zeroed pages. From the first training run on, freed memory stays in
/// the heap for reuse. A process that only serves keeps glibc's defaults, which hold its memory
/// lower (its buffers are small and come and go with the traffic).
pub fn keep_freed_memory() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| set_malloc(512 << 20, 1 << 30));
}
