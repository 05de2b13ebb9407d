//! The matrix products of an edit at SmolLM2-135M's shapes, f32 on the CPU: kedit's AVX-512
//! kernels, OpenBLAS (where it loads) and candle's gemm, forward `x·wᵀ` and backward `dy·w`, each
//! over 16 distinct weights (a large L3 cache may hold them all), and, for kedit's kernels from
//! f32 and from Q4_1 rows and for OpenBLAS, over a model's worth of weights that no cache holds
//! (`-from-memory`, `-q4_1`), as an editing step meets them; the same from bf16 rows against
//! candle's bf16 matmul (`-bf16`), as a model loaded in bf16 meets them.
//! Criterion reports GFLOP/s as elements: 1 element = 1 FLOP.
//!
//! The group `products-half` sets the two half-precision paths side by side at the MLP widths of
//! SmolLM2, GPT2-XL and LLaMA-2-7B (bf16 weights; the larger two no cache holds): the kernels
//! reading the rows in place against widening the whole weight once and OpenBLAS, the choice
//! `ops::half_stream_rows` makes by the number of rows and the weight's size.
//!
//! `cargo bench --bench kernels` (`-- 16x576x1536` for one shape, `-- products-half` for the
//! half-precision paths; one thread: `RAYON_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1`).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kedit::model::packed::PackedRows;
use kedit::model::{blas, kernels};

/// (rows, in, out): an MLP up/gate projection, its down projection, and the LM head.
const SHAPES: &[(usize, usize, usize)] = &[
    (1, 576, 1536),
    (16, 576, 1536),
    (16, 1536, 576),
    (48, 576, 1536),
    (64, 576, 1536),
    (256, 576, 1536),
    (16, 576, 49152),
];

fn values(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919 + seed * 104_729) % 2001) as f32 / 1000.0 - 1.0)
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("products");
    group.sample_size(20);
    for &(m, k, n) in SHAPES {
        let copies = if n > 10_000 { 2 } else { 16 };
        let x = values(m * k, 0);
        let dy = values(m * n, 1);
        let ws: Vec<Vec<f32>> = (0..copies).map(|s| values(n * k, s + 2)).collect();
        let xt = Tensor::from_slice(&x, (m, k), &Device::Cpu).unwrap();
        let dyt = Tensor::from_slice(&dy, (m, n), &Device::Cpu).unwrap();
        let wts: Vec<Tensor> = ws
            .iter()
            .map(|w| Tensor::from_slice(w, (n, k), &Device::Cpu).unwrap())
            .collect();
        group.throughput(Throughput::Elements((2 * m * k * n) as u64));
        let shape = format!("{m}x{k}x{n}");
        let mut i = 0;
        let mut next = || {
            i = (i + 1) % copies;
            i
        };
        group.bench_function(format!("{shape}/x_wt/candle"), |b| {
            b.iter(|| xt.matmul(&wts[next()].t().unwrap()).unwrap())
        });
        group.bench_function(format!("{shape}/dy_w/candle"), |b| {
            b.iter(|| dyt.matmul(&wts[next()]).unwrap())
        });
        if kernels::available() && m <= kernels::MAX_ROWS {
            group.bench_function(format!("{shape}/x_wt/kernels"), |b| {
                b.iter(|| kernels::x_wt(&x, &ws[next()], m, k, n))
            });
            group.bench_function(format!("{shape}/dy_w/kernels"), |b| {
                b.iter(|| kernels::dy_w(&dy, &ws[next()], m, n, k))
            });
        }
        if kernels::available() && m <= kernels::MAX_PACKED_ROWS {
            // A model's worth of weights (~450 MB of f32), so that neither form stays in the
            // cache between calls: the f32 rows stream from memory, the Q4_1 rows a sixth of it.
            let copies = 450_000_000 / (4 * n * k);
            let f32s: Vec<Vec<f32>> = (0..copies).map(|s| values(n * k, s + 2)).collect();
            let packed: Vec<PackedRows> = f32s
                .iter()
                .map(|w| {
                    let t = Tensor::from_slice(w, (n, k), &Device::Cpu).unwrap();
                    let q = QTensor::quantize(&t, GgmlDType::Q4_1).unwrap();
                    PackedRows::from_gguf(&q).unwrap().unwrap()
                })
                .collect();
            let mut i = 0;
            let mut next = || {
                i = (i + 1) % copies;
                i
            };
            if m <= kernels::MAX_ROWS {
                group.bench_function(format!("{shape}/x_wt/kernels-from-memory"), |b| {
                    b.iter(|| kernels::x_wt(&x, &f32s[next()], m, k, n))
                });
                group.bench_function(format!("{shape}/dy_w/kernels-from-memory"), |b| {
                    b.iter(|| kernels::dy_w(&dy, &f32s[next()], m, n, k))
                });
            }
            if blas::available() {
                group.bench_function(format!("{shape}/x_wt/openblas-from-memory"), |b| {
                    b.iter(|| blas::x_wt(&x, &f32s[next()], m, k, n).unwrap())
                });
                group.bench_function(format!("{shape}/dy_w/openblas-from-memory"), |b| {
                    b.iter(|| blas::dy_w(&dy, &f32s[next()], m, n, k).unwrap())
                });
            }
            group.bench_function(format!("{shape}/x_wt/kernels-q4_1"), |b| {
                b.iter(|| kernels::x_wt_packed(&x, &packed[next()], m))
            });
            group.bench_function(format!("{shape}/dy_w/kernels-q4_1"), |b| {
                b.iter(|| kernels::dy_w_packed(&dy, &packed[next()], m))
            });
            // The same weights in bf16 (a LLaMA-2-7B loaded as `--dtype auto` chooses): kedit's
            // kernels reading the rows in place against candle's bf16 matmul, which widens both
            // whole operands into fresh f32 buffers on every call.
            drop(packed);
            let bf16s: Vec<Vec<half::bf16>> = f32s
                .iter()
                .map(|w| w.iter().map(|&v| half::bf16::from_f32(v)).collect())
                .collect();
            drop(f32s);
            group.bench_function(format!("{shape}/x_wt/kernels-bf16"), |b| {
                b.iter(|| kernels::x_wt_half(&x, kernels::HalfRows::Bf16(&bf16s[next()]), m, k, n))
            });
            group.bench_function(format!("{shape}/dy_w/kernels-bf16"), |b| {
                b.iter(|| kernels::dy_w_half(&dy, kernels::HalfRows::Bf16(&bf16s[next()]), m, n, k))
            });
            let xt16 = xt.to_dtype(candle_core::DType::BF16).unwrap();
            let w16: Vec<Tensor> = bf16s
                .iter()
                .map(|w| Tensor::from_slice(w, (n, k), &Device::Cpu).unwrap())
                .collect();
            drop(bf16s);
            group.bench_function(format!("{shape}/x_wt/candle-bf16"), |b| {
                b.iter(|| xt16.matmul(&w16[next()].t().unwrap()).unwrap())
            });
        }
        if blas::available() {
            group.bench_function(format!("{shape}/x_wt/openblas"), |b| {
                b.iter(|| blas::x_wt(&x, &ws[next()], m, k, n).unwrap())
            });
            group.bench_function(format!("{shape}/dy_w/openblas"), |b| {
                b.iter(|| blas::dy_w(&dy, &ws[next()], m, n, k).unwrap())
            });
        }
    }
    group.finish();
}

/// Rows of a bf16 product around where streaming the rows stops paying.
const HALF_ROWS: &[usize] = &[64, 96, 128, 192];

/// (in, out): the MLP up projections of SmolLM2-135M and GPT2-XL, LLaMA-2-7B's attention and MLP.
const HALF_WIDTHS: &[(usize, usize)] = &[(576, 1536), (1600, 6400), (4096, 4096), (4096, 11008)];

fn bench_half_widths(c: &mut Criterion) {
    let mut group = c.benchmark_group("products-half");
    group.sample_size(10);
    for &(k, n) in HALF_WIDTHS {
        bench_half_width(&mut group, k, n);
    }
    group.finish();
}

fn bench_half_width(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    k: usize,
    n: usize,
) {
    // Enough distinct weights that no cache holds them all, as a model's layers meet them.
    let copies = (64 << 20) / (2 * n * k) + 2;
    let weights: Vec<Vec<half::bf16>> = (0..copies)
        .map(|s| {
            values(n * k, s + 2)
                .into_iter()
                .map(half::bf16::from_f32)
                .collect()
        })
        .collect();
    let mut widened = vec![0f32; n * k];
    for &m in HALF_ROWS {
        let x = values(m * k, 0);
        let dy = values(m * n, 1);
        group.throughput(Throughput::Elements((2 * m * k * n) as u64));
        let shape = format!("{m}x{k}x{n}");
        let mut i = 0;
        let mut next = || {
            i = (i + 1) % copies;
            i
        };
        if kernels::available() {
            group.bench_function(format!("{shape}/x_wt/kernels-bf16"), |b| {
                b.iter(|| {
                    kernels::x_wt_half(&x, kernels::HalfRows::Bf16(&weights[next()]), m, k, n)
                })
            });
            group.bench_function(format!("{shape}/dy_w/kernels-bf16"), |b| {
                b.iter(|| {
                    kernels::dy_w_half(&dy, kernels::HalfRows::Bf16(&weights[next()]), m, n, k)
                })
            });
        }
        if blas::available() {
            group.bench_function(format!("{shape}/x_wt/widened-openblas"), |b| {
                b.iter(|| {
                    kernels::widen_bf16(&weights[next()], &mut widened);
                    blas::x_wt(&x, &widened, m, k, n).unwrap()
                })
            });
            group.bench_function(format!("{shape}/dy_w/widened-openblas"), |b| {
                b.iter(|| {
                    kernels::widen_bf16(&weights[next()], &mut widened);
                    blas::dy_w(&dy, &widened, m, n, k).unwrap()
                })
            });
        }
    }
}

/// The Gram matrix `kᵀk` of a statistics batch (3 windows of 1024 tokens) at SmolLM2's and
/// GPT2-XL's MLP widths: candle's full product of the transposed keys against OpenBLAS on the
/// upper triangle (`ops::gram`).
fn bench_gram(c: &mut Criterion) {
    let mut group = c.benchmark_group("gram");
    group.sample_size(10);
    for (rows, cols) in [(3072, 1536), (3072, 6400)] {
        let keys = Tensor::from_vec(values(rows * cols, 0), (rows, cols), &Device::Cpu).unwrap();
        group.throughput(Throughput::Elements((2 * rows * cols * cols) as u64));
        group.bench_function(format!("{rows}x{cols}/candle"), |b| {
            b.iter(|| keys.t().unwrap().matmul(&keys).unwrap())
        });
        group.bench_function(format!("{rows}x{cols}/ops"), |b| {
            b.iter(|| kedit::model::ops::gram(&keys).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench, bench_half_widths, bench_gram);
criterion_main!(benches);
