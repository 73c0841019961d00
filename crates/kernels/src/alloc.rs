//! Keeping the memory of large tensors in the process between steps.
//!
//! glibc's `malloc` serves every block over its mmap threshold (at most
//! 32 MiB) with a fresh `mmap` and returns it with `munmap` on free. The
//! model's large tensors — logits of 8×256 tokens over a 49k vocabulary are
//! 400 MB, and their gradients as much — are allocated and freed at every
//! forward and backward pass, so each pass had the kernel map and zero those
//! pages again: a profile of the LoRA step (`perf record dsel bench --only
//! lora`) spent 19% of its time in the kernel's `clear_page_erms` and about
//! 10% more in page faults. With freed blocks kept in the heap instead, the
//! same step ran at 255 instead of 148 tokens/s and the forward pass at 809
//! instead of 727, for 9% more peak memory (8.5 vs 7.8 GiB) — measured on the
//! 2-core AMD Zen 4 this project runs on, bf16, 8×256 tokens.

/// Tells glibc's allocator to serve large blocks from its heap and to keep
/// freed memory instead of returning it to the system, so the next pass
/// reuses pages that are already mapped. Call once, at the start of a
/// process, before threads allocate. Does nothing where the C library is not
/// glibc, or when `DSEL_MALLOC=default` is set; returns whether it applied.
pub fn keep_freed_memory() -> bool {
    if std::env::var("DSEL_MALLOC").is_ok_and(|v| v.trim().eq_ignore_ascii_case("default")) {
        return false;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::ffi::c_int;
        // glibc's <malloc.h> parameters.
        const M_TRIM_THRESHOLD: c_int = -1;
        const M_MMAP_MAX: c_int = -4;
        extern "C" {
            fn mallopt(param: c_int, value: c_int) -> c_int;
        }
        // SAFETY: mallopt only sets the allocator's tunables; both values are
        // in their documented ranges (0 mmap'd blocks: every block from the
        // heap; trim only above 2 GiB of free memory at the top).
        unsafe { mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, c_int::MAX) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn large_blocks_still_allocate_and_free_after_tuning() {
        let applied = super::keep_freed_memory();
        if cfg!(all(target_os = "linux", target_env = "gnu"))
            && std::env::var_os("DSEL_MALLOC").is_none()
        {
            assert!(applied, "glibc refused the tunables");
        }
        // Blocks over the old mmap threshold, from several threads at once.
        std::thread::scope(|s| {
            for t in 0..3 {
                s.spawn(move || {
                    for round in 0..3 {
                        let v = vec![t as u8 + round; 96 << 20];
                        assert_eq!(v[v.len() - 1], t as u8 + round);
                    }
                });
            }
        });
    }
}
