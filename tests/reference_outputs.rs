//! The forward pass against reference outputs recorded with Hugging Face transformers
//! (tests/fixtures/README.md says how they were made).

mod common;

use std::sync::OnceLock;

use candle_core::{DType, IndexOp, D};
use common::*;
use kedit::model::{HookSpec, Model, Sampling, Site, TokenBatch};

fn smol() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(smollm2)
}

/// Checks ids, top-5 order, logits and logsumexp at the last position of a prompt.
fn check_last_position(model: &Model, case: &serde_json::Value, tol: f32) {
    let prompt = case["prompt"].as_str().unwrap();
    let ids = model.encode(prompt).unwrap();
    assert_eq!(ids, u32s(&case["input_ids"]), "token ids of {prompt:?}");
    let logits = logits_alone(model, &ids);
    let last = logits.i(ids.len() - 1).unwrap();
    let values: Vec<f32> = last.to_vec1().unwrap();
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    let top5: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
    assert_eq!(top5, u32s(&case["top5_ids"]), "top-5 ids of {prompt:?}");
    for (got, want) in order[..5]
        .iter()
        .map(|&i| values[i])
        .zip(f32s(&case["top5_logits"]))
    {
        assert!(
            (got - want).abs() < tol,
            "{prompt:?}: logit {got} vs {want}"
        );
    }
    if let Some(lse) = case.get("logsumexp") {
        let got = last
            .log_sum_exp(D::Minus1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let want = lse.as_f64().unwrap() as f32;
        assert!(
            (got - want).abs() < tol,
            "{prompt:?}: logsumexp {got} vs {want}"
        );
    }
    if let Some(greedy) = case.get("greedy_new_ids") {
        let gen = model.generate_ids(&ids, 8, Sampling::Greedy).unwrap();
        assert_eq!(
            gen.generated_ids,
            u32s(greedy),
            "greedy continuation of {prompt:?}"
        );
    }
}

/// The activation at `site`, last position of `prompt`.
fn last_token_activation(model: &Model, prompt: &str, site: Site) -> Vec<f32> {
    let ids = model.encode(prompt).unwrap();
    let batch = TokenBatch::new(std::slice::from_ref(&ids), 0, model.device()).unwrap();
    let out = model
        .forward(&batch, &HookSpec::new().capture(site))
        .unwrap();
    out.capture(site)
        .unwrap()
        .i((0, ids.len() - 1))
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn tiny_gpt2_matches_transformers() {
    let model = tiny_gpt2();
    let reference = read_json("tiny-gpt2/reference_outputs.json");
    for case in reference["prompts"].as_array().unwrap() {
        check_last_position(&model, case, 1e-3);
        let prompt = case["prompt"].as_str().unwrap();
        for (key, site) in [
            ("mlp_key_layer1", Site::MlpAct(1)),
            ("mlp_out_layer1", Site::MlpOut(1)),
            ("hidden_final", Site::FinalNorm),
        ] {
            let got = last_token_activation(&model, prompt, site);
            let want = f32s(&case[key]);
            assert_eq!(got.len(), want.len(), "{key} width");
            let err = rel_l2(&got, &want);
            assert!(err < 1e-4, "{prompt:?} {key}: relative L2 error {err}");
        }
    }
}

#[test]
fn smollm2_gguf_matches_transformers_logits() {
    let reference = read_json("smollm2/reference_logits.json");
    for case in reference["prompts"].as_array().unwrap() {
        check_last_position(smol(), case, 1e-2);
    }
}

#[test]
fn smollm2_gguf_matches_transformers_activations() {
    let reference = read_json("smollm2/reference_activations.json");
    for case in reference["prompts"].as_array().unwrap() {
        check_last_position(smol(), case, 1e-2);
        let prompt = case["prompt"].as_str().unwrap();
        for layer in [3, 15, 29] {
            for (key, site) in [
                (format!("down_proj_input_layer{layer}"), Site::MlpAct(layer)),
                (format!("mlp_out_layer{layer}"), Site::MlpOut(layer)),
            ] {
                let got = last_token_activation(smol(), prompt, site);
                let want = &case[&key];
                assert_eq!(
                    got.len() as u64,
                    want["dim"].as_u64().unwrap(),
                    "{key} width"
                );
                let first16 = f32s(&want["first16"]);
                let err = rel_l2(&got[..16], &first16);
                assert!(
                    err < 1e-3,
                    "{prompt:?} {key}: relative L2 error {err} on the first 16 values"
                );
                let norm: f32 = got.iter().map(|v| v * v).sum::<f32>().sqrt();
                let want_norm = want["l2"].as_f64().unwrap() as f32;
                assert!(
                    (norm - want_norm).abs() / want_norm < 1e-3,
                    "{prompt:?} {key}: L2 norm {norm} vs {want_norm}"
                );
            }
        }
    }
}

#[test]
fn smollm2_in_half_precision_stays_close_to_the_reference() {
    let reference = read_json("smollm2/reference_logits.json");
    let case = &reference["prompts"][0];
    for dtype in [DType::BF16, DType::F16] {
        let model = load_as(&smollm2_path(), dtype);
        assert_eq!(model.dtype(), dtype);
        let ids = u32s(&case["input_ids"]);
        let last = logits_alone(&model, &ids)
            .i(ids.len() - 1)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let values: Vec<f32> = last.to_vec1().unwrap();
        let top5 = u32s(&case["top5_ids"]);
        let best = (0..values.len())
            .max_by(|&a, &b| values[a].total_cmp(&values[b]))
            .unwrap();
        assert_eq!(best as u32, top5[0], "{dtype:?}: top-1");
        for (id, want) in top5.into_iter().zip(f32s(&case["top5_logits"])) {
            let got = values[id as usize];
            assert!(
                (got - want).abs() < 0.5,
                "{dtype:?}: logit of {id} is {got}, reference {want}"
            );
        }
    }
}
