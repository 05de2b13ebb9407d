//! The training of a hypernetwork editor (SPEC-editors §8.5, shared by MEND and KE): each
//! micro-batch edits the model with the current editor, scores the edited model, and accumulates
//! the gradient of `cedit·NLL + cloc·KL` for the editor's parameters.

use std::path::PathBuf;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, CheckpointHeader};
use super::{
    gradient_factors, kl_from_base, lowest_layer, AnswerBatch, EditText, Gradient, Hypernet,
    Purpose,
};
use crate::data::python_random::PythonRandom;
use crate::data::EditRequest;
use crate::editors::optim::Adam;
use crate::error::{Error, Result};
use crate::model::{HookSpec, Model, Site, WeightId};
use crate::run::train::{EarlyStopping, Metrics, Outcome, Trainee};

/// The fields of EasyEdit's TRAINING files the loop reads, whatever the method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingHparams {
    pub lr: f64,
    pub cedit: f64,
    pub cloc: f64,
    pub seed: u64,
    pub batch_size: usize,
    pub val_batch_size: usize,
    pub accumulate_bs: usize,
    pub max_iters: usize,
    pub val_interval: usize,
    pub val_steps: usize,
    pub early_stop_patience: usize,
    pub early_stop_key: Option<String>,
    pub grad_clip: f64,
    /// EasyEdit's LLaMA labels, which start with BOS ([`AnswerBatch::with_labels`]).
    pub bos_label: bool,
    /// Score the edited model on the edit's rephrase (the MEND paper's `edit_outer`) rather than
    /// on the edit itself (EasyEdit's `edit_inner`); records without a rephrase use the edit.
    pub outer_edit_loss: bool,
    /// At most this many of a ConvSent topic's sentences of each kind (wanted, unwanted,
    /// locality), drawn per record ([`TrainingPair::thinned`]); `None` keeps all (EasyEdit).
    pub sentences_per_topic: Option<usize>,
}

/// One answer the edited model is scored on.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredAnswer {
    pub prompt: String,
    pub answer: String,
    /// `false` for an answer the loss makes unlikely (ConvSent's other sentiment).
    pub wanted: bool,
}

/// One training example: the edit, what the edited model is scored on, and locality prompts whose
/// predictions should not move.
#[derive(Debug, Clone)]
pub struct TrainingPair {
    pub edit: EditText,
    /// The edit's prompt and new answer; for ConvSent, every opinion sentence on the topic, the
    /// target sentiment's wanted and the other's unwanted (EasyEdit's multi-task trainer).
    pub answers: Vec<ScoredAnswer>,
    pub rephrase: Option<String>,
    /// A fact's first locality prompt and answer; ConvSent's sentences on the next topic.
    pub locality: Vec<(String, String)>,
}

impl TrainingPair {
    /// The request as a training example, its edit prompts (not its locality prompts) passed
    /// through `wrap` (InstructEdit's instruction; the identity otherwise).
    ///
    /// A fact is scored on its new answer and keeps its first locality prompt. A ConvSent topic
    /// is scored on its sentences after `question </s>` (the answer tokens only: EasyEdit also
    /// scores the question tokens, the same for both sentiments, which the unlikelihood term then
    /// pushes down), with the next topic's sentences for locality.
    ///
    /// # Errors
    /// A request without a locality prompt: the training loss needs one.
    pub fn from_request(
        r: &EditRequest,
        wrap: &dyn Fn(&str) -> String,
    ) -> std::result::Result<Self, String> {
        use crate::data::convsent::SEPARATOR;
        let edit = EditText {
            prompt: wrap(&r.prompt),
            ..EditText::of(r)
        };
        if let Some(probe) = &r.sentiment {
            let answers = probe
                .inner_qa
                .iter()
                .zip(&probe.same_sentiment)
                .map(|((q, a), &wanted)| ScoredAnswer {
                    prompt: format!("{} {SEPARATOR}", wrap(q)),
                    answer: a.trim().to_string(),
                    wanted,
                })
                .collect();
            let locality = probe
                .outer_qa
                .iter()
                .map(|(q, a)| (format!("{q} {SEPARATOR}"), a.trim().to_string()))
                .collect();
            return Ok(TrainingPair {
                edit,
                answers,
                rephrase: None,
                locality,
            });
        }
        let (p, a) = r
            .locality
            .values()
            .find_map(|set| Some((set.prompt.first()?, set.ground_truth.first()?)))
            .ok_or_else(|| "no locality prompt (the training loss needs one)".to_string())?;
        Ok(TrainingPair {
            answers: vec![ScoredAnswer {
                prompt: edit.prompt.clone(),
                answer: edit.target.clone(),
                wanted: true,
            }],
            edit,
            rephrase: r.rephrase_prompt.as_deref().map(wrap),
            locality: vec![(p.clone(), a.clone())],
        })
    }
}

impl TrainingPair {
    /// The pair with at most `n` wanted answers, `n` unwanted ones and `n` locality prompts, a
    /// uniform draw keyed on `seed` and the edit alone (so the same record is thinned the same
    /// way in every run and on resume), kept in their original order. A fact has one answer and
    /// one locality prompt, so only ConvSent topics (20 sentences and 20 more for locality) are
    /// thinned: each mean of the unlikelihood loss and of the locality KL is then estimated from
    /// a sample of the topic's sentences, as a mini-batch estimates a loss over records.
    pub fn thinned(mut self, n: usize, seed: u64) -> Self {
        let key = [self.edit.prompt.as_str(), self.edit.target.as_str()];
        let mut rng = PythonRandom::new(crate::data::stable_hash::stable_hash(seed, &key));
        let mut keep_answer = vec![true; self.answers.len()];
        for wanted in [true, false] {
            let of_kind = (0..self.answers.len()).filter(|&i| self.answers[i].wanted == wanted);
            keep_only(n, of_kind.collect(), &mut rng, &mut keep_answer);
        }
        let mut keep_locality = vec![true; self.locality.len()];
        keep_only(
            n,
            (0..self.locality.len()).collect(),
            &mut rng,
            &mut keep_locality,
        );
        let mut kept = keep_answer.into_iter();
        self.answers.retain(|_| kept.next().unwrap_or(true));
        let mut kept = keep_locality.into_iter();
        self.locality.retain(|_| kept.next().unwrap_or(true));
        self
    }
}

/// Clears `keep` for all but `n` of `candidates`, drawn uniformly.
fn keep_only(n: usize, mut candidates: Vec<usize>, rng: &mut PythonRandom, keep: &mut [bool]) {
    rng.shuffle(&mut candidates);
    for &i in candidates.iter().skip(n) {
        keep[i] = false;
    }
}

/// The batch scoring `answers`, unwanted ones by unlikelihood.
fn answer_batch(model: &Model, answers: &[&ScoredAnswer], bos_label: bool) -> Result<AnswerBatch> {
    let pairs: Vec<(&str, &str)> = answers
        .iter()
        .map(|a| (a.prompt.as_str(), a.answer.as_str()))
        .collect();
    let wanted: Vec<bool> = answers.iter().map(|a| a.wanted).collect();
    Ok(AnswerBatch::with_labels(model, &pairs, bos_label)?.with_unwanted_rows(&wanted))
}

/// The base model's side of a training example: the batches, the residual entering the lowest
/// edited layer (the same before and after an edit) and the locality predictions before it.
struct Prepared {
    edit: AnswerBatch,
    /// What the edited model is scored on, when not `edit`, and its residual below the edits.
    outer: Option<(AnswerBatch, Option<(usize, Tensor)>)>,
    locality: AnswerBatch,
    locality_resid: Option<(usize, Tensor)>,
    base_locality: Tensor,
}

/// A hypernetwork editor under training, with its optimiser and data.
pub struct HypernetTrainee<'a, H: Hypernet> {
    pub editor: H,
    model: &'a mut Model,
    train: Vec<TrainingPair>,
    validation: Vec<TrainingPair>,
    optimiser: Adam,
    accumulated: Vec<Option<Gradient>>,
    micro_batches: usize,
    /// Where the next micro-batch starts in `train` (it wraps around).
    cursor: usize,
    /// Micro-batches skipped for a gradient that was not finite: in all, and since the last
    /// finite one.
    skipped: usize,
    skipped_in_a_row: usize,
    /// The best state so far, when no checkpoint folder is set.
    pub best: Option<(usize, Vec<(String, Tensor)>)>,
    /// Where checkpoints go, and the fingerprint of the model they are for.
    dir: Option<PathBuf>,
    fingerprint: String,
}

impl<'a, H: Hypernet> HypernetTrainee<'a, H> {
    pub fn new(
        editor: H,
        model: &'a mut Model,
        train: Vec<TrainingPair>,
        validation: Vec<TrainingPair>,
    ) -> Result<Self> {
        if train.is_empty() || validation.is_empty() {
            return Err(Error::Invalid(format!(
                "{} training needs training and validation records",
                H::METHOD
            )));
        }
        let vars = editor.vars();
        let optimiser = Adam::new(vars.clone(), editor.training().lr, 0.0)?;
        Ok(HypernetTrainee {
            accumulated: vec![None; vars.len()],
            editor,
            model,
            train,
            validation,
            optimiser,
            micro_batches: 0,
            cursor: 0,
            skipped: 0,
            skipped_in_a_row: 0,
            best: None,
            dir: None,
            fingerprint: String::new(),
        })
    }

    fn prepare(&self, pairs: &[TrainingPair]) -> Result<Prepared> {
        let model = &*self.model;
        let answers: Vec<&ScoredAnswer> = pairs.iter().flat_map(|p| &p.answers).collect();
        let locs: Vec<(&str, &str)> = pairs
            .iter()
            .flat_map(|p| &p.locality)
            .map(|(p, a)| (p.as_str(), a.as_str()))
            .collect();
        let knobs = self.editor.training();
        let edit = answer_batch(model, &answers, knobs.bos_label)?;
        let locality = AnswerBatch::new(model, &locs)?;
        let below = lowest_layer(self.editor.weights()).checked_sub(1);
        let mut hooks = HookSpec::new();
        if let Some(l) = below {
            hooks = hooks.capture(Site::ResidPost(l));
        }
        let outer = if knobs.outer_edit_loss {
            let rephrased: Vec<ScoredAnswer> = pairs
                .iter()
                .flat_map(|p| match &p.rephrase {
                    Some(prompt) => vec![ScoredAnswer {
                        prompt: prompt.clone(),
                        answer: p.edit.target.clone(),
                        wanted: true,
                    }],
                    None => p.answers.clone(),
                })
                .collect();
            let batch = answer_batch(
                model,
                &rephrased.iter().collect::<Vec<_>>(),
                knobs.bos_label,
            )?;
            let resid = match below {
                Some(l) => {
                    let out = model.forward_at(&batch.batch, &hooks, &batch.positions)?;
                    Some((l, out.capture(Site::ResidPost(l))?.detach()))
                }
                None => None,
            };
            Some((batch, resid))
        } else {
            None
        };
        let out = model.forward_at(&locality.batch, &hooks, &locality.positions)?;
        let base_locality = Model::log_probs(&out.logits)?.detach();
        let locality_resid = match below {
            Some(l) => Some((l, out.capture(Site::ResidPost(l))?.detach())),
            None => None,
        };
        Ok(Prepared {
            edit,
            outer,
            locality,
            locality_resid,
            base_locality,
        })
    }

    /// Edits the model with the current editor, scores it, and puts the weights back: the loss
    /// (carrying the editor's graph unless `purpose` is [`Purpose::Inference`]) and its parts.
    fn edited_loss(
        &mut self,
        pairs: &[TrainingPair],
        prepared: &Prepared,
        purpose: Purpose,
    ) -> Result<(Tensor, Metrics)> {
        let weights = self.editor.weights().to_vec();
        let ids: Vec<WeightId> = weights.iter().map(|w| w.id).collect();
        let below = lowest_layer(&weights).checked_sub(1);
        let pass = gradient_factors(self.model, &prepared.edit, &ids, below)?;
        let texts: Vec<EditText> = pairs.iter().map(|p| p.edit.clone()).collect();
        let updates = self.editor.updates(&texts, self.model, &pass, purpose)?;
        // The edited weights stay factored in the graph: W + ΔW and its gradient would cost a
        // weight-sized tensor each, per weight and micro-batch.
        let mut installed = Vec::with_capacity(weights.len());
        let mut put = Ok(());
        for (w, change) in weights.iter().zip(updates) {
            put = self
                .model
                .set_low_rank_change(w.id, Some(change))
                .map(|_| ());
            if put.is_err() {
                break;
            }
            installed.push(w.id);
        }
        let scored = put.and_then(|()| {
            let resume = |r: &Option<(usize, Tensor)>| match r {
                Some((l, t)) => HookSpec::new().resume_after(*l, t.clone()),
                None => HookSpec::new(),
            };
            let (scored, resid) = match &prepared.outer {
                Some((batch, resid)) => (batch, resid),
                None => (&prepared.edit, &pass.resid),
            };
            let edit_lp = scored.log_probs(self.model, &resume(resid))?;
            let (nll, acc) = scored.nll_and_accuracy(&edit_lp)?;
            let loc_lp = prepared
                .locality
                .log_probs(self.model, &resume(&prepared.locality_resid))?;
            let kl = kl_from_base(&prepared.base_locality, &loc_lp)?;
            Ok::<_, Error>((nll, acc, kl))
        });
        for id in installed {
            self.model.set_low_rank_change(id, None)?;
        }
        let (nll, acc, kl) = scored?;
        let p = self.editor.training();
        let total = ((&nll * p.cedit)? + (&kl * p.cloc)?)?;
        let scalar = |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar()?) };
        let metrics = Metrics::from([
            ("loss/edit".to_string(), scalar(&nll)?),
            ("loss/loc".to_string(), scalar(&kl)?),
            ("loss/total_edit".to_string(), scalar(&total)?),
            ("edit/acc".to_string(), acc),
            ("edit/nll_before".to_string(), pass.nll),
        ]);
        Ok((total, metrics))
    }

    /// The training loss of `pairs` under the current editor (carrying its graph) and its parts;
    /// `training` lets the editor's running statistics take the edit in.
    pub fn loss(&mut self, pairs: &[TrainingPair], training: bool) -> Result<(Tensor, Metrics)> {
        let prepared = self.prepare(pairs)?;
        let purpose = if training {
            Purpose::Training
        } else {
            Purpose::Differentiable
        };
        self.edited_loss(pairs, &prepared, purpose)
    }

    /// Writes checkpoints into `dir` (`best.safetensors`, `last.safetensors` and its JSON
    /// sidecar `last.json`) instead of keeping the best state in memory.
    pub fn checkpoint_into(&mut self, dir: &std::path::Path) -> Result<()> {
        self.dir = Some(dir.to_path_buf());
        self.fingerprint = self.model.fingerprint()?;
        Ok(())
    }

    fn header(
        &self,
        progress: &Outcome,
        stopper: Option<&EarlyStopping>,
    ) -> Result<CheckpointHeader> {
        Ok(CheckpointHeader {
            format_version: checkpoint::FORMAT,
            kedit_version: env!("CARGO_PKG_VERSION").into(),
            method: H::METHOD.into(),
            model_fingerprint: self.fingerprint.clone(),
            hparams: serde_json::to_value(self.editor.params()).map_err(|e| {
                Error::Invalid(format!("cannot serialise the {} hparams: {e}", H::METHOD))
            })?,
            weights: self.editor.weights().to_vec(),
            cursor: self.cursor,
            micro_batches: self.micro_batches,
            adam_step: self.optimiser.state().0,
            progress: progress.clone(),
            early_stopping: stopper.cloned(),
        })
    }

    /// Continues from `dir/last.safetensors`: the editor, the optimiser, the data cursor; returns
    /// the loop's progress and stopper to hand back to `train`.
    ///
    /// # Errors
    /// No checkpoint, or one of another method, model or configuration.
    pub fn resume(&mut self, dir: &std::path::Path) -> Result<(Outcome, Option<EarlyStopping>)> {
        let file = dir.join(checkpoint::LAST_FILE);
        let (header, tensors) = checkpoint::read(&file, H::METHOD)?;
        let here = self.model.fingerprint()?;
        if header.model_fingerprint != here {
            return Err(Error::file(
                &file,
                format!(
                    "this run trained on model {}, but the model here is {here}",
                    header.model_fingerprint
                ),
            ));
        }
        if header.weights != self.editor.weights() {
            return Err(Error::file(
                &file,
                "this run edited other weights (inner_params differ from the hparams file's)",
            ));
        }
        self.editor
            .load_tensors(&tensors)
            .map_err(|e| Error::file(&file, e.to_string()))?;
        let n = self.editor.vars().len();
        let moment = |kind: &str| -> Result<Vec<Tensor>> {
            (0..n)
                .map(|i| {
                    tensors
                        .get(&format!("opt.{kind}.{i}"))
                        .cloned()
                        .ok_or_else(|| {
                            Error::file(&file, format!("the checkpoint lacks opt.{kind}.{i}"))
                        })
                })
                .collect()
        };
        self.optimiser
            .restore(header.adam_step, moment("m")?, moment("v")?)
            .map_err(|e| Error::file(&file, e.to_string()))?;
        self.cursor = header.cursor % self.train.len();
        self.micro_batches = header.micro_batches;
        Ok((header.progress, header.early_stopping))
    }
}

/// EasyEdit skips a micro-batch whose loss is not finite and goes on; kedit does too, but stops
/// when that happens this many times in a row, since nothing is being learned any more.
const MAX_SKIPPED_IN_A_ROW: usize = 20;

fn squared_norm(t: &Tensor) -> Result<f64> {
    Ok(t.sqr()?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

impl<H: Hypernet> Trainee for HypernetTrainee<'_, H> {
    fn accumulate(&mut self, _step: usize) -> Result<Metrics> {
        let p = self.editor.training();
        let n = p.batch_size.max(1);
        let pairs: Vec<TrainingPair> = (0..n)
            .map(|k| self.train[(self.cursor + k) % self.train.len()].clone())
            .collect();
        self.cursor = (self.cursor + n) % self.train.len();
        let prepared = self.prepare(&pairs)?;
        let (loss, metrics) = self.edited_loss(&pairs, &prepared, Purpose::Training)?;
        // The 1/accumulate_bs of gradient accumulation, applied to the loss: the gradients come
        // out scaled, without another pass over every parameter (KE's embedding table alone is
        // 28 M of them on SmolLM2).
        let scale = 1.0 / p.accumulate_bs.max(1) as f64;
        let grads = (loss * scale)?.backward()?;
        let fresh = self.editor.gradients(&grads)?;
        drop(grads);
        // A micro-batch whose gradient is not finite is skipped, as EasyEdit's trainer skips it.
        // A plain sum is not finite exactly when some entry is not (or, for sums beyond f32's
        // range, when the gradient is useless anyway), and needs no temporary.
        let finite = fresh
            .iter()
            .flatten()
            .try_fold(true, |ok, g| Ok::<_, Error>(ok && g.sum()?.is_finite()))?;
        if finite {
            self.skipped_in_a_row = 0;
            let vars = self.editor.vars();
            for ((acc, g), var) in self.accumulated.iter_mut().zip(fresh).zip(&vars) {
                *acc = match (acc.take(), g) {
                    (Some(a), Some(g)) => Some(a.add(g, var.as_tensor())?),
                    (a, g) => a.or(g),
                };
            }
        } else {
            self.skipped += 1;
            self.skipped_in_a_row += 1;
            if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW {
                return Err(Error::Invalid(format!(
                    "the gradient was not finite in {MAX_SKIPPED_IN_A_ROW} micro-batches in a row \
                     (the last at training record {}): training diverged; lower lr ({})",
                    self.cursor, p.lr
                )));
            }
        }
        self.micro_batches += 1;
        let mut metrics = metrics;
        metrics.insert("skipped/not_finite".into(), self.skipped as f64);
        Ok(metrics)
    }

    fn update(&mut self) -> Result<()> {
        let p = self.editor.training();
        let vars = self.editor.vars();
        let n = vars.len();
        let grads = std::mem::replace(&mut self.accumulated, vec![None; n])
            .into_iter()
            .zip(&vars)
            .map(|(g, var)| g.map(|g| g.dense(var.as_tensor())).transpose())
            .collect::<Result<Vec<_>>>()?;
        let norm = grads
            .iter()
            .flatten()
            .try_fold(0.0, |sum, g| Ok::<_, Error>(sum + squared_norm(g)?))?
            .sqrt();
        if !norm.is_finite() {
            return Err(Error::Invalid(format!(
                "the gradient norm is {norm}: training diverged (lower lr, {})",
                p.lr
            )));
        }
        let factor = if p.grad_clip > 0.0 && norm > p.grad_clip {
            p.grad_clip / norm
        } else {
            1.0
        };
        // Unclipped gradients are used as they are (`g · 1` would copy each for nothing).
        let grads = if factor < 1.0 {
            grads
                .into_iter()
                .map(|g| g.map(|g| g * factor).transpose())
                .collect::<candle_core::Result<Vec<_>>>()?
        } else {
            grads
        };
        self.optimiser.apply_gradients(&grads)?;
        Ok(())
    }

    fn validate(&mut self) -> Result<Metrics> {
        let n = self.editor.training().val_batch_size.max(1);
        let mut sums = Metrics::new();
        let mut batches = 0.0;
        let validation = self.validation.clone();
        for chunk in validation.chunks(n) {
            let prepared = self.prepare(chunk)?;
            let (_, metrics) = self.edited_loss(chunk, &prepared, Purpose::Inference)?;
            for (k, v) in metrics {
                *sums.entry(format!("{k}_val")).or_insert(0.0) += v;
            }
            batches += 1.0;
        }
        Ok(sums.into_iter().map(|(k, v)| (k, v / batches)).collect())
    }

    fn keep_best(&mut self, step: usize) -> Result<()> {
        match &self.dir {
            Some(dir) => {
                let progress = Outcome {
                    steps: step,
                    best_step: Some(step),
                    ..Outcome::default()
                };
                let header = self.header(&progress, None)?;
                let tensors = self.editor.tensors()?;
                checkpoint::write(&dir.join(checkpoint::BEST_FILE), &header, tensors)?;
            }
            None => {
                // A copy: the optimiser updates the editor's variables in place.
                let tensors = self
                    .editor
                    .tensors()?
                    .into_iter()
                    .map(|(k, t)| Ok((k, t.copy()?)))
                    .collect::<Result<Vec<_>>>()?;
                self.best = Some((step, tensors));
            }
        }
        Ok(())
    }

    fn checkpoint(&mut self, progress: &Outcome, stopper: Option<&EarlyStopping>) -> Result<()> {
        let Some(dir) = self.dir.clone() else {
            return Ok(());
        };
        let header = self.header(progress, stopper)?;
        let mut tensors = self.editor.tensors()?;
        let (_, m, v) = self.optimiser.state();
        for (i, (m, v)) in m.iter().zip(v).enumerate() {
            tensors.push((format!("opt.m.{i}"), m.clone()));
            tensors.push((format!("opt.v.{i}"), v.clone()));
        }
        checkpoint::write(&dir.join(checkpoint::LAST_FILE), &header, tensors)?;
        let json = serde_json::to_string_pretty(&header)
            .map_err(|e| Error::Invalid(format!("cannot serialise the checkpoint header: {e}")))?;
        crate::files::write_atomically(&dir.join("last.json"), json.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::read_dataset;

    /// A ConvSent topic trains on all its opinion sentences after `question </s>`: those of the
    /// sentiment its prompt asks for wanted, the others unwanted; its locality is the next topic's
    /// sentences; only the questions of the edit side are wrapped.
    #[test]
    fn a_convsent_topic_becomes_wanted_and_unwanted_answers() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/data/knowedit_convsent_test.json");
        let raw: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let ds = read_dataset(&path, None).unwrap();
        let sentences = |record: &serde_json::Value, key: &str| -> Vec<String> {
            record[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().trim().to_string())
                .collect()
        };
        for (i, request) in ds.cases.iter().take(4).map(|(_, r)| r).enumerate() {
            let pair = TrainingPair::from_request(request, &|p: &str| format!("[I] {p}")).unwrap();
            let wants_positive = request.prompt.ends_with(" postively.");
            let (pos, neg) = (sentences(&raw[i], "pos"), sentences(&raw[i], "neg"));
            assert_eq!(pair.answers.len(), pos.len() + neg.len());
            for a in &pair.answers {
                assert!(
                    a.prompt.starts_with("[I] ") && a.prompt.ends_with(" </s>"),
                    "{a:?}"
                );
                let positive = pos.contains(&a.answer);
                assert!(positive || neg.contains(&a.answer), "{a:?}");
                assert_eq!(a.wanted, positive == wants_positive, "{a:?}");
            }
            let (next_pos, next_neg) =
                (sentences(&raw[i + 1], "pos"), sentences(&raw[i + 1], "neg"));
            assert_eq!(pair.locality.len(), next_pos.len() + next_neg.len());
            for (q, a) in &pair.locality {
                assert!(!q.contains("[I]") && q.ends_with(" </s>"), "{q}");
                assert!(next_pos.contains(a) || next_neg.contains(a), "{a}");
            }
            assert_eq!(pair.edit.prompt, format!("[I] {}", request.prompt));
        }
    }

    /// Thinning keeps n sentences of each kind, a subset in file order that depends on the seed
    /// and the record only; a fact's pair (one answer, one locality prompt) is left as it was.
    #[test]
    fn thinning_keeps_n_of_each_kind_in_order_and_the_same_for_the_same_record() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data");
        let convsent = read_dataset(&dir.join("knowedit_convsent_test.json"), None).unwrap();
        let pairs: Vec<TrainingPair> = convsent
            .cases
            .iter()
            .take(3)
            .map(|(_, r)| TrainingPair::from_request(r, &|p: &str| p.to_string()).unwrap())
            .collect();
        let is_subsequence = |small: &[String], big: &[String]| {
            let mut rest = big.iter();
            small.iter().all(|x| rest.any(|y| y == x))
        };
        let texts = |p: &TrainingPair, wanted: bool| -> Vec<String> {
            p.answers
                .iter()
                .filter(|a| a.wanted == wanted)
                .map(|a| a.answer.clone())
                .collect()
        };
        let mut draws_differ = false;
        for pair in &pairs {
            let thin = pair.clone().thinned(3, 42);
            for wanted in [true, false] {
                let (all, kept) = (texts(pair, wanted), texts(&thin, wanted));
                assert_eq!(kept.len(), all.len().min(3));
                assert!(
                    is_subsequence(&kept, &all),
                    "{kept:?} not in order in {all:?}"
                );
            }
            let locality = |p: &TrainingPair| -> Vec<String> {
                p.locality.iter().map(|(q, a)| format!("{q}|{a}")).collect()
            };
            assert_eq!(thin.locality.len(), 3);
            assert!(is_subsequence(&locality(&thin), &locality(pair)));
            let again = pair.clone().thinned(3, 42);
            assert_eq!(again.answers, thin.answers);
            assert_eq!(again.locality, thin.locality);
            draws_differ |= pair.clone().thinned(3, 7).answers != thin.answers;
        }
        assert!(draws_differ, "the seed changes no draw");

        let facts = read_dataset(&dir.join("knowedit_wiki_counterfact_train.json"), None).unwrap();
        let fact = facts
            .cases
            .iter()
            .find_map(|(_, r)| TrainingPair::from_request(r, &|p: &str| p.to_string()).ok())
            .unwrap();
        let thin = fact.clone().thinned(1, 42);
        assert_eq!((thin.answers, thin.locality), (fact.answers, fact.locality));
    }
}
