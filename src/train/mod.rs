//! Training: the loop fine-tuning and pre-training share, their data, optimiser and metrics,
//! and the job worker.

pub mod anchor;
pub mod calibration;
pub mod checkpoint;
pub mod data;
pub mod entities;
pub mod events;
pub mod hyper;
pub mod kept;
pub mod method;
pub mod metrics;
pub mod mlm;
pub mod objective;
pub mod optim;
pub mod precision;
pub mod request;
pub mod run_loop;
pub mod scores;
pub mod tagger;
pub mod thresholds;
pub mod trainer;
pub mod worker;

/// Process CPU seconds (user + system) and peak resident memory in MiB, from `getrusage`.
pub fn process_usage() -> (f64, f64) {
    // SAFETY: getrusage only writes into the zeroed struct we hand it.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(u.ru_utime) + secs(u.ru_stime), u.ru_maxrss as f64 / 1024.0)
}
