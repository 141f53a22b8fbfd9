//! CPU thread budgets. Training and inference each run inside their own rayon pool, so a
//! job cannot take every core from predict (or the other way round); every parallel
//! kernel (gemm, our fused ops) runs on the pool of the thread that calls it.

use std::sync::Arc;

/// A named rayon pool of `threads` threads (0 = one per core).
pub fn pool(name: &'static str, threads: usize) -> anyhow::Result<Arc<rayon::ThreadPool>> {
    let threads = if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("{name}-{i}"))
        .start_handler(|_| flush_denormals())
        .build()?;
    Ok(Arc::new(pool))
}

/// Call first thing in `main`, before any thread starts. candle runs its own element-wise
/// ops on a second pool of threads that spin for a while after each op; beside gemm's
/// rayon threads (and a training job beside predict) those spinning threads took the cores
/// the real work needed (training ran at half speed on a busy machine). Our heavy
/// element-wise work is in our own rayon kernels, so candle's pool is turned off unless
/// `CANDLE_NUM_THREADS` is set.
pub fn init_process() {
    flush_denormals();
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

/// Sets the calling thread to treat subnormal floats as zero, in inputs and results (threads
/// it starts afterwards inherit the setting). Gradients of a layer can underflow to subnormal
/// values; on Intel CPUs each multiply that meets one takes a microcode assist of ~100 cycles,
/// and one training step's backward pass took 24 s instead of 1 s. Values under 1.2e-38 carry
/// nothing a classifier's training needs; TensorFlow and oneDNN flush them the same way.
pub fn flush_denormals() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: reads and writes only this thread's MXCSR; bit 15 is flush-to-zero, bit 6
    // denormals-are-zero, both defined on every x86-64 CPU with SSE2.
    unsafe {
        let mut csr: u32 = 0;
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack));
        csr |= (1 << 15) | (1 << 6);
        std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, readonly));
    }
    #[cfg(target_arch = "aarch64")]
    // SAFETY: sets only FPCR.FZ (bit 24) of this thread.
    unsafe {
        let mut fpcr: u64;
        std::arch::asm!("mrs {}, fpcr", out(reg) fpcr, options(nomem, nostack));
        fpcr |= 1 << 24;
        std::arch::asm!("msr fpcr, {}", in(reg) fpcr, options(nomem, nostack));
    }
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

/// Hands the heap's free pages back to the kernel: loading a model for inference frees its
/// f32 weights as it packs them, and glibc keeps such freed chunks mapped (about 400 MiB for
/// XLM-R base) unless asked.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory, under glibc's own lock.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use std::hint::black_box;

    /// 1e-30 × 1e-10 is 1e-40, a subnormal: flushed to zero on a pool thread, kept elsewhere.
    #[test]
    fn pool_threads_flush_subnormal_results_to_zero() {
        let product = || black_box(1e-30f32) * black_box(1e-10f32);
        let plain = std::thread::spawn(product).join().unwrap();
        assert!(plain > 0.0, "a thread that was not set up keeps subnormals");
        let pool = super::pool("test", 2).unwrap();
        assert_eq!(pool.install(product), 0.0);
        let all: Vec<f32> = pool.broadcast(|_| product());
        assert!(all.iter().all(|&v| v == 0.0), "every pool thread flushes: {all:?}");
    }
}
