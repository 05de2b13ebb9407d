//! CaliNet on SmolLM2: calibration neurons make the target the argmax and leave unrelated
//! prompts' argmax and the base weights alone; later calls add neurons and freeze the earlier
//! ones; the neurons save and reload bit for bit; their gradient matches finite differences.

mod common;

use std::sync::Arc;

use candle_core::{DType, Tensor, Var};
use common::*;
use kedit::editors::memory::{CaliNet, CaliNetParams, CalibrationFfn};
use kedit::editors::registry::overlay_from_parts;
use kedit::editors::{patch, EditCtx, Editor, Patch};
use kedit::model::{HookSpec, Model, Site, TokenBatch};

fn params() -> CaliNetParams {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("hparams/CaliNet/smollm2-135m.yaml");
    serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ffn(model: &Model, layer: usize) -> CalibrationFfn {
    model
        .overlay_as::<CalibrationFfn>(Site::MlpOut(layer))
        .cloned()
        .expect("calibration neurons")
}

const UNRELATED: [&str; 4] = [
    "Michel Rocard is a native speaker of",
    "The capital of Japan is",
    "Apple A5 was created by",
    "The Eiffel Tower is located in",
];

#[test]
fn calls_make_their_targets_the_argmax_on_new_neurons_leaving_unrelated_answers_and_weights() {
    let mut model = smollm2();
    let fingerprint = model.fingerprint().unwrap();
    let layer = params().kb_layer[0];
    let before: Vec<u32> = UNRELATED.iter().map(|p| next_token(&model, p)).collect();
    let mut calinet = CaliNet::new(params()).unwrap();
    let ctx = EditCtx::default();
    let (p1, p2) = (
        "The mother tongue of Danielle Darrieux is",
        "Ferrari F40, developed by",
    );
    assert_ne!(next_token(&model, p1), first_token(&model, "English"));
    let first = calinet
        .apply(&mut model, &[request(p1, "English")], &ctx)
        .unwrap();
    assert_eq!(next_token(&model, p1), first_token(&model, "English"));
    let after_first = ffn(&model, layer);
    let after: Vec<u32> = UNRELATED.iter().map(|p| next_token(&model, p)).collect();
    assert_eq!(before, after, "an unrelated prompt's answer changed");
    assert_eq!(after_first.neurons(), params().ex_size);

    calinet
        .apply(&mut model, &[request(p2, "Microsoft")], &ctx)
        .unwrap();
    assert_eq!(next_token(&model, p2), first_token(&model, "Microsoft"));
    assert_eq!(next_token(&model, p1), first_token(&model, "English"));
    let both = ffn(&model, layer);
    assert_eq!(both.neurons(), 2 * params().ex_size);
    let n = params().ex_size;
    let rows = |t: &Tensor, dim: usize| t.narrow(dim, 0, n).unwrap().flatten_all().unwrap();
    assert_eq!(
        rows(&both.w_in, 0).to_vec1::<f32>().unwrap(),
        rows(&after_first.w_in, 0).to_vec1::<f32>().unwrap(),
        "the first call's neurons were retrained"
    );
    assert_eq!(
        rows(&both.w_out, 1).to_vec1::<f32>().unwrap(),
        rows(&after_first.w_out, 1).to_vec1::<f32>().unwrap()
    );
    assert_eq!(
        model.fingerprint().unwrap(),
        fingerprint,
        "base weights changed"
    );
    assert!(!both.w_out.track_op());

    // Saved and made on a fresh model: the same logits, bit for bit.
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("calinet.safetensors");
    let whole = kedit::editors::Edit {
        changes: vec![kedit::editors::Change::Overlay(
            kedit::editors::OverlayChange {
                site: Site::MlpOut(layer),
                before: None,
                after: model.overlay(Site::MlpOut(layer)).cloned(),
            },
        )],
        ..Default::default()
    };
    patch::save(&file, &model, "CaliNet", &fingerprint, &whole, None).unwrap();
    let mut fresh = smollm2();
    Patch::load(&fresh, &file, &overlay_from_parts)
        .unwrap()
        .edit
        .reapply(&mut fresh)
        .unwrap();
    for p in [p1, p2, UNRELATED[1]] {
        let ids = model.encode_with_special_tokens(p).unwrap();
        assert_eq!(
            max_abs_diff(&logits_alone(&model, &ids), &logits_alone(&fresh, &ids)),
            0.0,
            "{p}"
        );
    }
    // Undoing the first call (the overlay before it was none) removes the neurons.
    first.undo(&mut model).unwrap();
    assert!(model.overlay(Site::MlpOut(layer)).is_none());
}

/// The derivative of the target's NLL in one entry of `W_o` and of `W_g`, through the
/// calibration FFN and the layers above it, against central differences.
#[test]
fn the_calibration_gradient_matches_finite_differences() {
    let mut model = smollm2();
    let layer = params().kb_layer[0];
    let spec = model.spec().clone();
    let n = 4;
    let device = model.device().clone();
    let w_in = sine_matrix(n, spec.d_model, 0.05, 0.0, &device);
    let w_gate = sine_matrix(n, spec.d_model, 0.05, 1.0, &device);
    let w_out = Var::from_tensor(&sine_matrix(spec.d_model, n, 0.05, 2.0, &device)).unwrap();
    let gate = Var::from_tensor(&w_gate).unwrap();
    let prompt = model
        .encode_with_special_tokens("The mother tongue of Danielle Darrieux is")
        .unwrap();
    let target = model.encode(" English").unwrap()[0];
    let batch = TokenBatch::new(std::slice::from_ref(&prompt), 0, model.device()).unwrap();
    let at = [(0, prompt.len() - 1)];
    let nll = |model: &mut Model, gate: Tensor, out: Tensor| -> Tensor {
        let ffn = CalibrationFfn {
            activation: spec.activation,
            w_in: w_in.clone(),
            w_gate: Some(gate),
            w_out: out,
        };
        model
            .set_overlay(Site::MlpOut(layer), Some(Arc::new(ffn)))
            .unwrap();
        let logits = model
            .forward_at(&batch, &HookSpec::new(), &at)
            .unwrap()
            .logits;
        Model::log_probs(&logits)
            .unwrap()
            .get(0)
            .unwrap()
            .get(target as usize)
            .unwrap()
            .neg()
            .unwrap()
    };
    let loss = nll(
        &mut model,
        gate.as_tensor().clone(),
        w_out.as_tensor().clone(),
    );
    let grads = loss.backward().unwrap();
    let analytic = |v: &Var, r: usize, c: usize| -> f64 {
        let g = grads.get(v.as_tensor()).unwrap();
        f64::from(
            g.get(r)
                .unwrap()
                .get(c)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
        )
    };
    let h = 1e-2;
    let bumped = |t: &Tensor, r: usize, c: usize, by: f64| -> Tensor {
        let mut rows = t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
        rows[r][c] += by;
        Tensor::new(rows, &device)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let value = |t: Tensor| f64::from(t.to_scalar::<f32>().unwrap());
    for (r, c) in [(3, 1), (100, 2)] {
        let plus = value(nll(&mut model, w_gate.clone(), bumped(&w_out, r, c, h)));
        let minus = value(nll(&mut model, w_gate.clone(), bumped(&w_out, r, c, -h)));
        let numeric = (plus - minus) / (2.0 * h);
        let exact = analytic(&w_out, r, c);
        assert!(
            (numeric - exact).abs() <= 2e-2 * exact.abs().max(1e-1),
            "W_o[{r},{c}]: {exact} vs {numeric}"
        );
    }
    let out = w_out.as_tensor().detach();
    for (r, c) in [(1, 7), (2, 300)] {
        let plus = value(nll(&mut model, bumped(&w_gate, r, c, h), out.clone()));
        let minus = value(nll(&mut model, bumped(&w_gate, r, c, -h), out.clone()));
        let numeric = (plus - minus) / (2.0 * h);
        let exact = analytic(&gate, r, c);
        assert!(
            (numeric - exact).abs() <= 2e-2 * exact.abs().max(1e-1),
            "W_g[{r},{c}]: {exact} vs {numeric}"
        );
    }
}

/// GPT-2's forms: GRACE on `c_fc` (keys the MLP's input, values its activation) and CaliNet's
/// GELU neurons both make the target the argmax of the tiny GPT-2; layers and projections the
/// model does not have are refused naming the field.
#[test]
fn both_memory_editors_edit_gpt2_and_refuse_what_the_model_lacks() {
    use kedit::editors::memory::{Grace, GraceParams};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let grace_file = std::fs::read_to_string(root.join("hparams/GRACE/gpt2-xl.yaml")).unwrap();
    let grace_params = |inner: &str| -> GraceParams {
        let mut p: GraceParams = serde_yaml::from_str(&grace_file).unwrap();
        p.inner_params = vec![inner.to_string()];
        p.n_iter = 40;
        p
    };
    let calinet_params = |layer: usize| -> CaliNetParams {
        let text = std::fs::read_to_string(root.join("hparams/CaliNet/gpt2-xl.yaml")).unwrap();
        let mut p: CaliNetParams = serde_yaml::from_str(&text).unwrap();
        p.kb_layer = vec![layer];
        p.num_steps = 100;
        p
    };
    let ctx = EditCtx::default();
    let prompt = "The capital of France is";
    for (name, mut editor) in [
        (
            "GRACE",
            Box::new(Grace::new(grace_params("transformer.h[1].mlp.c_fc.weight")).unwrap())
                as Box<dyn Editor>,
        ),
        (
            "CaliNet",
            Box::new(CaliNet::new(calinet_params(1)).unwrap()),
        ),
    ] {
        let mut model = tiny_gpt2();
        let target = first_token(&model, "Rome");
        assert_ne!(next_token(&model, prompt), target);
        let edit = editor
            .apply(&mut model, &[request(prompt, "Rome")], &ctx)
            .unwrap();
        assert_eq!(next_token(&model, prompt), target, "{name}");
        editor.undo(&mut model, &edit).unwrap();
        assert_ne!(next_token(&model, prompt), target, "{name}: undo");
    }

    let mut model = tiny_gpt2();
    let refused = |editor: &mut dyn Editor, model: &mut Model| {
        editor
            .apply(model, &[request(prompt, "Rome")], &ctx)
            .unwrap_err()
            .to_string()
    };
    let err = refused(
        &mut Grace::new(grace_params("transformer.h[1].attn.c_attn.weight")).unwrap(),
        &mut model,
    );
    assert!(
        err.contains("inner_params") && err.contains("not an MLP"),
        "{err}"
    );
    let err = refused(
        &mut Grace::new(grace_params("transformer.h[7].mlp.c_fc.weight")).unwrap(),
        &mut model,
    );
    assert!(err.contains("not a weight of this model"), "{err}");
    let err = refused(&mut CaliNet::new(calinet_params(7)).unwrap(), &mut model);
    assert!(
        err.contains("kb_layer") && err.contains("out of range"),
        "{err}"
    );
    assert!(
        model.overlays().next().is_none(),
        "a refused edit left an overlay"
    );
}

/// A call beside the neurons of earlier calls adds their output apart from the new neurons'
/// (kept from the first step at the lowest calibrated layer, whose input never changes;
/// recomputed above it): the loss the call stops at is the one the edited model — frozen and new
/// neurons concatenated — has on the fact, at both layers of a two-layer calibration.
#[test]
fn a_call_beside_frozen_neurons_stops_at_the_loss_the_edited_model_has() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("hparams/CaliNet/gpt2-xl.yaml")).unwrap();
    let mut p: CaliNetParams = serde_yaml::from_str(&text).unwrap();
    p.kb_layer = vec![0, 1];
    p.num_steps = 300;
    p.loss_floor = 6.0;
    let mut model = tiny_gpt2();
    let mut calinet = CaliNet::new(p.clone()).unwrap();
    for (prompt, target) in [
        ("The capital of France is", "Rome"),
        ("The Eiffel Tower is located in", "Berlin"),
    ] {
        assert_eq!(model.encode(&format!(" {target}")).unwrap().len(), 1);
        let edit = calinet
            .apply(&mut model, &[request(prompt, target)], &EditCtx::default())
            .unwrap();
        let report = edit.report.as_ref().unwrap().to_json();
        let steps = report["calibration"]["steps"].as_u64().unwrap();
        let stopped_at = report["calibration"]["final_loss"].as_f64().unwrap();
        assert!(
            steps < 300 && stopped_at < 6.0,
            "{target}: no stop at the floor ({steps} steps, loss {stopped_at})"
        );
        let ids = model.encode_with_special_tokens(prompt).unwrap();
        let last = logits_alone(&model, &ids)
            .get(ids.len() - 1)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let nll = -f64::from(
            Model::log_probs(&last)
                .unwrap()
                .get(0)
                .unwrap()
                .get(first_token(&model, target) as usize)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
        );
        assert!(
            (nll - stopped_at).abs() < 1e-4,
            "{target}: training stopped at {stopped_at}, the edited model's NLL is {nll}"
        );
    }
    assert_eq!(ffn(&model, 0).neurons(), 2 * p.ex_size);
    assert_eq!(ffn(&model, 1).neurons(), 2 * p.ex_size);
}
