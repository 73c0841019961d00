//! The training loop: convergence, loss weighting, checkpoints and
//! bit-identical resume after a simulated crash.

use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use dsel_train::{
    read_adamw_state, train, AdamW, EpochSummary, NoHooks, StepContext, TrainConfig, TrainError,
    TrainHooks, TrainReport, CHECKPOINT_FILE,
};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

const D_IN: usize = 5;

/// A linear regression problem: y = X w* + b* + small noise.
struct Problem {
    x: Tensor,
    y: Tensor,
    n: usize,
}

fn uniform(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
}

fn problem(n: usize) -> Problem {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let w_true = [1.5f32, -2.0, 0.5, 3.0, -1.0];
    let mut xs = Vec::with_capacity(n * D_IN);
    let mut ys = Vec::with_capacity(n);
    for _ in 0..n {
        let row: Vec<f32> = (0..D_IN).map(|_| uniform(&mut rng)).collect();
        let y: f32 = row.iter().zip(w_true).map(|(a, b)| a * b).sum::<f32>()
            + 0.7
            + 0.01 * uniform(&mut rng);
        xs.extend(row);
        ys.push(y);
    }
    Problem {
        x: Tensor::from_vec(xs, (n, D_IN), &Device::Cpu).unwrap(),
        y: Tensor::from_vec(ys, (n, 1), &Device::Cpu).unwrap(),
        n,
    }
}

fn fresh_vars() -> Vec<(String, Var)> {
    let w = Var::from_slice(&[0.1f32, -0.1, 0.05, 0.0, 0.2], (D_IN, 1), &Device::Cpu).unwrap();
    let b = Var::from_slice(&[0.0f32], 1, &Device::Cpu).unwrap();
    vec![("linear.weight".into(), w), ("linear.bias".into(), b)]
}

/// Mean squared error of the micro-batch, with "dropout" on the per-example
/// errors drawn from `ctx.dropout_seed` (so resume must reproduce the seeds).
fn mse(
    p: &Problem,
    vars: &[(String, Var)],
    idx: &[usize],
    ctx: Option<&StepContext>,
) -> Result<Tensor> {
    let ids = Tensor::from_vec(
        idx.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        idx.len(),
        &Device::Cpu,
    )?;
    let x = p.x.index_select(&ids, 0)?;
    let y = p.y.index_select(&ids, 0)?;
    let pred = x
        .matmul(vars[0].1.as_tensor())?
        .broadcast_add(vars[1].1.as_tensor())?;
    let mut err = (pred - y)?.sqr()?.sum(D::Minus1)?;
    if let Some(ctx) = ctx {
        let mut rng = ChaCha8Rng::seed_from_u64(ctx.dropout_seed);
        let keep: Vec<f32> = idx
            .iter()
            .map(|_| if rng.next_u32() % 10 < 8 { 1.25 } else { 0.0 })
            .collect();
        err = err.mul(&Tensor::from_vec(keep, idx.len(), &Device::Cpu)?)?;
    }
    Ok(err.mean_all()?)
}

/// Trains `vars` on `p` in `dir` with the loss `mse`, which draws its
/// dropout from the step context when `dropout` is set.
fn train_on(
    p: &Problem,
    vars: &[(String, Var)],
    c: &TrainConfig,
    dir: &Path,
    dropout: bool,
    hooks: &mut dyn TrainHooks,
) -> Result<TrainReport> {
    train(
        vars.to_vec(),
        p.n,
        c,
        dir,
        &mut |idx, ctx| mse(p, vars, idx, dropout.then_some(ctx)),
        hooks,
    )
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Variable values, exp_avg, exp_avg_sq (in variable order) and the optimizer step.
type State = (Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<Vec<f32>>, u64);

/// Captures the final state at the last epoch's end.
#[derive(Default)]
struct Capture {
    last: Option<State>,
    epochs_seen: Vec<usize>,
    steps: Vec<(u64, f64, f64)>,
}

impl TrainHooks for Capture {
    fn on_step(&mut self, step: u64, lr: f64, loss: f64) -> Result<()> {
        self.steps.push((step, lr, loss));
        Ok(())
    }
    fn on_epoch_end(&mut self, epoch: usize, _s: &EpochSummary, opt: &AdamW) -> Result<()> {
        self.epochs_seen.push(epoch);
        let mut p = vec![];
        let mut m = vec![];
        let mut v = vec![];
        for (name, var) in opt.vars() {
            p.push(values(var.as_tensor()));
            let (mm, vv) = opt.moments(name).unwrap();
            m.push(values(mm));
            v.push(values(vv));
        }
        self.last = Some((p, m, v, opt.step_count()));
        Ok(())
    }
    fn tokens(&mut self, indices: &[usize]) -> Option<u64> {
        Some(indices.iter().map(|&i| i as u64 % 7 + 1).sum())
    }
}

fn cfg(micro_batch: usize, grad_accum: usize, ckpt_every: Option<u64>) -> TrainConfig {
    TrainConfig {
        epochs: 3,
        lr: 0.05,
        warmup_ratio: 0.1,
        micro_batch,
        grad_accum,
        seed: 1234,
        shuffle: true,
        max_grad_norm: Some(5.0),
        checkpoint_every_steps: ckpt_every,
        adam: Default::default(),
        schedule: Default::default(),
    }
}

/// The state of a finished run as recorded on disk (vars + optimizer files).
fn disk_state(dir: &Path) -> State {
    let idx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(CHECKPOINT_FILE)).unwrap()).unwrap();
    let vars =
        candle_core::safetensors::load(dir.join(idx["vars_file"].as_str().unwrap()), &Device::Cpu)
            .unwrap();
    let st = read_adamw_state(
        &dir.join(idx["optimizer_file"].as_str().unwrap()),
        &Device::Cpu,
    )
    .unwrap();
    let mut p = vec![];
    let mut m = vec![];
    let mut v = vec![];
    for (name, mm, vv, _) in &st.moments {
        p.push(values(&vars[name]));
        m.push(values(mm));
        v.push(values(vv));
    }
    (p, m, v, st.step)
}

/// Report fields that must not depend on interruptions.
fn deterministic(r: &TrainReport) -> String {
    let mut r = r.clone();
    r.seconds = 0.0;
    r.resumed_from_step = None;
    for e in &mut r.epochs {
        e.seconds = 0.0;
    }
    format!("{r:?}")
}

#[test]
fn linear_regression_converges() {
    let p = problem(96);
    let vars = fresh_vars();
    let dir = tempfile::tempdir().unwrap();
    let initial = mse(&p, &vars, &(0..p.n).collect::<Vec<_>>(), None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let mut c = cfg(8, 1, None);
    c.epochs = 40;
    c.lr = 0.1;
    c.warmup_ratio = 0.03;
    let report = train_on(&p, &vars, &c, dir.path(), false, &mut NoHooks).unwrap();
    let fin = mse(&p, &vars, &(0..p.n).collect::<Vec<_>>(), None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(fin < initial * 1e-3, "initial {initial}, final {fin}");
    assert_eq!(report.plan.steps_per_epoch, 12);
    assert_eq!(report.steps, 480);
    assert_eq!(report.plan.warmup_steps, 15); // ceil(480 · 0.03) = ceil(14.4)
    assert_eq!(report.epochs.len(), 40);
    assert!(report.epochs[39].mean_loss < report.epochs[0].mean_loss * 1e-2);
    let w = values(vars[0].1.as_tensor());
    for (got, want) in w.iter().zip([1.5f32, -2.0, 0.5, 3.0, -1.0]) {
        assert!((got - want).abs() < 0.02, "{w:?}");
    }
    assert!((values(vars[1].1.as_tensor())[0] - 0.7).abs() < 0.02);
}

/// Run A uninterrupted; run B crashes at micro-step `crash_at`, then a second
/// call with fresh variables (a new process) resumes: everything must be
/// bit-identical.
fn resume_case(
    micro_batch: usize,
    grad_accum: usize,
    ckpt_every: Option<u64>,
    crash_at: u64,
    expect_resume_step: u64,
) {
    let p = problem(50);
    let c = cfg(micro_batch, grad_accum, ckpt_every);

    let dir_a = tempfile::tempdir().unwrap();
    let vars_a = fresh_vars();
    let mut hooks_a = Capture::default();
    let rep_a = train_on(&p, &vars_a, &c, dir_a.path(), true, &mut hooks_a).unwrap();
    assert_eq!(rep_a.resumed_from_step, None);
    assert_eq!(hooks_a.epochs_seen, vec![0, 1, 2]);

    let dir_b = tempfile::tempdir().unwrap();
    let vars_b1 = fresh_vars();
    let mut seen = vec![];
    let err = train(
        vars_b1.clone(),
        p.n,
        &c,
        dir_b.path(),
        &mut |idx, ctx| {
            seen.push(ctx.micro_step);
            if ctx.micro_step == crash_at {
                bail!("simulated crash");
            }
            mse(&p, &vars_b1, idx, Some(ctx))
        },
        &mut Capture::default(),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("simulated crash"), "{err:#}");
    assert_eq!(*seen.last().unwrap(), crash_at);

    // A new "process": fresh variables with the same initial values.
    let vars_b2 = fresh_vars();
    let mut hooks_b = Capture::default();
    let mut first_micro = None;
    let rep_b = train(
        vars_b2.clone(),
        p.n,
        &c,
        dir_b.path(),
        &mut |idx, ctx| {
            first_micro.get_or_insert(ctx.micro_step);
            mse(&p, &vars_b2, idx, Some(ctx))
        },
        &mut hooks_b,
    )
    .unwrap();
    assert_eq!(rep_b.resumed_from_step, Some(expect_resume_step));
    assert!(first_micro.unwrap() < crash_at);

    // Bit-identical: variables, m, v, step (==, not approx).
    let a = hooks_a.last.clone().unwrap();
    let b = hooks_b.last.clone().unwrap();
    assert_eq!(a, b);
    for (x, y) in vars_a.iter().zip(&vars_b2) {
        assert_eq!(values(x.1.as_tensor()), values(y.1.as_tensor()), "{}", x.0);
    }
    assert_eq!(disk_state(dir_a.path()), a);
    assert_eq!(disk_state(dir_b.path()), a);
    // The per-step history after the resume point and the report agree too.
    let tail_a: Vec<_> = hooks_a
        .steps
        .iter()
        .filter(|s| s.0 >= expect_resume_step)
        .cloned()
        .collect();
    assert_eq!(tail_a, hooks_b.steps);
    assert_eq!(deterministic(&rep_a), deterministic(&rep_b));
    assert!(rep_a.tokens.unwrap() > 0);

    // A finished run is not retrained.
    let vars_c = fresh_vars();
    let rep_c = train(
        vars_c.clone(),
        p.n,
        &c,
        dir_b.path(),
        &mut |_, _| bail!("must not be called"),
        &mut NoHooks,
    )
    .unwrap();
    assert_eq!(rep_c.resumed_from_step, Some(rep_a.steps));
    assert_eq!(deterministic(&rep_c), deterministic(&rep_a));
    assert_eq!(values(vars_c[0].1.as_tensor()), a.0[0]);

    // Only the current checkpoint's files remain.
    let mut files: Vec<String> = std::fs::read_dir(dir_b.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files.len(), 6, "{files:?}"); // index, vars, optimizer + their blake3
    assert_eq!(files[0], CHECKPOINT_FILE);
    for f in &files {
        if let Some(sealed) = f.strip_suffix(".blake3") {
            assert!(files.iter().any(|g| g == sealed), "{files:?}");
            assert!(dsel_store::check_sealed(dir_b.path().join(sealed)).is_valid());
        }
    }
}

/// Changes one byte of `path` in place, keeping its size.
fn flip_byte(path: &Path, from_end: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes.len() - from_end;
    bytes[at] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn damaged_checkpoint_is_not_resumed() {
    // 50 examples, micro-batch 4, accumulation 3, a checkpoint every 2 steps:
    // the crash at micro-step 20 leaves the checkpoint of step 6.
    let p = problem(50);
    let c = cfg(4, 3, Some(2));
    let dir_a = tempfile::tempdir().unwrap();
    let vars_a = fresh_vars();
    let mut hooks_a = Capture::default();
    let rep_a = train_on(&p, &vars_a, &c, dir_a.path(), true, &mut hooks_a).unwrap();
    let full = hooks_a.last.clone().unwrap();

    // Same-size damage to each file of the checkpoint: a float's lowest
    // mantissa bit of the variables or of the optimizer moments, or a digit
    // of the index's loss sum (still valid JSON, still a plausible position).
    type Damage = fn(&Path, &serde_json::Value);
    let damages: [(&str, Damage); 3] = [
        ("vars", |d, idx| {
            flip_byte(&d.join(idx["vars_file"].as_str().unwrap()), 4)
        }),
        ("optimizer", |d, idx| {
            flip_byte(&d.join(idx["optimizer_file"].as_str().unwrap()), 4)
        }),
        ("index", |d, _| {
            let path = d.join(CHECKPOINT_FILE);
            let text = std::fs::read_to_string(&path).unwrap();
            let at = text.find("\"loss_sum\": \"").unwrap() + "\"loss_sum\": \"".len();
            let digit = text[at..].find(|c: char| c.is_ascii_digit()).unwrap() + at;
            let old = text.as_bytes()[digit];
            let new = if old == b'9' { b'8' } else { old + 1 };
            let mut bytes = text.into_bytes();
            bytes[digit] = new;
            std::fs::write(&path, bytes).unwrap();
        }),
    ];
    for (what, damage) in damages {
        let dir_b = tempfile::tempdir().unwrap();
        let vars_b1 = fresh_vars();
        train(
            vars_b1.clone(),
            p.n,
            &c,
            dir_b.path(),
            &mut |idx, ctx| {
                if ctx.micro_step == 20 {
                    bail!("simulated crash");
                }
                mse(&p, &vars_b1, idx, Some(ctx))
            },
            &mut NoHooks,
        )
        .unwrap_err();
        let idx: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir_b.path().join(CHECKPOINT_FILE)).unwrap(),
        )
        .unwrap();
        assert_eq!(idx["position"]["step"], 6);
        damage(dir_b.path(), &idx);

        let vars_b2 = fresh_vars();
        let mut hooks_b = Capture::default();
        let rep_b = train_on(&p, &vars_b2, &c, dir_b.path(), true, &mut hooks_b).unwrap();
        assert_eq!(
            rep_b.resumed_from_step, None,
            "{what}: damaged state resumed"
        );
        // Recomputed from scratch: bit-identical to the uninterrupted run.
        assert_eq!(hooks_b.last.clone().unwrap(), full, "{what}");
        assert_eq!(deterministic(&rep_b), deterministic(&rep_a), "{what}");
        assert_eq!(disk_state(dir_b.path()), full, "{what}");
    }
}

/// Caller state beside the checkpoint that the caller finds damaged.
struct RejectResume(u32);

impl TrainHooks for RejectResume {
    fn can_resume(&mut self, _step: u64, _dir: &Path) -> Result<bool> {
        self.0 += 1;
        Ok(false)
    }
}

#[test]
fn hook_can_refuse_a_resume() {
    let p = problem(20);
    let c = cfg(4, 1, Some(1));
    let dir = tempfile::tempdir().unwrap();
    let v1 = fresh_vars();
    train_on(&p, &v1, &c, dir.path(), true, &mut NoHooks).unwrap();
    let v2 = fresh_vars();
    let mut hooks = RejectResume(0);
    let r = train_on(&p, &v2, &c, dir.path(), true, &mut hooks).unwrap();
    assert_eq!(hooks.0, 1);
    assert_eq!(r.resumed_from_step, None);
    assert_eq!(values(v1[0].1.as_tensor()), values(v2[0].1.as_tensor()));
}

#[test]
fn resume_mid_accumulation_window_is_bit_identical() {
    // 50 examples, micro-batch 4 → 13 micro-batches per epoch (last holds 2);
    // accumulation 3 → 5 steps per epoch (last step: one micro-batch of 2).
    // Epoch 1 runs micro-steps 13..26 and steps 5..10; checkpoints every 2
    // steps → last one before the crash at step 6. Micro-step 20 is the
    // second micro-batch of step 7's window (micro-steps 19, 20, 21).
    resume_case(4, 3, Some(2), 20, 6);
}

#[test]
fn resume_from_epoch_end_checkpoint_is_bit_identical() {
    // Without step checkpoints the run resumes from the end of epoch 0 (step 5);
    // the crash (micro-step 25) is in the last, partial window of epoch 1.
    resume_case(4, 3, None, 25, 5);
}

#[test]
fn resume_without_accumulation_is_bit_identical() {
    // micro-batch 7, no accumulation: 8 steps per epoch; checkpoint every 3
    // steps; crash at micro-step 11 (epoch 1) → resume from step 9.
    resume_case(7, 1, Some(3), 11, 9);
}

#[test]
fn accumulated_step_equals_full_batch_step() {
    // One optimizer step over 7 examples, as micro-batches 3 + 3 + 1 with
    // accumulation, must follow the gradient of the mean over all 7 (not the
    // mean of the micro-batch means): compare m = (1 − β1) g.
    let p = problem(7);
    let run = |micro_batch: usize, grad_accum: usize| -> Vec<Vec<f32>> {
        let vars = fresh_vars();
        let dir = tempfile::tempdir().unwrap();
        let c = TrainConfig {
            epochs: 1,
            lr: 0.01,
            warmup_ratio: 0.0,
            micro_batch,
            grad_accum,
            shuffle: false,
            ..TrainConfig::default()
        };
        let mut hooks = Capture::default();
        let r = train_on(&p, &vars, &c, dir.path(), false, &mut hooks).unwrap();
        assert_eq!(r.steps, 1);
        assert_eq!(r.micro_steps as usize, 7usize.div_ceil(micro_batch));
        // The step loss is the mean over the 7 examples.
        let full = mse(&p, &fresh_vars(), &(0..7).collect::<Vec<_>>(), None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            (hooks.steps[0].2 - full as f64).abs() < 1e-5,
            "{} vs {full}",
            hooks.steps[0].2
        );
        hooks.last.unwrap().1
    };
    let full = run(7, 1);
    let acc = run(3, 3);
    for (a, b) in full.iter().flatten().zip(acc.iter().flatten()) {
        assert!(
            (a - b).abs() <= 1e-6 * (1.0 + a.abs()),
            "{full:?} vs {acc:?}"
        );
    }
    // Independent check of m for the bias: (1 − β1) · mean(2 (pred − y)).
    let x: Vec<Vec<f32>> = p.x.to_vec2().unwrap();
    let y: Vec<Vec<f32>> = p.y.to_vec2().unwrap();
    let w0 = [0.1f32, -0.1, 0.05, 0.0, 0.2];
    let gb: f64 = (0..7)
        .map(|i| 2.0 * ((0..D_IN).map(|k| (x[i][k] * w0[k]) as f64).sum::<f64>() - y[i][0] as f64))
        .sum::<f64>()
        / 7.0;
    assert!(
        (full[1][0] as f64 - 0.1 * gb).abs() < 1e-5,
        "{} vs {}",
        full[1][0],
        0.1 * gb
    );
}

#[test]
fn different_config_ignores_old_checkpoint() {
    let p = problem(20);
    let c1 = cfg(4, 1, Some(1));
    let mut c2 = c1.clone();
    c2.seed = 99;
    let dir = tempfile::tempdir().unwrap();
    let v1 = fresh_vars();
    train_on(&p, &v1, &c1, dir.path(), true, &mut NoHooks).unwrap();
    let v2 = fresh_vars();
    let r2 = train_on(&p, &v2, &c2, dir.path(), true, &mut NoHooks).unwrap();
    assert_eq!(r2.resumed_from_step, None);
    let other = tempfile::tempdir().unwrap();
    let v3 = fresh_vars();
    train_on(&p, &v3, &c2, other.path(), true, &mut NoHooks).unwrap();
    assert_eq!(values(v2[0].1.as_tensor()), values(v3[0].1.as_tensor()));
    // Different initial values are a different run too.
    let v4 = fresh_vars();
    v4[1]
        .1
        .set(&Tensor::new(&[0.5f32], &Device::Cpu).unwrap())
        .unwrap();
    let r4 = train_on(&p, &v4, &c2, dir.path(), true, &mut NoHooks).unwrap();
    assert_eq!(r4.resumed_from_step, None);
}

#[test]
fn var_without_gradient_fails_training_naming_it() {
    let p = problem(8);
    let mut vars = fresh_vars();
    vars.push((
        "unused.lora_b".into(),
        Var::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
    ));
    let dir = tempfile::tempdir().unwrap();
    let err = train_on(&p, &vars, &cfg(4, 1, None), dir.path(), false, &mut NoHooks).unwrap_err();
    assert_eq!(
        err.downcast_ref::<TrainError>(),
        Some(&TrainError::MissingGradient {
            name: "unused.lora_b".into()
        })
    );
    assert!(format!("{err:#}").contains("unused.lora_b"));
}

#[test]
fn bad_inputs_are_errors() {
    let p = problem(8);
    let vars = fresh_vars();
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(4, 1, None);
    c.micro_batch = 0;
    let e = train_on(&p, &vars, &c, dir.path(), false, &mut NoHooks).unwrap_err();
    assert!(matches!(
        e.downcast_ref::<TrainError>(),
        Some(TrainError::InvalidConfig {
            field: "micro_batch",
            ..
        })
    ));
    // Non-scalar and non-finite losses.
    let c = cfg(4, 1, None);
    let e = train(
        vars.clone(),
        p.n,
        &c,
        dir.path(),
        &mut |_, _| Ok(vars[0].1.as_tensor().clone()),
        &mut NoHooks,
    )
    .unwrap_err();
    assert!(e.to_string().contains("scalar"), "{e}");
    let e = train(
        vars.clone(),
        p.n,
        &c,
        dir.path(),
        &mut |i, _| Ok((mse(&p, &vars, i, None)? * f64::NAN)?),
        &mut NoHooks,
    )
    .unwrap_err();
    assert!(
        matches!(
            e.downcast_ref::<TrainError>(),
            Some(TrainError::NonFiniteLoss { step: 0, .. })
        ),
        "{e}"
    );
    // An index that is the bytes written but not an index names the file
    // (one that differs from its recorded blake3 is ignored instead).
    dsel_store::write_sealed(dir.path().join(CHECKPOINT_FILE), "{not json").unwrap();
    let e = train_on(&p, &vars, &c, dir.path(), false, &mut NoHooks).unwrap_err();
    assert!(e.to_string().contains(CHECKPOINT_FILE), "{e}");
}
