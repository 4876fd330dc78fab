//! Taper's trainer: dataset preparation, GPT pretraining and finetuning with candle.

pub mod chat;
pub mod cleanup;
pub mod dashboards;
pub mod dataset;
pub mod device;
pub mod finetune;
pub mod generate;
pub mod job;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod prepare;
pub mod quickstart;
pub mod status;
pub mod store;
pub mod tokenizer;
pub mod train;

/// mimalloc for every binary built on this crate (`taper`, its tests and benchmarks):
/// candle allocates a fresh tensor buffer per op, and glibc's malloc handed the large ones
/// back to the kernel after each use, so every step page-faulted them in again.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's `mimalloc.h` (the same index in its v2 and v3;
/// libmimalloc-sys names no constant for it).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps the memory mimalloc frees for reuse instead of handing it back to the kernel
/// (`MIMALLOC_PURGE_DELAY=-1`), unless `MIMALLOC_PURGE_DELAY` is set. A training step
/// frees and reallocates the same large tensor buffers every time; with mimalloc's default
/// purge delay (1 s) the buffers freed at the end of a step were returned and page-faulted
/// (zeroed by the kernel) again in the next: the baby GPT's CPU step took 4.3–5.0 s with
/// purging and 3.66–3.71 s without, for 5 % more peak memory (2,911 → 3,056 MiB), since
/// freed pages stay mapped. Called first thing by `taper` and by the step benchmark.
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: mi_option_set writes one of mimalloc's option words (an atomic store in
        // its C code); it has no preconditions and is documented as callable at any time.
        #[allow(unsafe_code)]
        unsafe {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1)
        };
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn freed_memory_is_kept_unless_the_environment_says_otherwise() {
        // SAFETY: reads one of mimalloc's option words; no preconditions.
        #[allow(unsafe_code)]
        let get = || unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        let want = match std::env::var("MIMALLOC_PURGE_DELAY") {
            Ok(v) => v.parse().expect("MIMALLOC_PURGE_DELAY is a number"),
            Err(_) => -1,
        };
        super::keep_freed_memory();
        assert_eq!(get(), want);
    }
}
