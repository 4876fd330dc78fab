//! With the `cuda` feature, compiles the trainer's own CUDA kernels (`kernels/*.cu`) to
//! PTX with `nvcc` (from `NVCC`, else `PATH`; `trainer-image/scripts/build-cuda.sh` puts
//! the CUDA 13 toolkit's there). The PTX targets `compute_$CUDA_COMPUTE_CAP` (default 80)
//! and the driver compiles it for the GPU at run time, as candle's own kernels. Without the
//! feature nothing is built.

use std::{env, path::PathBuf, process::Command};

const KERNELS: &[&str] = &["causal_softmax", "cross_entropy", "layer_norm"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-changed=kernels/common.cuh");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    for name in KERNELS {
        let src = format!("kernels/{name}.cu");
        println!("cargo::rerun-if-changed={src}");
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), "-o"])
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| {
                panic!("running {nvcc} for {src}: {e} (is the CUDA toolkit on PATH?)")
            });
        assert!(status.success(), "{nvcc} failed on {src}: {status}");
    }
}
