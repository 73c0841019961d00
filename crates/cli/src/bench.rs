//! `dsel bench`: the throughput figures that decide CPU run times.
//!
//! Measures, on the active GEMM backend (see `dsel_kernels::library`):
//! the 2048³ GEMM ceiling (f32, bf16, and candle's own matmul for
//! reference); the model's own GEMM shapes alone; forward + per-token
//! log-probs; a LoRA AdamW step; per-example LoRA gradients plus their
//! projection (LESS's datastore). Each figure at every precision asked
//! for, with the peak memory of that measurement, and a profile of the
//! forward pass (GEMM share, LM head + log-softmax, the rest). `--json`
//! writes the figures for `make bench-compare`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use dsel_model::{Batch, LoraConfig, Mode, Model, Precision};
use dsel_train::{AdamW, AdamWConfig};
use serde_json::{json, Value};

/// Options of `dsel bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model to benchmark.
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Benchmark a randomly initialised model of this shape instead (a
    /// Hugging Face `config.json`, e.g. pipelines/models/llama-3.2-1b.json):
    /// throughput does not depend on the weights, so nothing is downloaded.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// LoRA rank of the train-step and LESS benchmarks.
    #[arg(long, default_value_t = 128)]
    lora_rank: usize,
    /// Timed repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// GEMM size for the FLOP ceiling.
    #[arg(long, default_value_t = 2048)]
    gemm: usize,
    /// Precisions to measure, comma-separated (default: f32, plus bf16 where
    /// it runs natively).
    #[arg(long, value_delimiter = ',')]
    precisions: Vec<Precision>,
    /// What to measure, comma-separated: gemm, shapes, forward, lora, less.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "gemm,shapes,forward,lora,less"
    )]
    only: Vec<String>,
    /// LESS projection dimension.
    #[arg(long, default_value_t = 8192)]
    less_dim: usize,
    /// Gradient rows per LESS projection product (the cpu preset's
    /// `proj_batch`): the batch's gradients, repeated to this many rows.
    #[arg(long, default_value_t = 32)]
    less_rows: usize,
    /// Write every figure as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Resets the peak-memory mark to the current resident size (Linux), so
/// that the next [`dsel_store::process_peak_rss_mib`] is the peak of what runs in between.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds of `reps` timed calls after one warm-up call.
fn time<F: FnMut() -> Result<()>>(reps: usize, mut f: F) -> Result<f64> {
    f()?;
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64());
    }
    Ok(median(t))
}

/// `(name, rows m, inner k, cols n, count)` of the GEMMs the forward pass
/// runs (`count` times each: per layer, or once for the LM head), for
/// `m = batch·seq` tokens.
fn model_gemm_shapes(m: &Model, tokens: usize) -> Vec<(String, usize, usize, usize, usize)> {
    let c = m.config();
    let q = c.num_attention_heads * c.head_dim;
    let kv = c.num_key_value_heads * c.head_dim;
    let (h, i, l) = (c.hidden_size, c.intermediate_size, c.num_hidden_layers);
    vec![
        ("q,o".into(), tokens, h, q, 2 * l),
        ("k,v".into(), tokens, h, kv, 2 * l),
        ("gate,up".into(), tokens, h, i, 2 * l),
        ("down".into(), tokens, i, h, l),
        ("lm_head".into(), tokens, h, c.vocab_size, 1),
    ]
}

/// Approximate forward FLOPs per token of a Llama model at sequence length `t`.
fn forward_flops_per_token(m: &Model, t: usize) -> f64 {
    let c = m.config();
    let (h, i, v, l) = (
        c.hidden_size as f64,
        c.intermediate_size as f64,
        c.vocab_size as f64,
        c.num_hidden_layers as f64,
    );
    let kv = (c.num_key_value_heads * c.head_dim) as f64;
    let q = (c.num_attention_heads * c.head_dim) as f64;
    let per_layer =
        2.0 * (h * q + 2.0 * h * kv + q * h + 3.0 * h * i) + 2.0 * 2.0 * q * t as f64 / 2.0;
    l * per_layer + 2.0 * h * v
}

fn bench_batch(model: &Model, batch: usize, seq: usize, dev: &Device) -> Result<Batch> {
    let vocab = model.config().vocab_size as u32;
    let seqs: Vec<(Vec<u32>, Vec<u8>)> = (0..batch)
        .map(|b| {
            let ids = (0..seq)
                .map(|t| ((b * 7919 + t * 104729) as u32) % vocab)
                .collect();
            // Completion = the second half (as LESS's and ToV's examples).
            let mask = (0..seq).map(|t| u8::from(t >= seq / 2)).collect();
            (ids, mask)
        })
        .collect();
    let refs: Vec<(&[u32], &[u8])> = seqs
        .iter()
        .map(|(i, m)| (i.as_slice(), m.as_slice()))
        .collect();
    Batch::new(&refs, dev)
}

/// Run the benchmark and print the figures.
pub fn run(a: &BenchArgs) -> Result<()> {
    let dev = Device::Cpu;
    let backend = dsel_kernels::backend();
    let precisions = if a.precisions.is_empty() {
        let mut p = vec![Precision::F32];
        if backend.bf16_native {
            p.push(Precision::Bf16);
        }
        p
    } else {
        a.precisions.clone()
    };
    let want = |what: &str| a.only.iter().any(|o| o == what);
    println!(
        "dsel bench — {} rayon threads; GEMM backend: {}; bf16 native: {}",
        rayon::current_num_threads(),
        backend.description,
        backend.bf16_native
    );
    let mut out = json!({
        "backend": backend.description,
        "backend_kind": format!("{:?}", backend.kind),
        "bf16_native": backend.bf16_native,
        "cpu": format!("{:?}", backend.cpu),
        "threads": rayon::current_num_threads(),
        "batch": a.batch, "seq": a.seq, "lora_rank": a.lora_rank,
    });
    let mut ceiling = 0f64;

    if want("gemm") {
        let n = a.gemm;
        let x = Tensor::randn(0f32, 1.0, (n, n), &dev)?;
        let y = Tensor::randn(0f32, 1.0, (n, n), &dev)?;
        let flops = 2.0 * (n as f64).powi(3);
        let candle = flops
            / time(a.reps, || {
                x.matmul(&y)?;
                Ok(())
            })?
            / 1e9;
        println!("GEMM {n}³, candle's own matmul: {candle:.1} GFLOP/s");
        out["gemm_candle_gflops"] = json!(candle);
        for &p in &precisions {
            let g = flops
                / time(a.reps, || {
                    dsel_kernels::matmul(&x, &y, p)?;
                    Ok(())
                })?
                / 1e9;
            println!("GEMM {n}³, {p}: {g:.1} GFLOP/s");
            out[format!("gemm_{p}_gflops")] = json!(g);
            ceiling = ceiling.max(g);
        }
    }

    let raw = match &a.config {
        Some(path) => {
            let cfg = dsel_model::hf::parse_config(path)?;
            println!(
                "random-init model of {}: {} layers, hidden {}, vocab {}",
                path.display(),
                cfg.num_hidden_layers,
                cfg.hidden_size,
                cfg.vocab_size
            );
            dsel_model::random_weights(&cfg, 0, candle_core::DType::F32)
        }
        None => dsel_model::load(&a.model, &dev)
            .with_context(|| format!("loading {}", a.model.display()))?,
    };
    let tokens = a.batch * a.seq;
    for &p in &precisions {
        let mut model = Model::new(&raw)?;
        model.set_precision(p)?;
        let batch = bench_batch(&model, a.batch, a.seq, &dev)?;
        let mut gemm_seconds = 0f64;
        let mut gemm_flops = 0f64;
        let mut lm_head_gemm_s = 0f64;
        if want("shapes") {
            let wdtype = if p == Precision::Bf16 {
                DType::BF16
            } else {
                DType::F32
            };
            for (name, m, k, n, count) in model_gemm_shapes(&model, tokens) {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
                let w = Tensor::randn(0f32, 0.05, (n, k), &dev)?.to_dtype(wdtype)?;
                let s = time(a.reps, || {
                    dsel_kernels::linear(&x, &w, p)?;
                    Ok(())
                })?;
                let f = 2.0 * (m * k * n) as f64;
                gemm_seconds += s * count as f64;
                if name == "lm_head" {
                    lm_head_gemm_s = s;
                }
                gemm_flops += f * count as f64;
                println!(
                    "  {p} GEMM {name} [{m}×{k}]·[{k}×{n}]: {:.1} GFLOP/s",
                    f / s / 1e9
                );
            }
            let rate = gemm_flops / gemm_seconds / 1e9;
            // The share of the ceiling only when `gemm` measured one.
            let share = if ceiling > 0.0 {
                format!(
                    " ({:.0}% of the best GEMM 2048³ rate)",
                    100.0 * rate / ceiling
                )
            } else {
                String::new()
            };
            println!("{p} model GEMM shapes: {rate:.1} GFLOP/s{share}");
            out[format!("model_gemm_{p}_gflops")] = json!(rate);
        }
        if want("forward") {
            reset_peak();
            let fwd = time(a.reps, || {
                model.token_logprobs_inference(&batch)?;
                Ok(())
            })?;
            let mem = dsel_store::process_peak_rss_mib();
            let flops = forward_flops_per_token(&model, a.seq) * tokens as f64;
            let tps = tokens as f64 / fwd;
            // The LM head + log-softmax alone (hidden states given).
            let h = Tensor::randn(
                0f32,
                1.0,
                (a.batch, a.seq, model.config().hidden_size),
                &dev,
            )?;
            let head = time(a.reps, || {
                model.token_logprobs_from_hidden(&batch, &h)?;
                Ok(())
            })?;
            println!(
                "{p} forward + per-token log-probs ({}×{}): {tps:.0} tokens/s, {:.1} GFLOP/s, peak {mem:.0} MiB",
                a.batch,
                a.seq,
                flops / fwd / 1e9
            );
            let mut profile = json!({"lm_head_and_log_softmax_s": head, "total_s": fwd});
            if gemm_seconds > 0.0 {
                let pct = |s: f64| 100.0 * s / fwd;
                let softmax = (head - lm_head_gemm_s).max(0.0);
                println!(
                    "    profile: GEMMs at the model's shapes {:.0}% (LM head GEMM {:.0}%), log-softmax over the vocabulary {:.0}%, everything else (norms, RoPE, attention softmax, SiLU, copies, allocation) {:.0}%",
                    pct(gemm_seconds),
                    pct(lm_head_gemm_s),
                    pct(softmax),
                    pct((fwd - gemm_seconds - softmax).max(0.0))
                );
                profile["gemm_s"] = json!(gemm_seconds);
                profile["lm_head_gemm_s"] = json!(lm_head_gemm_s);
            }
            out[format!("forward_{p}")] = json!({
                "tokens_per_s": tps, "gflops": flops / fwd / 1e9, "peak_mib": mem, "profile": profile,
            });
        }
        let lora = LoraConfig {
            rank: a.lora_rank,
            alpha: 2.0 * a.lora_rank as f64,
            dropout: 0.0,
            targets: ["q", "k", "v", "o"].map(String::from).to_vec(),
            seed: 0,
        };
        model.add_lora(&lora)?;
        if want("lora") {
            let mut opt = AdamW::new(model.lora_params(), AdamWConfig::default())?;
            reset_peak();
            let step = time(a.reps, || {
                let loss = model
                    .example_losses(&batch, Mode::Train { dropout_seed: 0 })?
                    .mean_all()?;
                let grads = loss.backward()?;
                opt.step(&grads, 1e-5)?;
                Ok(())
            })?;
            let mem = dsel_store::process_peak_rss_mib();
            println!(
                "{p} LoRA r={} (q,k,v,o) AdamW step ({}×{}): {:.0} tokens/s, peak {mem:.0} MiB ({} trainable parameters)",
                a.lora_rank,
                a.batch,
                a.seq,
                tokens as f64 / step,
                model.lora_num_params()
            );
            out[format!("lora_{p}")] =
                json!({"tokens_per_s": tokens as f64 / step, "peak_mib": mem});
        }
        if want("less") {
            out[format!("less_{p}")] = bench_less(&model, &batch, a, p)?;
        }
    }
    println!(
        "peak memory of the whole run: {:.0} MiB",
        dsel_store::process_peak_rss_mib()
    );
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_vec_pretty(&out)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}

/// LESS datastore throughput: per-example LoRA gradients of one batch
/// (one batched forward + backward), then their projection to `less_dim`
/// dimensions as one product of the whole batch with Π per block of rows.
fn bench_less(model: &Model, batch: &Batch, a: &BenchArgs, p: Precision) -> Result<Value> {
    let b = batch.batch_size();
    reset_peak();
    let grads_s = time(1, || {
        model.per_example_lora_grads(batch)?;
        Ok(())
    })?;
    let g = model.per_example_lora_grads(batch)?.grads;
    let params = g.dim(1)?;
    let g = g.flatten_all()?.to_vec1::<f32>()?;
    let rows = a.less_rows.max(1);
    let g: Vec<f32> = (0..rows)
        .flat_map(|r| g[(r % b) * params..(r % b + 1) * params].iter().copied())
        .collect();
    let proj = dsel_less::Projector::new(0, a.less_dim)?;
    let mut sketch = vec![0f32; rows * a.less_dim];
    let proj_s = time(1, || {
        sketch.iter_mut().for_each(|v| *v = 0.0);
        proj.project_accumulate(&g, rows, params, params, 0, &mut sketch, p)?;
        Ok(())
    })?;
    let mem = dsel_store::process_peak_rss_mib();
    let grad_per_ex = grads_s / b as f64;
    let proj_per_ex = proj_s / rows as f64;
    let per_example = grad_per_ex + proj_per_ex;
    println!(
        "{p} LESS datastore (r={}, d={}, P={params}, {b}×{}): {:.3} examples/s (per example: gradients {:.2} s, projection {:.2} s in products of {rows} rows at {:.1} GFLOP/s), peak {mem:.0} MiB",
        a.lora_rank,
        a.less_dim,
        a.seq,
        1.0 / per_example,
        grad_per_ex,
        proj_per_ex,
        2.0 * (rows * params * a.less_dim) as f64 / proj_s / 1e9
    );
    Ok(json!({
        "examples_per_s": 1.0 / per_example, "grad_s_per_example": grad_per_ex,
        "projection_s_per_example": proj_per_ex, "params": params, "d": a.less_dim, "batch": b,
        "projection_rows": rows, "peak_mib": mem,
    }))
}
