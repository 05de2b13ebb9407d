//! Locate-then-edit on SmolLM2-135M (f32, CPU): one ROME edit, one MEMIT batch of 10, one
//! AlphaEdit edit (statistics cached beforehand, templates sampled once), and collecting key
//! statistics (tokens/s).
//!
//! `cargo bench --bench locate_edit` (run scripts/fetch-model.sh first).

mod common;

use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kedit::data::EditRequest;
use kedit::editors::rank_one::stats::{second_moments, Corpus, StatsStore};
use kedit::editors::{build_editor, EditCtx, Editor};
use kedit::model::Model;

fn bench(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut model = common::smollm2_f32();
    let requests: Vec<_> = common::counterfact().into_iter().take(10).collect();
    let ctx = EditCtx::default();

    let mut group = c.benchmark_group("locate_edit_smollm2");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(60));

    // Editors are built and warmed inside their benchmark, so that a filtered run
    // (`cargo bench --bench locate_edit -- rome`) pays only for what it measures.
    let mut rome = None;
    group.bench_function("rome_edit", |b| {
        let rome = rome.get_or_insert_with(|| {
            warmed(
                &mut model,
                "ROME",
                &root.join("hparams/ROME/smollm2-135m.yaml"),
                &requests[..1],
                &ctx,
            )
        });
        b.iter(|| {
            rome.apply(&mut model, &requests[..1], &ctx)
                .unwrap()
                .undo(&mut model)
                .unwrap()
        })
    });

    let mut memit = None;
    group.bench_function("memit_batch_of_10", |b| {
        let memit = memit.get_or_insert_with(|| {
            let file = root.join("tests/fixtures/hparams/memit-smollm2-test.yaml");
            warmed(&mut model, "MEMIT", &file, &requests[..1], &ctx)
        });
        b.iter(|| {
            memit
                .apply(&mut model, &requests, &ctx)
                .unwrap()
                .undo(&mut model)
                .unwrap()
        })
    });

    let mut alpha = None;
    group.bench_function("alphaedit_edit", |b| {
        let alpha = alpha.get_or_insert_with(|| {
            let file = root.join("tests/fixtures/hparams/alphaedit-smollm2-test.yaml");
            warmed(&mut model, "AlphaEdit", &file, &requests[..1], &ctx)
        });
        b.iter(|| {
            let edit = alpha.apply(&mut model, &requests[1..2], &ctx).unwrap();
            alpha.undo(&mut model, &edit).unwrap()
        })
    });

    // Statistics of one layer over 2 articles, recomputed every time (fresh cache folder).
    let corpus = Corpus::builtin();
    let tmp = std::env::temp_dir().join("kedit-bench-stats");
    let mut stats_opts = StatsStore::in_memory().options(2).unwrap();
    let tokens = {
        stats_opts.cache_dir = Some(tmp.join("probe"));
        let m = second_moments(&model, &[5], &corpus, &stats_opts, &mut |_, _| {}).unwrap();
        m[0].tokens
    };
    group.throughput(Throughput::Elements(tokens));
    let mut run = 0;
    group.bench_function("stats_layer_5_tokens", |b| {
        b.iter(|| {
            run += 1;
            stats_opts.cache_dir = Some(tmp.join(format!("run{run}")));
            second_moments(&model, &[5], &corpus, &stats_opts, &mut |_, _| {}).unwrap()
        })
    });
    let _ = std::fs::remove_dir_all(&tmp);
    group.finish();
}

/// An editor that has already made (and taken back) one edit: statistics loaded, templates sampled.
fn warmed(
    model: &mut Model,
    method: &str,
    hparams: &Path,
    requests: &[EditRequest],
    ctx: &EditCtx,
) -> Box<dyn Editor> {
    let mut editor = build_editor(method, hparams).unwrap();
    let edit = editor.apply(model, requests, ctx).unwrap();
    editor.undo(model, &edit).unwrap();
    editor
}

criterion_group!(benches, bench);
criterion_main!(benches);
