//! The memory editors on SmolLM2-135M (f32, CPU): one GRACE edit (50 value steps, the shipped
//! file) and what a 1,000-entry codebook adds to a forward pass — the pass with the codebook
//! against the pass without, on the same prompts (every token is looked up; nothing hits); one
//! CaliNet edit (the shipped file) on a fresh layer and beside the 16,000 frozen neurons that 250
//! sequential edits leave (their `W_o` zero, so both edits train the same steps and differ only
//! by what carrying the frozen neurons costs).
//!
//! `cargo bench --bench memory` (run scripts/fetch-model.sh first).

mod common;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use kedit::editors::memory::codebook::{Entry, KeyInput, QueryTokens, Replacement};
use kedit::editors::memory::{CaliNetParams, CalibrationFfn, Codebook};
use kedit::editors::{build_editor, EditCtx};
use kedit::model::{Activation, HookSpec, Site, TokenBatch};

fn bench(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut model = common::smollm2_f32();
    let requests = common::counterfact();
    let mut grace = build_editor("GRACE", &root.join("hparams/GRACE/smollm2-135m.yaml")).unwrap();

    let mut group = c.benchmark_group("smollm2");
    group.sample_size(10);
    group.bench_function("grace_edit_and_undo", |b| {
        b.iter(|| {
            let edit = grace
                .apply(&mut model, &requests[..1], &EditCtx::default())
                .unwrap();
            grace.undo(&mut model, &edit).unwrap();
        })
    });

    let calinet_file = root.join("hparams/CaliNet/smollm2-135m.yaml");
    let mut calinet = build_editor("CaliNet", &calinet_file).unwrap();
    let mut calinet_edit_and_undo = |model: &mut kedit::model::Model| {
        let edit = calinet
            .apply(model, &requests[..1], &EditCtx::default())
            .unwrap();
        calinet.undo(model, &edit).unwrap();
    };
    group.bench_function("calinet_edit_and_undo", |b| {
        b.iter(|| calinet_edit_and_undo(&mut model))
    });
    let calibrated: CaliNetParams =
        serde_yaml::from_str(&std::fs::read_to_string(&calinet_file).unwrap()).unwrap();
    let site = Site::MlpOut(calibrated.kb_layer[0]);
    let (neurons, d) = (16_000, model.spec().d_model);
    let frozen = CalibrationFfn {
        activation: Activation::Silu,
        w_in: Tensor::randn(0f32, 0.04, (neurons, d), model.device()).unwrap(),
        w_gate: Some(Tensor::randn(0f32, 0.04, (neurons, d), model.device()).unwrap()),
        w_out: Tensor::zeros((d, neurons), DType::F32, model.device()).unwrap(),
    };
    model.set_overlay(site, Some(Arc::new(frozen))).unwrap();
    group.bench_function("calinet_edit_and_undo_beside_16000_neurons", |b| {
        b.iter(|| calinet_edit_and_undo(&mut model))
    });
    model.set_overlay(site, None).unwrap();

    let prompts: Vec<Vec<u32>> = requests[..8]
        .iter()
        .map(|r| model.encode_with_special_tokens(&r.prompt).unwrap())
        .collect();
    let batch = TokenBatch::new(&prompts, 0, model.device()).unwrap();
    let forward = |model: &kedit::model::Model| model.forward(&batch, &HookSpec::new()).unwrap();
    group.bench_function("forward_8_prompts", |b| b.iter(|| forward(&model)));
    let spec = model.spec().clone();
    let n = 1000;
    let device = model.device().clone();
    let book = Codebook {
        keys: (Tensor::randn(0f32, 1.0, (n, spec.d_mlp), &device).unwrap() * 100.0).unwrap(),
        values: Tensor::randn(0f32, 1.0, (n, spec.d_model), &device).unwrap(),
        entries: (0..n as u64)
            .map(|edit| Entry {
                radius: 1.0,
                answer: String::new(),
                label_mean: 0.0,
                edit,
            })
            .collect(),
        ..Codebook::empty(
            KeyInput::MlpAct,
            Replacement::ReplaceLast,
            QueryTokens::Every,
            spec.d_mlp,
            spec.d_model,
            &device,
        )
        .unwrap()
    };
    assert_eq!(book.keys.dtype(), DType::F32);
    model
        .set_overlay(Site::MlpOut(28), Some(Arc::new(book)))
        .unwrap();
    group.bench_function("forward_8_prompts_with_1000_entry_codebook", |b| {
        b.iter(|| forward(&model))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
