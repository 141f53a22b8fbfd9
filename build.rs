//! With the `cuda` feature, compiles `kernels/finetuned.cu` to PTX in `OUT_DIR` for
//! `src/model/ops/cuda.rs`: `finetuned.ptx` for compute capability min(CUDA_COMPUTE_CAP, 80) (default
//! 80; the driver JIT-compiles it for Ampere, Hopper and later) and `finetuned_90.ptx` for
//! compute_90, which `cuda.rs` picks on Hopper and later. Without the feature it does nothing.
//!
//! nvcc is `$NVCC`, else `bin/nvcc` under `$CUDA_ROOT`, `$CUDA_PATH` or `$CUDA_HOME`, else `nvcc`
//! on `PATH`, else `/usr/local/cuda/bin/nvcc`; `$NVCC_CCBIN` picks its host compiler.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCE: &str = "kernels/finetuned.cu";

fn main() {
    // Without this line Cargo would rerun the script whenever any file of the package changed.
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed={SOURCE}");
    for var in ["NVCC", "NVCC_CCBIN", "CUDA_ROOT", "CUDA_PATH", "CUDA_HOME", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let nvcc = find_nvcc();
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by Cargo"));
    let base = compute_cap().min(80);
    compile(&nvcc, base, &out.join("finetuned.ptx"));
    compile(&nvcc, 90, &out.join("finetuned_90.ptx"));
}

/// `CUDA_COMPUTE_CAP` as a number ("90", "9.0" and "90a" are 90), 80 when unset.
fn compute_cap() -> u32 {
    let Ok(raw) = env::var("CUDA_COMPUTE_CAP") else { return 80 };
    let digits: String = raw.chars().filter(|c| *c != '.').take_while(|c| c.is_ascii_digit()).collect();
    match digits.parse() {
        Ok(cap) if cap >= 50 => cap,
        _ => panic!("CUDA_COMPUTE_CAP={raw:?}: expected a compute capability such as 80 or 90"),
    }
}

fn find_nvcc() -> PathBuf {
    if let Some(nvcc) = env::var_os("NVCC") {
        return PathBuf::from(nvcc);
    }
    for var in ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"] {
        if let Some(root) = env::var_os(var) {
            let nvcc = Path::new(&root).join("bin").join("nvcc");
            if nvcc.is_file() {
                return nvcc;
            }
        }
    }
    let on_path = env::var_os("PATH").and_then(|paths| env::split_paths(&paths).map(|d| d.join("nvcc")).find(|p| p.is_file()));
    on_path.unwrap_or_else(|| PathBuf::from("/usr/local/cuda/bin/nvcc"))
}

fn compile(nvcc: &Path, cap: u32, ptx: &Path) {
    let mut cmd = Command::new(nvcc);
    // -fmad=false: the kernels round every product and sum as the CPU reference does.
    cmd.args(["-ptx", "-O3", "-std=c++17", "-fmad=false"]).arg(format!("-arch=compute_{cap}")).arg("-o").arg(ptx).arg(SOURCE);
    if let Some(ccbin) = env::var_os("NVCC_CCBIN") {
        cmd.arg("-ccbin").arg(ccbin);
    }
    let output = cmd.output().unwrap_or_else(|e| {
        panic!(
            "the `cuda` feature needs nvcc; running {} failed: {e} (set NVCC or CUDA_ROOT, or see scripts/cuda-toolchain.sh)",
            nvcc.display()
        )
    });
    if !output.status.success() {
        panic!(
            "nvcc failed to compile {SOURCE} for compute_{cap} ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
