//! AdamW with its state exposed, gradient accumulation and gradient-norm
//! clipping.
//!
//! The update reproduces PyTorch's `torch.optim.AdamW` (single-tensor code
//! path, `amsgrad=False`, `maximize=False`) operation by operation in `f32`.
//! For a parameter `p` with gradient `g` at its `t`-th update (`t` starts at 1):
//!
//! ```text
//! p  ← p · (1 − lr·λ)                          (decoupled weight decay, skipped when λ = 0)
//! m  ← lerp(m, g, 1 − β1)                      (= m + (1−β1)(g − m))
//! v  ← v·β2 + (1 − β2)·g·g
//! c1 = 1 − β1^t        c2 = 1 − β2^t           (f64, as Python floats)
//! p  ← p + (−lr / c1) · m / (sqrt(v) / sqrt(c2) + ε)
//! ```
//!
//! The scalars are computed in `f64` and rounded to `f32` once, as PyTorch's
//! CPU kernels do with Python-float arguments; the element-wise arithmetic is
//! done in `f32` in PyTorch's evaluation order. Moments `m` (`exp_avg`) and `v`
//! (`exp_avg_sq`) are `f32` tensors whatever the variable's dtype; a
//! non-`f32` variable is updated in `f32` and rounded back to its dtype.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::TrainError;
use crate::io::{read_safetensors, safetensors_bytes, write_atomic};

/// Value of the `format` metadata entry of optimizer-state files.
pub const ADAMW_FORMAT: &str = "dsel-adamw/1";

/// Hyper-parameters of [`AdamW`] (the learning rate is given per step).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// Decay rate of the first moment (PyTorch default 0.9).
    pub beta1: f64,
    /// Decay rate of the second moment (PyTorch default 0.999).
    pub beta2: f64,
    /// Added to the bias-corrected `sqrt(v)` (PyTorch default 1e-8).
    pub eps: f64,
    /// Decoupled weight decay λ (the project uses 0; PyTorch's default is 0.01).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl AdamWConfig {
    /// Checks every field is in range.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, reason: String| -> Result<()> {
            Err(TrainError::InvalidConfig { field, reason }.into())
        };
        if !(self.beta1.is_finite() && (0.0..1.0).contains(&self.beta1)) {
            return bad(
                "adam.beta1",
                format!("must be in [0, 1), got {}", self.beta1),
            );
        }
        if !(self.beta2.is_finite() && (0.0..1.0).contains(&self.beta2)) {
            return bad(
                "adam.beta2",
                format!("must be in [0, 1), got {}", self.beta2),
            );
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return bad(
                "adam.eps",
                format!("must be finite and >= 0, got {}", self.eps),
            );
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(
                "adam.weight_decay",
                format!("must be finite and >= 0, got {}", self.weight_decay),
            );
        }
        Ok(())
    }
}

/// AdamW over a list of named variables, with its moments readable
/// ([`AdamW::moments`]) and saved to / loaded from safetensors.
#[derive(Debug)]
pub struct AdamW {
    vars: Vec<(String, Var)>,
    index: HashMap<String, usize>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Number of updates each variable received (PyTorch keeps `step` per
    /// parameter; it differs from `step` only when missing gradients are allowed).
    var_steps: Vec<u64>,
    step: u64,
    cfg: AdamWConfig,
    allow_missing_grads: bool,
}

fn check_float(name: &str, dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::F64 | DType::BF16 | DType::F16 => Ok(()),
        other => bail!(
            "trainable variable `{name}` has dtype {other:?}; only float dtypes can be trained"
        ),
    }
}

impl AdamW {
    /// An optimizer over `vars` with zero moments and step 0. Names must be
    /// unique and non-empty, variables of a float dtype.
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        cfg.validate()?;
        if vars.is_empty() {
            bail!("AdamW needs at least one trainable variable, got none");
        }
        let mut index = HashMap::with_capacity(vars.len());
        let mut m = Vec::with_capacity(vars.len());
        let mut v = Vec::with_capacity(vars.len());
        for (i, (name, var)) in vars.iter().enumerate() {
            if name.is_empty() {
                bail!("trainable variable #{i} has an empty name");
            }
            if index.insert(name.clone(), i).is_some() {
                bail!("trainable variable name `{name}` appears more than once");
            }
            check_float(name, var.dtype())?;
            let z = Tensor::zeros(var.shape(), DType::F32, var.device())?;
            m.push(z.clone());
            v.push(z);
        }
        let n = vars.len();
        Ok(AdamW {
            vars,
            index,
            m,
            v,
            var_steps: vec![0; n],
            step: 0,
            cfg,
            allow_missing_grads: false,
        })
    }

    /// When `allow` is true, a variable without a gradient in the store is
    /// skipped (its moments and per-variable step are left unchanged, as
    /// PyTorch does for a parameter whose `.grad` is `None`) instead of being
    /// an error. Default: false.
    pub fn set_allow_missing_grads(&mut self, allow: bool) {
        self.allow_missing_grads = allow;
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Number of [`AdamW::step`] calls so far (restored by [`AdamW::load`]).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Number of updates the named variable received (equal to
    /// [`AdamW::step_count`] unless missing gradients are allowed).
    pub fn var_step_count(&self, name: &str) -> Option<u64> {
        self.index.get(name).map(|&i| self.var_steps[i])
    }

    /// The moments `(m, v)` = (`exp_avg`, `exp_avg_sq`) of the named variable, `f32`.
    pub fn moments(&self, name: &str) -> Option<(&Tensor, &Tensor)> {
        self.index.get(name).map(|&i| (&self.m[i], &self.v[i]))
    }

    /// The variables, in the order given to [`AdamW::new`].
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// One update with learning rate `lr` using the gradients of `grads`
    /// (looked up by each variable's tensor id). A variable with no gradient
    /// is an error naming it ([`TrainError::MissingGradient`]) unless allowed
    /// with [`AdamW::set_allow_missing_grads`]; all gradients are checked
    /// before any variable is changed.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        if !lr.is_finite() {
            bail!("AdamW step: learning rate must be finite, got {lr}");
        }
        let mut found: Vec<Option<&Tensor>> = Vec::with_capacity(self.vars.len());
        for (name, var) in &self.vars {
            match grads.get(var.as_tensor()) {
                Some(g) => {
                    if g.dims() != var.dims() {
                        return Err(TrainError::GradientShape {
                            name: name.clone(),
                            var: var.dims().to_vec(),
                            grad: g.dims().to_vec(),
                        }
                        .into());
                    }
                    found.push(Some(g));
                }
                None if self.allow_missing_grads => found.push(None),
                None => return Err(TrainError::MissingGradient { name: name.clone() }.into()),
            }
        }
        for (i, g) in found.into_iter().enumerate() {
            if let Some(g) = g {
                self.update_one(i, g, lr)
                    .with_context(|| format!("AdamW update of `{}`", self.vars[i].0))?;
            }
        }
        self.step += 1;
        Ok(())
    }

    fn update_one(&mut self, i: usize, grad: &Tensor, lr: f64) -> Result<()> {
        let var = &self.vars[i].1;
        let shape = var.shape().clone();
        let device = var.device().clone();
        let mut p: Vec<f32> = var
            .as_tensor()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let g: Vec<f32> = grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mut m: Vec<f32> = self.m[i].flatten_all()?.to_vec1()?;
        let mut v: Vec<f32> = self.v[i].flatten_all()?.to_vec1()?;
        if g.len() != p.len() || m.len() != p.len() || v.len() != p.len() {
            bail!("internal error: element counts of parameter, gradient and moments differ");
        }

        let t = self.var_steps[i] + 1;
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        // Scalars as PyTorch computes them in Python floats (f64).
        let bias_correction1 = 1.0 - beta1.powf(t as f64);
        let bias_correction2 = 1.0 - beta2.powf(t as f64);
        let step_size = lr / bias_correction1;
        let bias_correction2_sqrt = bias_correction2.sqrt();
        // ... rounded once to the tensor dtype, as the CPU kernels do.
        let decay = (1.0 - lr * weight_decay) as f32;
        let weight = (1.0 - beta1) as f32;
        let beta2_f = beta2 as f32;
        let one_minus_beta2 = (1.0 - beta2) as f32;
        let bc2_sqrt = bias_correction2_sqrt as f32;
        let eps_f = eps as f32;
        let neg_step = (-step_size) as f32;
        let lerp_low = weight.abs() < 0.5;

        for k in 0..p.len() {
            let gk = g[k];
            let mut pk = p[k];
            if weight_decay != 0.0 {
                pk *= decay;
            }
            // torch.lerp(m, g, w) (ATen's two-branch formula).
            let mk = if lerp_low {
                m[k] + weight * (gk - m[k])
            } else {
                gk - (gk - m[k]) * (1.0 - weight)
            };
            // addcmul: v·β2 + value·g·g
            let vk = v[k] * beta2_f + one_minus_beta2 * gk * gk;
            let denom = vk.sqrt() / bc2_sqrt + eps_f;
            // addcdiv: p + value·m / denom
            pk += neg_step * mk / denom;
            p[k] = pk;
            m[k] = mk;
            v[k] = vk;
        }

        let new_p = Tensor::from_vec(p, shape.clone(), &device)?.to_dtype(var.dtype())?;
        var.set(&new_p)?;
        self.m[i] = Tensor::from_vec(m, shape.clone(), &device)?;
        self.v[i] = Tensor::from_vec(v, shape, &device)?;
        self.var_steps[i] = t;
        Ok(())
    }

    /// Saves the optimizer state (not the parameters) to a safetensors file,
    /// atomically: tensors `"<name>.exp_avg"` and `"<name>.exp_avg_sq"` (`f32`),
    /// metadata `format` = [`ADAMW_FORMAT`], `step` (decimal), `var_steps` and
    /// `names` (JSON arrays in variable order) and `config` (JSON).
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self
            .state_bytes()
            .with_context(|| format!("serialising AdamW state for {}", path.display()))?;
        write_atomic(path, &bytes)
    }

    /// The bytes [`AdamW::save`] writes.
    pub(crate) fn state_bytes(&self) -> Result<Vec<u8>> {
        let mut tensors = Vec::with_capacity(2 * self.vars.len());
        for (i, (name, _)) in self.vars.iter().enumerate() {
            tensors.push((format!("{name}.exp_avg"), self.m[i].clone()));
            tensors.push((format!("{name}.exp_avg_sq"), self.v[i].clone()));
        }
        let names: Vec<&str> = self.vars.iter().map(|(n, _)| n.as_str()).collect();
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), ADAMW_FORMAT.to_string());
        meta.insert("step".to_string(), self.step.to_string());
        meta.insert(
            "var_steps".to_string(),
            serde_json::to_string(&self.var_steps)?,
        );
        meta.insert("names".to_string(), serde_json::to_string(&names)?);
        meta.insert("config".to_string(), serde_json::to_string(&self.cfg)?);
        safetensors_bytes(&tensors, meta)
    }

    /// Restores the state saved by [`AdamW::save`]. Every variable must have
    /// both moments in the file with its shape, and the file must hold no
    /// other tensors; errors name the file and the tensor. The
    /// hyper-parameters are not taken from the file. On error the optimizer
    /// is unchanged.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let device = match self.vars.first() {
            Some((_, v)) => v.device().clone(),
            None => Device::Cpu,
        };
        let state = read_adamw_state(path, &device)?;
        let mut by_name: HashMap<String, (Tensor, Tensor, u64)> = HashMap::new();
        for (name, m, v, s) in state.moments {
            by_name.insert(name, (m, v, s));
        }
        let mut new_m = Vec::with_capacity(self.vars.len());
        let mut new_v = Vec::with_capacity(self.vars.len());
        let mut new_steps = Vec::with_capacity(self.vars.len());
        for (name, var) in &self.vars {
            let (m, v, s) = by_name.remove(name).ok_or_else(|| {
                anyhow!(
                    "{}: optimizer state has no moments for variable `{name}`",
                    path.display()
                )
            })?;
            for (what, t) in [("exp_avg", &m), ("exp_avg_sq", &v)] {
                if t.dims() != var.dims() {
                    bail!(
                        "{}: tensor `{name}.{what}` has shape {:?}, variable `{name}` has shape {:?}",
                        path.display(),
                        t.dims(),
                        var.dims()
                    );
                }
            }
            new_m.push(m.to_device(var.device())?);
            new_v.push(v.to_device(var.device())?);
            new_steps.push(s);
        }
        if !by_name.is_empty() {
            let mut extra: Vec<_> = by_name.into_keys().collect();
            extra.sort();
            bail!(
                "{}: optimizer state has moments for variables this optimizer does not have: {}",
                path.display(),
                extra.join(", ")
            );
        }
        self.m = new_m;
        self.v = new_v;
        self.var_steps = new_steps;
        self.step = state.step;
        Ok(())
    }
}

/// Optimizer state read from a file written by [`AdamW::save`], without
/// needing the variables (LESS reads `m`, `v` of warmup checkpoints this way).
#[derive(Debug, Clone)]
pub struct AdamWState {
    /// Number of optimizer steps taken when the state was saved.
    pub step: u64,
    /// `(name, exp_avg, exp_avg_sq, per-variable step)` in the saved variable order, `f32`.
    pub moments: Vec<(String, Tensor, Tensor, u64)>,
    /// The hyper-parameters recorded in the file, if present and readable.
    pub config: Option<AdamWConfig>,
}

/// Reads an optimizer-state file written by [`AdamW::save`]; moments are
/// placed on `device` and converted to `f32`. Errors name the file and the
/// offending entry.
pub fn read_adamw_state(path: &Path, device: &Device) -> Result<AdamWState> {
    let (mut tensors, meta) = read_safetensors(path, device)?;
    let p = path.display();
    match meta.get("format") {
        Some(f) if f == ADAMW_FORMAT => {}
        Some(f) => bail!("{p}: metadata `format` is `{f}`, expected `{ADAMW_FORMAT}`"),
        None => bail!("{p}: metadata has no `format` entry; not an AdamW state file"),
    }
    let step: u64 = meta
        .get("step")
        .ok_or_else(|| anyhow!("{p}: metadata has no `step` entry"))?
        .parse()
        .map_err(|e| anyhow!("{p}: metadata `step` is not an integer: {e}"))?;
    let names: Vec<String> = serde_json::from_str(
        meta.get("names")
            .ok_or_else(|| anyhow!("{p}: metadata has no `names` entry"))?,
    )
    .map_err(|e| anyhow!("{p}: metadata `names` is not a JSON list of strings: {e}"))?;
    let var_steps: Vec<u64> = match meta.get("var_steps") {
        Some(s) => serde_json::from_str(s).map_err(|e| {
            anyhow!("{p}: metadata `var_steps` is not a JSON list of integers: {e}")
        })?,
        None => vec![step; names.len()],
    };
    if var_steps.len() != names.len() {
        bail!(
            "{p}: metadata `var_steps` has {} entries but `names` has {}",
            var_steps.len(),
            names.len()
        );
    }
    let config = meta
        .get("config")
        .and_then(|c| serde_json::from_str::<AdamWConfig>(c).ok());
    let mut moments = Vec::with_capacity(names.len());
    for (name, s) in names.iter().zip(var_steps) {
        let mut take = |suffix: &str| -> Result<Tensor> {
            let key = format!("{name}.{suffix}");
            let t = tensors
                .remove(&key)
                .ok_or_else(|| anyhow!("{p}: tensor `{key}` is missing"))?;
            Ok(t.to_dtype(DType::F32)?)
        };
        let m = take("exp_avg")?;
        let v = take("exp_avg_sq")?;
        if m.dims() != v.dims() {
            bail!(
                "{p}: `{name}.exp_avg` has shape {:?} but `{name}.exp_avg_sq` has shape {:?}",
                m.dims(),
                v.dims()
            );
        }
        moments.push((name.clone(), m, v, s));
    }
    if !tensors.is_empty() {
        let mut extra: Vec<_> = tensors.into_keys().collect();
        extra.sort();
        bail!(
            "{p}: tensors not listed in metadata `names`: {}",
            extra.join(", ")
        );
    }
    Ok(AdamWState {
        step,
        moments,
        config,
    })
}

/// Sums weighted gradients of the given variables over several backward
/// passes (micro-batches), keeping only those variables' gradients.
#[derive(Debug)]
pub struct GradAccumulator {
    keys: Vec<Tensor>,
    bufs: Vec<Option<Tensor>>,
}

impl GradAccumulator {
    /// An empty accumulator for `vars`.
    pub fn new(vars: &[(String, Var)]) -> Self {
        GradAccumulator {
            keys: vars.iter().map(|(_, v)| v.as_tensor().clone()).collect(),
            bufs: vec![None; vars.len()],
        }
    }

    /// Adds `weight · grad` for every variable that has a gradient in `grads`
    /// (a variable with none is left as it is; [`AdamW::step`] reports a
    /// variable that ends up with no gradient at all). A weight of exactly 1
    /// adds the gradient unscaled.
    pub fn add(&mut self, grads: &GradStore, weight: f64) -> Result<()> {
        if !weight.is_finite() {
            bail!("gradient accumulation weight must be finite, got {weight}");
        }
        for (key, buf) in self.keys.iter().zip(self.bufs.iter_mut()) {
            if let Some(g) = grads.get(key) {
                let g = if weight == 1.0 {
                    g.detach()
                } else {
                    g.affine(weight, 0.0)?.detach()
                };
                *buf = Some(match buf.take() {
                    None => g,
                    Some(acc) => acc.add(&g)?.detach(),
                });
            }
        }
        Ok(())
    }

    /// True when no gradient has been added since creation or the last take.
    pub fn is_empty(&self) -> bool {
        self.bufs.iter().all(|b| b.is_none())
    }

    /// The accumulated gradients as a [`GradStore`] keyed by the variables;
    /// the accumulator is left empty.
    pub fn take(&mut self) -> GradStore {
        let mut store = GradStore::default();
        for (key, buf) in self.keys.iter().zip(self.bufs.iter_mut()) {
            if let Some(g) = buf.take() {
                store.insert(key, g);
            }
        }
        store
    }
}

/// Clips gradients by their total L2 norm, with the semantics of PyTorch's
/// `torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=2)`:
/// `total = ‖(‖g_1‖, …, ‖g_n‖)‖₂` over the variables that have a gradient,
/// `coef = max_norm / (total + 1e-6)`, and when `coef < 1` every gradient is
/// multiplied by `coef`. Returns the total norm before clipping. Norms are
/// accumulated in `f64`. Deviation: a non-finite total norm is an error
/// ([`TrainError::NonFiniteGradNorm`]) rather than NaN-filled gradients.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[(String, Var)], max_norm: f64) -> Result<f64> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        bail!("max_grad_norm must be finite and > 0, got {max_norm}");
    }
    let mut sum_sq_norms = 0.0f64;
    for (name, var) in vars {
        if let Some(g) = grads.get(var.as_tensor()) {
            let vals: Vec<f64> = g
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1()
                .with_context(|| format!("reading the gradient of `{name}`"))?;
            let ss: f64 = vals.iter().map(|x| x * x).sum();
            let norm = ss.sqrt();
            sum_sq_norms += norm * norm;
        }
    }
    let total = sum_sq_norms.sqrt();
    if !total.is_finite() {
        return Err(TrainError::NonFiniteGradNorm { norm: total }.into());
    }
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 {
        for (_, var) in vars {
            let key = var.as_tensor();
            if let Some(g) = grads.remove(key) {
                grads.insert(key, g.affine(coef, 0.0)?.detach());
            }
        }
    }
    Ok(total)
}
