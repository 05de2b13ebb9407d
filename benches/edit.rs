//! Evaluation and editing throughput on SmolLM2-135M (f32, CPU): all teacher-forced metrics of one
//! CounterFact case (one phase), and one FT-L edit with the shipped hyperparameters.
//!
//! `cargo bench --bench edit` (run scripts/fetch-model.sh first).

mod common;

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use kedit::editors::{build_editor, EditCtx};
use kedit::eval::evaluate;

fn bench(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut model = common::smollm2_f32();
    let request = common::counterfact().remove(0);
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
