//! Text generation with a KV cache owned by the generation loop (never by the model, so an edit can
//! never leave a stale cache behind).

use candle_core::{DType, Tensor, D};
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use super::{HookSpec, Model};
use crate::error::{Error, Result};

/// Keys and values of every layer for one sequence.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            len: 0,
        }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(super) fn layer_mut(&mut self, l: usize) -> &mut Option<(Tensor, Tensor)> {
        &mut self.layers[l]
    }

    pub(super) fn into_layers(self) -> Vec<Option<(Tensor, Tensor)>> {
        self.layers
    }

    pub(super) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}

/// Keys and values of every layer for a batch of prefixes of different lengths, computed once and
/// read (never extended) by the continuations run after them. The value optimisation of the
/// locate-then-edit methods uses it: nothing before the fact token depends on δ, so each step only
/// recomputes the tokens from the fact token on.
#[derive(Debug, Clone)]
pub struct PrefixCache {
    /// Per layer, `[b, kv_heads, width, head_dim]`; row `r` is valid in its first `lengths[r]` columns.
    pub(super) layers: Vec<(Tensor, Tensor)>,
    pub(super) lengths: Vec<usize>,
}

impl PrefixCache {
    /// The real length of every row's prefix.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// Cached columns (the longest prefix).
    pub fn width(&self) -> usize {
        self.layers.first().map_or(0, |(k, _)| k.dims()[2])
    }
}

/// What a forward pass continues from.
pub(crate) enum Past<'a> {
    None,
    /// A generation cache, extended by the pass.
    Growing(&'a mut KvCache),
    /// Per-row prefixes, read only.
    Prefixes(&'a PrefixCache),
}

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    Greedy,
    /// Sample from the `k` most likely tokens (softmax over their logits), seeded.
    TopK {
        k: usize,
        seed: u64,
    },
}

/// The five most likely next tokens at one step, before the choice.
#[derive(Debug, Clone, Serialize)]
pub struct StepTopK {
    pub ids: Vec<u32>,
    pub logits: Vec<f32>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    pub prompt_ids: Vec<u32>,
    pub generated_ids: Vec<u32>,
    pub text: String,
    pub steps: Vec<StepTopK>,
}

impl Model {
    /// Generates up to `max_new_tokens` after `prompt`, stopping early at the end-of-sequence token.
    pub fn generate(
        &self,
        prompt: &str,
        max_new_tokens: usize,
        sampling: Sampling,
    ) -> Result<Generation> {
        let prompt_ids = self.encode(prompt)?;
        self.generate_ids(&prompt_ids, max_new_tokens, sampling)
    }

    pub fn generate_ids(
        &self,
        prompt_ids: &[u32],
        max_new_tokens: usize,
        sampling: Sampling,
    ) -> Result<Generation> {
        self.generate_ids_until(prompt_ids, max_new_tokens, sampling, true)
    }

    /// Like [`Model::generate_ids`]; with `stop_at_eos` false an end-of-sequence token is kept and
    /// generation goes on (EasyEdit's fluency sampler does not stop).
    pub fn generate_ids_until(
        &self,
        prompt_ids: &[u32],
        max_new_tokens: usize,
        sampling: Sampling,
        stop_at_eos: bool,
    ) -> Result<Generation> {
        if prompt_ids.is_empty() {
            return Err(Error::Invalid(
                "cannot generate from an empty prompt".into(),
            ));
        }
        self.check_room(prompt_ids.len(), max_new_tokens)?;
        let mut chooser = Chooser::new(sampling);
        let hooks = HookSpec::new();
        let mut cache = KvCache::new(self.spec.n_layers);
        let mut next_input = Tensor::new(prompt_ids, &self.device)?.unsqueeze(0)?;
        let mut generated = Vec::with_capacity(max_new_tokens);
        let mut steps = Vec::with_capacity(max_new_tokens);
        for _ in 0..max_new_tokens {
            let lengths = [next_input.dim(1)?];
            let out = self.run(
                &next_input,
                &lengths,
                &hooks,
                Past::Growing(&mut cache),
                None,
            )?;
            let last = out.logits.dim(1)? - 1;
            let logits: Vec<f32> = out
                .logits
                .narrow(1, last, 1)?
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1()?;
            let ranked = top_k(&logits, 5.max(chooser.k()));
            steps.push(StepTopK {
                ids: ranked.iter().take(5).map(|&(i, _)| i).collect(),
                logits: ranked.iter().take(5).map(|&(_, l)| l).collect(),
            });
            let next = chooser.choose(&ranked);
            generated.push(next);
            if stop_at_eos && Some(next) == self.spec.eos_id {
                break;
            }
            next_input = Tensor::new(&[next], &self.device)?.unsqueeze(0)?;
        }
        Ok(Generation {
            prompt_ids: prompt_ids.to_vec(),
            text: self.decode(&generated)?,
            generated_ids: generated,
            steps,
        })
    }

    /// Samples `max_new_tokens` after each of `prompts` (all of one length) in one batch, row `r`
    /// drawing with `samplings[r]`; never stops at the end-of-sequence token. Each row draws what
    /// [`Model::generate_ids_until`] draws for it alone, but for float rounding, which differs
    /// between batch shapes and can tip a near-tie between two candidates.
    pub fn generate_batch_ids(
        &self,
        prompts: &[Vec<u32>],
        max_new_tokens: usize,
        samplings: &[Sampling],
    ) -> Result<Vec<Vec<u32>>> {
        let Some(first) = prompts.first() else {
            return Ok(Vec::new());
        };
        if first.is_empty() || prompts.iter().any(|p| p.len() != first.len()) {
            return Err(Error::Invalid(
                "batched generation needs non-empty prompts of one length".into(),
            ));
        }
        if samplings.len() != prompts.len() {
            return Err(Error::Invalid(format!(
                "{} samplings for {} prompts",
                samplings.len(),
                prompts.len()
            )));
        }
        self.check_room(first.len(), max_new_tokens)?;
        let mut choosers: Vec<Chooser> = samplings.iter().map(|&s| Chooser::new(s)).collect();
        let b = prompts.len();
        let mut cache = KvCache::new(self.spec.n_layers);
        let mut input = Tensor::new(prompts.concat(), &self.device)?.reshape((b, first.len()))?;
        let mut generated = vec![Vec::with_capacity(max_new_tokens); b];
        for _ in 0..max_new_tokens {
            let s = input.dim(1)?;
            let last: Vec<(usize, usize)> = (0..b).map(|r| (r, s - 1)).collect();
            let out = self.run(
                &input,
                &vec![s; b],
                &HookSpec::new(),
                Past::Growing(&mut cache),
                Some(&last),
            )?;
            let logits: Vec<Vec<f32>> = out.logits.to_dtype(DType::F32)?.to_vec2()?;
            let next: Vec<u32> = logits
                .iter()
                .zip(&mut choosers)
                .map(|(row, chooser)| chooser.choose(&top_k(row, chooser.k())))
                .collect();
            for (row, &id) in generated.iter_mut().zip(&next) {
                row.push(id);
            }
            input = Tensor::new(next, &self.device)?.unsqueeze(1)?;
        }
        Ok(generated)
    }

    /// Greedy next-token ids at every position of a single sequence, without a cache (a check of
    /// the cached path).
    pub fn argmax_all(&self, ids: &[u32]) -> Result<Vec<u32>> {
        let batch = super::TokenBatch::new(&[ids.to_vec()], 0, &self.device)?;
        let out = self.forward(&batch, &HookSpec::new())?;
        Ok(out.logits.argmax(D::Minus1)?.squeeze(0)?.to_vec1()?)
    }
}

impl Model {
    fn check_room(&self, prompt_len: usize, max_new_tokens: usize) -> Result<()> {
        if prompt_len + max_new_tokens > self.spec.max_positions {
            return Err(Error::Invalid(format!(
                "prompt of {prompt_len} tokens plus {max_new_tokens} new tokens is longer than the model's context of {} positions",
                self.spec.max_positions
            )));
        }
        Ok(())
    }
}

/// One sequence's choice of next token: greedy, or seeded top-k sampling with its own stream.
struct Chooser {
    sampling: Sampling,
    rng: Option<rand::rngs::StdRng>,
}

impl Chooser {
    fn new(sampling: Sampling) -> Self {
        let rng = match sampling {
            Sampling::TopK { seed, .. } => Some(rand::rngs::StdRng::seed_from_u64(seed)),
            Sampling::Greedy => None,
        };
        Self { sampling, rng }
    }

    /// How many of the best candidates the choice looks at.
    fn k(&self) -> usize {
        match self.sampling {
            Sampling::Greedy => 1,
            Sampling::TopK { k, .. } => k.max(1),
        }
    }

    /// Picks from `ranked` (best first, at least `self.k()` long where the vocabulary allows).
    fn choose(&mut self, ranked: &[(u32, f32)]) -> u32 {
        let k = self.k().min(ranked.len());
        match self.rng.as_mut() {
            Some(rng) => sample(&ranked[..k], rng),
            None => ranked[0].0,
        }
    }
}

/// The `k` largest logits with their ids, best first; ties go to the lower id, as `torch.topk` does on CPU.
fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    let k = k.min(idx.len());
    let cmp = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if k < idx.len() {
        idx.select_nth_unstable_by(k, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx
}

/// Draws one id from the softmax over the given logits.
fn sample(candidates: &[(u32, f32)], rng: &mut rand::rngs::StdRng) -> u32 {
    let max = candidates
        .iter()
        .map(|c| c.1)
        .fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f64> = candidates
        .iter()
        .map(|c| f64::from(c.1 - max).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (c, w) in candidates.iter().zip(&weights) {
        if u < *w {
            return c.0;
        }
        u -= w;
    }
    candidates[candidates.len() - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_by_logit_then_id() {
        let got = top_k(&[0.5, 2.0, 2.0, -1.0, 3.0], 3);
        assert_eq!(got, vec![(4, 3.0), (1, 2.0), (2, 2.0)]);
    }

    #[test]
    fn sampling_is_seeded_and_follows_the_weights() {
        let cands = [(7u32, 0.0f32), (9, (3.0f32).ln())];
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let draws: Vec<u32> = (0..4000).map(|_| sample(&cands, &mut rng)).collect();
        let nines = draws.iter().filter(|&&d| d == 9).count() as f64 / 4000.0;
        assert!((nines - 0.75).abs() < 0.03, "{nines}");
        let mut again = rand::rngs::StdRng::seed_from_u64(1);
        let redraw: Vec<u32> = (0..4000).map(|_| sample(&cands, &mut again)).collect();
        assert_eq!(draws, redraw);
    }
}
