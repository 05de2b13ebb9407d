//! MEND's mechanics on the real SmolLM2: the gradient factors multiply back to the weight's
//! gradient (autograd on the weight itself), the training loss differentiates through the edited
//! weights into the editor (central finite differences in f64), and a short training run lowers
//! the validation loss on held-out training records.

mod common;

use candle_core::{DType, Tensor, Var};
use common::*;
use kedit::editors::hypernet::mend::{Mend, MendParams, MendTrainee};
use kedit::editors::hypernet::{gradient_factors, AnswerBatch};
use kedit::model::{HookSpec, Module, WeightId};
use kedit::run::train::{train, Outcome, Schedule, Silent};

/// A MEND configuration on SmolLM2's last layers, small enough for a test.
fn params(inner: &[&str], rank: usize, lr: f64) -> MendParams {
    let yaml = format!(
        "alg_name: MEND\ninner_params: [{}]\nlr: {lr}\nedit_lr: 1e-4\nlr_lr: 1e-4\nseed: 42\n\
         cedit: 0.1\ncloc: 1.0\ncbase: 1.0\nn_hidden: 1\ninit: id\nnorm: true\ncombine: true\n\
         rank: {rank}\nmlp_class: IDMLP\nshared: true\nbatch_size: 1\nval_batch_size: 4\n\
         accumulate_bs: 2\ngrad_clip: 100.\n",
        inner.join(", ")
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mend.yaml");
    std::fs::write(&path, yaml).unwrap();
    MendParams::from_yaml(&path).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// `Σₙ δₙ xₙᵀ` over the factor rows equals the gradient autograd gives the weight as a variable,
/// for each kind of MLP matrix, at two layers at once.
#[test]
fn gradient_factors_multiply_back_to_the_weight_gradient() {
    let mut model = smollm2();
    let batch = AnswerBatch::new(
        &model,
        &[
            ("The mother tongue of Danielle Darrieux is", "English"),
            ("What is the twin city of Houston? It is", "Aberdeen"),
        ],
    )
    .unwrap();
    let ids = [
        WeightId::layer(27, Module::MlpGate),
        WeightId::layer(27, Module::MlpUp),
        WeightId::layer(27, Module::MlpDown),
        WeightId::layer(29, Module::MlpDown),
    ];
    let pass = gradient_factors(&model, &batch, &ids, None).unwrap();

    let vars: Vec<Var> = ids
        .iter()
        .map(|&id| Var::from_tensor(&model.weight(id).unwrap()).unwrap())
        .collect();
    let originals: Vec<Tensor> = ids
        .iter()
        .zip(&vars)
        .map(|(&id, v)| model.replace_weight(id, v.as_tensor().clone()).unwrap())
        .collect();
    let log_probs = batch.log_probs(&model, &HookSpec::new()).unwrap();
    let (nll, _) = batch.nll_and_accuracy(&log_probs).unwrap();
    assert!((scalar(&nll) - pass.nll).abs() < 1e-5);
    let grads = nll.backward().unwrap();
    for ((id, var), factors) in ids.iter().zip(&vars).zip(&pass.factors) {
        let want = grads
            .get(var.as_tensor())
            .expect("the weight has a gradient");
        let got = factors.delta.t().unwrap().matmul(&factors.x).unwrap();
        let gap = relative_gap(&got, want);
        assert!(gap < 1e-4, "{id}: factors vs autograd, relative gap {gap}");
        // Padding rows carry no gradient and are dropped: fewer rows than the padded batch.
        let (b, s) = batch.batch.ids.dims2().unwrap();
        assert!(factors.x.dim(0).unwrap() < b * s, "{id}: no row dropped");
    }
    for (&id, w) in ids.iter().zip(originals) {
        model.replace_weight(id, w).unwrap();
    }
}

/// The outer loss's gradient with respect to a step size and to a bias entry of the editor
/// network, against central finite differences of the same loss, in f64.
#[test]
fn the_training_loss_differentiates_through_the_edited_weights() {
    let mut model = load_as(&smollm2_path(), DType::F64);
    let p = params(
        &[
            "model.layers.29.mlp.up_proj.weight",
            "model.layers.29.mlp.down_proj.weight",
        ],
        8,
        1e-4,
    );
    let mend = Mend::new(&model, p).unwrap();
    let records = zsre_pairs(0..3);
    let mut trainee =
        MendTrainee::new(mend, &mut model, records.clone(), records[..1].to_vec()).unwrap();
    // Moments from the first edits (training mode), then fixed for the comparison.
    trainee.loss(&records[1..3], true).unwrap();
    // Move U off zero so the network's own path matters too, and no pre-activation sits at the
    // clamp's kink (where autograd takes torch's one-sided slope and a central difference half).
    for net in trainee.editor.nets.values() {
        for layer in &net.layers {
            let noise = layer.u.as_tensor().randn_like(0.0, 1e-2).unwrap();
            layer.u.set(&noise).unwrap();
        }
    }
    let probe = records[..1].to_vec();
    let (loss, _) = trainee.loss(&probe, false).unwrap();
    let grads = loss.backward().unwrap();

    let net = trainee.editor.nets.values().next().unwrap();
    let bias = net.layers[1].bias.clone();
    let edit_lrs = trainee.editor.edit_lrs.clone();
    for (var, index, what) in [(edit_lrs, 1, "edit_lrs[1]"), (bias, 5, "bias[5]")] {
        let analytic: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{what} has no gradient"))
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = var.as_tensor().to_vec1().unwrap();
        let h = if base[index] == 0.0 {
            1e-4
        } else {
            base[index].abs() * 1e-3
        };
        let mut at = |shift: f64| {
            let mut v = base.clone();
            v[index] += shift;
            var.set(&Tensor::new(v.as_slice(), var.as_tensor().device()).unwrap())
                .unwrap();
            let (l, _) = trainee.loss(&probe, false).unwrap();
            scalar(&l)
        };
        let numeric = (at(h) - at(-h)) / (2.0 * h);
        var.set(&Tensor::new(base.as_slice(), var.as_tensor().device()).unwrap())
            .unwrap();
        let a = analytic[index];
        let scale = a.abs().max(numeric.abs()).max(1e-9);
        assert!(
            (a - numeric).abs() / scale < 1e-4,
            "{what}: autograd {a:e} vs finite difference {numeric:e}"
        );
    }
}

/// Thirty updates on training records lower the loss on held-out ones, and the validation
/// metrics carry EasyEdit's names.
#[test]
fn training_lowers_the_validation_loss() {
    let mut model = smollm2();
    let p = params(
        &[
            "model.layers.28.mlp.down_proj.weight",
            "model.layers.29.mlp.gate_proj.weight",
            "model.layers.29.mlp.up_proj.weight",
            "model.layers.29.mlp.down_proj.weight",
        ],
        64,
        // Adam moves every parameter by about lr per update, the step sizes η (1e-4) included: at
        // 1e-3 they grow tenfold in one update and the edits wreck the model.
        1e-4,
    );
    let mend = Mend::new(&model, p).unwrap();
    let mut trainee =
        MendTrainee::new(mend, &mut model, zsre_pairs(0..60), zsre_pairs(60..68)).unwrap();
    let mut schedule = Schedule {
        max_steps: 30,
        accumulate: 2,
        val_interval: 30,
        max_time: None,
        early_stopping: None,
        interrupt: None,
    };
    // The networks normalise by moments of the factors they have seen: let them see a few
    // training edits (no update), then validate before training.
    use kedit::run::train::Trainee;
    trainee.loss(&zsre_pairs(0..4), true).unwrap();
    let before = trainee.validate().unwrap();
    let outcome = train(&mut trainee, &mut schedule, Outcome::default(), &mut Silent).unwrap();
    let after = &outcome.history.last().unwrap().1;
    for key in [
        "loss/edit_val",
        "loss/loc_val",
        "loss/total_edit_val",
        "edit/acc_val",
    ] {
        assert!(after.contains_key(key), "no {key} in {after:?}");
    }
    assert!(
        after["loss/total_edit_val"] < 0.8 * before["loss/total_edit_val"],
        "validation loss {} → {}",
        before["loss/total_edit_val"],
        after["loss/total_edit_val"]
    );
}

/// A run stopped after two updates and resumed from its checkpoint ends with the same bits as one
/// that ran four updates straight, and a trained editor loads back for editing.
#[test]
fn a_resumed_run_equals_an_uninterrupted_one() {
    use kedit::editors::hypernet::checkpoint::{self, BEST_FILE, LAST_FILE};
    let inner = [
        "model.layers.29.mlp.up_proj.weight",
        "model.layers.29.mlp.down_proj.weight",
    ];
    let run = |dir: &std::path::Path, max_steps: usize, resume: bool| {
        let mut model = smollm2();
        let mend = Mend::new(&model, params(&inner, 8, 1e-3)).unwrap();
        let mut trainee =
            MendTrainee::new(mend, &mut model, zsre_pairs(0..12), zsre_pairs(12..14)).unwrap();
        trainee.checkpoint_into(dir).unwrap();
        let mut schedule = Schedule {
            max_steps,
            accumulate: 2,
            val_interval: 2,
            max_time: None,
            early_stopping: None,
            interrupt: None,
        };
        let start = if resume {
            trainee.resume(dir).unwrap().0
        } else {
            Outcome::default()
        };
        train(&mut trainee, &mut schedule, start, &mut Silent).unwrap()
    };
    let straight = tempfile::tempdir().unwrap();
    let stopped = tempfile::tempdir().unwrap();
    let a = run(straight.path(), 4, false);
    run(stopped.path(), 2, false);
    let b = run(stopped.path(), 4, true);
    assert_eq!(a.steps, 4);
    assert_eq!(b.steps, 4);
    assert_eq!(
        a.history.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        b.history.iter().map(|(s, _)| *s).collect::<Vec<_>>()
    );
    let (ha, ta) = checkpoint::read(&straight.path().join(LAST_FILE), "MEND").unwrap();
    let (hb, tb) = checkpoint::read(&stopped.path().join(LAST_FILE), "MEND").unwrap();
    assert_eq!(ha.adam_step, 4);
    assert_eq!(hb.adam_step, 4);
    assert_eq!(ha.cursor, hb.cursor);
    assert_eq!(ta.len(), tb.len());
    for (name, t) in &ta {
        let diff = max_abs_diff(t, &tb[name]);
        assert_eq!(diff, 0.0, "{name} differs by {diff}");
    }
    // The history's metrics are the same numbers too.
    assert_eq!(a.history, b.history);

    // The best editor loads for editing and changes exactly the edited weights.
    let mut model = smollm2();
    let mut mend: Mend = checkpoint::load(&model, &straight.path().join(BEST_FILE)).unwrap();
    let request = kedit::data::EditRequest {
        prompt: "The mother tongue of Danielle Darrieux is".into(),
        target_new: "English".into(),
        ..Default::default()
    };
    let edit = kedit::editors::hypernet::apply_trained(&mut mend, &mut model, &[request]).unwrap();
    let changed: Vec<String> = edit.weight_changes().map(|w| w.id.to_string()).collect();
    assert_eq!(changed, ["29.mlp_up", "29.mlp_down"]);
}

/// Running only the layers above the first edited one, from the residual a full pass kept, gives
/// the full pass's log-probabilities (padded batch, label positions only).
#[test]
fn resuming_above_a_layer_equals_a_full_forward() {
    let model = smollm2();
    let batch = AnswerBatch::new(
        &model,
        &[
            ("The mother tongue of Danielle Darrieux is", "English"),
            ("What is the twin city of Houston? It is", "Aberdeen"),
        ],
    )
    .unwrap();
    let full = batch.log_probs(&model, &HookSpec::new()).unwrap();
    let pass = gradient_factors(
        &model,
        &batch,
        &[WeightId::layer(27, Module::MlpUp)],
        Some(26),
    )
    .unwrap();
    let (layer, resid) = pass.resid.unwrap();
    let resumed = batch
        .log_probs(&model, &HookSpec::new().resume_after(layer, resid))
        .unwrap();
    let gap = max_abs_diff(&full, &resumed);
    assert!(gap <= 1e-6, "resumed log-probs differ by {gap}");
}

/// EasyEdit's LLaMA labels, behind `label_bos`: with a tokenizer that adds BOS, the answer
/// tokenised alone starts with BOS, and EasyEdit right-aligns those labels against the logits
/// with the last one dropped, so BOS is scored where the prompt's last token is predicted. Here
/// SmolLM2's tokenizer is made to add BOS (`<|im_start|>`, its config's bos_token_id 1), as
/// LLaMA-2's does.
#[test]
fn easyedit_bos_labels_are_right_aligned_as_easyedit_aligns_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut tokenizer: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2/tokenizer.json")).unwrap())
            .unwrap();
    tokenizer["post_processor"] = serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}}
    });
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, tokenizer.to_string()).unwrap();
    let opts = kedit::model::load::LoadOptions {
        tokenizer: Some(path),
        ..kedit::model::load::LoadOptions::default()
    };
    let model = kedit::model::load::load(smollm2_path().to_str().unwrap(), &opts).unwrap();
    let (prompt, answer) = ("The capital of France is", "Paris");
    let input = model
        .encode_with_special_tokens(&format!("{prompt} {answer}"))
        .unwrap();
    let alone = model.encode_with_special_tokens(answer).unwrap();
    assert_eq!(input[0], 1, "the tokenizer adds BOS");
    assert_eq!(alone[0], 1);

    // EasyEdit: labels = [BOS] + the answer's tokens in the input; logits 0..len-1 (the last
    // dropped); the labels take the last len(labels) of those positions.
    let n_prompt = model.encode_with_special_tokens(prompt).unwrap().len();
    let mut want_labels = vec![1u32];
    want_labels.extend(&input[n_prompt..]);
    let kept = input.len() - 1;
    let want_positions: Vec<(usize, usize)> =
        (kept - want_labels.len()..kept).map(|p| (0, p)).collect();

    let quirk = AnswerBatch::with_labels(&model, &[(prompt, answer)], true).unwrap();
    assert_eq!(quirk.labels, want_labels);
    assert_eq!(quirk.positions, want_positions);
    // By default the labels are the answer's tokens only.
    let plain = AnswerBatch::new(&model, &[(prompt, answer)]).unwrap();
    assert_eq!(plain.labels, &want_labels[1..]);
    assert_eq!(plain.positions, &want_positions[1..]);
}

/// With `outer_edit_loss` the edited model is scored on the rephrase (the MEND paper's
/// `edit_outer`): with every step size zero the edit changes nothing, and the loss is the base
/// model's NLL of the target after the rephrase.
#[test]
fn the_outer_edit_loss_scores_the_rephrase() {
    let mut model = smollm2();
    let mut p = params(&["model.layers.29.mlp.down_proj.weight"], 8, 1e-4);
    p.edit_lr = 0.0;
    p.outer_edit_loss = true;
    let records = zsre_pairs(0..1);
    let rephrase = records[0]
        .rephrase
        .clone()
        .expect("ZsRE records have a rephrase");
    assert_ne!(rephrase, records[0].edit.prompt);
    let target = records[0].edit.target.clone();
    let batch = AnswerBatch::new(&model, &[(rephrase.as_str(), target.as_str())]).unwrap();
    let (want, _) = batch
        .nll_and_accuracy(&batch.log_probs(&model, &HookSpec::new()).unwrap())
        .unwrap();
    let mend = Mend::new(&model, p).unwrap();
    let mut trainee = MendTrainee::new(mend, &mut model, records.clone(), records.clone()).unwrap();
    let (_, metrics) = trainee.loss(&records, true).unwrap();
    let got = metrics["loss/edit"];
    // An installed weight multiplies through candle's kernel rather than the loader's packed one:
    // the same values summed in another order (1e-5 relative here).
    assert!(
        (got - scalar(&want)).abs() < 1e-3,
        "{got} vs {}",
        scalar(&want)
    );
    assert!(
        (got - metrics["edit/nll_before"]).abs() > 0.1,
        "the edit prompt was scored"
    );
}

/// The same identity on GPT-2 (tiny, f64), whose MLP is Conv1D `c_fc`/`c_proj`: the factors
/// multiply back to autograd's gradient to f64 precision.
#[test]
fn gradient_factors_multiply_back_on_gpt2_in_f64() {
    let mut model = load_as(&fixture("tiny-gpt2"), DType::F64);
    let batch = AnswerBatch::new(
        &model,
        &[
            ("The mother tongue of Danielle Darrieux is", "English"),
            ("Houston is twinned with", "Aberdeen"),
        ],
    )
    .unwrap();
    let last = model.spec().n_layers - 1;
    let ids = [
        WeightId::layer(0, Module::MlpUp),
        WeightId::layer(0, Module::MlpDown),
        WeightId::layer(last, Module::MlpUp),
    ];
    let pass = gradient_factors(&model, &batch, &ids, None).unwrap();
    let vars: Vec<Var> = ids
        .iter()
        .map(|&id| Var::from_tensor(&model.weight(id).unwrap()).unwrap())
        .collect();
    for (&id, v) in ids.iter().zip(&vars) {
        model.replace_weight(id, v.as_tensor().clone()).unwrap();
    }
    let log_probs = batch.log_probs(&model, &HookSpec::new()).unwrap();
    let (nll, _) = batch.nll_and_accuracy(&log_probs).unwrap();
    let grads = nll.backward().unwrap();
    for ((id, var), factors) in ids.iter().zip(&vars).zip(&pass.factors) {
        let want = grads
            .get(var.as_tensor())
            .expect("the weight has a gradient");
        let got = factors.delta.t().unwrap().matmul(&factors.x).unwrap();
        let gap = relative_gap(&got, want);
        assert!(gap < 1e-10, "{id}: factors vs autograd, relative gap {gap}");
    }
}
