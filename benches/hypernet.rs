//! The hypernetwork editors on SmolLM2-135M (f32, CPU) with the shipped SmolLM2 TRAINING files
//! (the last three layers' MLP matrices):
//!
//! - `mend_edit_and_undo`, `ke_edit_and_undo`: one test-time edit (one forward and backward of
//!   the base model, one pass of the editor, the weights installed) and its undo;
//! - `mend_micro_batch`, `ke_micro_batch`: one training micro-batch (the base pass for the
//!   factors, the edit, the edited model on the edit and locality prompts, the backward into the
//!   editor). `train_step`'s `mend_step_16` is the base model's share of it, the limit.
//!
//! `cargo bench --bench hypernet` (run scripts/fetch-model.sh first).

mod common;

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion};
use kedit::editors::hypernet::ke::{Ke, KeParams};
use kedit::editors::hypernet::mend::{Mend, MendParams};
use kedit::editors::hypernet::trainer::{HypernetTrainee, TrainingPair};
use kedit::editors::hypernet::{apply_trained, Hypernet};
use kedit::model::Model;
use kedit::run::train::Trainee;

fn bench_one<H: Hypernet>(c: &mut Criterion, name: &str, editor: impl Fn(&Model) -> H) {
    let records = common::zsre_training();
    let pairs: Vec<TrainingPair> = records
        .iter()
        .take(20)
        .map(|r| TrainingPair::from_request(r, &|p: &str| p.to_string()).unwrap())
        .collect();
    let mut model = common::smollm2_f32();
    let mut group = c.benchmark_group("smollm2");
    group.sample_size(10);
    {
        let built = editor(&model);
        let mut trainee =
            HypernetTrainee::new(built, &mut model, pairs.clone(), pairs[..2].to_vec()).unwrap();
        group.bench_function(format!("{name}_micro_batch"), |b| {
            b.iter(|| trainee.accumulate(0).unwrap())
        });
    }
    // A fresh editor whose running statistics have seen the training edits once (MEND's
    // normalisation needs them; KE has none).
    let mut fresh = editor(&model);
    {
        let mut warm =
            HypernetTrainee::new(fresh, &mut model, pairs.clone(), pairs[..2].to_vec()).unwrap();
        warm.loss(&pairs[..4], true).unwrap();
        fresh = warm.editor;
    }
    let request = records[0].clone();
    group.bench_function(format!("{name}_edit_and_undo"), |b| {
        b.iter(|| {
            let edit =
                apply_trained(&mut fresh, &mut model, std::slice::from_ref(&request)).unwrap();
            edit.undo(&mut model).unwrap();
        })
    });
    group.finish();
}

fn bench(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mend =
        MendParams::from_yaml(&root.join("hparams/TRAINING/MEND/smollm2-135m.yaml")).unwrap();
    bench_one(c, "mend", |m| Mend::new(m, mend.clone()).unwrap());
    let ke = KeParams::from_yaml(&root.join("hparams/TRAINING/KE/smollm2-135m.yaml")).unwrap();
    bench_one(c, "ke", |m| Ke::new(m, ke.clone()).unwrap());
}

criterion_group!(benches, bench);
criterion_main!(benches);
