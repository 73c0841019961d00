//! Measures online selectors on a real model: one short run per selector
//! from the same seed, then the target's test loss and the step throughput
//! relative to plain training (`none`, k examples per step).
//!
//! ```text
//! cargo run --release -p dsel-online --example measure -- \
//!     <model.gguf> [task=mmlu] [steps=10] [B=8] [k=4] [max_len=128] [n_test=64] [selectors=none,greats,uds,maxloss] [target_max_len=1024]
//! ```
//! Data: `DSEL_DATA_ROOT` (default `../shared/data` relative to the
//! workspace); pool: the `tiny` mixture.

use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{Context, Result};
use candle_core::Device;
use dsel_ingest::{Message, SubsetOptions, TargetSpec};
use dsel_model::{LoraConfig, Model};
use dsel_online::{mean_loss, run_online, OnlineRunConfig, SelectorConfig, SelectorKind};
use dsel_tokenize::{ChatFormat, Formatter, TokenizeConfig, TokenizedSet};

fn arg<T: FromStr>(args: &[String], i: usize, default: T) -> Result<T> {
    match args.get(i) {
        Some(s) => s
            .parse()
            .map_err(|_| anyhow::anyhow!("argument {i}: cannot parse {s:?}")),
        None => Ok(default),
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args: Vec<String> = std::env::args().collect();
    let model_path =
        PathBuf::from(args.get(1).context(
            "usage: measure <model> [task] [steps] [B] [k] [max_len] [n_test] [selectors]",
        )?);
    let task: String = arg(&args, 2, "mmlu".to_string())?;
    let steps: usize = arg(&args, 3, 10)?;
    let b: usize = arg(&args, 4, 8)?;
    let k: usize = arg(&args, 5, 4)?;
    let max_len: usize = arg(&args, 6, 128)?;
    let n_test: usize = arg(&args, 7, 64)?;
    let selectors: String = arg(&args, 8, "none,greats,uds,maxloss".to_string())?;
    // Target prompts (few-shot MMLU, BBH, TyDiQA passages) need a longer cut
    // than pool examples, or their answers are truncated away.
    let target_max_len: usize = arg(&args, 9, 1024)?;
    let data_root = match std::env::var("DSEL_DATA_ROOT") {
        Ok(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data")),
    };

    let raw = dsel_model::load(&model_path, &Device::Cpu)?;
    let tok = raw.tokenizer.clone().context("model has no tokenizer")?;
    let format = match &raw.chat_template {
        Some(t) => ChatFormat::Template {
            template: t.clone(),
            bos_token: raw.bos_token.clone().unwrap_or_default(),
            eos_token: raw.eos_token.clone().unwrap_or_default(),
        },
        None => ChatFormat::Tulu {
            eos_token: raw.eos_token.clone().unwrap_or_else(|| "</s>".into()),
        },
    };
    let bos_id = if raw.chat_template.is_some() {
        None
    } else {
        raw.config.bos_token_id
    };
    let fmt = Formatter::new(format)?;
    let tmp = tempfile::tempdir()?;
    let tokenize = |name: &str, ex: &[dsel_ingest::Example]| -> Result<TokenizedSet> {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir)?;
        let len = if name == "pool" {
            max_len
        } else {
            target_max_len
        };
        let tcfg = TokenizeConfig {
            max_len: len,
            bos_id,
            truncation: Default::default(),
        };
        dsel_tokenize::tokenize_to_dir(&tok, &fmt, ex, &tcfg, &dir)?;
        TokenizedSet::open(&dir)
    };
    let opts = SubsetOptions {
        limit: Some((steps * b).max(64) * 2),
        per_source_cap: None,
        seed: 0,
        stratify: false,
    };
    let (pool, _) = dsel_ingest::load_pool("tiny", &data_root, &opts)?;
    let target = TargetSpec::parse(&task)?;
    let (val, _) = dsel_ingest::load_target_validation(&target, &data_root)?;
    let (mut test, _) = dsel_ingest::load_target_test(&target, &data_root, None, 0)?;
    // Test loss: the gold answer as the assistant turn; a seeded spread over the set.
    let stride = (test.len() / n_test.max(1)).max(1);
    test = test.into_iter().step_by(stride).take(n_test).collect();
    for ex in &mut test {
        let answer = ex.references.first().cloned().unwrap_or_default();
        ex.messages.push(Message {
            role: "assistant".into(),
            content: answer,
        });
    }
    let pool = tokenize("pool", &pool)?;
    let val = tokenize("val", &val)?;
    let test = tokenize("test", &test)?;
    println!(
        "pool {} examples, validation {}, test {}; steps {steps}, B {b}, k {k}, max_len {max_len}",
        pool.len(),
        val.len(),
        test.len()
    );
    let test_idx: Vec<usize> = (0..test.len()).collect();
    let base = Model::new(&raw)?;
    let base_loss = mean_loss(&base, &test, &test_idx, 8)?;
    println!("base model test loss {base_loss:.4}");
    drop(base);

    let lora = LoraConfig {
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: ["q", "k", "v", "o"].iter().map(|s| s.to_string()).collect(),
        seed: 0,
    };
    let mut rows = Vec::new();
    for name in selectors.split(',') {
        let kind: SelectorKind = name.parse().map_err(anyhow::Error::msg)?;
        let mut cfg = OnlineRunConfig::new(SelectorConfig::default_for(kind), lora.clone());
        cfg.steps = steps;
        cfg.candidates = b;
        cfg.k = Some(k);
        cfg.lr = 5e-4;
        cfg.warmup_ratio = 0.0;
        let mut model = Model::new(&raw)?;
        let dir = tmp.path().join(format!("run-{name}"));
        let rep = run_online(
            &mut model,
            &pool,
            &val,
            &cfg,
            &dir.join("scratch"),
            &dir.join("out"),
        )?;
        let loss = mean_loss(&model, &test, &test_idx, 8)?;
        // Throughput excludes step 0 (allocation warm-up) when there are several steps.
        let steps_txt = std::fs::read_to_string(dir.join("out/steps.jsonl"))?;
        let recs: Vec<dsel_online::StepRecord> = steps_txt
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        let skip = usize::from(recs.len() > 2);
        let secs: f64 = recs[skip..].iter().map(|r| r.step_seconds).sum();
        let sel: f64 = recs[skip..].iter().map(|r| r.select_seconds).sum();
        let sps = (recs.len() - skip) as f64 / secs;
        println!(
            "{name:>9}: test loss {loss:.4}  train loss {:.4}  {sps:.4} steps/s  select {:.0}%",
            rep.mean_loss,
            100.0 * sel / secs
        );
        rows.push((name.to_string(), loss, sps, sel / secs, rep.mean_loss));
    }
    let plain = rows.iter().find(|r| r.0 == "none").map(|r| r.2);
    println!("\n| selector | target test loss | train loss (chosen) | steps/s | rel. throughput | selection share |");
    println!("|---|---|---|---|---|---|");
    for (name, loss, sps, frac, tl) in &rows {
        let rel = plain
            .map(|p| format!("{:.2}", sps / p))
            .unwrap_or_else(|| "-".into());
        println!(
            "| {name} | {loss:.4} | {tl:.4} | {sps:.4} | {rel} | {:.0}% |",
            100.0 * frac
        );
    }
    Ok(())
}
