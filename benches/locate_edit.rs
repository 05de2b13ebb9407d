//! Locate-then-edit on SmolLM2-135M (f32, CPU): one ROME edit, one MEMIT batch of 10, one
//! AlphaEdit edit (statistics cached beforehand, templates sampled once), and collecting key
//! statistics (tokens/s).
//!
//! `cargo bench --bench locate_edit` (run scripts/fetch-model.sh first).

mod common;

use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kedit::editors::rank_one::stats::{second_moments, Corpus, StatsOptions};
use kedit::editors::{build_editor, EditCtx};

fn bench(c: &mut Criterion) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut model = common::smollm2_f32();
    let requests: Vec<_> = common::counterfact().into_iter().take(10).collect();
    let ctx = EditCtx::default();

    let mut group = c.benchmark_group("locate_edit_smollm2");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(60));

    let mut rome = build_editor("ROME", &root.join("hparams/ROME/smollm2-135m.yaml")).unwrap();
    // The first call samples the context templates; time the edits after it.
    rome.apply(&mut model, &requests[..1], &ctx)
        .unwrap()
        .undo(&mut model)
        .unwrap();
    group.bench_function("rome_edit", |b| {
        b.iter(|| {
            rome.apply(&mut model, &requests[..1], &ctx)
                .unwrap()
                .undo(&mut model)
                .unwrap()
        })
    });

    let memit_file = root.join("tests/fixtures/hparams/memit-smollm2-test.yaml");
    let mut memit = build_editor("MEMIT", &memit_file).unwrap();
    memit
        .apply(&mut model, &requests[..1], &ctx)
        .unwrap()
        .undo(&mut model)
        .unwrap();
    group.bench_function("memit_batch_of_10", |b| {
        b.iter(|| {
            memit
                .apply(&mut model, &requests, &ctx)
                .unwrap()
                .undo(&mut model)
                .unwrap()
        })
    });

    let alpha_file = root.join("tests/fixtures/hparams/alphaedit-smollm2-test.yaml");
    let mut alpha = build_editor("AlphaEdit", &alpha_file).unwrap();
    alpha
        .apply(&mut model, &requests[..1], &ctx)
        .unwrap()
        .undo(&mut model)
        .unwrap();
    group.bench_function("alphaedit_edit", |b| {
        b.iter(|| {
            alpha
                .apply(&mut model, &requests[1..2], &ctx)
                .unwrap()
                .undo(&mut model)
                .unwrap()
        })
    });

    // Statistics of one layer over 2 articles, recomputed every time (fresh cache folder).
    let corpus = Corpus::builtin();
    let tmp = std::env::temp_dir().join("kedit-bench-stats");
    let mut stats_opts = StatsOptions::new(2);
    let tokens = {
        stats_opts.cache_dir = tmp.join("probe");
        let m = second_moments(&model, &[5], &corpus, &stats_opts, &mut |_, _| {}).unwrap();
        m[0].tokens
    };
    group.throughput(Throughput::Elements(tokens));
    let mut run = 0;
    group.bench_function("stats_layer_5_tokens", |b| {
        b.iter(|| {
            run += 1;
            stats_opts.cache_dir = tmp.join(format!("run{run}"));
            second_moments(&model, &[5], &corpus, &stats_opts, &mut |_, _| {}).unwrap()
        })
    });
    let _ = std::fs::remove_dir_all(&tmp);
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
