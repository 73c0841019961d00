//! LESS datastore and matching throughput (`cargo bench -p dsel-less`).
//!
//! Measures, on the model at `LESS_BENCH_MODEL` (default
//! `/work/main/models/SmolLM2-135M-Instruct.Q4_1.gguf`):
//!
//! * per-example LoRA gradients from batched forward + backward
//!   (`LESS_BENCH_BATCH` examples of `LESS_BENCH_TOKENS` tokens, default 8 × 256);
//! * Adam preconditioning;
//! * the projection of `LESS_BENCH_PROJ` gradient rows (default 32) to
//!   `LESS_BENCH_D` (default 8192) dimensions, over the first
//!   `LESS_BENCH_PSLICE` rows of Π (default 524288; linear in P, so the
//!   full-P time is extrapolated), and the same GEMM with a pre-generated
//!   block (the GEMM ceiling);
//! * matching throughput over a synthetic f16 datastore.
//!
//! LoRA rank `LESS_BENCH_RANK` (default 128) on q,k,v,o. Prints one JSON
//! object; nothing is written to disk except a temporary datastore file.

use std::time::Instant;

use candle_core::Device;
use dsel_less::{matching, precondition, Moments, Projector};
use dsel_model::Precision::F32;
use dsel_model::{Batch, LoraConfig, Model};
use half::f16;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let model_path = std::env::var("LESS_BENCH_MODEL")
        .unwrap_or_else(|_| "/work/main/models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let rank = env_usize("LESS_BENCH_RANK", 128);
    let d = env_usize("LESS_BENCH_D", 8192);
    let b = env_usize("LESS_BENCH_BATCH", 8);
    let t = env_usize("LESS_BENCH_TOKENS", 256);
    let rows = env_usize("LESS_BENCH_PROJ", 32);
    let pslice = env_usize("LESS_BENCH_PSLICE", 1 << 19);

    let raw = dsel_model::load(std::path::Path::new(&model_path), &Device::Cpu)?;
    let mut model = Model::new(&raw)?;
    model.add_lora(&LoraConfig {
        rank,
        alpha: 4.0 * rank as f64,
        dropout: 0.1,
        targets: ["q", "k", "v", "o"].map(String::from).to_vec(),
        seed: 0,
    })?;
    // Non-zero B so every gradient is non-trivial.
    for (name, var) in model.lora_params() {
        if name.ends_with("lora_b") {
            let n = var.elem_count();
            let v: Vec<f32> = (0..n)
                .map(|i| {
                    (dsel_model::rng::unit_f64(dsel_model::rng::hash_words(1, &[i as u64])) - 0.5)
                        as f32
                        * 0.01
                })
                .collect();
            var.set(&candle_core::Tensor::from_vec(
                v,
                var.shape(),
                &Device::Cpu,
            )?)?;
        }
    }
    let p = model.lora_num_params();
    let vocab = model.config().vocab_size as u64;
    let seqs: Vec<(Vec<u32>, Vec<u8>)> = (0..b)
        .map(|i| {
            let ids = (0..t)
                .map(|j| (dsel_model::rng::hash_words(7, &[i as u64, j as u64]) % vocab) as u32)
                .collect();
            let mask = (0..t).map(|j| u8::from(j >= t / 2)).collect();
            (ids, mask)
        })
        .collect();
    let refs: Vec<(&[u32], &[u8])> = seqs.iter().map(|(a, m)| (&a[..], &m[..])).collect();
    let batch = Batch::new(&refs, &Device::Cpu)?;

    // Gradients (one warm-up call, then timed).
    let _ = model.per_example_lora_grads(&batch)?;
    let t0 = Instant::now();
    let g = model
        .per_example_lora_grads(&batch)?
        .grads
        .flatten_all()?
        .to_vec1::<f32>()?;
    let grad_s = t0.elapsed().as_secs_f64() / b as f64;

    // Preconditioning.
    let mom = Moments {
        m: g[..p].iter().map(|x| x * 0.5).collect(),
        v: g[..p].iter().map(|x| x * x + 1e-6).collect(),
    };
    let mut row = g[..p].to_vec();
    let t0 = Instant::now();
    precondition(&mut row, &mom)?;
    let precond_s = t0.elapsed().as_secs_f64();
    drop(g);

    // Projection over a slice of P, `rows` rows.
    let k = pslice.min(p);
    let gr: Vec<f32> = (0..rows * k)
        .map(|i| {
            (dsel_model::rng::unit_f64(dsel_model::rng::hash_words(3, &[i as u64])) - 0.5) as f32
        })
        .collect();
    let proj = Projector::new(0, d)?;
    let mut out = vec![0f32; rows * d];
    proj.project_accumulate(&gr[..rows * 1024], rows, 1024, 1024, 0, &mut out, F32)?; // warm-up
    let t0 = Instant::now();
    proj.project_accumulate(&gr, rows, k, k, 0, &mut out, F32)?;
    let proj_slice_s = t0.elapsed().as_secs_f64();
    let proj_s = proj_slice_s * (p as f64 / k as f64) / rows as f64;
    let flops_slice = 2.0 * rows as f64 * k as f64 * d as f64;

    // Generation alone.
    let block = proj.block_rows();
    let mut r = vec![0f32; block * d];
    let t0 = Instant::now();
    let mut c0 = 0;
    while c0 < k {
        let kb = block.min(k - c0);
        proj.fill_rows(c0 as u64, kb, &mut r);
        c0 += kb;
    }
    let gen_s = t0.elapsed().as_secs_f64();

    // GEMM ceiling: the same products with one pre-generated block.
    let threads = rayon::current_num_threads();
    let t0 = Instant::now();
    let mut c0 = 0;
    while c0 < k {
        let kb = block.min(k - c0);
        unsafe {
            gemm::gemm(
                rows,
                d,
                kb,
                out.as_mut_ptr(),
                1,
                d as isize,
                true,
                gr.as_ptr().add(c0),
                1,
                k as isize,
                r.as_ptr(),
                1,
                d as isize,
                1.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            );
        }
        c0 += kb;
    }
    let gemm_s = t0.elapsed().as_secs_f64();

    // Matching over a synthetic datastore.
    let n_store = env_usize("LESS_BENCH_STORE_ROWS", 16384);
    let n_val = env_usize("LESS_BENCH_VAL", 285);
    let tmp = std::env::temp_dir().join(format!("less-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let gen = |rows: usize, tag: u64| -> Vec<f16> {
        (0..rows * d)
            .map(|i| {
                f16::from_f64(
                    dsel_model::rng::unit_f64(dsel_model::rng::hash_words(tag, &[i as u64])) - 0.5,
                )
            })
            .collect()
    };
    dsel_store::write_npy(tmp.join("t.npy"), &[n_store, d], &gen(n_store, 1))?;
    dsel_store::write_npy(tmp.join("v.npy"), &[n_val, d], &gen(n_val, 2))?;
    let tr = dsel_store::NpyArray::open(tmp.join("t.npy"))?;
    let va = dsel_store::NpyArray::open(tmp.join("v.npy"))?;
    let groups: Vec<Vec<usize>> = (0..n_val)
        .collect::<Vec<_>>()
        .chunks(5)
        .map(|c| c.to_vec())
        .collect();
    let (_, mrep) = matching::score(&[tr], &[va], &[1.0], &groups, 1024)?;
    std::fs::remove_dir_all(&tmp)?;

    let per_example = grad_s + precond_s + proj_s;
    let reference_s_per_example = 1.1 + 120.0;
    let report = serde_json::json!({
        "model": model_path, "rank": rank, "params": p, "d": d, "tokens": t, "grad_batch": b,
        "proj_rows": rows, "threads": threads,
        "grad_seconds_per_example": grad_s,
        "precondition_seconds_per_example": precond_s,
        "projection_seconds_per_example": proj_s,
        "projection_gflops": flops_slice / proj_slice_s / 1e9,
        "gemm_ceiling_gflops": flops_slice / gemm_s / 1e9,
        "projection_share_of_gemm_ceiling": gemm_s / proj_slice_s,
        "generation_seconds_per_block_pass": gen_s,
        "datastore_examples_per_second": 1.0 / per_example,
        "speedup_vs_reference": reference_s_per_example / per_example,
        "matching_gb_per_second": mrep.gb_per_second,
        "matching_rows": n_store, "matching_val": n_val,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
