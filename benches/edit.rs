//! Evaluation and editing throughput on SmolLM2-135M (f32, CPU): all teacher-forced metrics of one
//! CounterFact case (one phase), and one FT-L edit with the shipped hyperparameters.
//!
//! `cargo bench --bench edit` (run scripts/fetch-model.sh first).

use std::path::Path;

use candle_core::DType;
use criterion::{criterion_group, criterion_main, Criterion};
use kedit::data::read_dataset;
use kedit::editors::{build_editor, EditCtx};
use kedit::eval::evaluate;
use kedit::model::load::{load, DTypeChoice, LoadOptions};

fn bench(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let opts = LoadOptions {
        dtype: DTypeChoice::Exact(DType::F32),
        ..LoadOptions::default()
    };
    let mut model = load(
        kedit::model::load::fetched_smollm2()
            .to_str()
            .unwrap_or_default(),
        &opts,
    )
    .expect("SmolLM2 GGUF: run scripts/fetch-model.sh");
    let data = read_dataset(
        &root.join("tests/fixtures/data/counterfact_easyedit_edit.json"),
        None,
    )
    .unwrap();
    let request = data.cases[0].1.clone();
    let mut editor = build_editor("FT-L", &root.join("hparams/FT/smollm2-135m.yaml")).unwrap();

    let mut group = c.benchmark_group("smollm2");
    group.sample_size(10);
    group.bench_function("evaluate_counterfact_case", |b| {
        b.iter(|| evaluate(&model, &request).unwrap())
    });
    group.bench_function("ft_l_edit_and_undo", |b| {
        b.iter(|| {
            let edit = editor
                .apply(
                    &mut model,
                    std::slice::from_ref(&request),
                    &EditCtx::default(),
                )
                .unwrap();
            edit.undo(&mut model).unwrap();
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
