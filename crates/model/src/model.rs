//! The decoder: frozen base weights, optional LoRA, per-token outputs,
//! per-example LoRA gradients.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};

use crate::batch::{Batch, Mode};
use crate::lora::{dropout_mask, LoraConfig, LoraModule, LORA_TARGETS};
use crate::ops::{
    apply_rope, attention_mask, gather_log_softmax, linear, masked_softmax_last, rms_norm,
    rope_tables,
};
use crate::{LlamaConfig, Precision, RawModel};

/// Slots of the seven projections of a layer, in [`LORA_TARGETS`] order.
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

/// Metadata key under which [`Model::save_lora`] stores the LoRA config (JSON).
pub const LORA_META_KEY: &str = "dsel_lora_config";

struct Layer {
    input_norm: Tensor,
    post_norm: Tensor,
    /// Projection weights `[d_out, d_in]` in slot order q,k,v,o,gate,up,down.
    w: [Tensor; 7],
    /// Biases for q, k, v (Qwen2-style), when present.
    bias: [Option<Tensor>; 3],
    lora: [Option<LoraModule>; 7],
}

/// What one forward pass records for the LoRA modules.
struct Capture {
    name: String,
    x: Tensor,
    h: Tensor,
    probe: Var,
}

/// Options of an internal forward pass.
#[derive(Clone, Copy)]
struct Fwd {
    mode: Mode,
    /// Insert zero-valued probe variables on every LoRA branch output and
    /// record the branch inputs (per-example gradients).
    capture: bool,
    /// Use detached LoRA weights (no autograd graph through them).
    detach_lora: bool,
}

/// Per-example LoRA gradients from one batched backward pass.
#[derive(Debug, Clone)]
pub struct PerExampleGrads {
    /// `[B]` per-example completion-mean NLL.
    pub losses: Tensor,
    /// `[B, P]`: row `i` is example `i`'s gradient of its own loss with
    /// respect to every LoRA parameter, in [`Model::lora_params`] order,
    /// each parameter flattened row-major.
    pub grads: Tensor,
}

/// Tensors captured at one LoRA module for gradient inner products.
///
/// With `A [r, d_in]`, `B [d_out, r]` and scale `s = alpha/rank`, the branch
/// computes `h = x Aᵀ`, `u = h Bᵀ`, output `s·u`. `dy` is the gradient of the
/// sum over examples of the per-example losses with respect to `u` — i.e.
/// BEFORE the scale, so the scale is already folded in. Hence for example `i`
/// (padding rows are zero in `x`, `h` and `dy`):
/// `grad_B(i) = Σ_t dy_t h_tᵀ = dy_iᵀ h_i` and `grad_A(i) = Σ_t (Bᵀ dy_t) x_tᵀ = (dy_i B)ᵀ x_i`.
#[derive(Debug, Clone)]
pub struct LoraCapture {
    /// Module name, `"layers.{i}.{target}"`.
    pub name: String,
    /// `[B, T, d_in]` input of A (after dropout in train mode), detached.
    pub x: Tensor,
    /// `[B, T, r]` = `x Aᵀ`, detached.
    pub h: Tensor,
    /// `[B, T, d_out]` gradient w.r.t. the unscaled branch output `h Bᵀ`.
    pub dy: Tensor,
}

/// A Llama-family decoder with frozen base weights and optional LoRA.
///
/// All computation runs on the device of the weights and in their dtype
/// (f32 from every loader; f64 works on CPU, which the tests use for finite
/// differences). Every operation is differentiable (see [`crate::ops`]).
pub struct Model {
    cfg: LlamaConfig,
    device: Device,
    dtype: DType,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    lora_cfg: Option<LoraConfig>,
    precision: Precision,
}

fn take(raw: &RawModel, name: &str, shape: &[usize]) -> Result<Tensor> {
    let t = raw
        .tensors
        .get(name)
        .ok_or_else(|| anyhow!("model weights: missing tensor {name}"))?;
    if t.dims() != shape {
        bail!(
            "model weights: tensor {name} has shape {:?}, expected {shape:?}",
            t.dims()
        );
    }
    // Frozen: a plain tensor, never a Var.
    Ok(t.detach())
}

impl Model {
    /// Builds the model from loader output, checking every weight's presence
    /// and shape against the config. Base weights are frozen (plain tensors).
    pub fn new(raw: &RawModel) -> Result<Model> {
        let c = &raw.config;
        if c.num_attention_heads == 0
            || c.num_attention_heads.checked_rem(c.num_key_value_heads) != Some(0)
        {
            bail!(
                "model config: num_attention_heads {} must be a positive multiple of num_key_value_heads {}",
                c.num_attention_heads,
                c.num_key_value_heads
            );
        }
        if c.head_dim == 0 || c.head_dim & 1 == 1 {
            bail!(
                "model config: head_dim {} must be even and positive",
                c.head_dim
            );
        }
        let (h, i, v) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let qd = c.num_attention_heads * c.head_dim;
        let kvd = c.num_key_value_heads * c.head_dim;
        let embed = take(raw, "model.embed_tokens.weight", &[v, h])?;
        let dtype = embed.dtype();
        if !dtype.is_float() {
            bail!("model weights: model.embed_tokens.weight has non-float dtype {dtype:?}");
        }
        let device = embed.device().clone();
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let w = [
                take(raw, &format!("{p}.self_attn.q_proj.weight"), &[qd, h])?,
                take(raw, &format!("{p}.self_attn.k_proj.weight"), &[kvd, h])?,
                take(raw, &format!("{p}.self_attn.v_proj.weight"), &[kvd, h])?,
                take(raw, &format!("{p}.self_attn.o_proj.weight"), &[h, qd])?,
                take(raw, &format!("{p}.mlp.gate_proj.weight"), &[i, h])?,
                take(raw, &format!("{p}.mlp.up_proj.weight"), &[i, h])?,
                take(raw, &format!("{p}.mlp.down_proj.weight"), &[h, i])?,
            ];
            let bias = if c.attention_bias {
                [
                    Some(take(raw, &format!("{p}.self_attn.q_proj.bias"), &[qd])?),
                    Some(take(raw, &format!("{p}.self_attn.k_proj.bias"), &[kvd])?),
                    Some(take(raw, &format!("{p}.self_attn.v_proj.bias"), &[kvd])?),
                ]
            } else {
                [None, None, None]
            };
            for t in w.iter().chain(bias.iter().flatten()) {
                if t.dtype() != dtype || !t.device().same_device(&device) {
                    bail!("model weights: layer {l} tensors differ in dtype or device from the embedding");
                }
            }
            layers.push(Layer {
                input_norm: take(raw, &format!("{p}.input_layernorm.weight"), &[h])?,
                post_norm: take(raw, &format!("{p}.post_attention_layernorm.weight"), &[h])?,
                w,
                bias,
                lora: Default::default(),
            });
        }
        let norm = take(raw, "model.norm.weight", &[h])?;
        let lm_head = if c.tie_word_embeddings {
            embed.clone()
        } else {
            take(raw, "lm_head.weight", &[v, h])?
        };
        Ok(Model {
            cfg: c.clone(),
            device,
            dtype,
            embed,
            layers,
            norm,
            lm_head,
            lora_cfg: None,
            precision: Precision::F32,
        })
    }

    /// The architecture.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The device every tensor of the model lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype (that of the loaded weights).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The precision of the matrix products (see [`Precision`]).
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Sets the precision of every matrix product. [`Precision::Bf16`]
    /// converts the frozen projection weights and the LM head to bf16 once
    /// (halving their memory); the embedding, norms, LoRA weights and all
    /// activations stay in the model dtype. A model whose weights are f64
    /// (tests) ignores the request; going back from bf16 to f32 is refused
    /// (the rounding cannot be undone: load the model again).
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        if precision == self.precision || self.dtype != DType::F32 {
            return Ok(());
        }
        if precision == Precision::F32 {
            bail!("model precision: cannot go back from bf16 to f32 weights; load the model again");
        }
        for layer in &mut self.layers {
            for w in layer.w.iter_mut() {
                *w = w.to_dtype(DType::BF16)?;
            }
        }
        self.lm_head = self.lm_head.to_dtype(DType::BF16)?;
        self.precision = precision;
        Ok(())
    }

    /// The active LoRA configuration, if any.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora_cfg.as_ref()
    }

    /// `(d_in, d_out)` of projection `slot`.
    fn proj_dims(&self, slot: usize) -> (usize, usize) {
        let c = &self.cfg;
        let qd = c.num_attention_heads * c.head_dim;
        let kvd = c.num_key_value_heads * c.head_dim;
        let (h, i) = (c.hidden_size, c.intermediate_size);
        match slot {
            Q => (h, qd),
            K | V => (h, kvd),
            O => (qd, h),
            GATE | UP => (h, i),
            _ => (i, h),
        }
    }

    /// Adds fresh LoRA adapters (replacing any existing ones): A drawn
    /// kaiming-uniform like PEFT from `cfg.seed`, B = 0, scale `alpha/rank`.
    pub fn add_lora(&mut self, cfg: &LoraConfig) -> Result<()> {
        let on = cfg.validate()?;
        let mut new_modules: Vec<[Option<LoraModule>; 7]> = Vec::with_capacity(self.layers.len());
        for l in 0..self.layers.len() {
            let mut mods: [Option<LoraModule>; 7] = Default::default();
            for (slot, enabled) in on.iter().enumerate() {
                if !enabled {
                    continue;
                }
                let (d_in, d_out) = self.proj_dims(slot);
                mods[slot] = Some(LoraModule::new(
                    format!("layers.{l}.{}", LORA_TARGETS[slot]),
                    (l * 7 + slot) as u64,
                    cfg.rank,
                    d_in,
                    d_out,
                    cfg.seed,
                    self.dtype,
                    &self.device,
                )?);
            }
            new_modules.push(mods);
        }
        for (layer, mods) in self.layers.iter_mut().zip(new_modules) {
            layer.lora = mods;
        }
        self.lora_cfg = Some(cfg.clone());
        Ok(())
    }

    fn lora_modules(&self) -> impl Iterator<Item = &LoraModule> {
        self.layers.iter().flat_map(|l| l.lora.iter().flatten())
    }

    /// The trainable LoRA variables in the fixed order: layers `0..L`;
    /// within a layer the targets in the order q,k,v,o,gate,up,down (those
    /// enabled); within a module A (`[r, d_in]`) then B (`[d_out, r]`).
    /// Names: `"layers.{i}.{target}.lora_a"` / `".lora_b"`. Empty without LoRA.
    pub fn lora_params(&self) -> Vec<(String, Var)> {
        let mut v = Vec::new();
        for m in self.lora_modules() {
            v.push((format!("{}.lora_a", m.name), m.a.clone()));
            v.push((format!("{}.lora_b", m.name), m.b.clone()));
        }
        v
    }

    /// Total number of LoRA parameters `P`.
    pub fn lora_num_params(&self) -> usize {
        self.lora_modules()
            .map(|m| m.a.elem_count() + m.b.elem_count())
            .sum()
    }

    /// Writes the LoRA parameters (f32) and config (metadata key
    /// [`LORA_META_KEY`]) to a safetensors file atomically (temp file in the
    /// same folder, then rename).
    pub fn save_lora(&self, path: &Path) -> Result<()> {
        let cfg = self.lora_cfg.as_ref().ok_or_else(|| {
            anyhow!(
                "save_lora {}: the model has no LoRA adapters",
                path.display()
            )
        })?;
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (name, var) in self.lora_params() {
            let t = var
                .as_detached_tensor()
                .to_dtype(DType::F32)?
                .contiguous()?;
            tensors.push((name, t));
        }
        let mut meta = HashMap::new();
        meta.insert(LORA_META_KEY.to_string(), serde_json::to_string(cfg)?);
        let bytes =
            safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
                .with_context(|| format!("save_lora {}: serialising", path.display()))?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let file_name = path
            .file_name()
            .ok_or_else(|| anyhow!("save_lora {}: not a file path", path.display()))?
            .to_string_lossy()
            .to_string();
        let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("save_lora: creating {}", tmp.display()))?;
            f.write_all(&bytes)
                .with_context(|| format!("save_lora: writing {}", tmp.display()))?;
            f.sync_all()
                .with_context(|| format!("save_lora: syncing {}", tmp.display()))?;
        }
        std::fs::rename(&tmp, path).with_context(|| {
            let _ = std::fs::remove_file(&tmp);
            format!(
                "save_lora: renaming {} to {}",
                tmp.display(),
                path.display()
            )
        })?;
        Ok(())
    }

    /// Loads LoRA parameters written by [`Model::save_lora`]. Without LoRA
    /// on the model, adapters are first created from the config stored in
    /// the file. The file must hold exactly the names of
    /// [`Model::lora_params`] with matching shapes; otherwise a clear error
    /// is returned and the model is left unchanged.
    pub fn load_lora(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("load_lora: reading {}", path.display()))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
            anyhow!(
                "load_lora {}: invalid safetensors header: {e}",
                path.display()
            )
        })?;
        let file_cfg: Option<LoraConfig> =
            match meta.metadata().as_ref().and_then(|m| m.get(LORA_META_KEY)) {
                Some(s) => Some(serde_json::from_str(s).with_context(|| {
                    format!(
                        "load_lora {}: invalid {LORA_META_KEY} metadata",
                        path.display()
                    )
                })?),
                None => None,
            };
        let loaded = candle_core::safetensors::load_buffer(&bytes, &self.device)
            .with_context(|| format!("load_lora {}: reading tensors", path.display()))?;
        if self.lora_cfg.is_none() {
            let cfg = file_cfg.clone().ok_or_else(|| {
                anyhow!(
                    "load_lora {}: the model has no LoRA and the file has no {LORA_META_KEY} metadata; call add_lora first",
                    path.display()
                )
            })?;
            // Validate against a scratch copy of the module layout first.
            self.check_lora_tensors(&loaded, Some(&cfg), path)?;
            self.add_lora(&cfg)?;
        } else {
            self.check_lora_tensors(&loaded, None, path)?;
        }
        for (name, var) in self.lora_params() {
            let t = loaded
                .get(&name)
                .ok_or_else(|| anyhow!("load_lora {}: missing tensor {name}", path.display()))?;
            var.set(&t.to_dtype(self.dtype)?)?;
        }
        if let (Some(cur), Some(f)) = (self.lora_cfg.as_mut(), file_cfg) {
            // Names and shapes matched, so rank and targets agree; take the
            // saved alpha (scale), dropout and seed.
            *cur = f;
        }
        Ok(())
    }

    /// Checks names and shapes of loaded LoRA tensors against the model's
    /// current adapters, or against those `cfg` would create.
    fn check_lora_tensors(
        &self,
        loaded: &HashMap<String, Tensor>,
        cfg: Option<&LoraConfig>,
        path: &Path,
    ) -> Result<()> {
        let mut expected: Vec<(String, Vec<usize>)> = Vec::new();
        match cfg {
            Some(cfg) => {
                let on = cfg
                    .validate()
                    .with_context(|| format!("load_lora {}: stored config", path.display()))?;
                for l in 0..self.layers.len() {
                    for (slot, enabled) in on.iter().enumerate() {
                        if *enabled {
                            let (d_in, d_out) = self.proj_dims(slot);
                            let n = format!("layers.{l}.{}", LORA_TARGETS[slot]);
                            expected.push((format!("{n}.lora_a"), vec![cfg.rank, d_in]));
                            expected.push((format!("{n}.lora_b"), vec![d_out, cfg.rank]));
                        }
                    }
                }
            }
            None => {
                for (name, var) in self.lora_params() {
                    expected.push((name, var.dims().to_vec()));
                }
            }
        }
        for (name, shape) in &expected {
            match loaded.get(name) {
                None => bail!("load_lora {}: missing tensor {name}", path.display()),
                Some(t) if t.dims() != shape.as_slice() => bail!(
                    "load_lora {}: tensor {name} has shape {:?}, the model expects {shape:?}",
                    path.display(),
                    t.dims()
                ),
                Some(_) => {}
            }
        }
        if loaded.len() != expected.len() {
            let mut extra: Vec<&String> = loaded
                .keys()
                .filter(|k| !expected.iter().any(|(n, _)| n == *k))
                .collect();
            extra.sort();
            bail!(
                "load_lora {}: unexpected tensors not in the model's LoRA layout: {extra:?}",
                path.display()
            );
        }
        Ok(())
    }

    fn check_batch(&self, batch: &Batch) -> Result<(usize, usize)> {
        let (b, t) = batch
            .input_ids
            .dims2()
            .context("batch: input_ids must be [B, T]")?;
        if batch.input_ids.dtype() != DType::U32 {
            bail!(
                "batch: input_ids must be u32, got {:?}",
                batch.input_ids.dtype()
            );
        }
        if batch.label_mask.dims() != [b, t] {
            bail!(
                "batch: label_mask has shape {:?}, expected [{b}, {t}]",
                batch.label_mask.dims()
            );
        }
        if batch.lengths.len() != b {
            bail!("batch: {} lengths for {b} rows", batch.lengths.len());
        }
        if let Some((i, &len)) = batch
            .lengths
            .iter()
            .enumerate()
            .find(|(_, &l)| l == 0 || l > t)
        {
            bail!("batch: example {i} has length {len}, must be in 1..={t}");
        }
        Ok((b, t))
    }

    /// One projection with optional bias and LoRA branch.
    #[allow(clippy::too_many_arguments)]
    fn proj(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        lora: Option<&LoraModule>,
        fwd: Fwd,
        captures: &mut Vec<Capture>,
        real: &Tensor,
    ) -> Result<Tensor> {
        let mut y = linear(x, w, self.precision)?;
        if let Some(b) = bias {
            y = y.broadcast_add(b)?;
        }
        let (Some(m), Some(cfg)) = (lora, self.lora_cfg.as_ref()) else {
            return Ok(y);
        };
        let xd = match fwd.mode {
            Mode::Train { dropout_seed } if cfg.dropout > 0.0 => {
                let mask = dropout_mask(
                    dropout_seed,
                    m.module_id,
                    cfg.dropout,
                    x.dims3()?,
                    self.dtype,
                    &self.device,
                )?;
                (x * mask)?
            }
            _ => x.clone(),
        };
        let (a, b) = if fwd.detach_lora || fwd.capture {
            (m.a.as_detached_tensor(), m.b.as_detached_tensor())
        } else {
            (m.a.as_tensor().clone(), m.b.as_tensor().clone())
        };
        let h = linear(&xd, &a, self.precision)?;
        let mut u = linear(&h, &b, self.precision)?;
        if fwd.capture {
            let probe = Var::zeros(u.shape(), self.dtype, &self.device)?;
            u = (u + probe.as_tensor())?;
            captures.push(Capture {
                name: m.name.clone(),
                x: xd.detach().broadcast_mul(real)?,
                h: h.detach().broadcast_mul(real)?,
                probe,
            });
        }
        Ok((y + (u * cfg.scale())?)?)
    }

    /// Final-norm hidden states `[B, T, H]`.
    fn hidden(&self, batch: &Batch, fwd: Fwd, captures: &mut Vec<Capture>) -> Result<Tensor> {
        let (b, t) = self.check_batch(batch)?;
        let c = &self.cfg;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let n_rep = nh / nkv;
        let real = Tensor::from_vec(batch.real_positions(), (b, t, 1), &self.device)?
            .to_dtype(self.dtype)?;
        let ids = batch.input_ids.flatten_all()?;
        let mut x = self
            .embed
            .index_select(&ids, 0)?
            .reshape((b, t, c.hidden_size))?;
        let (cos, sin) = rope_tables(t, hd, c.rope_theta, self.dtype, &self.device)?;
        let mask = attention_mask(&batch.lengths, t, self.dtype, &self.device)?;
        let att_scale = 1.0 / (hd as f64).sqrt();
        for layer in &self.layers {
            let lo = |s: usize| layer.lora[s].as_ref();
            let xn = rms_norm(&x, &layer.input_norm, c.rms_norm_eps)?;
            let q = self.proj(
                &xn,
                &layer.w[Q],
                layer.bias[0].as_ref(),
                lo(Q),
                fwd,
                captures,
                &real,
            )?;
            let k = self.proj(
                &xn,
                &layer.w[K],
                layer.bias[1].as_ref(),
                lo(K),
                fwd,
                captures,
                &real,
            )?;
            let v = self.proj(
                &xn,
                &layer.w[V],
                layer.bias[2].as_ref(),
                lo(V),
                fwd,
                captures,
                &real,
            )?;
            let q = q.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
            let k = k.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
            let q = (apply_rope(&q, &cos, &sin)? * att_scale)?;
            let k = apply_rope(&k, &cos, &sin)?;
            // GQA without repeating K/V: query head h = g·n_rep + r uses KV
            // head g, so group the query heads and stack them along time.
            let qg = q.reshape((b, nkv, n_rep * t, hd))?;
            let scores =
                crate::ops::matmul(&qg, &k.t()?, self.precision)?.reshape((b, nh, t, t))?;
            let probs = masked_softmax_last(&scores, &mask)?;
            let ctx =
                crate::ops::matmul(&probs.reshape((b, nkv, n_rep * t, t))?, &v, self.precision)?
                    .reshape((b, nh, t, hd))?
                    .transpose(1, 2)?
                    .reshape((b, t, nh * hd))?;
            let attn = self.proj(&ctx, &layer.w[O], None, lo(O), fwd, captures, &real)?;
            x = (x + attn)?;
            let xn = rms_norm(&x, &layer.post_norm, c.rms_norm_eps)?;
            let g = self.proj(&xn, &layer.w[GATE], None, lo(GATE), fwd, captures, &real)?;
            let u = self.proj(&xn, &layer.w[UP], None, lo(UP), fwd, captures, &real)?;
            let act = (g.silu()? * u)?;
            let down = self.proj(&act, &layer.w[DOWN], None, lo(DOWN), fwd, captures, &real)?;
            x = (x + down)?;
        }
        Ok(rms_norm(&x, &self.norm, c.rms_norm_eps)?)
    }

    /// Logits `[B, T, V]` (model dtype, f32 for loaded models) at every position.
    pub fn logits(&self, batch: &Batch, mode: Mode) -> Result<Tensor> {
        let fwd = Fwd {
            mode,
            capture: false,
            detach_lora: false,
        };
        let h = self.hidden(batch, fwd, &mut Vec::new())?;
        Ok(linear(&h, &self.lm_head, self.precision)?)
    }

    /// Per-token log-probabilities from final hidden states.
    fn logprobs_from_hidden(&self, batch: &Batch, h: &Tensor) -> Result<Tensor> {
        let (b, t) = self.check_batch(batch)?;
        if t == 1 {
            return Ok(Tensor::zeros((b, 1), self.dtype, &self.device)?);
        }
        let logits = linear(&h.narrow(1, 0, t - 1)?, &self.lm_head, self.precision)?; // [B, T-1, V]
        let targets = batch.input_ids.narrow(1, 1, t - 1)?;
        let lp = gather_log_softmax(&logits, &targets)?; // [B, T-1]
        let zero = Tensor::zeros((b, 1), self.dtype, &self.device)?;
        let lp = Tensor::cat(&[&zero, &lp], 1)?;
        let scored = Tensor::from_vec(batch.scored_positions(), (b, t), &self.device)?
            .to_dtype(self.dtype)?;
        Ok((lp * scored)?)
    }

    /// [`Model::token_logprobs`] from given final hidden states `[B, T, H]`:
    /// the LM head and the log-softmax alone (benchmarks, profiles).
    pub fn token_logprobs_from_hidden(&self, batch: &Batch, hidden: &Tensor) -> Result<Tensor> {
        self.logprobs_from_hidden(batch, hidden)
    }

    /// `[B, T]`: entry `t` is `log p(ids[t] | ids[<t])` for `1 ≤ t < len`;
    /// exactly 0 at `t = 0` and at padding. Computed as gathered logit minus
    /// logsumexp (no full-size log-softmax tensor).
    pub fn token_logprobs(&self, batch: &Batch, mode: Mode) -> Result<Tensor> {
        let fwd = Fwd {
            mode,
            capture: false,
            detach_lora: false,
        };
        let h = self.hidden(batch, fwd, &mut Vec::new())?;
        self.logprobs_from_hidden(batch, &h)
    }

    /// [`Model::logits`] in [`Mode::Eval`] without any autograd graph (LoRA
    /// weights detached): intermediates are freed as the pass proceeds, so
    /// use this for scoring sweeps (e.g. UDS) where no gradient is needed.
    pub fn logits_inference(&self, batch: &Batch) -> Result<Tensor> {
        let fwd = Fwd {
            mode: Mode::Eval,
            capture: false,
            detach_lora: true,
        };
        let h = self.hidden(batch, fwd, &mut Vec::new())?;
        Ok(linear(&h, &self.lm_head, self.precision)?)
    }

    /// [`Model::token_logprobs`] in [`Mode::Eval`] without any autograd graph
    /// (LoRA weights detached); same values. Use for log-prob sweeps.
    pub fn token_logprobs_inference(&self, batch: &Batch) -> Result<Tensor> {
        let fwd = Fwd {
            mode: Mode::Eval,
            capture: false,
            detach_lora: true,
        };
        let h = self.hidden(batch, fwd, &mut Vec::new())?;
        self.logprobs_from_hidden(batch, &h)
    }

    /// Per-example completion-only mean NLL from token log-probs.
    fn losses_from_logprobs(&self, batch: &Batch, lp: &Tensor) -> Result<Tensor> {
        let (b, t) = self.check_batch(batch)?;
        let scored = Tensor::from_vec(batch.scored_positions(), (b, t), &self.device)?
            .to_dtype(self.dtype)?;
        let mask = (batch.label_mask.to_dtype(self.dtype)? * scored)?;
        let num = (lp * &mask)?.sum(1)?;
        let den = mask.sum(1)?.clamp(1.0, f64::INFINITY)?;
        Ok((num / den)?.neg()?)
    }

    /// `[B]` completion-only mean NLL of each example:
    /// `−Σ_t mask[t]·logp[t] / Σ_t mask[t]` (positions 0 and padding never
    /// count; an example without labels gets loss 0). Summing these and
    /// calling `backward` gives each example its own gradient.
    pub fn example_losses(&self, batch: &Batch, mode: Mode) -> Result<Tensor> {
        let lp = self.token_logprobs(batch, mode)?;
        self.losses_from_logprobs(batch, &lp)
    }

    /// `[B, H]` final-norm hidden state at each example's last real token
    /// (no autograd graph).
    pub fn last_hidden(&self, batch: &Batch) -> Result<Tensor> {
        let (b, t) = self.check_batch(batch)?;
        let fwd = Fwd {
            mode: Mode::Eval,
            capture: false,
            detach_lora: true,
        };
        let h = self.hidden(batch, fwd, &mut Vec::new())?;
        let idx: Vec<u32> = batch
            .lengths
            .iter()
            .enumerate()
            .map(|(i, &len)| (i * t + len - 1) as u32)
            .collect();
        let idx = Tensor::from_vec(idx, b, &self.device)?;
        Ok(h.reshape((b * t, self.cfg.hidden_size))?
            .index_select(&idx, 0)?)
    }

    /// Per-example losses and, for every LoRA module (in [`Model::lora_params`]
    /// module order), the tensors needed for per-example gradients and ghost
    /// inner products, from one forward and one backward of
    /// `Σ_i loss_i`. See [`LoraCapture`] for the convention (dy is taken
    /// before the `alpha/rank` scale).
    pub fn lora_captures(&self, batch: &Batch, mode: Mode) -> Result<(Tensor, Vec<LoraCapture>)> {
        if self.lora_cfg.is_none() {
            bail!("lora_captures: the model has no LoRA adapters");
        }
        let (b, t) = self.check_batch(batch)?;
        let fwd = Fwd {
            mode,
            capture: true,
            detach_lora: false,
        };
        let mut caps = Vec::new();
        let h = self.hidden(batch, fwd, &mut caps)?;
        let lp = self.logprobs_from_hidden(batch, &h)?;
        let losses = self.losses_from_logprobs(batch, &lp)?;
        let grads = losses.sum_all()?.backward()?;
        let real = Tensor::from_vec(batch.real_positions(), (b, t, 1), &self.device)?
            .to_dtype(self.dtype)?;
        let mut out = Vec::with_capacity(caps.len());
        for c in caps {
            let dy = match grads.get(c.probe.as_tensor()) {
                Some(g) => g.broadcast_mul(&real)?,
                None => c.probe.as_detached_tensor(), // zeros: branch does not reach the loss
            };
            out.push(LoraCapture {
                name: c.name,
                x: c.x,
                h: c.h,
                dy,
            });
        }
        Ok((losses.detach(), out))
    }

    /// Per-example LoRA gradients of each example's own mean loss, from ONE
    /// batched forward + backward in [`Mode::Eval`]:
    /// `grad_B(i) = dy_iᵀ h_i`, `grad_A(i) = (dy_i B)ᵀ x_i` (batched matmuls;
    /// padding rows contribute zero).
    pub fn per_example_lora_grads(&self, batch: &Batch) -> Result<PerExampleGrads> {
        let (losses, caps) = self.lora_captures(batch, Mode::Eval)?;
        let b = batch.batch_size();
        let modules: Vec<&LoraModule> = self.lora_modules().collect();
        if modules.len() != caps.len() {
            bail!(
                "per_example_lora_grads: internal error, {} captures for {} modules",
                caps.len(),
                modules.len()
            );
        }
        let mut parts = Vec::with_capacity(2 * caps.len());
        for (c, m) in caps.iter().zip(modules) {
            let bmat = m.b.as_detached_tensor(); // [d_out, r]
            let p = self.precision;
            // Transposed views go to the GEMM without copies.
            let g_b = crate::ops::matmul(&c.dy.transpose(1, 2)?, &c.h, p)?; // [B, d_out, r]
            let dyb = linear(&c.dy, &bmat.t()?, p)?; // [B, T, r]
            let g_a = crate::ops::matmul(&dyb.transpose(1, 2)?, &c.x, p)?; // [B, r, d_in]
            parts.push(g_a.reshape((b, ()))?);
            parts.push(g_b.reshape((b, ()))?);
        }
        let grads = Tensor::cat(&parts, 1)?;
        Ok(PerExampleGrads { losses, grads })
    }

    /// Greedy decoding without a KV cache (recomputes the prefix each step):
    /// appends up to `max_new_tokens` argmax tokens to `prompt_ids`, stopping
    /// after emitting any token in `stop`. Returns only the new tokens
    /// (including the stop token when one was produced).
    pub fn generate_greedy(
        &self,
        prompt_ids: &[u32],
        max_new_tokens: usize,
        stop: &[u32],
    ) -> Result<Vec<u32>> {
        if prompt_ids.is_empty() {
            bail!("generate_greedy: empty prompt");
        }
        let mut ids = prompt_ids.to_vec();
        let mut out = Vec::new();
        let fwd = Fwd {
            mode: Mode::Eval,
            capture: false,
            detach_lora: true,
        };
        for _ in 0..max_new_tokens {
            let mask = vec![0u8; ids.len()];
            let batch = Batch::new(&[(&ids, &mask)], &self.device)?;
            let h = self.hidden(&batch, fwd, &mut Vec::new())?;
            let last = h.narrow(1, ids.len() - 1, 1)?;
            let logits = linear(&last, &self.lm_head, self.precision)?.flatten_all()?;
            let next = logits.argmax(D::Minus1)?.to_scalar::<u32>()?;
            ids.push(next);
            out.push(next);
            if stop.contains(&next) {
                break;
            }
        }
        Ok(out)
    }
}
