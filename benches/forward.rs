//! Forward-pass throughput on SmolLM2-135M (batch of 8 prompts × 32 tokens, f32, CPU) beside one
//! f32 matrix product of the same FLOPs and the same row count, by the fastest path kedit has
//! (`ops::matmul_t`: OpenBLAS where linked), the practical limit of this machine, and by candle's
//! gemm.
//!
//! `cargo bench --bench forward` (run scripts/fetch-model.sh first).

mod common;

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kedit::model::{HookSpec, TokenBatch};

const BATCH: usize = 8;
const TOKENS: usize = 32;

fn bench(c: &mut Criterion) {
    let model = common::smollm2_f32();
    let seqs: Vec<Vec<u32>> = (0..BATCH)
        .map(|b| {
            (0..TOKENS)
                .map(|t| (100 + 37 * b + 11 * t) as u32)
                .collect()
        })
        .collect();
    let batch = TokenBatch::new(&seqs, 0, &Device::Cpu).unwrap();
    let hooks = HookSpec::new();

    let mut group = c.benchmark_group("smollm2");
    group.sample_size(10);
    group.throughput(Throughput::Elements((BATCH * TOKENS) as u64));
    group.bench_function("forward_8x32_f32", |b| {
        b.iter(|| model.forward(&batch, &hooks).unwrap())
    });

    // The same FLOPs as one GEMM shaped like the model's: [tokens, d_model] x [d_model, n].
    let flops = model.spec().forward_flops(TOKENS, BATCH * TOKENS);
    let (m, k) = (BATCH * TOKENS, model.spec().d_model);
    let n = (flops / (2.0 * m as f64 * k as f64)).round() as usize;
    let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
    eprintln!(
        "forward = {:.2} GFLOP; equivalent GEMM [{m}x{k}] x [{k}x{n}]",
        flops / 1e9
    );
    group.bench_function("product_same_flops_f32", |b| {
        b.iter(|| kedit::model::ops::matmul_t(&a, &w, None).unwrap())
    });
    group.bench_function("candle_gemm_same_flops_f32", |b| {
        b.iter(|| a.matmul(&w.t().unwrap()).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
