//! AdamW, clipping, accumulation and schedule against independent computations.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use dsel_train::{
    batches, clip_grad_norm, epoch_order, read_adamw_state, AdamW, AdamWConfig, GradAccumulator,
    LinearSchedule, TrainError,
};

fn var(name: &str, vals: &[f32]) -> (String, Var) {
    (
        name.to_string(),
        Var::from_slice(vals, vals.len(), &Device::Cpu).unwrap(),
    )
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn store(pairs: &[(&Var, &[f32])]) -> GradStore {
    let mut g = GradStore::default();
    for (v, vals) in pairs {
        g.insert(
            v.as_tensor(),
            Tensor::from_slice(vals, vals.len(), &Device::Cpu).unwrap(),
        );
    }
    g
}

/// PyTorch's AdamW written out in f64 from the documentation's algorithm
/// (`torch.optim.AdamW`): θ ← θ − γλθ; m ← β1 m + (1−β1) g; v ← β2 v + (1−β2) g²;
/// m̂ = m / (1−β1^t); v̂ = v / (1−β2^t); θ ← θ − γ m̂ / (sqrt(v̂) + ε).
struct Reference {
    p: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}

impl Reference {
    fn step(&mut self, g: &[f32], lr: f64, c: &AdamWConfig) {
        self.t += 1;
        for k in 0..self.p.len() {
            let g = g[k] as f64;
            self.p[k] -= lr * c.weight_decay * self.p[k];
            self.m[k] = c.beta1 * self.m[k] + (1.0 - c.beta1) * g;
            self.v[k] = c.beta2 * self.v[k] + (1.0 - c.beta2) * g * g;
            let mhat = self.m[k] / (1.0 - c.beta1.powi(self.t));
            let vhat = self.v[k] / (1.0 - c.beta2.powi(self.t));
            self.p[k] -= lr * mhat / (vhat.sqrt() + c.eps);
        }
    }
}

fn close(a: &[f32], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let err = (*x as f64 - y).abs();
        assert!(
            err <= tol * (1.0 + y.abs()),
            "{what}[{i}]: got {x}, expected {y} (err {err})"
        );
    }
}

fn adamw_three_steps(weight_decay: f64) {
    let cfg = AdamWConfig {
        weight_decay,
        ..AdamWConfig::default()
    };
    let init = [0.5f32, -1.25, 2.0, 0.0, 3.5, -0.75];
    let (name, w) = var("w", &init);
    let mut opt = AdamW::new(vec![(name, w.clone())], cfg).unwrap();
    let mut r = Reference {
        p: init.iter().map(|&x| x as f64).collect(),
        m: vec![0.0; 6],
        v: vec![0.0; 6],
        t: 0,
    };
    let grads: [[f32; 6]; 3] = [
        [0.1, -0.2, 0.3, 1e-3, -2.0, 0.0],
        [-0.3, 0.25, 0.1, 5e-4, 1.5, 0.0],
        [0.2, 0.05, -0.4, -1e-3, 0.5, 0.0],
    ];
    let lrs = [1e-2, 5e-2, 2e-3];
    for (g, lr) in grads.iter().zip(lrs) {
        opt.step(&store(&[(&w, g)]), lr).unwrap();
        r.step(g, lr, &cfg);
        close(&vals(w.as_tensor()), &r.p, 2e-6, "param");
        let (m, v) = opt.moments("w").unwrap();
        close(&vals(m), &r.m, 2e-6, "exp_avg");
        close(&vals(v), &r.v, 2e-6, "exp_avg_sq");
    }
    assert_eq!(opt.step_count(), 3);
    // Zero gradient throughout: only the decay moves the parameter.
    let expect_last = init[5] as f64
        * (1.0 - 1e-2 * weight_decay)
        * (1.0 - 5e-2 * weight_decay)
        * (1.0 - 2e-3 * weight_decay);
    close(
        &vals(w.as_tensor())[5..],
        &[expect_last],
        1e-7,
        "zero-grad param",
    );
}

#[test]
fn adamw_matches_pytorch_formulas_without_weight_decay() {
    adamw_three_steps(0.0);
}

#[test]
fn adamw_matches_pytorch_formulas_with_weight_decay() {
    adamw_three_steps(0.1);
}

#[test]
fn adamw_first_steps_closed_form() {
    // With a constant gradient the bias-corrected moments are exactly g and
    // g², so every step moves by lr·g/(|g|+ε), here exactly lr·sign(g) up to ε.
    let (name, w) = var("w", &[1.0, -1.0]);
    let mut opt = AdamW::new(vec![(name, w.clone())], AdamWConfig::default()).unwrap();
    for t in 1..=3 {
        opt.step(&store(&[(&w, &[0.5, -4.0])]), 0.1).unwrap();
        let p = vals(w.as_tensor());
        let d = 0.1 * t as f64;
        close(&p, &[1.0 - d, -1.0 + d], 1e-6, "param");
    }
    let (m, v) = opt.moments("w").unwrap();
    // m_3 = (1 − 0.9³) g, v_3 = (1 − 0.999³) g²
    close(&vals(m), &[0.271 * 0.5, 0.271 * -4.0], 1e-6, "m");
    let c = 1.0 - 0.999f64.powi(3);
    close(&vals(v), &[c * 0.25, c * 16.0], 1e-6, "v");
}

#[test]
fn missing_gradient_is_an_error_naming_the_var() {
    let (na, a) = var("layer.a", &[1.0, 2.0]);
    let (nb, b) = var("layer.b", &[3.0]);
    let mut opt = AdamW::new(
        vec![(na, a.clone()), (nb, b.clone())],
        AdamWConfig::default(),
    )
    .unwrap();
    // A real backward pass that never reaches `b`.
    let loss = a.as_tensor().sqr().unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let err = opt.step(&grads, 0.1).unwrap_err();
    assert_eq!(
        err.downcast_ref::<TrainError>(),
        Some(&TrainError::MissingGradient {
            name: "layer.b".into()
        })
    );
    assert!(err.to_string().contains("layer.b"), "{err}");
    // Nothing was changed by the failed step.
    assert_eq!(vals(a.as_tensor()), vec![1.0, 2.0]);
    assert_eq!(opt.step_count(), 0);
    // Allowed: `b` is skipped, as PyTorch skips parameters without .grad.
    opt.set_allow_missing_grads(true);
    opt.step(&grads, 0.1).unwrap();
    assert_eq!(vals(b.as_tensor()), vec![3.0]);
    assert_eq!(opt.var_step_count("layer.b"), Some(0));
    assert_eq!(opt.var_step_count("layer.a"), Some(1));
    assert_ne!(vals(a.as_tensor()), vec![1.0, 2.0]);
}

/// `keys` in the order their `"key":` first appears in `json` (a key inside
/// a string value is escaped, `\"key\":`, so it does not match).
fn keys_in_text_order(json: &str, keys: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut found: Vec<(usize, String)> = keys
        .into_iter()
        .map(|k| {
            let needle = format!("{}:", serde_json::to_string(&k).unwrap());
            (
                json.find(&needle)
                    .unwrap_or_else(|| panic!("{k} not in {json}")),
                k,
            )
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, k)| k).collect()
}

#[test]
fn same_state_saves_to_identical_bytes_with_sorted_header() {
    let dir = tempfile::tempdir().unwrap();
    let mut vars = Vec::new();
    for (i, name) in [
        "q_proj.lora_b",
        "k_proj.lora_a",
        "v_proj.lora_a",
        "o_proj.lora_b",
    ]
    .iter()
    .enumerate()
    {
        vars.push(var(name, &[0.25 * i as f32, -1.0, 2.0]));
    }
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
    let pairs: Vec<(&Var, &[f32])> = vars
        .iter()
        .map(|(_, v)| (v, &[0.1f32, -0.2, 0.3][..]))
        .collect();
    opt.step(&store(&pairs), 0.01).unwrap();
    // Every save builds its metadata map afresh (a new hash seed each time).
    let writes: Vec<Vec<u8>> = (0..6)
        .map(|i| {
            let p = dir.path().join(format!("optimizer-{i}.safetensors"));
            opt.save(&p).unwrap();
            std::fs::read(&p).unwrap()
        })
        .collect();
    for w in &writes[1..] {
        assert!(*w == writes[0], "two saves of one state differ");
    }
    // Independently: the header's keys appear sorted, top level and metadata.
    let bytes = &writes[0];
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(n % 8, 0);
    let text = std::str::from_utf8(&bytes[8..8 + n]).unwrap().trim_end();
    let header: serde_json::Value = serde_json::from_str(text).unwrap();
    let top: Vec<String> = header.as_object().unwrap().keys().cloned().collect();
    let mut sorted = top.clone();
    sorted.sort();
    assert_eq!(keys_in_text_order(text, top), sorted);
    assert_eq!(sorted[0], "__metadata__");
    let meta: Vec<String> = header["__metadata__"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(meta.len(), 5);
    let mut meta_sorted = meta.clone();
    meta_sorted.sort();
    assert_eq!(keys_in_text_order(text, meta), meta_sorted);
    // Still a valid file.
    let mut fresh = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
    fresh
        .load(&dir.path().join("optimizer-3.safetensors"))
        .unwrap();
    assert_eq!(fresh.step_count(), 1);
}

#[test]
fn adamw_save_load_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opt.safetensors");
    let (na, a) = var("a", &[1.0, 2.0, 3.0]);
    let b = Var::from_slice(&[0.5f32, -0.5, 1.5, 2.5], (2, 2), &Device::Cpu).unwrap();
    let vars = vec![(na, a.clone()), ("b".to_string(), b.clone())];
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
    for i in 0..3 {
        let s = i as f32;
        let mut g = store(&[(&a, &[0.1 + s, -0.2, 0.3 * s])]);
        g.insert(
            b.as_tensor(),
            Tensor::new(&[[s, 1.0], [-1.0, 0.25]], &Device::Cpu).unwrap(),
        );
        opt.step(&g, 0.01).unwrap();
    }
    opt.save(&path).unwrap();

    let mut fresh = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
    fresh.load(&path).unwrap();
    assert_eq!(fresh.step_count(), 3);
    for name in ["a", "b"] {
        let (m0, v0) = opt.moments(name).unwrap();
        let (m1, v1) = fresh.moments(name).unwrap();
        assert_eq!(vals(m0), vals(m1), "{name} exp_avg");
        assert_eq!(vals(v0), vals(v1), "{name} exp_avg_sq");
        assert_eq!(
            m1.dims(),
            opt.vars().iter().find(|(n, _)| n == name).unwrap().1.dims()
        );
        assert_eq!(m1.dtype(), DType::F32);
    }
    // The file layout LESS reads.
    let st = read_adamw_state(&path, &Device::Cpu).unwrap();
    assert_eq!(st.step, 3);
    assert_eq!(st.moments.len(), 2);
    assert_eq!(st.moments[0].0, "a");
    assert_eq!(vals(&st.moments[1].1), vals(opt.moments("b").unwrap().0));
    let raw = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let mut keys: Vec<_> = raw.keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        ["a.exp_avg", "a.exp_avg_sq", "b.exp_avg", "b.exp_avg_sq"]
    );

    // Shape mismatch and missing variable give clear errors.
    let wrong = Var::from_slice(&[0f32; 4], 4, &Device::Cpu).unwrap();
    let mut bad = AdamW::new(
        vec![("a".into(), a.clone()), ("b".into(), wrong)],
        AdamWConfig::default(),
    )
    .unwrap();
    let e = bad.load(&path).unwrap_err().to_string();
    assert!(e.contains("b.exp_avg") && e.contains("shape"), "{e}");
    let c = Var::from_slice(&[0f32; 3], 3, &Device::Cpu).unwrap();
    let mut other = AdamW::new(
        vec![("a".into(), a), ("c".into(), c)],
        AdamWConfig::default(),
    )
    .unwrap();
    let e = other.load(&path).unwrap_err().to_string();
    assert!(e.contains("`c`") && e.contains("opt.safetensors"), "{e}");
    assert_eq!(other.step_count(), 0);
}

#[test]
fn clip_grad_norm_torch_semantics() {
    let (na, a) = var("a", &[0.0, 0.0]);
    let (nb, b) = var("b", &[0.0]);
    let vars = vec![(na, a.clone()), (nb, b.clone())];
    // ‖(3,4)‖ = 5, ‖12‖ = 12, total = 13.
    let mut g = store(&[(&a, &[3.0, 4.0]), (&b, &[12.0])]);
    let total = clip_grad_norm(&mut g, &vars, 6.5).unwrap();
    assert!((total - 13.0).abs() < 1e-9);
    let coef = 6.5 / (13.0 + 1e-6);
    close(
        &vals(g.get(a.as_tensor()).unwrap()),
        &[3.0 * coef, 4.0 * coef],
        1e-6,
        "a",
    );
    close(
        &vals(g.get(b.as_tensor()).unwrap()),
        &[12.0 * coef],
        1e-6,
        "b",
    );
    // Under the limit: untouched.
    let mut g = store(&[(&a, &[3.0, 4.0]), (&b, &[12.0])]);
    let total = clip_grad_norm(&mut g, &vars, 100.0).unwrap();
    assert!((total - 13.0).abs() < 1e-9);
    assert_eq!(vals(g.get(a.as_tensor()).unwrap()), vec![3.0, 4.0]);
    // Non-finite norm is an error.
    let mut g = store(&[(&a, &[f32::NAN, 4.0])]);
    assert!(clip_grad_norm(&mut g, &vars, 1.0).is_err());
}

#[test]
fn accumulator_weights_and_sums() {
    let (na, a) = var("a", &[0.0, 0.0]);
    let vars = vec![(na, a.clone())];
    let mut acc = GradAccumulator::new(&vars);
    assert!(acc.is_empty());
    acc.add(&store(&[(&a, &[1.0, 2.0])]), 0.75).unwrap();
    acc.add(&store(&[(&a, &[-4.0, 8.0])]), 0.25).unwrap();
    let g = acc.take();
    assert!(acc.is_empty());
    close(
        &vals(g.get(a.as_tensor()).unwrap()),
        &[-0.25, 3.5],
        1e-7,
        "acc",
    );
}

#[test]
fn linear_schedule_matches_hf() {
    // Values printed by Python with HF's lambda:
    //   lr_lambda(s) = s / max(1, W) if s < W else max(0, (T − s) / max(1, T − W))
    // and warmup = math.ceil(T * ratio); T = 134, ratio = 0.03 → W = ceil(4.02) = 5.
    let s = LinearSchedule::from_ratio(2e-5, 134, 0.03);
    assert_eq!(s.warmup_steps, 5);
    let expected: [(u64, f64); 9] = [
        (0, 0.0),
        (1, 4.000000000000001e-06),
        (2, 8.000000000000001e-06),
        (3, 1.2e-05),
        (4, 1.6000000000000003e-05),
        (5, 2e-05),
        (133, 1.5503875968992249e-07), // last step: peak / (T − W)
        (134, 0.0),
        (135, 0.0),
    ];
    for (step, lr) in expected {
        assert_eq!(
            s.lr(step).to_bits(),
            lr.to_bits(),
            "step {step}: {} vs {lr}",
            s.lr(step)
        );
    }
    // Midway through the decay: (134 − 69) / 129.
    assert!((s.lr(69) - 2e-5 * 65.0 / 129.0).abs() < 1e-20);
    // Python's 100 * 0.07 = 7.000000000000001, so HF warms up for 8 steps.
    assert_eq!(LinearSchedule::from_ratio(1.0, 100, 0.07).warmup_steps, 8);
    assert_eq!(LinearSchedule::from_ratio(1.0, 10, 0.03).warmup_steps, 1);
    // No warmup: starts at the peak.
    let s = LinearSchedule::from_ratio(1.0, 4, 0.0);
    assert_eq!((s.lr(0), s.lr(1), s.lr(3)), (1.0, 0.75, 0.25));
}

#[test]
fn epoch_order_is_a_deterministic_permutation() {
    let a = epoch_order(1000, 42, 0);
    let mut sorted = a.clone();
    sorted.sort();
    assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
    assert_eq!(a, epoch_order(1000, 42, 0));
    assert_ne!(a, epoch_order(1000, 42, 1));
    assert_ne!(a, epoch_order(1000, 43, 0));
    assert_ne!(a, (0..1000).collect::<Vec<_>>());
    assert!(epoch_order(0, 1, 0).is_empty());
    assert_eq!(epoch_order(1, 1, 0), vec![0]);
    // Roughly uniform: position of element 0 over many epochs.
    let mut first_half = 0;
    for e in 0..400 {
        let o = epoch_order(10, 7, e);
        if o.iter().position(|&x| x == 0).unwrap() < 5 {
            first_half += 1;
        }
    }
    assert!((150..250).contains(&first_half), "{first_half}");

    let order: Vec<usize> = (0..10).collect();
    let b: Vec<&[usize]> = batches(&order, 4).unwrap().collect();
    assert_eq!(b, vec![&[0, 1, 2, 3][..], &[4, 5, 6, 7][..], &[8, 9][..]]);
    assert!(batches(&order, 0).is_err());
}
