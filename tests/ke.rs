//! KE's training on the real SmolLM2: the outer loss differentiates through the edited weights
//! into the condition encoder and the conditioners (central finite differences in f64), and a
//! short training run lowers the loss on held-out records; the trained editor loads and edits.

mod common;

use candle_core::{DType, Tensor, Var};
use common::*;
use kedit::editors::hypernet::ke::{Ke, KeParams, KeTrainee};
use kedit::editors::hypernet::{Gradient, Hypernet};
use kedit::run::train::{train, Outcome, Schedule, Silent, Trainee};

/// A KE configuration on SmolLM2's last layer, with a small network.
fn params(inner: &[&str], width: usize, lr: f64) -> KeParams {
    let yaml = format!(
        "alg: KE\ninner_params: [{}]\nlr: {lr}\nedit_lr: 1e-2\nlr_lr: 1e-3\nseed: 42\n\
         cedit: 0.1\ncloc: 1.0\ncbase: 1.0\nhidden_dim: {width}\ncondition_dim: {width}\n\
         batch_size: 1\nval_batch_size: 4\naccumulate_bs: 2\ngrad_clip: 100.\n",
        inner.join(", ")
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ke.yaml");
    std::fs::write(&path, yaml).unwrap();
    KeParams::from_yaml(&path).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// The gradient of the outer loss with respect to an embedding row the condition reads, an LSTM
/// weight of each direction, the projection and both conditioner layers, against central finite
/// differences of the same loss, in f64.
#[test]
fn the_training_loss_differentiates_into_the_encoder_and_conditioners() {
    let mut model = load_as(&smollm2_path(), DType::F64);
    let inner = [
        "model.layers.29.mlp.up_proj.weight",
        "model.layers.29.mlp.down_proj.weight",
    ];
    let ke = Ke::new(&model, params(&inner, 8, 1e-3)).unwrap();
    let records = zsre_pairs(0..2);
    let condition = kedit::editors::hypernet::ke::condition_text(&records[0].edit);
    let token = model.encode_with_special_tokens(&condition).unwrap()[2] as usize;
    let mut trainee = KeTrainee::new(ke, &mut model, records.clone(), records.clone()).unwrap();
    // Grow the edit so the loss depends on the editor well above rounding: scale up the
    // conditioners' gains (the change is about a thousandth of a weight at initialisation).
    for c in &trainee.editor.conditioners {
        c.second
            .gain
            .set(&(c.second.gain.as_tensor() * 30.0).unwrap())
            .unwrap();
    }
    let probe = records[..1].to_vec();
    let (loss, _) = trainee.loss(&probe, false).unwrap();
    let grads = loss.backward().unwrap();
    let e = &trainee.editor;
    // As the trainer reads them: the embedding's as the gathered rows' gradient.
    let gradients: Vec<(Var, Option<Gradient>)> = e
        .vars()
        .into_iter()
        .zip(e.gradients(&grads).unwrap())
        .collect();
    let width = e.encoder.embedding.as_tensor().dim(1).unwrap();
    let checks: Vec<(Var, usize, &str)> = vec![
        (e.encoder.embedding.clone(), token * width + 3, "embedding"),
        (e.encoder.forward.w_hh.clone(), 5, "forward w_hh"),
        (e.encoder.backward.w_ih.clone(), 11, "backward w_ih"),
        (e.encoder.project.bias.clone(), 2, "projection bias"),
        (e.conditioners[0].first.gain.clone(), 1, "first gain"),
        (
            e.conditioners[1].second.direction.clone(),
            40,
            "second direction",
        ),
        (
            e.conditioners[1].second.bias.clone(),
            2 * (576 + 1536),
            "scale bias",
        ),
    ];
    for (var, index, what) in checks {
        let shape = var.as_tensor().dims().to_vec();
        let analytic: Vec<f64> = gradients
            .iter()
            .find(|(v, _)| v.as_tensor().id() == var.as_tensor().id())
            .and_then(|(_, g)| g.clone())
            .unwrap_or_else(|| panic!("{what} has no gradient"))
            .dense(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let h = base[index].abs().max(1e-2) * 1e-3;
        let mut at = |shift: f64| {
            let mut v = base.clone();
            v[index] += shift;
            let t = Tensor::from_vec(v, shape.as_slice(), var.as_tensor().device()).unwrap();
            var.set(&t).unwrap();
            let (l, _) = trainee.loss(&probe, false).unwrap();
            scalar(&l)
        };
        let numeric = (at(h) - at(-h)) / (2.0 * h);
        let t = Tensor::from_vec(base.clone(), shape.as_slice(), var.as_tensor().device()).unwrap();
        var.set(&t).unwrap();
        let a = analytic[index];
        let scale = a.abs().max(numeric.abs());
        assert!(scale > 1e-10, "{what}: no gradient to compare ({a:e})");
        assert!(
            (a - numeric).abs() / scale < 1e-4,
            "{what}: autograd {a:e} vs finite difference {numeric:e}"
        );
    }
}

/// Updates on training records lower the loss on held-out ones; the best editor, written as a
/// checkpoint, loads back and changes exactly the edited weights.
#[test]
fn training_lowers_the_validation_loss_and_the_editor_loads_back() {
    let inner = [
        "model.layers.29.mlp.up_proj.weight",
        "model.layers.29.mlp.down_proj.weight",
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut model = smollm2();
    let ke = Ke::new(&model, params(&inner, 32, 1e-3)).unwrap();
    let mut trainee =
        KeTrainee::new(ke, &mut model, zsre_pairs(0..60), zsre_pairs(60..68)).unwrap();
    trainee.checkpoint_into(dir.path()).unwrap();
    let before = trainee.validate().unwrap();
    let mut schedule = Schedule {
        max_steps: 30,
        accumulate: 2,
        val_interval: 30,
        max_time: None,
        early_stopping: None,
        interrupt: None,
    };
    let outcome = train(&mut trainee, &mut schedule, Outcome::default(), &mut Silent).unwrap();
    let after = &outcome.history.last().unwrap().1;
    // KE learns slowly (its edit starts at about a thousandth of a weight, and a larger lr trades
    // the edit for locality: at 3e-3 the edit NLL fell 5.26 → 4.90 but the total rose); at 1e-3
    // thirty updates lowered the held-out total 0.526 → 0.513.
    assert!(after["loss/edit_val"] < before["loss/edit_val"]);
    assert!(
        after["loss/total_edit_val"] < 0.99 * before["loss/total_edit_val"],
        "validation loss {} → {} ({before:?} → {after:?})",
        before["loss/total_edit_val"],
        after["loss/total_edit_val"]
    );

    use kedit::editors::hypernet::checkpoint::{self, BEST_FILE};
    let mut model = smollm2();
    let mut ke: Ke = checkpoint::load(&model, &dir.path().join(BEST_FILE)).unwrap();
    let request = kedit::data::EditRequest {
        prompt: "The mother tongue of Danielle Darrieux is".into(),
        target_new: "English".into(),
        ground_truth: Some("French".into()),
        ..Default::default()
    };
    let edit = kedit::editors::hypernet::apply_trained(&mut ke, &mut model, &[request]).unwrap();
    let changed: Vec<String> = edit.weight_changes().map(|w| w.id.to_string()).collect();
    assert_eq!(changed, ["29.mlp_up", "29.mlp_down"]);
    // A checkpoint of one method is refused by name as the other's.
    let err = checkpoint::load::<kedit::editors::hypernet::mend::Mend>(
        &model,
        &dir.path().join(BEST_FILE),
    )
    .err()
    .expect("a KE checkpoint is not a MEND editor")
    .to_string();
    assert!(err.contains("trained as KE"), "{err}");
}
