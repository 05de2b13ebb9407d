//! Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", §2.1):
//! corrupt the subject's token embeddings with Gaussian noise, then restore the clean value of one
//! hidden state at a time and measure how much of the answer's probability comes back. States are
//! the residual stream after each layer, and the MLP and attention outputs, which (as in the paper)
//! are restored over a window of layers centred on each layer.

use candle_core::{DType, Tensor, D};
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::subject::{fact_token, FactToken};
use crate::model::{HookSpec, Intervention, Model, Site, TokenBatch};

#[derive(Debug, Clone)]
pub struct TraceOptions {
    /// Noise draws averaged over.
    pub samples: usize,
    /// Standard deviation of the noise; `None`: three times the standard deviation of the
    /// token-embedding matrix (the paper uses three times that of subject embeddings).
    pub noise: Option<f64>,
    /// Layers restored together for the MLP and attention traces.
    pub window: usize,
    pub seed: u64,
}

impl Default for TraceOptions {
    fn default() -> Self {
        TraceOptions {
            samples: 10,
            noise: None,
            window: 10,
            seed: 1,
        }
    }
}

/// The probabilities of the answer with each state restored: `[token][layer]`.
#[derive(Debug, Clone, Serialize)]
pub struct Trace {
    pub prompt: String,
    pub subject: String,
    pub tokens: Vec<String>,
    /// First and last token of the subject.
    pub subject_tokens: (usize, usize),
    pub answer: String,
    pub answer_id: u32,
    /// The answer's probability on the clean prompt and with the subject corrupted.
    pub clean: f64,
    pub corrupted: f64,
    pub noise: f64,
    pub samples: usize,
    pub window: usize,
    pub residual: Vec<Vec<f64>>,
    pub mlp: Vec<Vec<f64>>,
    pub attention: Vec<Vec<f64>>,
}

/// What kind of state is restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Residual,
    Mlp,
    Attention,
}

impl Kind {
    fn site(self, layer: usize) -> Site {
        match self {
            Kind::Residual => Site::ResidPost(layer),
            Kind::Mlp => Site::MlpOut(layer),
            Kind::Attention => Site::AttnOut(layer),
        }
    }
}

/// Traces `prompt`, whose subject is `subject`.
pub fn causal_trace(
    model: &Model,
    prompt: &str,
    subject: &str,
    opts: &TraceOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Trace> {
    if opts.samples == 0 {
        return Err(Error::Invalid("--samples must be at least 1".into()));
    }
    let start = prompt.find(subject).ok_or_else(|| {
        Error::Invalid(format!(
            "subject {subject:?} does not occur in prompt {prompt:?}"
        ))
    })?;
    let template = format!(
        "{}{{}}{}",
        &prompt[..start],
        &prompt[start + subject.len()..]
    );
    let (_, first) = fact_token(model, &template, subject, FactToken::SubjectFirst)?;
    let (_, last) = fact_token(model, &template, subject, FactToken::SubjectLast)?;
    let ids = model.encode_with_special_tokens(prompt)?;
    let n_tokens = ids.len();
    let n_layers = model.spec().n_layers;
    let dev = model.device();

    // The clean run: every state, and the answer.
    let mut clean_hooks = HookSpec::new();
    for l in 0..n_layers {
        for kind in [Kind::Residual, Kind::Mlp, Kind::Attention] {
            clean_hooks = clean_hooks.capture(kind.site(l));
        }
    }
    let one = TokenBatch::new(std::slice::from_ref(&ids), 0, dev)?;
    let clean_out = model.forward_at(&one, &clean_hooks, &[(0, n_tokens - 1)])?;
    let clean_probs = candle_nn::ops::softmax_last_dim(&clean_out.logits.to_dtype(DType::F32)?)?;
    let answer_id = clean_probs.argmax(D::Minus1)?.get(0)?.to_scalar::<u32>()?;
    let clean = clean_probs
        .get(0)?
        .get(answer_id as usize)?
        .to_scalar::<f32>()? as f64;

    // Noise on the subject's embeddings, one draw per row.
    let sigma = match opts.noise {
        Some(s) => s,
        None => 3.0 * embedding_std(model)?,
    };
    let d = model.spec().d_model;
    let n_subject = last - first + 1;
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let draws: Vec<Vec<f32>> = (0..opts.samples)
        .map(|_| {
            (0..n_subject * d)
                .map(|_| (standard_normal(&mut rng) * sigma) as f32)
                .collect()
        })
        .collect();

    // One corrupted batch per (kind, layer): a row per (token, draw) with that state restored,
    // plus `samples` rows with nothing restored.
    let rows_per_token = opts.samples;
    let restored_rows = n_tokens * rows_per_token;
    let total_rows = restored_rows + opts.samples;
    let seqs = vec![ids.clone(); total_rows];
    let batch = TokenBatch::new(&seqs, 0, dev)?;
    let mut noise = vec![0f32; total_rows * n_tokens * d];
    for row in 0..total_rows {
        let draw = &draws[row % opts.samples];
        let base = (row * n_tokens + first) * d;
        noise[base..base + n_subject * d].copy_from_slice(draw);
    }
    let noise = Tensor::from_vec(noise, (total_rows, n_tokens, d), dev)?.to_dtype(model.dtype())?;
    let last_positions: Vec<(usize, usize)> = (0..total_rows).map(|r| (r, n_tokens - 1)).collect();

    let answer_prob = |hooks: HookSpec| -> Result<Vec<f64>> {
        let hooks = hooks.intervene(Site::Embed, Intervention::Add(noise.clone()));
        let logits = model.forward_at(&batch, &hooks, &last_positions)?.logits;
        let probs = candle_nn::ops::softmax_last_dim(&logits.to_dtype(DType::F32)?)?;
        let p: Vec<f32> = probs
            .narrow(1, answer_id as usize, 1)?
            .squeeze(1)?
            .to_vec1()?;
        Ok(p.into_iter().map(f64::from).collect())
    };

    let mut corrupted_sum = 0.0;
    let mut corrupted_runs = 0;
    let mut tables = Vec::new();
    let steps = 3 * n_layers;
    let mut done = 0;
    for kind in [Kind::Residual, Kind::Mlp, Kind::Attention] {
        let mut table = vec![vec![0.0; n_layers]; n_tokens];
        for layer in 0..n_layers {
            let window: Vec<usize> = match kind {
                Kind::Residual => vec![layer],
                _ => {
                    let lo = layer.saturating_sub(opts.window / 2);
                    let hi = (layer + opts.window - opts.window / 2).min(n_layers);
                    (lo..hi).collect()
                }
            };
            let mut hooks = HookSpec::new();
            for &l in &window {
                let site = kind.site(l);
                let clean_state = clean_out.capture(site)?.get(0)?;
                let mut entries = Vec::with_capacity(restored_rows);
                let mut values = Vec::with_capacity(restored_rows);
                for t in 0..n_tokens {
                    for k in 0..rows_per_token {
                        entries.push((t * rows_per_token + k, t));
                        values.push(clean_state.get(t)?);
                    }
                }
                hooks = hooks.intervene(
                    site,
                    Intervention::SetAt {
                        entries,
                        values: Tensor::stack(&values, 0)?,
                    },
                );
            }
            let p = answer_prob(hooks)?;
            for (t, row) in table.iter_mut().enumerate() {
                row[layer] = p[t * rows_per_token..(t + 1) * rows_per_token]
                    .iter()
                    .sum::<f64>()
                    / rows_per_token as f64;
            }
            corrupted_sum += p[restored_rows..].iter().sum::<f64>();
            corrupted_runs += opts.samples;
            done += 1;
            progress(done, steps);
        }
        tables.push(table);
    }
    let tokens = ids
        .iter()
        .map(|&id| model.decode(&[id]))
        .collect::<Result<Vec<_>>>()?;
    let (Some(attention), Some(mlp), Some(residual)) = (tables.pop(), tables.pop(), tables.pop())
    else {
        return Err(crate::Error::Invalid(
            "causal tracing made fewer than three tables".into(),
        ));
    };
    Ok(Trace {
        prompt: prompt.to_string(),
        subject: subject.to_string(),
        tokens,
        subject_tokens: (first, last),
        answer: model.decode(&[answer_id])?,
        answer_id,
        clean,
        corrupted: corrupted_sum / corrupted_runs as f64,
        noise: sigma,
        samples: opts.samples,
        window: opts.window,
        residual,
        mlp,
        attention,
    })
}

/// Standard deviation of every entry of the token-embedding matrix.
fn embedding_std(model: &Model) -> Result<f64> {
    let embed = model.weight(crate::model::WeightId::global(crate::model::Module::Embed))?;
    let flat = embed.flatten_all()?.to_dtype(DType::F64)?;
    let mean = flat.mean_all()?.to_scalar::<f64>()?;
    let var = flat
        .affine(1.0, -mean)?
        .sqr()?
        .mean_all()?
        .to_scalar::<f64>()?;
    Ok(var.sqrt())
}

/// A standard normal draw (Box–Muller).
fn standard_normal(rng: &mut rand::rngs::StdRng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}
