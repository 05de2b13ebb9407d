//! Differentiable building blocks of the decoder.
//!
//! candle's fused `rms_norm`, `layer_norm`, `softmax_last_dim` and `rope` kernels have no backward
//! pass: a gradient through them is dropped without an error. Editors differentiate through the
//! whole model (FT, ROME's value optimisation, MEND), so every op here is composed from primitives
//! that candle can differentiate (`tests/gradients.rs` checks them against finite differences).
//! Normalisations and softmax run in at least f32 whatever the model's dtype, as transformers does
//! (and in f64 for an f64 model, which the finite-difference tests use).
//!
//! On the CPU in f32 and f64, RMSNorm, softmax, log-softmax and rotary embedding take single ops with their
//! backward written out instead ([`super::fused_grad`]): the composed forms stay for other
//! dtypes and devices, and as the reference the fused ops are tested against.
//!
//! Where no gradient can flow (the input tracks no `Var`: inference, statistics, the layers below
//! an optimised weight) the fused kernels are used instead: on short sequences the composed forms
//! cost mostly per-op overhead. The two agree to float rounding (`tests/reference_outputs.rs` holds
//! both paths to the transformers fixtures).

use candle_core::{DType, Device, Result, Tensor, D};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::packed::PackedRows;
use super::{blas, fused_attention, fused_grad, kernels};

/// Whether a gradient can flow through any of `ts` (f64 always takes the composed path, which the
/// finite-difference tests rely on, and the fused kernels do not all support).
fn needs_grad(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op() || t.dtype() == DType::F64)
}

/// The dtype to compute reductions in: f16/bf16 are widened to f32, f32/f64 are kept.
fn wide(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`.
///
/// # Shapes
/// `xs: [.., d]`, `weight, bias: [d]` → `[.., d]`
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if !needs_grad(&[xs, weight, bias]) {
        return candle_nn::ops::layer_norm(&xs.contiguous()?, weight, bias, eps as f32);
    }
    let dtype = xs.dtype();
    let xs = xs.to_dtype(wide(dtype))?;
    let mean = xs.mean_keepdim(D::Minus1)?;
    let centred = xs.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed
        .to_dtype(dtype)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) * weight`.
///
/// # Shapes
/// `xs: [.., d]`, `weight: [d]` → `[.., d]`
pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if !needs_grad(&[xs, weight]) {
        return candle_nn::ops::rms_norm(&xs.contiguous()?, weight, eps as f32);
    }
    if fused_grad_ops() && fused_grad::applies(xs) && weight.dtype() == xs.dtype() {
        return xs
            .contiguous()?
            .apply_op2(&weight.contiguous()?, fused_grad::RmsNorm { eps });
    }
    let dtype = xs.dtype();
    let xs = xs.to_dtype(wide(dtype))?;
    let ms = xs.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xs.broadcast_div(&(ms + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(weight)
}

/// Softmax over the last dimension, computed in f32 (the non-fused, differentiable form).
pub fn softmax_last(xs: &Tensor) -> Result<Tensor> {
    let dtype = xs.dtype();
    if !needs_grad(&[xs]) {
        return candle_nn::ops::softmax_last_dim(&xs.to_dtype(wide(dtype))?.contiguous()?)?
            .to_dtype(dtype);
    }
    if fused_grad_ops() && fused_grad::applies(xs) {
        return xs.contiguous()?.apply_op1(fused_grad::SoftmaxLast);
    }
    candle_nn::ops::softmax(&xs.to_dtype(wide(dtype))?, D::Minus1)?.to_dtype(dtype)
}

/// Log-softmax over the last dimension (in the input's dtype: [`super::Model::log_probs`] widens).
pub fn log_softmax_last(xs: &Tensor) -> Result<Tensor> {
    if xs.track_op() && fused_grad_ops() && fused_grad::applies(xs) {
        return xs.contiguous()?.apply_op1(fused_grad::LogSoftmaxLast);
    }
    candle_nn::ops::log_softmax(xs, D::Minus1)
}

/// `silu(gate) · up`, LLaMA's MLP activation.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let flows = gate.track_op() || up.track_op();
    if flows && fused_grad_ops() && fused_grad::applies(gate) && up.dtype() == gate.dtype() {
        return gate
            .contiguous()?
            .apply_op2(&up.contiguous()?, fused_grad::SwiGlu);
    }
    candle_nn::ops::silu(gate)? * up
}

static FUSED_GRAD_OPS: AtomicBool = AtomicBool::new(true);

/// Whether differentiable RMSNorm, softmax, rope, attention and SwiGLU take single ops with their
/// backward written out ([`fused_grad`], [`fused_attention`]; the default)
/// or the composed forms, process-wide: the composed forms are the reference the tests hold the
/// fused ones to.
pub fn set_fused_grad_ops(on: bool) {
    FUSED_GRAD_OPS.store(on, Ordering::Relaxed);
}

fn fused_grad_ops() -> bool {
    FUSED_GRAD_OPS.load(Ordering::Relaxed)
}

/// A weight change `left · right` of rank `r`, applied to inputs as `(x rightᵀ) leftᵀ`.
///
/// # Shapes
/// `left: [out, r]`, `right: [r, in]`
#[derive(Debug, Clone)]
pub struct LowRankChange {
    pub left: Tensor,
    pub right: Tensor,
}

impl LowRankChange {
    /// The change as a matrix `[out, in]`.
    pub fn dense(&self) -> Result<Tensor> {
        self.left.matmul(&self.right)
    }

    /// `x @ changeᵀ` in `xs`'s dtype.
    ///
    /// # Shapes
    /// `xs: [b, s, in]` → `[b, s, out]`
    pub fn product(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, s, d_in) = xs.dims3()?;
        let dtype = xs.dtype();
        let flat = xs.contiguous()?.reshape((b * s, d_in))?;
        let inner = flat.matmul(&self.right.to_dtype(dtype)?.t()?)?;
        let out = inner.matmul(&self.left.to_dtype(dtype)?.t()?)?;
        out.reshape((b, s, self.left.dim(0)?))
    }
}

/// `x @ wᵀ (+ b)` for a weight stored `[out, in]`, with its quantised rows where the model keeps
/// them ([`PackedRows`], the same values).
///
/// # Shapes
/// `xs: [b, s, in]`, `weight: [out, in]`, `bias: [out]` → `[b, s, out]`
pub fn linear(
    xs: &Tensor,
    weight: &Tensor,
    packed: Option<&Arc<PackedRows>>,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, s, d_in) = xs.dims3()?;
    let d_out = weight.dim(0)?;
    let ys = matmul_t(&xs.contiguous()?.reshape((b * s, d_in))?, weight, packed)?
        .reshape((b, s, d_out))?;
    match bias {
        Some(bias) => ys.broadcast_add(bias),
        None => Ok(ys),
    }
}

/// `x @ wᵀ (+ b)` from a weight's quantised rows alone, where the short-product kernels apply
/// (f32 on the CPU, no gradient, at most [`kernels::MAX_PACKED_ROWS`] rows): the same kernel, so
/// the same bits, as [`linear`] given the weight beside its rows. `None` elsewhere.
///
/// # Shapes
/// `xs: [b, s, in]`, `packed: [out, in]`, `bias: [out]` → `[b, s, out]`
pub fn linear_from_packed(
    xs: &Tensor,
    packed: &PackedRows,
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let (b, s, d_in) = xs.dims3()?;
    let m = b * s;
    let applies = !xs.track_op()
        && xs.dtype() == DType::F32
        && xs.device().is_cpu()
        && m <= kernels::MAX_PACKED_ROWS
        && d_in == packed.cols()
        && kernels::available()
        && FAST_PRODUCTS.load(Ordering::Relaxed);
    if !applies {
        return Ok(None);
    }
    let flat = xs.contiguous()?.reshape((m, d_in))?;
    let Some(a) = cpu_f32(&flat) else {
        return Ok(None);
    };
    let ys = Tensor::from_vec(
        kernels::x_wt_packed(a.slice(), packed, m),
        (b, s, packed.rows()),
        &Device::Cpu,
    )?;
    Ok(Some(match bias {
        Some(bias) => ys.broadcast_add(bias)?,
        None => ys,
    }))
}

/// `x @ wᵀ` for a 2-D `x`. When a gradient flows through `x` but `w` is a constant, candle's
/// matmul backward would still build the full `[out, in]` gradient of `w` (for the LM head, a
/// vocabulary-sized matrix) on every backward pass and throw it away; [`ConstWeightMatmul`]
/// returns only the gradient of `x`. f32 products on the CPU go to [`kernels`] (from `packed`
/// where given) or OpenBLAS, both ways.
///
/// # Shapes
/// `xs: [n, in]`, `weight: [out, in]` → `[n, out]`
pub fn matmul_t(xs: &Tensor, weight: &Tensor, packed: Option<&Arc<PackedRows>>) -> Result<Tensor> {
    if xs.device().is_cpu() && !weight.track_op() {
        if xs.track_op() {
            return xs.contiguous()?.apply_op1(ConstWeightMatmul {
                weight: weight.clone(),
                packed: packed.cloned(),
            });
        }
        if let Some(ys) = fast_product(xs, weight, packed, Product::XWt)? {
            return Ok(ys);
        }
        if let Some(ys) = widened_product(xs, weight, Product::XWt)? {
            return Ok(ys);
        }
    }
    xs.matmul(&weight.t()?)
}

/// `dy @ w`, the gradient of `x` through `x @ wᵀ` for a constant `w`.
fn const_weight_grad(
    dy: &Tensor,
    weight: &Tensor,
    packed: Option<&Arc<PackedRows>>,
) -> Result<Tensor> {
    if !dy.track_op() {
        if let Some(dx) = fast_product(dy, weight, packed, Product::DyW)? {
            return Ok(dx);
        }
        if let Some(dx) = widened_product(dy, weight, Product::DyW)? {
            return Ok(dx);
        }
    }
    dy.contiguous()?.matmul(weight)
}

/// Rows from which a bf16 or f16 product on the CPU is computed in f32 ([`widened_product`])
/// where the short-product kernels are missing (no AVX-512).
const WIDEN_MIN_ROWS: usize = 8;

/// The most rows of a bf16 or f16 product that the kernels take, reading the weight's rows in
/// place; beyond it the weight is widened once and OpenBLAS multiplies. Twice f32's
/// [`kernels::MAX_ROWS`], because for a half-precision weight OpenBLAS must first have the whole
/// weight written out in f32 and read back; three times for a weight of [`LARGE_HALF_WEIGHT`]
/// elements or more, whose widened copy costs most. Measured (`cargo bench --bench kernels --
/// products-half`, bf16, 2026-12-06, ms for `x·wᵀ` / `dy·w`, streamed against widened):
///
/// | rows | SmolLM2 576×1536 | GPT2-XL 1600×6400 | 7B 4096×4096 | 7B 4096×11008 |
/// |---|---|---|---|---|
/// | 64 | 0.91/0.70 vs 0.83/0.85 | 9.5/7.7 vs 9.7/10.6 | 15.8/15.6 vs 19.5/21.4 | 42.7/41.6 vs 57.5/59.6 |
/// | 96 | 1.28/0.99 vs 1.02/1.01 | 13.5/10.8 vs 12.1/11.7 | 18.5/23.5 vs 24.1/26.5 | 52.7/59.9 vs 62.6/70.3 |
/// | 128 | 1.76/1.28 vs 1.21/1.20 | 18.2/13.8 vs 13.4/14.0 | 26.1/32.6 vs 26.8/29.4 | 74.1/84.5 vs 75.5/75.5 |
fn half_stream_rows(weight_elements: usize) -> usize {
    if weight_elements >= LARGE_HALF_WEIGHT {
        3 * kernels::MAX_ROWS
    } else {
        2 * kernels::MAX_ROWS
    }
}

/// LLaMA-2-7B's attention weights (4096 × 4096) and anything larger.
const LARGE_HALF_WEIGHT: usize = 1 << 24;

thread_local! {
    /// The last widened weight's f32 elements, kept to be overwritten by the next: a fresh
    /// weight-sized allocation per product would be mapped anew each time, and first-touching
    /// that memory costs more than the product here (about 2 ms per MB on this VM).
    static WIDE_WEIGHT: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `f` on a contiguous CPU bf16 or f16 tensor's elements, in place; `None` for other tensors.
fn with_half_rows<R>(t: &Tensor, f: impl FnOnce(kernels::HalfRows<'_>) -> R) -> Option<R> {
    let (guard, layout) = t.storage_and_layout();
    let (start, end) = layout.contiguous_offsets()?;
    match &*guard {
        candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(v)) => {
            Some(f(kernels::HalfRows::Bf16(&v[start..end])))
        }
        candle_core::Storage::Cpu(candle_core::CpuStorage::F16(v)) => {
            Some(f(kernels::HalfRows::F16(&v[start..end])))
        }
        _ => None,
    }
}

/// A contiguous CPU bf16 or f16 tensor's elements as f32, written into `out` in parallel slices
/// (candle's `to_dtype` converts element by element, ~4.6 ns each); false for other tensors.
fn widen_into(t: &Tensor, out: &mut Vec<f32>) -> bool {
    use half::slice::HalfFloatSliceExt;
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    with_half_rows(t, |rows| {
        let n = rows.len();
        if out.len() < n {
            out.resize(n, 0.0);
        }
        let out = out[..n].par_chunks_mut(CHUNK);
        match rows {
            kernels::HalfRows::Bf16(v) => out
                .zip(v.par_chunks(CHUNK))
                .for_each(|(o, i)| kernels::widen_bf16(i, o)),
            kernels::HalfRows::F16(v) => out
                .zip(v.par_chunks(CHUNK))
                .for_each(|(o, i)| i.convert_to_f32_slice(o)),
        }
    })
    .is_some()
}

/// A bf16 or f16 product on the CPU computed in f32 and rounded back. candle multiplies half
/// precision on the CPU by widening both whole operands into fresh f32 buffers on every call
/// (bf16), or several times slower than f32 (f16): for token-by-token generation on LLaMA-2-7B
/// that is 27 GB of fresh memory per token. Up to [`half_stream_rows`] rows, the kernels read
/// the weight's half-precision rows as they lie, a few converted at a time; from there on the
/// weight is widened once into a buffer reused from product to product and OpenBLAS multiplies.
/// Each output is the f32-accumulated sum rounded once, as candle's half kernels also
/// accumulate in f32. `None` where it does not apply.
fn widened_product(lhs: &Tensor, weight: &Tensor, product: Product) -> Result<Option<Tensor>> {
    let dtype = lhs.dtype();
    let (m, width) = match lhs.dims() {
        &[m, width] => (m, width),
        _ => return Ok(None),
    };
    let streams = m <= half_stream_rows(weight.elem_count()) && kernels::available();
    let applies = matches!(dtype, DType::BF16 | DType::F16)
        && weight.dtype() == dtype
        && lhs.device().is_cpu()
        && weight.device().is_cpu()
        && (streams || m >= WIDEN_MIN_ROWS)
        && FAST_PRODUCTS.load(Ordering::Relaxed);
    if !applies {
        return Ok(None);
    }
    let lhs = lhs.contiguous()?;
    let weight = weight.contiguous()?;
    let (rows, cols) = weight.dims2()?;
    let mut a = Vec::new();
    if !widen_into(&lhs, &mut a) {
        return Ok(None);
    }
    let out = if streams {
        with_half_rows(&weight, |w| match product {
            Product::XWt if width == cols => Some((kernels::x_wt_half(&a, w, m, cols, rows), rows)),
            Product::DyW if width == rows => Some((kernels::dy_w_half(&a, w, m, rows, cols), cols)),
            _ => None, // mismatched widths: candle's matmul reports them
        })
        .flatten()
    } else {
        WIDE_WEIGHT.with(|cell| {
            let mut w = cell.borrow_mut();
            if !widen_into(&weight, &mut w) {
                return None;
            }
            dense_product_of(&a, m, width, &w[..rows * cols], (rows, cols), product)
        })
    };
    match out {
        Some((out, cols)) => Ok(Some(
            Tensor::from_vec(out, (m, cols), &Device::Cpu)?.to_dtype(dtype)?,
        )),
        None => Ok(None),
    }
}

static FAST_PRODUCTS: AtomicBool = AtomicBool::new(true);

/// Turns [`kernels`] and OpenBLAS off (or back on) for the whole process, leaving candle's matmul
/// for every product: the reference the fast paths are tested against.
pub fn set_fast_products(on: bool) {
    FAST_PRODUCTS.store(on, Ordering::Relaxed);
}

#[derive(Clone, Copy)]
enum Product {
    /// `x @ wᵀ`: `[m, k] × [n, k]ᵀ`.
    XWt,
    /// `dy @ w`: `[m, n] × [n, k]`.
    DyW,
}

impl Product {
    /// The same product taken on the weight's transpose.
    fn on_transpose(self) -> Self {
        match self {
            Product::XWt => Product::DyW,
            Product::DyW => Product::XWt,
        }
    }
}

/// The product by [`kernels`] (up to [`kernels::MAX_ROWS`] rows) or OpenBLAS (more rows), for f32
/// on the CPU with a 2-D left side and a contiguous weight; `None` where neither applies.
fn fast_product(
    lhs: &Tensor,
    weight: &Tensor,
    packed: Option<&Arc<PackedRows>>,
    product: Product,
) -> Result<Option<Tensor>> {
    let (m, width) = match lhs.dims() {
        &[m, width] => (m, width),
        _ => return Ok(None),
    };
    if lhs.dtype() != DType::F32 {
        return Ok(None);
    }
    let lhs = lhs.contiguous()?;
    let Some(a) = cpu_f32(&lhs) else {
        return Ok(None);
    };
    Ok(
        match fast_product_of(a.slice(), m, width, weight, packed, product)? {
            Some((out, cols)) => Some(Tensor::from_vec(out, (m, cols), &Device::Cpu)?),
            None => None,
        },
    )
}

/// [`fast_product`] on the left side's elements (`[m, width]`, row-major), with the product's
/// width; `None` where neither fast path applies.
fn fast_product_of(
    a: &[f32],
    m: usize,
    width: usize,
    weight: &Tensor,
    packed: Option<&Arc<PackedRows>>,
    product: Product,
) -> Result<Option<(Vec<f32>, usize)>> {
    if !FAST_PRODUCTS.load(Ordering::Relaxed) || weight.dtype() != DType::F32 {
        return Ok(None);
    }
    if !weight.is_contiguous() {
        // A weight held as the transposed view of a matrix stored `[in, out]` (GPT-2's Conv1D
        // weights, loaded without a transposing copy): `x·wᵀ` is `x·s` on the stored `s`, the
        // kernels' `dy·w`, and the other way round.
        let stored = weight.t()?;
        if weight.rank() != 2 || !stored.is_contiguous() {
            return Ok(None);
        }
        return fast_product_of(a, m, width, &stored, None, product.on_transpose());
    }
    let (rows, cols) = weight.dims2()?;
    let packed = packed.filter(|p| {
        m <= kernels::MAX_PACKED_ROWS
            && kernels::available()
            && (p.rows(), p.cols()) == (rows, cols)
    });
    if let Some(packed) = packed {
        return Ok(match product {
            Product::XWt if width == cols => Some((kernels::x_wt_packed(a, packed, m), rows)),
            Product::DyW if width == rows => Some((kernels::dy_w_packed(a, packed, m), cols)),
            _ => None,
        });
    }
    let Some(w) = cpu_f32(weight) else {
        return Ok(None);
    };
    Ok(dense_product_of(
        a,
        m,
        width,
        w.slice(),
        (rows, cols),
        product,
    ))
}

/// The product of `a` (`[m, width]`) with an f32 weight's elements (`shape`, row-major), by
/// [`kernels`] (up to [`kernels::MAX_ROWS`] rows) or OpenBLAS, with the product's width; `None`
/// where neither is available or the widths do not match.
fn dense_product_of(
    a: &[f32],
    m: usize,
    width: usize,
    w: &[f32],
    (rows, cols): (usize, usize),
    product: Product,
) -> Option<(Vec<f32>, usize)> {
    let short = m <= kernels::MAX_ROWS;
    let usable = if short {
        kernels::available()
    } else {
        blas::available()
    };
    if !usable {
        return None;
    }
    match product {
        Product::XWt if width == cols => if short {
            Some(kernels::x_wt(a, w, m, cols, rows))
        } else {
            blas::x_wt(a, w, m, cols, rows)
        }
        .map(|out| (out, rows)),
        Product::DyW if width == rows => if short {
            Some(kernels::dy_w(a, w, m, rows, cols))
        } else {
            blas::dy_w(a, w, m, rows, cols)
        }
        .map(|out| (out, cols)),
        _ => None, // mismatched widths: candle's matmul reports them
    }
}

/// `keysᵀ keys` for `keys: [n, d]`: the sum of `k kᵀ` over the rows. On the CPU in f32 with
/// OpenBLAS, only the upper triangle is multiplied ([`blas::gram`]): the key statistics of a
/// GPT2-XL-sized MLP (d = 6,400) spent 91% of their time in candle's full product.
pub fn gram(keys: &Tensor) -> Result<Tensor> {
    if let (&[n, d], true) = (keys.dims(), FAST_PRODUCTS.load(Ordering::Relaxed)) {
        if let Some(view) = cpu_f32(keys) {
            if let Some(out) = blas::gram(view.slice(), n, d) {
                return Tensor::from_vec(out, (d, d), keys.device());
            }
        }
    }
    keys.t()?.matmul(keys)
}

/// `sum += part` for an f64 `sum` and an f32 `part` of the same shape, in place where both lie
/// contiguous on the CPU. The key statistics keep one d_ff² f64 running sum per layer (328 MB
/// each for GPT2-XL); adding a batch by `(sum + part.to_dtype(F64))` allocated two more.
pub fn add_widened_into(sum: &mut Tensor, part: &Tensor) -> Result<()> {
    let in_place = sum.device().is_cpu()
        && part.device().is_cpu()
        && sum.dtype() == DType::F64
        && part.dtype() == DType::F32
        && sum.dims() == part.dims()
        && sum.is_contiguous()
        && part.is_contiguous();
    if in_place {
        return sum.inplace_op2(part, &AddWidened);
    }
    *sum = (&*sum + part.to_dtype(sum.dtype())?)?;
    Ok(())
}

struct AddWidened;

impl candle_core::InplaceOp2 for AddWidened {
    fn name(&self) -> &'static str {
        "add-widened"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> Result<()> {
        use candle_core::CpuStorage;
        let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("add-widened: operands are not contiguous");
        };
        match (s1, s2) {
            (CpuStorage::F64(sum), CpuStorage::F32(part)) if a1 - a0 == b1 - b0 => {
                for (s, &p) in sum[a0..a1].iter_mut().zip(&part[b0..b1]) {
                    *s += f64::from(p);
                }
                Ok(())
            }
            _ => candle_core::bail!("add-widened: expected an f64 sum and an f32 part of one size"),
        }
    }
}

/// A contiguous CPU f32 tensor's elements, read in place.
struct F32View<'a> {
    guard: candle_core::StorageRef<'a>,
    start: usize,
    len: usize,
}

impl F32View<'_> {
    fn slice(&self) -> &[f32] {
        match &*self.guard {
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
                &v[self.start..self.start + self.len]
            }
            _ => unreachable!("cpu_f32 checked the storage"),
        }
    }
}

fn cpu_f32(t: &Tensor) -> Option<F32View<'_>> {
    let (guard, layout) = t.storage_and_layout();
    let start = layout.contiguous_offsets()?.0;
    match &*guard {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(_)) => Some(F32View {
            guard,
            start,
            len: layout.shape().elem_count(),
        }),
        _ => None,
    }
}

/// `x @ wᵀ` with `w` held constant: the backward pass yields `∂x` only.
struct ConstWeightMatmul {
    weight: Tensor,
    packed: Option<Arc<PackedRows>>,
}

impl candle_core::CustomOp1 for ConstWeightMatmul {
    fn name(&self) -> &'static str {
        "const-weight-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage as S;
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("const-weight-matmul needs a contiguous input".into())
        })?;
        let dims = layout.shape().dims();
        if let (S::F32(v), &[m, width]) = (storage, dims) {
            // The input's elements in place: no copy in or out on the fast paths.
            let fast = fast_product_of(
                &v[start..end],
                m,
                width,
                &self.weight,
                self.packed.as_ref(),
                Product::XWt,
            )?;
            if let Some((out, cols)) = fast {
                return Ok((S::F32(out), (m, cols).into()));
            }
        }
        let xs = match storage {
            S::F32(v) => Tensor::from_slice(&v[start..end], dims, &Device::Cpu)?,
            S::F64(v) => Tensor::from_slice(&v[start..end], dims, &Device::Cpu)?,
            S::F16(v) => Tensor::from_slice(&v[start..end], dims, &Device::Cpu)?,
            S::BF16(v) => Tensor::from_slice(&v[start..end], dims, &Device::Cpu)?,
            _ => candle_core::bail!("const-weight-matmul: unsupported dtype"),
        };
        let ys = match widened_product(&xs, &self.weight, Product::XWt)? {
            Some(ys) => ys,
            None => xs.matmul(&self.weight.t()?)?,
        };
        let (storage, _) = ys.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cpu(cpu) => Ok((cpu.clone(), ys.shape().clone())),
            _ => candle_core::bail!("const-weight-matmul: the weight is not on the CPU"),
        }
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(const_weight_grad(
            grad_res,
            &self.weight,
            self.packed.as_ref(),
        )?))
    }
}

/// Rotary position tables in the Hugging Face (`rotate_half`) convention.
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
    cos_half: Tensor,
    sin_half: Tensor,
}

impl RopeTables {
    /// Tables for absolute positions `offset..offset + len`.
    ///
    /// # Shapes
    /// `cos, sin: [len, head_dim]`
    pub fn new(
        head_dim: usize,
        theta: f64,
        offset: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let positions: Vec<f32> = (offset..offset + len).map(|p| p as f32).collect();
        Self::at(head_dim, theta, positions, &[len], dtype, device)
    }

    /// Tables for row `r` at positions `offsets[r]..offsets[r] + len`.
    ///
    /// # Shapes
    /// `cos, sin: [rows, 1, len, head_dim]` (broadcast over heads)
    pub fn per_row(
        head_dim: usize,
        theta: f64,
        offsets: &[usize],
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let positions: Vec<f32> = offsets
            .iter()
            .flat_map(|&o| (o..o + len).map(|p| p as f32))
            .collect();
        Self::at(
            head_dim,
            theta,
            positions,
            &[offsets.len(), len],
            dtype,
            device,
        )
    }

    /// Tables for `positions` laid out as `lead` (`[len]` or `[rows, len]`).
    fn at(
        head_dim: usize,
        theta: f64,
        positions: Vec<f32>,
        lead: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32)
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let n = positions.len();
        let positions = Tensor::from_vec(positions, (n, 1), device)?;
        let half_freqs = positions.broadcast_mul(&inv_freq)?;
        let freqs = Tensor::cat(&[&half_freqs, &half_freqs], 1)?;
        // The fused kernel takes `[len, half]` or `[rows, len, half]`; the differentiable path
        // broadcasts `[len, head_dim]` or `[rows, 1, len, head_dim]` against `[b, heads, len, head_dim]`.
        let (half_shape, full_shape) = match *lead {
            [len] => (vec![len, half], vec![len, head_dim]),
            [rows, len] => (vec![rows, len, half], vec![rows, 1, len, head_dim]),
            _ => candle_core::bail!("rope tables take one or two leading dimensions"),
        };
        let table = |t: Tensor, shape: &[usize]| t.to_dtype(dtype)?.reshape(shape);
        Ok(Self {
            cos: table(freqs.cos()?, &full_shape)?,
            sin: table(freqs.sin()?, &full_shape)?,
            cos_half: table(half_freqs.cos()?, &half_shape)?,
            sin_half: table(half_freqs.sin()?, &half_shape)?,
        })
    }

    /// Rotates queries or keys: `x·cos + rotate_half(x)·sin`.
    ///
    /// # Shapes
    /// `xs: [b, heads, len, head_dim]` → same
    pub fn apply(&self, xs: &Tensor) -> Result<Tensor> {
        if !needs_grad(&[xs]) {
            return candle_nn::rotary_emb::rope(&xs.contiguous()?, &self.cos_half, &self.sin_half);
        }
        if fused_grad_ops() && fused_grad::applies(xs) && self.cos_half.dtype() == xs.dtype() {
            return xs.contiguous()?.apply_op1(fused_grad::Rope {
                cos_half: self.cos_half.clone(),
                sin_half: self.sin_half.clone(),
            });
        }
        let half = xs.dim(D::Minus1)? / 2;
        let x1 = xs.narrow(D::Minus1, 0, half)?;
        let x2 = xs.narrow(D::Minus1, half, half)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        xs.broadcast_mul(&self.cos)?
            .add(&rotated.broadcast_mul(&self.sin)?)
    }
}

/// Attention of the query heads that share each key/value head, stacked as rows.
///
/// # Shapes
/// `q: [b, kv_heads, group·s, head_dim]`, `k, v: [b, kv_heads, keys, head_dim]`,
/// `mask: [group·s, keys]` or `[b or 1, 1, group·s, keys]` → `[b, s, kv_heads·group·head_dim]`
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    group: usize,
    scale: f64,
) -> Result<Tensor> {
    let (b, kv, rows, d) = q.dims4()?;
    let flows = q.track_op() || k.track_op() || v.track_op();
    let one_dtype = [k.dtype(), v.dtype(), mask.dtype()]
        .iter()
        .all(|&t| t == q.dtype());
    if flows && fused_grad_ops() && fused_grad::applies(q) && one_dtype {
        return q.contiguous()?.apply_op3(
            &k.contiguous()?,
            &v.contiguous()?,
            fused_attention::GroupedAttention {
                scale,
                group,
                mask: mask.clone(),
            },
        );
    }
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
    let s = rows / group.max(1);
    softmax_last(&scores)?
        .matmul(v)?
        .reshape((b, kv * group, s, d))?
        .transpose(1, 2)?
        .reshape((b, s, kv * group * d))
}

/// Additive causal mask for `q_len` new queries after `offset` cached keys: query `i` sees key `j`
/// when `j <= offset + i`. Right padding needs nothing more, because a real token never comes after a pad.
///
/// # Shapes
/// → `[q_len, offset + q_len]`
pub fn causal_mask(q_len: usize, offset: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let k_len = offset + q_len;
    let mask: Vec<f32> = (0..q_len)
        .flat_map(|i| {
            (0..k_len).map(move |j| {
                if j <= offset + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (q_len, k_len), device)?.to_dtype(dtype)
}

/// Additive mask for `q_len` new queries per row after a cache of `width` columns of which row `r`
/// holds `offsets[r]` real ones: query `i` of row `r` sees the row's cached keys and the new keys up
/// to itself.
///
/// # Shapes
/// → `[rows, 1, q_len, width + q_len]`
pub fn ragged_causal_mask(
    q_len: usize,
    width: usize,
    offsets: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let k_len = width + q_len;
    let mut mask = vec![f32::NEG_INFINITY; offsets.len() * q_len * k_len];
    for (r, &offset) in offsets.iter().enumerate() {
        if offset > width {
            candle_core::bail!("row {r} has {offset} cached positions, the cache {width}")
        }
        for i in 0..q_len {
            let row = &mut mask[(r * q_len + i) * k_len..][..k_len];
            row[..offset].fill(0.0);
            row[width..=width + i].fill(0.0);
        }
    }
    Tensor::from_vec(mask, (offsets.len(), 1, q_len, k_len), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In place on the CPU, and by a fresh sum where it cannot be (a narrowed, non-contiguous
    /// part): the same exact f64 sums either way.
    #[test]
    fn add_widened_into_adds_the_exact_f32_values() -> Result<()> {
        let dev = Device::Cpu;
        let mut sum = Tensor::new(&[[1e16f64, 0.5], [-2.0, 3.0]], &dev)?;
        let aliased = sum.clone();
        let part = Tensor::new(&[[1.0f32, 0.1], [0.25, -3.0]], &dev)?;
        add_widened_into(&mut sum, &part)?;
        let want = [[1e16 + 1.0, 0.5 + f64::from(0.1f32)], [-1.75, 0.0]];
        assert_eq!(sum.to_vec2::<f64>()?, want);
        // In place: the storage itself changed, not a new tensor put in `sum`'s name.
        assert_eq!(aliased.to_vec2::<f64>()?, want);

        let wide = Tensor::new(&[[1.0f32, 0.1, 7.0], [0.25, -3.0, 7.0]], &dev)?;
        let strided = wide.narrow(1, 0, 2)?;
        assert!(!strided.is_contiguous());
        let mut fresh = Tensor::new(&[[1e16f64, 0.5], [-2.0, 3.0]], &dev)?;
        add_widened_into(&mut fresh, &strided)?;
        assert_eq!(fresh.to_vec2::<f64>()?, want);
        Ok(())
    }

    #[test]
    fn layer_norm_matches_hand_computation() -> Result<()> {
        let dev = Device::Cpu;
        let xs = Tensor::new(&[[1f32, 2., 3., 6.]], &dev)?;
        let w = Tensor::new(&[1f32, 1., 2., 1.], &dev)?;
        let b = Tensor::new(&[0f32, 0., 0., 1.], &dev)?;
        let got = layer_norm(&xs, &w, &b, 0.0)?.to_vec2::<f32>()?;
        // mean 3, variance (4+1+0+9)/4 = 3.5
        let sd = 3.5f32.sqrt();
        let want = [-2.0 / sd, -1.0 / sd, 0.0, 3.0 / sd + 1.0];
        for (g, w) in got[0].iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
        Ok(())
    }

    #[test]
    fn rms_norm_matches_hand_computation() -> Result<()> {
        let dev = Device::Cpu;
        let xs = Tensor::new(&[[3f32, 4.]], &dev)?;
        let w = Tensor::new(&[1f32, 2.], &dev)?;
        let got = rms_norm(&xs, &w, 0.0)?.to_vec2::<f32>()?;
        let rms = 12.5f32.sqrt();
        assert!((got[0][0] - 3.0 / rms).abs() < 1e-6);
        assert!((got[0][1] - 8.0 / rms).abs() < 1e-6);
        Ok(())
    }

    /// Every entry of a half-precision product is the exact product of its (half-precision)
    /// inputs rounded to a neighbouring half-precision value, up to the f32 summation's own error.
    /// That error is bounded by γₖ·Σ|xᵢwᵢ| (γₖ = k·2⁻²⁴/(1−k·2⁻²⁴)), not by the result: an entry
    /// that cancels to near zero may be off by more than its own half-precision step, so a bound
    /// relative to the result alone fails on some random draws.
    #[test]
    fn half_precision_products_round_the_exact_product() -> Result<()> {
        // One row (generation), a few (editing), and more than the short-product kernels take.
        let (k, n) = (300, 70);
        for m in [1, WIDEN_MIN_ROWS + 3, half_stream_rows(k * n) + 5] {
            for dtype in [DType::BF16, DType::F16] {
                assert_half_products_round_the_exact_product(m, k, n, dtype)?;
            }
        }
        Ok(())
    }

    /// A weight of LLaMA-2-7B's attention size is read in place for more rows than a small one.
    #[test]
    fn large_half_precision_weights_stream_more_rows_and_round_the_exact_product() -> Result<()> {
        let (k, n) = (4096, 4096);
        let m = 2 * kernels::MAX_ROWS + 26;
        assert!(half_stream_rows(k * n) >= m && half_stream_rows(300 * 70) < m);
        assert_half_products_round_the_exact_product(m, k, n, DType::BF16)
    }

    /// Every entry of `x·wᵀ` (plain and tracked) and `dy·w` in `dtype` is the exact product of
    /// its half-precision inputs rounded as [`half_precision_products_round_the_exact_product`]
    /// says.
    fn assert_half_products_round_the_exact_product(
        m: usize,
        k: usize,
        n: usize,
        dtype: DType,
    ) -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?.to_dtype(dtype)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?.to_dtype(dtype)?;
        let (x64, w64) = (x.to_dtype(DType::F64)?, w.to_dtype(DType::F64)?);
        let exact = x64.matmul(&w64.t()?)?;
        let magnitude = x64.abs()?.matmul(&w64.abs()?.t()?)?;
        let dy = Tensor::randn(0f32, 1.0, (m, n), &dev)?.to_dtype(dtype)?;
        let dy64 = dy.to_dtype(DType::F64)?;
        let exact_dx = dy64.matmul(&w64)?;
        let magnitude_dx = dy64.abs()?.matmul(&w64.abs()?)?;
        let x_var = candle_core::Var::from_tensor(&x)?;
        let tracked = matmul_t(x_var.as_tensor(), &w, None)?;
        let dx = const_weight_grad(&dy, &w, None)?;
        for (got, want, magnitude, sum_len) in [
            (matmul_t(&x, &w, None)?, &exact, &magnitude, k),
            (tracked, &exact, &magnitude, k),
            (dx, &exact_dx, &magnitude_dx, n),
        ] {
            assert_eq!(got.dtype(), dtype);
            let got = got.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
            let want = want.flatten_all()?.to_vec1::<f64>()?;
            let magnitude = magnitude.flatten_all()?.to_vec1::<f64>()?;
            let unit = sum_len as f64 * 2f64.powi(-24);
            let summation = unit / (1.0 - unit);
            // Half precision keeps 8 (bf16) or 11 (f16) significant bits.
            let relative_step = if dtype == DType::BF16 {
                2f64.powi(-7)
            } else {
                2f64.powi(-10)
            };
            for ((g, w), s) in got.iter().zip(&want).zip(&magnitude) {
                let f32_sum_error = summation * s;
                let bound = (w.abs() + f32_sum_error) * relative_step + f32_sum_error;
                assert!(
                    (g - w).abs() <= bound,
                    "{dtype:?}, {m} rows: {g} against exact {w} (bound {bound})"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn const_weight_matmul_gives_the_plain_input_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f64, 1.0, (5, 3), &dev)?;
        let x = candle_core::Var::randn(0f64, 1.0, (4, 3), &dev)?;
        let fused = matmul_t(x.as_tensor(), &w, None)?;
        let plain = x.as_tensor().matmul(&w.t()?)?;
        assert_eq!(fused.to_vec2::<f64>()?, plain.to_vec2::<f64>()?);
        let g1 = fused.sqr()?.sum_all()?.backward()?;
        let g2 = plain.sqr()?.sum_all()?.backward()?;
        let (a, b) = (
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "{diff}");
        assert!(g1.get(&w).is_none(), "no gradient for the constant weight");
        Ok(())
    }

    /// A weight held as the transposed view of an `[in, out]` matrix (GPT-2's Conv1D): `x·wᵀ`
    /// and the input gradient `dy·w`, on the kernels (8 rows) and OpenBLAS (70 rows), against
    /// sums in f64.
    #[test]
    fn products_with_a_transposed_view_match_f64_sums() -> Result<()> {
        let dev = Device::Cpu;
        let (n_in, n_out) = (40, 24);
        let stored = Tensor::randn(0f32, 1.0, (n_in, n_out), &dev)?;
        let w = stored.t()?;
        assert!(!w.is_contiguous());
        let wv = stored.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let close = |got: Vec<Vec<f32>>, want: &dyn Fn(usize, usize) -> f64| {
            for (r, row) in got.iter().enumerate() {
                for (c, &g) in row.iter().enumerate() {
                    let want = want(r, c);
                    assert!(
                        (f64::from(g) - want).abs() < 1e-4,
                        "[{r},{c}] {g} vs {want}"
                    );
                }
            }
        };
        for m in [8, 70] {
            let x = Tensor::randn(0f32, 1.0, (m, n_in), &dev)?;
            let xv = x.to_dtype(DType::F64)?.to_vec2::<f64>()?;
            let y = matmul_t(&x, &w, None)?;
            assert_eq!(y.dims(), [m, n_out]);
            close(y.to_vec2()?, &|r, c| {
                (0..n_in).map(|k| xv[r][k] * wv[k][c]).sum()
            });
            let dy = Tensor::randn(0f32, 1.0, (m, n_out), &dev)?;
            let dyv = dy.to_dtype(DType::F64)?.to_vec2::<f64>()?;
            let dx = const_weight_grad(&dy, &w, None)?;
            assert_eq!(dx.dims(), [m, n_in]);
            close(dx.to_vec2()?, &|r, c| {
                (0..n_out).map(|k| dyv[r][k] * wv[c][k]).sum()
            });
            // The products above would match through candle's matmul too: the view must take
            // the fast path wherever that path's library is there.
            let fast_here = if m <= kernels::MAX_ROWS {
                kernels::available()
            } else {
                blas::available()
            };
            let xs = x.flatten_all()?.to_vec1::<f32>()?;
            let dys = dy.flatten_all()?.to_vec1::<f32>()?;
            let forward = fast_product_of(&xs, m, n_in, &w, None, Product::XWt)?;
            let backward = fast_product_of(&dys, m, n_out, &w, None, Product::DyW)?;
            assert_eq!(forward.is_some(), fast_here);
            assert_eq!(backward.is_some(), fast_here);
            let rows = |(out, cols): (Vec<f32>, usize)| -> Vec<Vec<f32>> {
                out.chunks(cols).map(<[f32]>::to_vec).collect()
            };
            if let (Some(y), Some(dx)) = (forward, backward) {
                assert_eq!((y.1, dx.1), (n_out, n_in));
                close(rows(y), &|r, c| {
                    (0..n_in).map(|k| xv[r][k] * wv[k][c]).sum()
                });
                close(rows(dx), &|r, c| {
                    (0..n_out).map(|k| dyv[r][k] * wv[c][k]).sum()
                });
            }
        }
        Ok(())
    }

    #[test]
    fn causal_mask_with_offset_sees_the_cache() -> Result<()> {
        let m = causal_mask(2, 3, DType::F32, &Device::Cpu)?.to_vec2::<f32>()?;
        assert_eq!(m[0][..4], [0.0; 4]);
        assert!(m[0][4].is_infinite());
        assert_eq!(m[1], vec![0.0; 5]);
        Ok(())
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm() -> Result<()> {
        let dev = Device::Cpu;
        let tables = RopeTables::new(4, 10000.0, 0, 2, DType::F32, &dev)?;
        let xs = Tensor::new(&[1f32, 2., 3., 4., 1., 2., 3., 4.], &dev)?.reshape((1, 1, 2, 4))?;
        let ys = tables
            .apply(&xs)?
            .squeeze(0)?
            .squeeze(0)?
            .to_vec2::<f32>()?;
        assert_eq!(ys[0], vec![1., 2., 3., 4.]);
        let norm: f32 = ys[1].iter().map(|v| v * v).sum();
        assert!((norm - 30.0).abs() < 1e-4);
        // position 1, first frequency 1 rad: (x0, x2) rotates by one radian
        let (c, s) = (1f32.cos(), 1f32.sin());
        assert!((ys[1][0] - (1.0 * c - 3.0 * s)).abs() < 1e-6);
        assert!((ys[1][2] - (3.0 * c + 1.0 * s)).abs() < 1e-6);
        Ok(())
    }
}
