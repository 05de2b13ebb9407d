//! Properties the editors rely on: batching changes no numbers, hooks cost nothing when empty,
//! weight replacement undoes exactly, and layer indices are checked.

mod common;

use std::sync::OnceLock;

use candle_core::{DType, IndexOp, Tensor};
use common::*;
use kedit::model::{HookSpec, Intervention, Model, Module, Site, TokenBatch, WeightId};

fn smol() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(smollm2)
}

const PROMPTS: [&str; 4] = [
    "The capital of France is",
    "The mother tongue of Danielle Darrieux is",
    "Hi",
    "The Eiffel Tower is located in the city of Paris, which is the capital of",
];

fn batch_matches_single_runs(model: &Model) {
    let seqs: Vec<Vec<u32>> = PROMPTS.iter().map(|p| model.encode(p).unwrap()).collect();
    let batch = TokenBatch::new(&seqs, 0, model.device()).unwrap();
    let batched = model.forward(&batch, &HookSpec::new()).unwrap().logits;
    for (row, ids) in seqs.iter().enumerate() {
        let alone = logits_alone(model, ids);
        let in_batch = batched.i(row).unwrap().narrow(0, 0, ids.len()).unwrap();
        // Positions are the same alone and in a batch; what remains is float rounding from
        // different matrix shapes, far below anything that moves an argmax.
        let diff = max_abs_diff(&in_batch, &alone);
        assert!(
            diff < 1e-3,
            "row {row} ({:?}) differs by {diff} in a batch",
            PROMPTS[row]
        );
        let argmax = |t: &Tensor| {
            t.argmax(candle_core::D::Minus1)
                .unwrap()
                .to_vec1::<u32>()
                .unwrap()
        };
        assert_eq!(
            argmax(&in_batch),
            argmax(&alone),
            "row {row}: an argmax moved in a batch"
        );
    }
}

#[test]
fn batching_changes_no_sequence_gpt2() {
    batch_matches_single_runs(&tiny_gpt2());
}

#[test]
fn batching_changes_no_sequence_llama() {
    batch_matches_single_runs(smol());
}

#[test]
fn empty_hooks_and_captures_leave_logits_bit_identical() {
    for model in [&tiny_gpt2(), smol()] {
        let ids = model.encode(PROMPTS[1]).unwrap();
        let batch = TokenBatch::new(&[ids], 0, model.device()).unwrap();
        let plain = model.forward(&batch, &HookSpec::new()).unwrap().logits;
        let mut spec = HookSpec::new()
            .capture(Site::Embed)
            .capture(Site::FinalNorm);
        for l in 0..model.spec().n_layers {
            for site in [
                Site::ResidPre(l),
                Site::AttnOut(l),
                Site::MlpIn(l),
                Site::MlpAct(l),
                Site::MlpOut(l),
                Site::ResidPost(l),
            ] {
                spec = spec.capture(site);
            }
        }
        let out = model.forward(&batch, &spec).unwrap();
        assert_eq!(out.captures.len(), 2 + 6 * model.spec().n_layers);
        assert_eq!(max_abs_diff(&plain, &out.logits), 0.0);
    }
}

#[test]
fn replace_weight_then_restore_is_bit_identical() {
    let mut model = tiny_gpt2();
    let ids = model.encode(PROMPTS[0]).unwrap();
    let before = logits_alone(&model, &ids);
    let id = WeightId::layer(1, Module::MlpDown);
    let w = model.weight(id).unwrap();
    assert_eq!(w.dims(), [32, 128], "weights are [out, in]");
    let noise = Tensor::randn(0f32, 1.0, w.dims(), w.device()).unwrap();
    let old = model.replace_weight(id, (&w + noise).unwrap()).unwrap();
    let edited = logits_alone(&model, &ids);
    assert!(
        max_abs_diff(&before, &edited) > 1e-3,
        "the replacement changed nothing"
    );
    model.replace_weight(id, old).unwrap();
    assert_eq!(max_abs_diff(&before, &logits_alone(&model, &ids)), 0.0);
}

#[test]
fn replace_weight_checks_shape_and_dtype() {
    let mut model = tiny_gpt2();
    let id = WeightId::layer(0, Module::MlpDown);
    let wrong_shape = Tensor::zeros((128, 32), DType::F32, model.device()).unwrap();
    assert!(model.replace_weight(id, wrong_shape).is_err());
    let wrong_dtype = Tensor::zeros((32, 128), DType::F64, model.device()).unwrap();
    assert!(model.replace_weight(id, wrong_dtype).is_err());
    let missing = WeightId::layer(0, Module::MlpGate);
    assert!(
        model.weight(missing).is_err(),
        "GPT-2 has no gate projection"
    );
}

#[test]
fn hooks_at_missing_layers_are_rejected() {
    let model = tiny_gpt2();
    let batch = TokenBatch::new(&[vec![1, 2, 3]], 0, model.device()).unwrap();
    let err = model
        .forward(&batch, &HookSpec::new().capture(Site::MlpAct(2)))
        .unwrap_err()
        .to_string();
    assert!(err.contains("layer 2 is out of range"), "{err}");
}

#[test]
fn add_at_changes_only_later_positions_of_its_row() {
    let model = tiny_gpt2();
    let seqs = vec![
        model.encode(PROMPTS[0]).unwrap(),
        model.encode(PROMPTS[1]).unwrap(),
    ];
    let batch = TokenBatch::new(&seqs, 0, model.device()).unwrap();
    let plain = model.forward(&batch, &HookSpec::new()).unwrap().logits;
    // Not a constant vector: LayerNorm would subtract a constant shift away.
    let delta = Tensor::arange(0f32, 32., model.device()).unwrap();
    let spec = HookSpec::new().intervene(
        Site::MlpOut(0),
        Intervention::AddAt {
            rows: vec![(1, 2)],
            delta,
        },
    );
    let hooked = model.forward(&batch, &spec).unwrap().logits;
    assert_eq!(
        max_abs_diff(&plain.i(0).unwrap(), &hooked.i(0).unwrap()),
        0.0,
        "other row changed"
    );
    let before = |t: &Tensor| t.i((1, 0..2)).unwrap();
    assert_eq!(
        max_abs_diff(&before(&plain), &before(&hooked)),
        0.0,
        "earlier positions changed"
    );
    assert!(max_abs_diff(&plain.i((1, 2)).unwrap(), &hooked.i((1, 2)).unwrap()) > 1e-3);
}

#[test]
fn kv_cached_generation_agrees_with_full_forward() {
    let model = smol();
    let ids = model.encode(PROMPTS[1]).unwrap();
    let gen = model
        .generate_ids(&ids, 6, kedit::model::Sampling::Greedy)
        .unwrap();
    let mut all = ids.clone();
    all.extend(&gen.generated_ids[..5]);
    let argmax = model.argmax_all(&all).unwrap();
    assert_eq!(argmax[ids.len() - 1..], gen.generated_ids[..6]);
}

/// Adds a fixed vector at every position: the same as an `Add` intervention, so the two can be compared.
struct ShiftOverlay(Tensor);

impl kedit::model::Overlay for ShiftOverlay {
    fn forward(
        &self,
        input: &kedit::model::OverlayInput<'_>,
        output: &Tensor,
    ) -> candle_core::Result<Tensor> {
        assert!(
            input.mlp_act.is_some(),
            "an MlpOut overlay sees the down-projection input"
        );
        output.broadcast_add(&self.0)
    }

    fn kind(&self) -> &'static str {
        "test_shift"
    }

    fn parts(&self) -> kedit::Result<kedit::model::OverlayParts> {
        Ok(kedit::model::OverlayParts {
            header: serde_json::Value::Null,
            tensors: vec![("shift".into(), self.0.clone())],
        })
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[test]
fn overlay_acts_like_an_add_and_removing_it_restores_the_model() {
    let mut model = tiny_gpt2();
    let ids = model.encode(PROMPTS[0]).unwrap();
    let batch = TokenBatch::new(std::slice::from_ref(&ids), 0, model.device()).unwrap();
    let plain = logits_alone(&model, &ids);
    let shift = Tensor::arange(0f32, 32., model.device())
        .unwrap()
        .affine(0.1, -1.0)
        .unwrap();
    let spec = HookSpec::new().intervene(Site::MlpOut(1), Intervention::Add(shift.clone()));
    let with_hook = model
        .forward(&batch, &spec)
        .unwrap()
        .logits
        .squeeze(0)
        .unwrap();

    let site = Site::MlpOut(1);
    assert!(model
        .set_overlay(site, Some(std::sync::Arc::new(ShiftOverlay(shift))))
        .unwrap()
        .is_none());
    assert!(model.overlay(site).is_some());
    let with_overlay = logits_alone(&model, &ids);
    assert!(
        max_abs_diff(&plain, &with_overlay) > 1e-3,
        "the overlay changed nothing"
    );
    assert_eq!(max_abs_diff(&with_hook, &with_overlay), 0.0);

    assert!(
        model.set_overlay(site, None).unwrap().is_some(),
        "removal returns the overlay"
    );
    assert_eq!(max_abs_diff(&plain, &logits_alone(&model, &ids)), 0.0);
    assert!(
        model.set_overlay(Site::Embed, None).is_err(),
        "no overlay slot at the embeddings"
    );
    assert!(
        model.set_overlay(Site::MlpOut(2), None).is_err(),
        "layer out of range"
    );
}

#[test]
fn resuming_from_a_captured_residual_gives_the_same_logits() {
    use kedit::model::{HookSpec, Site, TokenBatch};
    for model in [tiny_gpt2(), smollm2()] {
        let seqs = vec![
            model.encode("The Eiffel Tower is in the city of").unwrap(),
            model.encode("Lobsters are").unwrap(),
        ];
        let batch = TokenBatch::new(&seqs, 0, model.device()).unwrap();
        let full = model.forward(&batch, &HookSpec::new()).unwrap().logits;
        let layer = 1;
        let resid = model
            .forward(
                &batch,
                &HookSpec::new()
                    .capture(Site::ResidPost(layer))
                    .stop_after(layer),
            )
            .unwrap()
            .capture(Site::ResidPost(layer))
            .unwrap()
            .clone();
        let resumed = model
            .forward(&batch, &HookSpec::new().resume_after(layer, resid))
            .unwrap()
            .logits;
        assert_eq!(max_abs_diff(&full, &resumed), 0.0);
    }
}

/// Each prompt split at a different point (one with nothing before it): continuing a prefix cache
/// must give the numbers, and the gradient of an addition at the split, of running the whole rows.
#[test]
fn continuing_per_row_prefixes_matches_full_rows_and_their_gradient() {
    use candle_core::Var;
    for model in [tiny_gpt2(), smollm2()] {
        let seqs: Vec<Vec<u32>> = PROMPTS.iter().map(|p| model.encode(p).unwrap()).collect();
        let splits = [3, 5, 0, 9];
        let (prefixes, suffixes): (Vec<_>, Vec<_>) = seqs
            .iter()
            .zip(splits)
            .map(|(s, at)| (s[..at].to_vec(), s[at..].to_vec()))
            .unzip();
        let d = model.spec().d_model;
        let delta = Var::from_tensor(
            &Tensor::arange(0f32, d as f32, model.device())
                .unwrap()
                .affine(1e-2, -0.1)
                .unwrap(),
        )
        .unwrap();
        let site = Site::MlpOut(1);
        let run = |batch: &TokenBatch, at: &[usize], continuing: bool| {
            let hooks = HookSpec::new().intervene(
                site,
                Intervention::AddAt {
                    rows: at.iter().copied().enumerate().collect(),
                    delta: delta.as_tensor().clone(),
                },
            );
            // Every real token of every row from the split on, in row order.
            let positions: Vec<(usize, usize)> = suffixes
                .iter()
                .enumerate()
                .flat_map(|(r, s)| (0..s.len()).map(move |j| (r, j)))
                .map(|(r, j)| (r, if continuing { j } else { splits[r] + j }))
                .collect();
            let logits = if continuing {
                let past = model
                    .prefix_cache(
                        &TokenBatch::allowing_empty_rows(&prefixes, 0, model.device()).unwrap(),
                    )
                    .unwrap();
                model
                    .forward_continuing(&past, batch, &hooks, Some(&positions))
                    .unwrap()
                    .logits
            } else {
                model.forward_at(batch, &hooks, &positions).unwrap().logits
            };
            let loss = Model::log_probs(&logits)
                .unwrap()
                .max_keepdim(1)
                .unwrap()
                .sum_all()
                .unwrap();
            let grad = loss.backward().unwrap();
            (logits, grad.get(delta.as_tensor()).unwrap().clone())
        };
        let full = TokenBatch::new(&seqs, 0, model.device()).unwrap();
        let (full_logits, full_grad) = run(&full, &splits, false);
        let tail = TokenBatch::new(&suffixes, 0, model.device()).unwrap();
        let (tail_logits, tail_grad) = run(&tail, &[0; 4], true);
        let diff = max_abs_diff(&full_logits, &tail_logits);
        assert!(diff < 1e-3, "logits differ by {diff}");
        let scale = max_abs_diff(&full_grad, &full_grad.zeros_like().unwrap());
        let diff = max_abs_diff(&full_grad, &tail_grad);
        assert!(
            scale > 1e-6 && diff < 1e-3 * scale,
            "gradients differ by {diff} (scale {scale})"
        );
    }
}

#[test]
fn batched_sampling_gives_each_row_what_it_samples_alone() {
    use kedit::model::Sampling;
    let model = smol();
    let prompts: Vec<Vec<u32>> = ["The", "Because", "You"]
        .iter()
        .map(|w| model.encode(w).unwrap())
        .collect();
    assert!(prompts.iter().all(|p| p.len() == prompts[0].len()));
    let samplings = [
        Sampling::TopK { k: 5, seed: 7 },
        Sampling::Greedy,
        Sampling::TopK { k: 5, seed: 8 },
    ];
    let batched = model.generate_batch_ids(&prompts, 6, &samplings).unwrap();
    for ((prompt, sampling), got) in prompts.iter().zip(samplings).zip(&batched) {
        let alone = model
            .generate_ids_until(prompt, 6, sampling, false)
            .unwrap()
            .generated_ids;
        assert_eq!(got, &alone, "{sampling:?}");
    }
    // Different seeds must draw different texts, or the rows are not independent.
    assert_ne!(batched[0], batched[2]);
}

/// `x Wᵀ + b` of `x` `[1, s, d_in]` for weight `[d_out, d_in]`, by hand.
fn linear_by_hand(x: &Tensor, w: &Tensor, b: Option<Tensor>) -> Tensor {
    let y = x.squeeze(0).unwrap().matmul(&w.t().unwrap()).unwrap();
    match b {
        Some(b) => y.broadcast_add(&b).unwrap(),
        None => y,
    }
}

fn mlp_projection_sites_hold_the_projections_outputs(model: &Model, gated: bool) {
    let l = 1;
    let ids = model.encode(PROMPTS[1]).unwrap();
    let batch = TokenBatch::new(std::slice::from_ref(&ids), 0, model.device()).unwrap();
    let mut spec = HookSpec::new()
        .capture(Site::MlpIn(l))
        .capture(Site::MlpUpOut(l))
        .capture(Site::MlpAct(l));
    if gated {
        spec = spec.capture(Site::MlpGateOut(l));
    }
    let out = model.forward(&batch, &spec).unwrap();
    let x = out.capture(Site::MlpIn(l)).unwrap();
    let up = WeightId::layer(l, Module::MlpUp);
    let bias = model.weight(up.bias()).ok();
    let want_up = linear_by_hand(x, &model.weight(up).unwrap(), bias);
    let got_up = out.capture(Site::MlpUpOut(l)).unwrap().squeeze(0).unwrap();
    assert!(max_abs_diff(&want_up, &got_up) < 1e-4);
    let act = out.capture(Site::MlpAct(l)).unwrap().squeeze(0).unwrap();
    let want_act = if gated {
        let gate = linear_by_hand(
            x,
            &model.weight(WeightId::layer(l, Module::MlpGate)).unwrap(),
            None,
        );
        let got_gate = out
            .capture(Site::MlpGateOut(l))
            .unwrap()
            .squeeze(0)
            .unwrap();
        assert!(max_abs_diff(&gate, &got_gate) < 1e-4);
        // SiLU by hand: g · σ(g).
        let sigmoid = (gate.neg().unwrap().exp().unwrap() + 1.0)
            .unwrap()
            .recip()
            .unwrap();
        ((&gate * sigmoid).unwrap() * &want_up).unwrap()
    } else {
        want_up.gelu().unwrap()
    };
    assert!(max_abs_diff(&want_act, &act) < 1e-4);

    // An intervention at the up projection's output reaches the activation.
    let shifted = model
        .forward(
            &batch,
            &HookSpec::new().capture(Site::MlpAct(l)).intervene(
                Site::MlpUpOut(l),
                Intervention::Add(Tensor::new(0.5f32, model.device()).unwrap()),
            ),
        )
        .unwrap();
    let moved = shifted
        .capture(Site::MlpAct(l))
        .unwrap()
        .squeeze(0)
        .unwrap();
    assert!(max_abs_diff(&moved, &act) > 1e-2);
}

#[test]
fn mlp_up_and_gate_sites_hold_the_projections_outputs() {
    mlp_projection_sites_hold_the_projections_outputs(&tiny_gpt2(), false);
    mlp_projection_sites_hold_the_projections_outputs(smol(), true);
    let model = tiny_gpt2();
    let batch = TokenBatch::new(&[vec![1, 2]], 0, model.device()).unwrap();
    let err = model
        .forward(&batch, &HookSpec::new().capture(Site::MlpGateOut(0)))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mlp_gate_out.0") && err.contains("no gate"),
        "{err}"
    );
}

/// A low-rank change acts as the merged weight `W + L·R` (on an MLP matrix with a bias, GPT-2's
/// up projection, and LLaMA's gate before its SiLU), and taking it back leaves the logits bit
/// for bit as before; factors of the wrong shape are refused.
#[test]
fn a_low_rank_change_acts_as_the_merged_weight_and_leaves_no_trace() {
    for (mut model, module) in [(tiny_gpt2(), Module::MlpUp), (smollm2(), Module::MlpGate)] {
        let ids = model.encode("The capital of France is").unwrap();
        let before = logits_alone(&model, &ids);
        let id = WeightId::layer(1, module);
        let (out, inp) = model.weight(id).unwrap().dims2().unwrap();
        let on = model.device().clone();
        let left = (Tensor::randn(0f32, 1.0, (out, 3), &on).unwrap() * 0.05).unwrap();
        let right = (Tensor::randn(0f32, 1.0, (3, inp), &on).unwrap() * 0.05).unwrap();
        let change = kedit::model::LowRankChange {
            left: left.clone(),
            right: right.clone(),
        };
        model.set_low_rank_change(id, Some(change)).unwrap();
        let factored = logits_alone(&model, &ids);
        model.set_low_rank_change(id, None).unwrap();
        assert_eq!(
            logits_alone(&model, &ids).to_vec2::<f32>().unwrap(),
            before.to_vec2::<f32>().unwrap()
        );
        let w = model.weight(id).unwrap();
        let merged = (&w + left.matmul(&right).unwrap()).unwrap();
        model.replace_weight(id, merged).unwrap();
        let dense = logits_alone(&model, &ids);
        model.replace_weight(id, w).unwrap();
        assert!(
            max_abs_diff(&dense, &before) > 1e-3,
            "the change moved nothing"
        );
        let gap = max_abs_diff(&factored, &dense);
        assert!(gap < 1e-4, "factored and merged logits differ by {gap}");
        let wrong = kedit::model::LowRankChange {
            left: right.t().unwrap(),
            right: left.t().unwrap(),
        };
        assert!(model.set_low_rank_change(id, Some(wrong)).is_err() || out == inp);
    }
}
