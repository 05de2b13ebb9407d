//! The hookable decoder shared by GPT-2 and LLaMA.
//!
//! One decoder loop; the two architectures differ only in the pieces `gpt2.rs` and `llama.rs`
//! provide (embeddings, norms, the QKV projection, the MLP activation). Weights are held by role
//! ([`WeightId`]) in `[out, in]` orientation, so an editor can read, replace or optimise any of them
//! without knowing the checkpoint's names or layout.

pub mod blas;
pub mod chat;
mod export;
mod fused_attention;
mod fused_grad;
mod generate;
mod gpt2;
mod hooks;
pub mod kernels;
mod llama;
pub mod load;
pub mod ops;
mod overlay;
pub mod packed;
mod parallel;
mod spec;
pub mod subject;
mod template;
mod weights;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, TensorId};
use tokenizers::Tokenizer;

pub use export::{export_gguf, export_hf, refuse_existing, Exported, GgufBlocks};
use generate::Past;
pub use generate::{Generation, KvCache, PrefixCache, Sampling, StepTopK};
pub use hooks::{HookSpec, Intervention, Site};
pub use overlay::{LowRankAdapter, Overlay, OverlayInput, OverlayParts, WeightForm};
use packed::PackedRows;
pub use spec::{Activation, Arch, ModelSpec};
pub use template::{module_template, ModuleTemplate};
pub use weights::{Module, Param, WeightId};

use crate::error::{Error, Result};
pub use ops::LowRankChange;
use ops::{causal_mask, linear, ragged_causal_mask, RopeTables};

/// A token's `[start, end)` byte range in the text it came from.
pub type ByteSpan = (usize, usize);

/// A batch of token sequences, right-padded to a common length.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// `[b, s]` u32 token ids; positions past a row's length hold padding.
    pub ids: Tensor,
    /// The real length of every row.
    pub lengths: Vec<usize>,
}

impl TokenBatch {
    /// Right-pads `sequences` with `pad_id`. Right padding keeps every real token at the position it
    /// would have alone, and the causal mask already hides the pads from it, so batching changes no
    /// sequence's numbers.
    pub fn new(sequences: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Self> {
        let width = sequences.iter().map(Vec::len).max().unwrap_or(0);
        if width == 0 {
            return Err(Error::Invalid(
                "cannot run an empty batch or an empty sequence".into(),
            ));
        }
        if let Some(i) = sequences.iter().position(Vec::is_empty) {
            return Err(Error::Invalid(format!(
                "sequence {i} of the batch is empty"
            )));
        }
        let mut flat = Vec::with_capacity(sequences.len() * width);
        for seq in sequences {
            flat.extend_from_slice(seq);
            flat.resize(flat.len() + width - seq.len(), pad_id);
        }
        Ok(Self {
            ids: Tensor::from_vec(flat, (sequences.len(), width), device)?,
            lengths: sequences.iter().map(Vec::len).collect(),
        })
    }

    /// Like [`TokenBatch::new`], but rows may be empty (prefixes for [`Model::prefix_cache`] where a
    /// continuation has nothing before it); at least one must not be.
    pub fn allowing_empty_rows(
        sequences: &[Vec<u32>],
        pad_id: u32,
        device: &Device,
    ) -> Result<Self> {
        let padded: Vec<Vec<u32>> = sequences
            .iter()
            .map(|s| {
                if s.is_empty() {
                    vec![pad_id]
                } else {
                    s.clone()
                }
            })
            .collect();
        let mut batch = Self::new(&padded, pad_id, device)?;
        if sequences.iter().all(Vec::is_empty) {
            return Err(Error::Invalid(
                "cannot run a batch whose rows are all empty".into(),
            ));
        }
        batch.lengths = sequences.iter().map(Vec::len).collect();
        Ok(batch)
    }

    pub fn width(&self) -> usize {
        self.lengths.iter().copied().max().unwrap_or(0)
    }
}

/// What a forward pass returns.
#[derive(Debug)]
pub struct ForwardOut {
    /// `[b, s, vocab]` logits at every position (pads included; ignore them), or `[n, vocab]` at the
    /// positions asked of [`Model::forward_at`].
    pub logits: Tensor,
    pub captures: BTreeMap<Site, Tensor>,
}

impl ForwardOut {
    /// A captured activation, or an error if the spec did not ask for it.
    pub fn capture(&self, site: Site) -> Result<&Tensor> {
        self.captures
            .get(&site)
            .ok_or_else(|| Error::MissingCapture(site.to_string()))
    }
}

/// One layer's view of [`Past`].
enum LayerPast<'a> {
    None,
    Growing(&'a mut Option<(Tensor, Tensor)>),
    Prefix(&'a (Tensor, Tensor)),
}

/// Where a model came from, for `inspect` and for cache keys.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelOrigin {
    /// `hf-folder`, `gguf` or `hub`.
    pub kind: &'static str,
    /// The path or Hub id the user gave.
    pub source: String,
    /// The files the weights were read from.
    pub files: Vec<std::path::PathBuf>,
    /// The `tokenizer.json` given instead of the source's own (`--tokenizer`).
    pub tokenizer_file: Option<std::path::PathBuf>,
}

pub struct Model {
    spec: ModelSpec,
    weights: BTreeMap<WeightId, Tensor>,
    /// Quantised rows of weights read from a GGUF file, each with the tensor it was made beside:
    /// used only while that tensor is still the weight (see [`packed`]).
    packed: BTreeMap<WeightId, (TensorId, Arc<PackedRows>)>,
    /// Weights kept only as their quantised rows ([`Model::release_dense_below`]): not in
    /// `weights`, made f32 when asked for.
    dormant: BTreeSet<WeightId>,
    overlays: BTreeMap<Site, Arc<dyn Overlay>>,
    /// Changes added to a weight's product without forming `W + ΔW` (see [`LowRankChange`]).
    low_rank: BTreeMap<WeightId, LowRankChange>,
    tokenizer: Tokenizer,
    chat_template: Option<String>,
    device: Device,
    dtype: DType,
    origin: ModelOrigin,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("spec", &self.spec)
            .field("dtype", &self.dtype)
            .field("device", &self.device)
            .field("origin", &self.origin)
            .field("overlays", &self.overlays.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Builds a model from weights already keyed by role and in `[out, in]` orientation.
    /// Every weight the architecture needs must be present with the right shape.
    pub fn new(
        spec: ModelSpec,
        weights: BTreeMap<WeightId, Tensor>,
        tokenizer: Tokenizer,
        origin: ModelOrigin,
    ) -> Result<Self> {
        let (device, dtype) = match weights.values().next() {
            Some(w) => (w.device().clone(), w.dtype()),
            None => return Err(Error::Invalid("the model has no weights".into())),
        };
        for (id, shape) in required_weights(&spec) {
            match weights.get(&id) {
                None => return Err(Error::UnknownWeight(id.to_string())),
                Some(w) if w.dims() != shape.as_slice() => {
                    return Err(Error::Invalid(format!(
                        "weight {id} has shape {:?}, the config implies {shape:?}",
                        w.dims()
                    )))
                }
                Some(_) => {}
            }
        }
        Ok(Self {
            spec,
            weights,
            packed: BTreeMap::new(),
            dormant: BTreeSet::new(),
            overlays: BTreeMap::new(),
            low_rank: BTreeMap::new(),
            tokenizer,
            chat_template: None,
            device,
            dtype,
            origin,
        })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn origin(&self) -> &ModelOrigin {
        &self.origin
    }

    /// A digest of the model's architecture and a strided sample of every weight: the same unedited
    /// model always gives the same fingerprint, an edited one does not.
    pub fn fingerprint(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let spec = self.spec();
        let mut hash = Sha256::new();
        hash.update(format!(
            "{:?} {} {} {} {}",
            spec.arch, spec.n_layers, spec.d_model, spec.d_mlp, spec.vocab_size
        ));
        for id in self.weight_ids() {
            let w = self.weight(id)?;
            hash.update(id.to_string().as_bytes());
            let n = w.elem_count();
            let stride = (n / 4096).max(1);
            let logical = (0..n).step_by(stride);
            // A weight held as the transposed view of its stored matrix is read where it lies
            // (flattening the view would copy it whole), at the same elements.
            let (flat, idx): (Tensor, Vec<u32>) = match *w.dims() {
                [rows, cols] if !w.is_contiguous() && w.t()?.is_contiguous() => (
                    w.t()?.flatten_all()?,
                    logical
                        .map(|i| ((i % cols) * rows + i / cols) as u32)
                        .collect(),
                ),
                _ => (w.flatten_all()?, logical.map(|i| i as u32).collect()),
            };
            let picked = flat
                .index_select(&Tensor::new(idx.as_slice(), w.device())?, 0)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            for v in picked {
                hash.update(v.to_le_bytes());
            }
        }
        Ok(hash
            .finalize()
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect())
    }

    /// The ids of every weight the model holds, in a stable order.
    pub fn weight_ids(&self) -> impl Iterator<Item = WeightId> + '_ {
        let ids: BTreeSet<WeightId> = self.weights.keys().chain(&self.dormant).copied().collect();
        ids.into_iter()
    }

    /// A weight, always `[out, in]`. The tied LM head resolves to the embedding. A weight kept
    /// only as quantised rows is made f32 for the caller (the values it had).
    pub fn weight(&self, id: WeightId) -> Result<Tensor> {
        let id = self.resolve(id);
        if let Some(w) = self.weights.get(&id) {
            return Ok(w.clone());
        }
        match self.packed.get(&id) {
            Some((_, rows)) if self.dormant.contains(&id) => Ok(rows.dequantize()?),
            _ => Err(Error::UnknownWeight(id.to_string())),
        }
    }

    /// Drops the f32 tensors of the layer matrices below `layer` that have quantised rows, which
    /// hold the same values: a hypernetwork's training only runs those layers forward, on short
    /// batches the quantised rows serve directly, and they are made f32 again only when asked
    /// for or for a long product (one at a time). Returns how many weights, and the bytes freed.
    pub fn release_dense_below(&mut self, layer: usize) -> (usize, usize) {
        if self.dtype != DType::F32 || !self.device.is_cpu() {
            return (0, 0);
        }
        let ids: Vec<WeightId> = self
            .packed
            .keys()
            .copied()
            .filter(|id| id.layer.is_some_and(|l| l < layer) && self.packed(*id).is_some())
            .collect();
        let mut bytes = 0;
        for id in &ids {
            if let Some(w) = self.weights.remove(id) {
                bytes += w.elem_count() * w.dtype().size_in_bytes();
                self.dormant.insert(*id);
            }
        }
        // The loader's frees raise glibc's mmap threshold, so weights of this size sit in its
        // heap, and freeing them would not lower the process's memory without giving the pages
        // back (KE's training peak on SmolLM2: 1.69 GB without, 1.54 GB with).
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only returns free heap pages to the system.
        unsafe {
            libc::malloc_trim(0);
        }
        (ids.len(), bytes)
    }

    /// Makes every weight f32 again (before the quantised rows go).
    fn wake_dormant(&mut self) -> Result<()> {
        for id in std::mem::take(&mut self.dormant) {
            let w = match self.packed.get(&id) {
                Some((_, rows)) => rows.dequantize()?,
                None => return Err(Error::UnknownWeight(id.to_string())),
            };
            self.packed
                .entry(id)
                .and_modify(|(source, _)| *source = w.id());
            self.weights.insert(id, w);
        }
        Ok(())
    }

    /// Puts `w` in place of weight `id` and returns the tensor it replaced (the undo record).
    /// `w` may be a `Var`'s tensor: gradients then flow to it through every later forward.
    pub fn replace_weight(&mut self, id: WeightId, w: Tensor) -> Result<Tensor> {
        let id = self.resolve(id);
        if self.dormant.contains(&id) {
            let old = self.weight(id)?;
            self.dormant.remove(&id);
            self.weights.insert(id, old);
        }
        let old = self
            .weights
            .get(&id)
            .ok_or_else(|| Error::UnknownWeight(id.to_string()))?;
        if old.dims() != w.dims() {
            return Err(Error::Invalid(format!(
                "replacement for {id} has shape {:?}, expected {:?}",
                w.dims(),
                old.dims()
            )));
        }
        if old.dtype() != w.dtype() || !old.device().same_device(w.device()) {
            return Err(Error::Invalid(format!(
                "replacement for {id} is {:?} on {:?}, the model holds {:?} on {:?}",
                w.dtype(),
                w.device(),
                old.dtype(),
                old.device()
            )));
        }
        // A weight held as the view of its stored `[in, out]` matrix (GPT-2's Conv1D) keeps that
        // layout when replaced: the products then run the same kernel, bit for bit, whether the
        // weight was edited here or loaded edited (`kedit export`). Not for a variable, whose
        // updates a copy would not see.
        let w = match *w.dims() {
            [_, _]
                if !old.is_contiguous()
                    && old.t()?.is_contiguous()
                    && w.is_contiguous()
                    && !w.track_op() =>
            {
                w.t()?.contiguous()?.t()?
            }
            _ => w,
        };
        self.weights
            .insert(id, w)
            .ok_or_else(|| Error::UnknownWeight(id.to_string()))
    }

    /// The overlay installed at `site`, if any.
    pub fn overlay(&self, site: Site) -> Option<&Arc<dyn Overlay>> {
        self.overlays.get(&site)
    }

    /// The overlay at `site` as its concrete type, for the editor that owns it: it reads its
    /// current state there and installs the grown or moved successor with [`Model::set_overlay`],
    /// so that every change of an overlay is a before/after pair that undoes exactly.
    pub fn overlay_as<T: Overlay + 'static>(&self, site: Site) -> Option<&T> {
        self.overlays.get(&site)?.as_any().downcast_ref::<T>()
    }

    /// Every installed overlay, by site.
    pub fn overlays(&self) -> impl Iterator<Item = (Site, &Arc<dyn Overlay>)> {
        self.overlays.iter().map(|(site, o)| (*site, o))
    }

    /// The changes [`Model::set_low_rank_change`] keeps beside their weights.
    pub fn low_rank_changes(&self) -> impl Iterator<Item = (WeightId, &LowRankChange)> {
        self.low_rank.iter().map(|(id, c)| (*id, c))
    }

    /// Installs an overlay at `site` (or removes it with `None`) and returns the one it displaced,
    /// which is the undo record.
    ///
    /// # Errors
    /// A site that takes no overlay, or a layer out of range.
    pub fn set_overlay(
        &mut self,
        site: Site,
        overlay: Option<Arc<dyn Overlay>>,
    ) -> Result<Option<Arc<dyn Overlay>>> {
        match site {
            Site::AttnOut(l) | Site::MlpAct(l) | Site::MlpOut(l) | Site::ResidPost(l) => {
                self.check_layer(l)?
            }
            other => {
                return Err(Error::Unsupported {
                    what: format!("an overlay at {other}"),
                    why: "overlays sit at attn_out, mlp_act, mlp_out or resid_post".into(),
                })
            }
        }
        Ok(match overlay {
            Some(o) => self.overlays.insert(site, o),
            None => self.overlays.remove(&site),
        })
    }

    /// The Hugging Face checkpoint name of a weight (`transformer.h.5.mlp.c_proj.weight`,
    /// `model.layers.5.mlp.down_proj.weight`), for EasyEdit's string templates and for saved edits.
    pub fn checkpoint_name(&self, id: WeightId) -> Option<String> {
        hf_checkpoint_name(self.spec.arch, id)
    }

    /// The weight with a given Hugging Face checkpoint name.
    pub fn weight_id_by_name(&self, name: &str) -> Option<WeightId> {
        self.weight_ids()
            .find(|id| self.checkpoint_name(*id).as_deref() == Some(name))
    }

    pub(crate) fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.spec.n_layers {
            return Err(Error::Invalid(format!(
                "layer {layer} is out of range: the model has layers 0..{}",
                self.spec.n_layers
            )));
        }
        Ok(())
    }

    fn resolve(&self, id: WeightId) -> WeightId {
        if id.module == Module::LmHead && self.spec.tied_embeddings {
            WeightId::global(Module::Embed)
        } else {
            id
        }
    }

    fn w(&self, id: WeightId) -> candle_core::Result<&Tensor> {
        self.weights
            .get(&self.resolve(id))
            .ok_or_else(|| candle_core::Error::Msg(format!("model has no weight {id}")))
    }

    fn bias(&self, id: WeightId) -> Option<&Tensor> {
        self.weights.get(&id.bias())
    }

    /// Weight `id`'s quantised rows, while the weight is still the tensor they were made beside
    /// (an edit or an optimiser that puts another tensor in its place leaves them unused).
    fn packed(&self, id: WeightId) -> Option<&Arc<PackedRows>> {
        let id = self.resolve(id);
        let (source, rows) = self.packed.get(&id)?;
        (self.dormant.contains(&id) || self.weights.get(&id)?.id() == *source).then_some(rows)
    }

    fn proj(&self, xs: &Tensor, id: WeightId) -> candle_core::Result<Tensor> {
        let ys = match self.packed(id) {
            Some(rows) if self.dormant.contains(&id) => {
                match ops::linear_from_packed(xs, rows, self.bias(id))? {
                    Some(ys) => ys,
                    None => {
                        let w = rows.dequantize()?;
                        linear(xs, &w, Some(rows), self.bias(id))?
                    }
                }
            }
            _ => linear(xs, self.w(id)?, self.packed(id), self.bias(id))?,
        };
        match self.low_rank.get(&self.resolve(id)) {
            Some(change) => ys + change.product(xs)?,
            None => Ok(ys),
        }
    }

    /// Makes every product with weight `id` that of `W + change` until it is taken back (`None`),
    /// without forming that matrix; returns the change it replaces. A hypernetwork's training
    /// graph differentiates through its edits this way: a weight-sized sum and its gradient per
    /// edited weight and micro-batch cost more than the rank-`r` products. [`Model::weight`] still
    /// returns `W`.
    ///
    /// # Errors
    /// An unknown weight, or factors whose shapes do not make one of its shape.
    pub fn set_low_rank_change(
        &mut self,
        id: WeightId,
        change: Option<LowRankChange>,
    ) -> Result<Option<LowRankChange>> {
        let id = self.resolve(id);
        let (out, inp) = self.weight(id)?.dims2()?;
        let Some(change) = change else {
            return Ok(self.low_rank.remove(&id));
        };
        let (rows, rank) = change.left.dims2()?;
        let (rank2, cols) = change.right.dims2()?;
        if (rows, cols) != (out, inp) || rank != rank2 {
            return Err(Error::Invalid(format!(
                "a change of {id} ({out}x{inp}) from factors {rows}x{rank} and {rank2}x{cols}"
            )));
        }
        Ok(self.low_rank.insert(id, change))
    }

    /// Keeps `rows` beside weight `id` for the short products of editing and training: they must
    /// hold the weight's exact values (a GGUF tensor's blocks beside its dequantised tensor).
    ///
    /// # Errors
    /// If the model has no such weight, or the shapes differ.
    pub(crate) fn attach_packed(&mut self, id: WeightId, rows: PackedRows) -> Result<()> {
        let weight = self
            .weights
            .get(&id)
            .ok_or_else(|| Error::UnknownWeight(id.to_string()))?;
        if weight.dims() != [rows.rows(), rows.cols()] {
            return Err(Error::Invalid(format!(
                "quantised rows of {id} are {}x{}, the weight {:?}",
                rows.rows(),
                rows.cols(),
                weight.dims()
            )));
        }
        self.packed.insert(id, (weight.id(), Arc::new(rows)));
        Ok(())
    }

    /// How many weights have quantised rows kept beside them, and their bytes.
    pub fn packed_weights(&self) -> (usize, usize) {
        let bytes = self.packed.values().map(|(_, r)| r.size_in_bytes()).sum();
        (self.packed.len(), bytes)
    }

    /// Drops the quantised rows: every product then reads the f32 weights.
    pub fn discard_packed_weights(&mut self) -> Result<()> {
        self.wake_dormant()?;
        self.packed.clear();
        Ok(())
    }

    /// Full-position logits for a padded batch, with hooks.
    ///
    /// # Shapes
    /// `batch.ids: [b, s]` → `logits: [b, s, vocab]`
    ///
    /// # Errors
    /// A hook at a layer that does not exist, a sequence longer than the model's context, or a
    /// shape error from an intervention.
    pub fn forward(&self, batch: &TokenBatch, hooks: &HookSpec) -> Result<ForwardOut> {
        self.run(&batch.ids, &batch.lengths, hooks, Past::None, None)
    }

    /// Like [`Model::forward`], but computes logits only at the given `(row, position)` pairs, which
    /// saves the LM head's work (and its gradient) at every other position.
    ///
    /// # Shapes
    /// `batch.ids: [b, s]` → `logits: [positions.len(), vocab]`, in the order given
    pub fn forward_at(
        &self,
        batch: &TokenBatch,
        hooks: &HookSpec,
        positions: &[(usize, usize)],
    ) -> Result<ForwardOut> {
        self.run(
            &batch.ids,
            &batch.lengths,
            hooks,
            Past::None,
            Some(positions),
        )
    }

    /// Runs `prefixes` once and keeps every layer's keys and values for [`Model::forward_continuing`].
    /// Rows may be empty (a continuation with nothing before it).
    ///
    /// # Shapes
    /// `prefixes.ids: [b, s]` → a cache of `b` rows, `s` columns
    pub fn prefix_cache(&self, prefixes: &TokenBatch) -> Result<PrefixCache> {
        let mut cache = KvCache::new(self.spec.n_layers);
        self.run(
            &prefixes.ids,
            &prefixes.lengths,
            &HookSpec::new(),
            Past::Growing(&mut cache),
            Some(&[]),
        )?;
        let layers = cache
            .into_layers()
            .into_iter()
            .map(|kv| kv.ok_or_else(|| Error::Invalid("a layer filled no cache".into())))
            .collect::<Result<_>>()?;
        Ok(PrefixCache {
            layers,
            lengths: prefixes.lengths.clone(),
        })
    }

    /// Like [`Model::forward_at`] (all positions when `positions` is `None`), for `batch` row `r`
    /// continuing row `r` of `prefixes`: its tokens sit at positions `prefixes.lengths()[r]..` and
    /// attend to that row's prefix. Hooks and positions index the new tokens only. The numbers are
    /// those of running each full row alone, without recomputing the prefix.
    ///
    /// # Shapes
    /// `batch.ids: [b, s]` with `b` the cache's rows
    pub fn forward_continuing(
        &self,
        prefixes: &PrefixCache,
        batch: &TokenBatch,
        hooks: &HookSpec,
        positions: Option<&[(usize, usize)]>,
    ) -> Result<ForwardOut> {
        self.run(
            &batch.ids,
            &batch.lengths,
            hooks,
            Past::Prefixes(prefixes),
            positions,
        )
    }

    /// The decoder loop. With a past, `ids` are the new tokens after the cached ones.
    pub(crate) fn run(
        &self,
        ids: &Tensor,
        lengths: &[usize],
        hooks: &HookSpec,
        mut past: Past<'_>,
        logit_positions: Option<&[(usize, usize)]>,
    ) -> Result<ForwardOut> {
        for site in hooks.sites() {
            if let Some(l) = site.layer() {
                self.check_layer(l)?;
            }
            if matches!(site, Site::MlpGateOut(_)) && self.spec.activation != Activation::Silu {
                return Err(Error::Invalid(format!(
                    "site {site}: this {:?} model's MLP has no gate projection",
                    self.spec.arch
                )));
            }
        }
        // A growing cache must see every layer of every new token; a read-only one need not.
        let growing = matches!(past, Past::Growing(_));
        if let Some(l) = hooks.stop_after_layer {
            self.check_layer(l)?;
            if growing {
                return Err(Error::Invalid(
                    "a forward pass that stops early cannot fill a KV cache".into(),
                ));
            }
        }
        let (b, s) = ids.dims2()?;
        // Per row: how many positions come before the new tokens.
        let offsets: Vec<usize> = match &past {
            Past::None => vec![0; b],
            Past::Growing(c) => vec![c.len(); b],
            Past::Prefixes(p) => {
                if p.lengths.len() != b {
                    return Err(Error::Invalid(format!(
                        "a batch of {b} rows cannot continue a prefix cache of {} rows",
                        p.lengths.len()
                    )));
                }
                p.lengths.clone()
            }
        };
        let longest = offsets.iter().copied().max().unwrap_or(0) + s;
        if longest > self.spec.max_positions {
            return Err(Error::Invalid(format!(
                "sequence of {longest} tokens is longer than the model's context of {} positions",
                self.spec.max_positions
            )));
        }
        let mut captures = BTreeMap::new();
        let (rope, mask) = match &past {
            Past::Prefixes(p) => (
                match self.spec.arch {
                    Arch::Llama => Some(RopeTables::per_row(
                        self.spec.head_dim,
                        self.spec.rope_theta,
                        &offsets,
                        s,
                        self.dtype,
                        &self.device,
                    )?),
                    Arch::Gpt2 => None,
                },
                ragged_causal_mask(s, p.width(), &offsets, self.dtype, &self.device)?,
            ),
            _ => (
                match self.spec.arch {
                    Arch::Llama => Some(RopeTables::new(
                        self.spec.head_dim,
                        self.spec.rope_theta,
                        offsets[0],
                        s,
                        self.dtype,
                        &self.device,
                    )?),
                    Arch::Gpt2 => None,
                },
                causal_mask(s, offsets[0], self.dtype, &self.device)?,
            ),
        };

        // Attention stacks the query heads of each key/value group (see `attention`): the mask
        // repeats once per head of a group.
        let mask = match self.spec.n_heads / self.spec.n_kv_heads {
            1 => mask,
            n_rep => Tensor::cat(&vec![&mask; n_rep], mask.rank() - 2)?,
        };
        let (mut xs, first_layer) = match &hooks.resume {
            Some((layer, resid)) => {
                self.check_layer(*layer)?;
                if growing || resid.dims() != [b, s, self.spec.d_model] {
                    return Err(Error::Invalid(format!(
                        "cannot resume from a residual of shape {:?} for a batch of {:?} (and never with a growing KV cache)",
                        resid.dims(),
                        ids.dims()
                    )));
                }
                let xs = hooks.visit(Site::ResidPost(*layer), resid.clone(), &mut captures)?;
                (xs, layer + 1)
            }
            None => {
                let xs = self.embed(ids, &offsets)?;
                (hooks.visit(Site::Embed, xs, &mut captures)?, 0)
            }
        };
        for l in first_layer..self.spec.n_layers {
            xs = hooks.visit(Site::ResidPre(l), xs, &mut captures)?;
            let resid_pre = xs.clone();
            let mut input = OverlayInput {
                resid_pre: &resid_pre,
                mlp_in: None,
                mlp_act: None,
                lengths,
            };
            let h = self.norm(&xs, WeightId::layer(l, Module::AttnNorm))?;
            let layer_past = match &mut past {
                Past::None => LayerPast::None,
                Past::Growing(c) => LayerPast::Growing(c.layer_mut(l)),
                Past::Prefixes(p) => LayerPast::Prefix(&p.layers[l]),
            };
            let attn = self.attention(l, &h, rope.as_ref(), &mask, layer_past)?;
            let attn = self.overlaid(Site::AttnOut(l), &input, attn)?;
            let attn = hooks.visit(Site::AttnOut(l), attn, &mut captures)?;
            xs = (xs + attn)?;

            let h = self.norm(&xs, WeightId::layer(l, Module::MlpNorm))?;
            let mlp_in = hooks.visit(Site::MlpIn(l), h, &mut captures)?;
            input.mlp_in = Some(&mlp_in);
            let act = self.mlp_act(l, &mlp_in, hooks, &mut captures)?;
            let act = self.overlaid(Site::MlpAct(l), &input, act)?;
            let act = hooks.visit(Site::MlpAct(l), act, &mut captures)?;
            input.mlp_act = Some(&act);
            let out = self.proj(&act, WeightId::layer(l, Module::MlpDown))?;
            let out = self.overlaid(Site::MlpOut(l), &input, out)?;
            let out = hooks.visit(Site::MlpOut(l), out, &mut captures)?;
            xs = (xs + out)?;
            xs = self.overlaid(Site::ResidPost(l), &input, xs)?;
            xs = hooks.visit(Site::ResidPost(l), xs, &mut captures)?;
            if hooks.stop_after_layer == Some(l) {
                let logits = Tensor::zeros((0, self.spec.vocab_size), self.dtype, &self.device)?;
                return Ok(ForwardOut { logits, captures });
            }
        }
        let xs = self.norm(&xs, WeightId::global(Module::FinalNorm))?;
        let xs = hooks.visit(Site::FinalNorm, xs, &mut captures)?;
        let head = self.w(WeightId::global(Module::LmHead))?;
        let head_rows = self.packed(WeightId::global(Module::LmHead));
        let logits = match logit_positions {
            None => linear(&xs, head, head_rows, None)?,
            Some([]) => Tensor::zeros((0, self.spec.vocab_size), self.dtype, &self.device)?,
            Some(positions) => {
                let (b, s, d) = xs.dims3()?;
                let mut rows = Vec::with_capacity(positions.len());
                for &(row, pos) in positions {
                    if row >= b || pos >= s {
                        return Err(Error::Invalid(format!(
                            "logit position ({row}, {pos}) is outside the batch [{b}, {s}]"
                        )));
                    }
                    rows.push((row * s + pos) as u32);
                }
                let rows = Tensor::from_vec(rows, positions.len(), &self.device)?;
                let picked = xs.reshape((b * s, d))?.index_select(&rows, 0)?;
                ops::matmul_t(&picked, head, head_rows)?
            }
        };
        if let Past::Growing(cache) = past {
            cache.advance(s);
        }
        Ok(ForwardOut { logits, captures })
    }

    fn overlaid(
        &self,
        site: Site,
        input: &OverlayInput<'_>,
        xs: Tensor,
    ) -> candle_core::Result<Tensor> {
        match self.overlays.get(&site) {
            Some(overlay) => overlay.forward(input, &xs),
            None => Ok(xs),
        }
    }

    /// Token (and, for GPT-2, position) embeddings of new tokens after `offsets[r]` earlier ones.
    fn embed(&self, ids: &Tensor, offsets: &[usize]) -> candle_core::Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let table = self.w(WeightId::global(Module::Embed))?;
        let xs = table
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, s, self.spec.d_model))?;
        match self.spec.arch {
            Arch::Gpt2 => {
                gpt2::add_positions(&xs, self.w(WeightId::global(Module::PosEmbed))?, offsets)
            }
            Arch::Llama => Ok(xs),
        }
    }

    fn norm(&self, xs: &Tensor, id: WeightId) -> candle_core::Result<Tensor> {
        let weight = self.w(id)?;
        match self.spec.arch {
            Arch::Gpt2 => {
                let bias = self.bias(id).ok_or_else(|| {
                    candle_core::Error::Msg(format!("model has no weight {}", id.bias()))
                })?;
                ops::layer_norm(xs, weight, bias, self.spec.norm_eps)
            }
            Arch::Llama => ops::rms_norm(xs, weight, self.spec.norm_eps),
        }
    }

    /// Self-attention of layer `l` after what `past` holds, extending a growing cache.
    ///
    /// # Shapes
    /// `h: [b, s, d_model]`, `mask: [g·s, cached + s]` or `[b, 1, g·s, cached + s]` with `g` query
    /// heads per key/value head → `[b, s, d_model]`
    fn attention(
        &self,
        l: usize,
        h: &Tensor,
        rope: Option<&RopeTables>,
        mask: &Tensor,
        past: LayerPast<'_>,
    ) -> candle_core::Result<Tensor> {
        let (b, s, _) = h.dims3()?;
        let spec = &self.spec;
        let (q, k, v) = match spec.arch {
            Arch::Gpt2 => gpt2::qkv(self, l, h)?,
            Arch::Llama => llama::qkv(self, l, h)?,
        };
        let heads = |xs: Tensor, n: usize| -> candle_core::Result<Tensor> {
            xs.reshape((b, s, n, spec.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let mut q = heads(q, spec.n_heads)?;
        let mut k = heads(k, spec.n_kv_heads)?;
        let mut v = heads(v, spec.n_kv_heads)?;
        if let Some(rope) = rope {
            q = rope.apply(&q)?;
            k = rope.apply(&k)?;
        }
        match past {
            LayerPast::None => {}
            LayerPast::Growing(cache) => {
                if let Some((past_k, past_v)) = cache.as_ref() {
                    k = Tensor::cat(&[past_k, &k], 2)?;
                    v = Tensor::cat(&[past_v, &v], 2)?;
                }
                *cache = Some((k.clone(), v.clone()));
            }
            LayerPast::Prefix((past_k, past_v)) => {
                k = Tensor::cat(&[past_k, &k], 2)?;
                v = Tensor::cat(&[past_v, &v], 2)?;
            }
        }
        // The query heads that share a key/value head are contiguous, so they stack as the rows
        // of one product with that head: no copy of the keys and values per query head (nor the
        // sum over copies in the backward pass that such a broadcast costs).
        let n_rep = spec.n_heads / spec.n_kv_heads;
        let q = q.reshape((b, spec.n_kv_heads, n_rep * s, spec.head_dim))?;
        let scale = 1.0 / (spec.head_dim as f64).sqrt();
        let out = ops::attention(&q, &k, &v, mask, n_rep, scale)?;
        self.proj(&out, WeightId::layer(l, Module::AttnO))
    }

    /// The MLP up to the input of the down-projection (the ROME key).
    ///
    /// # Shapes
    /// `h: [b, s, d_model]` → `[b, s, d_mlp]`
    /// The MLP's activations `[b, s, d_mlp]` from its normalised input, with the up and gate
    /// projections' outputs as hook sites.
    fn mlp_act(
        &self,
        l: usize,
        h: &Tensor,
        hooks: &HookSpec,
        captures: &mut BTreeMap<Site, Tensor>,
    ) -> Result<Tensor> {
        let up = self.proj(h, WeightId::layer(l, Module::MlpUp))?;
        let up = hooks.visit(Site::MlpUpOut(l), up, captures)?;
        Ok(match self.spec.activation {
            Activation::GeluTanh => up.gelu()?,
            Activation::GeluErf => up.gelu_erf()?,
            Activation::Silu => {
                let gate = self.proj(h, WeightId::layer(l, Module::MlpGate))?;
                let gate = hooks.visit(Site::MlpGateOut(l), gate, captures)?;
                ops::swiglu(&gate, &up)?
            }
        })
    }

    /// Tokenises `text` without special tokens (neither GPT-2 nor SmolLM2 adds a BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Tokenises `text` with the tokenizer's default special tokens (LLaMA-2 adds BOS; GPT-2 and
    /// SmolLM2 add nothing), as EasyEdit's metrics tokenise.
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Like [`Model::encode_with_special_tokens`], with each token's byte span in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<ByteSpan>)> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Decodes without special tokens (a BOS, an end-of-text).
    pub fn decode_skipping_special(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Logits from residual-stream vectors `[n, d]`: the final norm, then the LM head
    /// (differentiable, for losses read off an inner layer).
    pub fn unembed(&self, h: &Tensor) -> Result<Tensor> {
        let h = self.norm(
            &h.to_dtype(self.dtype)?,
            WeightId::global(Module::FinalNorm),
        )?;
        Ok(ops::matmul_t(
            &h,
            self.w(WeightId::global(Module::LmHead))?,
            self.packed(WeightId::global(Module::LmHead)),
        )?)
    }

    /// Log-softmax over the vocabulary, in f32 (f64 for an f64 model).
    ///
    /// # Shapes
    /// `[.., vocab]` → same
    pub fn log_probs(logits: &Tensor) -> candle_core::Result<Tensor> {
        let wide = match logits.dtype() {
            DType::F64 => DType::F64,
            _ => DType::F32,
        };
        ops::log_softmax_last(&logits.to_dtype(wide)?)
    }

    /// Casts every weight to `dtype` (norm weights too; the norms compute in f32 regardless).
    pub fn to_dtype(&mut self, dtype: DType) -> Result<()> {
        if dtype != self.dtype {
            self.wake_dormant()?;
            self.packed.clear();
        }
        for w in self.weights.values_mut() {
            *w = w.to_dtype(dtype)?;
        }
        self.dtype = dtype;
        Ok(())
    }
}

/// Every weight an architecture needs, with its `[out, in]` shape.
/// The Hugging Face checkpoint name of a weight of an `arch` model.
fn hf_checkpoint_name(arch: Arch, id: WeightId) -> Option<String> {
    match arch {
        Arch::Gpt2 => gpt2::checkpoint_name(id, load::Format::Hf).map(|n| match id.module {
            Module::LmHead => n,
            _ => format!("transformer.{n}"),
        }),
        Arch::Llama => llama::checkpoint_name(id, load::Format::Hf),
    }
}

fn required_weights(spec: &ModelSpec) -> Vec<(WeightId, Vec<usize>)> {
    match spec.arch {
        Arch::Gpt2 => gpt2::required_weights(spec),
        Arch::Llama => llama::required_weights(spec),
    }
}
