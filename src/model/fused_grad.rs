//! RMSNorm, softmax, log-softmax, rotary embedding and the SwiGLU gate as single CPU ops with their
//! backward pass written out.
//!
//! The composed forms in [`super::ops`] are differentiable but cost a dozen small tensor ops each,
//! forward and backward; on the short sequences of editing and training (16 tokens, 576 wide) that
//! per-op overhead, not arithmetic, is their cost, and it is paid at every layer of every step.
//! These ops do the same arithmetic in one pass each way, in f32 or f64 (`tests/gradients.rs`
//! checks them against central finite differences in f64). Other dtypes and devices keep the
//! composed forms.

use super::parallel::{self, ChunkedMut};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use num_traits::Float;

/// Whether `xs` can take the fused ops: f32 or f64 on the CPU.
pub(super) fn applies(xs: &Tensor) -> bool {
    xs.device().is_cpu() && matches!(xs.dtype(), DType::F32 | DType::F64)
}

/// A contiguous tensor's elements.
fn values<T: candle_core::WithDType>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

pub(super) fn contiguous<'a, T>(v: &'a [T], layout: &Layout, op: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&v[start..end]),
        None => candle_core::bail!("{op} needs a contiguous input"),
    }
}

/// The arithmetic of an op on two inputs of one dtype, written once over f32 and f64;
/// [`pair_forward`] and [`pair_backward`] do candle's dtype dispatch for it.
trait PairArithmetic {
    const NAME: &'static str;
    fn forward<T: Float + Send + Sync>(&self, a: &[T], b: &[T]) -> Vec<T>;
    /// `(∂a, ∂b)` from the output's gradient `g`.
    fn backward<T: Float + Send + Sync>(&self, a: &[T], b: &[T], g: &[T]) -> (Vec<T>, Vec<T>);
}

fn pair_forward<O: PairArithmetic>(
    op: &O,
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
) -> Result<CpuStorage> {
    Ok(match (s1, s2) {
        (CpuStorage::F32(a), CpuStorage::F32(b)) => {
            CpuStorage::F32(op.forward(contiguous(a, l1, O::NAME)?, contiguous(b, l2, O::NAME)?))
        }
        (CpuStorage::F64(a), CpuStorage::F64(b)) => {
            CpuStorage::F64(op.forward(contiguous(a, l1, O::NAME)?, contiguous(b, l2, O::NAME)?))
        }
        _ => candle_core::bail!("{}: f32 or f64, one dtype for both inputs", O::NAME),
    })
}

fn pair_backward<O: PairArithmetic>(
    op: &O,
    a: &Tensor,
    b: &Tensor,
    grad: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    fn typed<O: PairArithmetic, T: Float + Send + Sync + candle_core::WithDType>(
        op: &O,
        a: &Tensor,
        b: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (da, db) = op.backward(&values::<T>(a)?, &values(b)?, &values(grad)?);
        Ok((
            Some(Tensor::from_vec(da, a.shape(), a.device())?),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
    match a.dtype() {
        DType::F32 => typed::<O, f32>(op, a, b, grad),
        DType::F64 => typed::<O, f64>(op, a, b, grad),
        dtype => candle_core::bail!("{} backward: {dtype:?}", O::NAME),
    }
}

/// `x / sqrt(mean(x²) + eps) * weight` over the last dimension.
pub(super) struct RmsNorm {
    pub eps: f64,
}

impl PairArithmetic for RmsNorm {
    const NAME: &'static str = "rms-norm";

    fn forward<T: Float + Send + Sync>(&self, x: &[T], w: &[T]) -> Vec<T> {
        let d = w.len();
        let eps = cast(self.eps);
        let mut out = Vec::with_capacity(x.len());
        for row in x.chunks_exact(d) {
            let r = inverse_rms(row, eps);
            out.extend(row.iter().zip(w).map(|(&v, &g)| v * r * g));
        }
        out
    }

    /// `∂x_k = r·g_k·w_k − r³·x_k·Σ_j g_j·w_j·x_j / d`, `∂w_j = Σ_rows g_j·x_j·r`.
    fn backward<T: Float + Send + Sync>(&self, x: &[T], w: &[T], g: &[T]) -> (Vec<T>, Vec<T>) {
        let d = w.len();
        let eps = cast(self.eps);
        let width = cast(d as f64);
        let mut dx = Vec::with_capacity(x.len());
        let mut dw = vec![T::zero(); d];
        for (row, grow) in x.chunks_exact(d).zip(g.chunks_exact(d)) {
            let r = inverse_rms(row, eps);
            let mut gwx = T::zero();
            for ((&v, &gv), (&wv, acc)) in row.iter().zip(grow).zip(w.iter().zip(dw.iter_mut())) {
                gwx = gwx + gv * wv * v;
                *acc = *acc + gv * v * r;
            }
            let coef = r * r * r * gwx / width;
            dx.extend(
                row.iter()
                    .zip(grow)
                    .zip(w)
                    .map(|((&v, &gv), &wv)| r * gv * wv - coef * v),
            );
        }
        (dx, dw)
    }
}

/// `v` in `T` (f32 or f64, where every f64 converts).
fn cast<T: Float>(v: f64) -> T {
    T::from(v).unwrap_or_else(T::nan)
}

fn inverse_rms<T: Float>(row: &[T], eps: T) -> T {
    let ms = row.iter().fold(T::zero(), |s, &v| s + v * v) / cast::<T>(row.len() as f64);
    (ms + eps).sqrt().recip()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-with-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = l2.shape().elem_count();
        if l1.shape().dims().last() != Some(&d) {
            candle_core::bail!("rms-norm: weight of {d} for input {:?}", l1.shape());
        }
        Ok((pair_forward(self, s1, l1, s2, l2)?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        pair_backward(self, x, w, grad)
    }
}

/// LLaMA's gated MLP activation `silu(gate) · up`, with `silu(g) = g / (1 + e^−g)` as candle
/// computes it, so the forward values are candle's.
pub(super) struct SwiGlu;

/// Elements per parallel task: the MLP's activations are the widest tensors of a layer.
const SWIGLU_CHUNK: usize = 8192;

impl PairArithmetic for SwiGlu {
    const NAME: &'static str = "swiglu";

    fn forward<T: Float + Send + Sync>(&self, gate: &[T], up: &[T]) -> Vec<T> {
        let mut out = vec![T::zero(); gate.len()];
        parallel::for_each_chunk_mut(&mut out, SWIGLU_CHUNK, |i, out| {
            let at = i * SWIGLU_CHUNK;
            for ((o, &g), &u) in out.iter_mut().zip(&gate[at..]).zip(&up[at..]) {
                *o = g / (T::one() + (-g).exp()) * u;
            }
        });
        out
    }

    /// `∂gate = ∂y · up · σ(g)(1 + g(1 − σ(g)))`, `∂up = ∂y · silu(g)`.
    fn backward<T: Float + Send + Sync>(
        &self,
        gate: &[T],
        up: &[T],
        grad: &[T],
    ) -> (Vec<T>, Vec<T>) {
        let mut d_gate = vec![T::zero(); gate.len()];
        let mut d_up = vec![T::zero(); gate.len()];
        {
            let d_gates = ChunkedMut::new(&mut d_gate, SWIGLU_CHUNK);
            let d_ups = ChunkedMut::new(&mut d_up, SWIGLU_CHUNK);
            parallel::for_each(d_gates.count(), |c| {
                // SAFETY: `for_each` visits each chunk once.
                let (d_gate, d_up) = unsafe { (d_gates.take(c), d_ups.take(c)) };
                let at = c * SWIGLU_CHUNK;
                let inputs = gate[at..].iter().zip(up[at..].iter().zip(&grad[at..]));
                for (i, (&g, (&u, &dy))) in inputs.take(d_gate.len()).enumerate() {
                    let sigma = (T::one() + (-g).exp()).recip();
                    d_up[i] = dy * g * sigma;
                    d_gate[i] = dy * u * sigma * (T::one() + g * (T::one() - sigma));
                }
            });
        }
        (d_gate, d_up)
    }
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu-with-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: gate {:?}, up {:?}", l1.shape(), l2.shape());
        }
        Ok((pair_forward(self, s1, l1, s2, l2)?, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        pair_backward(self, gate, up, grad)
    }
}

/// Softmax over the last dimension.
pub(super) struct SoftmaxLast;

fn softmax_rows<T: Float>(x: &[T], d: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        let max = row.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
        let start = out.len();
        let mut sum = T::zero();
        for &v in row {
            let e = (v - max).exp();
            sum = sum + e;
            out.push(e);
        }
        out[start..].iter_mut().for_each(|e| *e = *e / sum);
    }
    out
}

/// `∂x = y ⊙ (g − Σ g ⊙ y)` row by row.
fn softmax_backward<T: Float>(y: &[T], g: &[T], d: usize) -> Vec<T> {
    let mut dx = Vec::with_capacity(y.len());
    for (yrow, grow) in y.chunks_exact(d).zip(g.chunks_exact(d)) {
        let dot = yrow
            .iter()
            .zip(grow)
            .fold(T::zero(), |s, (&a, &b)| s + a * b);
        dx.extend(yrow.iter().zip(grow).map(|(&a, &b)| a * (b - dot)));
    }
    dx
}

impl CustomOp1 for SoftmaxLast {
    fn name(&self) -> &'static str {
        "softmax-last-with-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = *l.shape().dims().last().unwrap_or(&1);
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(softmax_rows(contiguous(x, l, "softmax")?, d)),
            CpuStorage::F64(x) => CpuStorage::F64(softmax_rows(contiguous(x, l, "softmax")?, d)),
            _ => candle_core::bail!("softmax: f32 or f64"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let d = y.dims().last().copied().unwrap_or(1);
        let dx = match y.dtype() {
            DType::F32 => Tensor::from_vec(
                softmax_backward(&values::<f32>(y)?, &values(grad)?, d),
                y.shape(),
                y.device(),
            )?,
            DType::F64 => Tensor::from_vec(
                softmax_backward(&values::<f64>(y)?, &values(grad)?, d),
                y.shape(),
                y.device(),
            )?,
            dtype => candle_core::bail!("softmax backward: {dtype:?}"),
        };
        Ok(Some(dx))
    }
}

/// Log-softmax over the last dimension: `x − max − ln Σ exp(x − max)`.
pub(super) struct LogSoftmaxLast;

fn log_softmax_rows<T: Float>(x: &[T], d: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        let max = row.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
        let log_sum = row.iter().fold(T::zero(), |s, &v| s + (v - max).exp()).ln();
        out.extend(row.iter().map(|&v| (v - max) - log_sum));
    }
    out
}

/// `∂x = g − exp(y) · Σ g` row by row.
fn log_softmax_backward<T: Float>(y: &[T], g: &[T], d: usize) -> Vec<T> {
    let mut dx = Vec::with_capacity(y.len());
    for (yrow, grow) in y.chunks_exact(d).zip(g.chunks_exact(d)) {
        let total = grow.iter().fold(T::zero(), |s, &b| s + b);
        dx.extend(yrow.iter().zip(grow).map(|(&a, &b)| b - a.exp() * total));
    }
    dx
}

impl CustomOp1 for LogSoftmaxLast {
    fn name(&self) -> &'static str {
        "log-softmax-last-with-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = *l.shape().dims().last().unwrap_or(&1);
        let out = match s {
            CpuStorage::F32(x) => {
                CpuStorage::F32(log_softmax_rows(contiguous(x, l, "log-softmax")?, d))
            }
            CpuStorage::F64(x) => {
                CpuStorage::F64(log_softmax_rows(contiguous(x, l, "log-softmax")?, d))
            }
            _ => candle_core::bail!("log-softmax: f32 or f64"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let d = y.dims().last().copied().unwrap_or(1);
        let dx = match y.dtype() {
            DType::F32 => Tensor::from_vec(
                log_softmax_backward(&values::<f32>(y)?, &values(grad)?, d),
                y.shape(),
                y.device(),
            )?,
            DType::F64 => Tensor::from_vec(
                log_softmax_backward(&values::<f64>(y)?, &values(grad)?, d),
                y.shape(),
                y.device(),
            )?,
            dtype => candle_core::bail!("log-softmax backward: {dtype:?}"),
        };
        Ok(Some(dx))
    }
}

/// Rotary embedding in the `rotate_half` convention: `y₁ = x₁c − x₂s`, `y₂ = x₂c + x₁s` on the
/// two halves of each head. Its transpose is the rotation by the opposite angle, so the backward
/// pass is the same op with `s` negated.
pub(super) struct Rope {
    /// `[len, half]` (every row at the same positions) or `[rows, len, half]`.
    pub cos_half: Tensor,
    pub sin_half: Tensor,
}

impl Rope {
    fn rotate<T: Float + candle_core::WithDType>(
        &self,
        x: &[T],
        dims: &[usize],
        sign: T,
    ) -> Result<Vec<T>> {
        let &[b, heads, len, head_dim] = dims else {
            candle_core::bail!("rope: input {dims:?} is not [b, heads, len, head_dim]");
        };
        let half = head_dim / 2;
        let cos = values::<T>(&self.cos_half)?;
        let sin = values::<T>(&self.sin_half)?;
        let per_row = self.cos_half.rank() == 3;
        let table_rows = if per_row { b * len } else { len };
        if cos.len() != table_rows * half || sin.len() != cos.len() {
            candle_core::bail!(
                "rope: tables {:?} for input {dims:?}",
                self.cos_half.shape()
            );
        }
        let mut out = vec![T::zero(); x.len()];
        for (idx, (src, dst)) in x
            .chunks_exact(head_dim)
            .zip(out.chunks_exact_mut(head_dim))
            .enumerate()
        {
            let t = idx % len;
            let row = idx / (heads * len);
            let at = if per_row { row * len + t } else { t } * half;
            let (c, s) = (&cos[at..at + half], &sin[at..at + half]);
            for i in 0..half {
                let (x1, x2) = (src[i], src[i + half]);
                let si = sign * s[i];
                dst[i] = x1 * c[i] - x2 * si;
                dst[i + half] = x2 * c[i] + x1 * si;
            }
        }
        Ok(out)
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope-with-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims();
        let out = match s {
            CpuStorage::F32(x) => {
                CpuStorage::F32(self.rotate(contiguous(x, l, "rope")?, dims, 1.0)?)
            }
            CpuStorage::F64(x) => {
                CpuStorage::F64(self.rotate(contiguous(x, l, "rope")?, dims, 1.0)?)
            }
            _ => candle_core::bail!("rope: f32 or f64"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dims = grad.dims().to_vec();
        let dx = match grad.dtype() {
            DType::F32 => Tensor::from_vec(
                self.rotate(&values::<f32>(grad)?, &dims, -1.0)?,
                y.shape(),
                y.device(),
            )?,
            DType::F64 => Tensor::from_vec(
                self.rotate(&values::<f64>(grad)?, &dims, -1.0)?,
                y.shape(),
                y.device(),
            )?,
            dtype => candle_core::bail!("rope backward: {dtype:?}"),
        };
        Ok(Some(dx))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use candle_core::{Device, Var};

    pub(in crate::model) fn filled(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n as u64)
            .map(|i| (((i * 7919 + seed * 104_729) % 2001) as f64 - 1000.0) / 700.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    pub(in crate::model) fn scalar(t: &Tensor) -> f64 {
        t.to_scalar::<f64>().unwrap()
    }

    /// Central differences of `loss` at every element of `at`, against the backward pass.
    pub(in crate::model) fn check_gradient(
        at: &Tensor,
        loss: impl Fn(&Tensor) -> Tensor,
        what: &str,
    ) {
        let var = Var::from_tensor(at).unwrap();
        let grads = loss(var.as_tensor()).backward().unwrap();
        let analytic: Vec<f64> = values(grads.get(var.as_tensor()).unwrap()).unwrap();
        let base: Vec<f64> = values(at).unwrap();
        let h = 1e-6;
        for (i, &a) in analytic.iter().enumerate() {
            let mut plus = base.clone();
            let mut minus = base.clone();
            plus[i] += h;
            minus[i] -= h;
            let shifted = |v: Vec<f64>| Tensor::from_vec(v, at.shape(), &Device::Cpu).unwrap();
            let numeric =
                (scalar(&loss(&shifted(plus))) - scalar(&loss(&shifted(minus)))) / (2.0 * h);
            assert!(
                (a - numeric).abs() <= 1e-6 * (1.0 + numeric.abs()),
                "{what}: ∂[{i}] = {a}, finite differences {numeric}"
            );
        }
    }

    /// A loss that weighs every output differently, so no gradient hides in a plain sum.
    pub(in crate::model) fn weighted(y: &Tensor, seed: u64) -> Tensor {
        (y * filled(y.dims(), seed)).unwrap().sum_all().unwrap()
    }

    #[test]
    fn rms_norm_forward_is_its_definition_and_backward_its_derivative() {
        let x = filled(&[3, 5], 1);
        let w = filled(&[5], 2);
        let op = || RmsNorm { eps: 1e-5 };
        let fused = x.apply_op2(&w, op()).unwrap();
        let ms = x.sqr().unwrap().mean_keepdim(1).unwrap();
        let composed = x
            .broadcast_div(&(ms + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(&w)
            .unwrap();
        let gap = (fused - composed)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(scalar(&gap) < 1e-12, "forward gap {gap}");
        check_gradient(
            &x,
            |x| weighted(&x.apply_op2(&w, op()).unwrap(), 3),
            "rms-norm ∂x",
        );
        check_gradient(
            &w,
            |w| weighted(&x.apply_op2(w, op()).unwrap(), 3),
            "rms-norm ∂w",
        );
    }

    #[test]
    fn swiglu_forward_is_silu_times_up_and_backward_its_derivative() {
        let gate = filled(&[3, 4, 5], 11);
        let up = filled(&[3, 4, 5], 12);
        let fused = gate.apply_op2(&up, SwiGlu).unwrap();
        let composed = (gate.silu().unwrap() * &up).unwrap();
        let gap = (fused - composed)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(scalar(&gap) < 1e-12, "forward gap {gap}");
        check_gradient(
            &gate,
            |g| weighted(&g.apply_op2(&up, SwiGlu).unwrap(), 13),
            "swiglu ∂gate",
        );
        check_gradient(
            &up,
            |u| weighted(&gate.apply_op2(u, SwiGlu).unwrap(), 13),
            "swiglu ∂up",
        );
    }

    #[test]
    fn softmax_forward_is_its_definition_and_backward_its_derivative() {
        let x = filled(&[2, 3, 4], 4);
        let fused = x.apply_op1(SoftmaxLast).unwrap();
        let e = x.exp().unwrap();
        let composed = e.broadcast_div(&e.sum_keepdim(2).unwrap()).unwrap();
        let gap = (fused - composed)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(scalar(&gap) < 1e-12, "forward gap {gap}");
        check_gradient(
            &x,
            |x| weighted(&x.apply_op1(SoftmaxLast).unwrap(), 5),
            "softmax",
        );
    }

    #[test]
    fn log_softmax_forward_is_its_definition_and_backward_its_derivative() {
        let x = filled(&[3, 7], 9);
        let fused = x.apply_op1(LogSoftmaxLast).unwrap();
        let e = x.exp().unwrap();
        let composed = x
            .broadcast_sub(&e.sum_keepdim(1).unwrap().log().unwrap())
            .unwrap();
        let gap = (fused - composed)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(scalar(&gap) < 1e-12, "forward gap {gap}");
        check_gradient(
            &x,
            |x| weighted(&x.apply_op1(LogSoftmaxLast).unwrap(), 10),
            "log-softmax",
        );
    }

    #[test]
    fn rope_forward_is_its_definition_and_backward_its_derivative() {
        // [b, heads, len, head_dim] with tables shared by the rows, then one table per row.
        let x = filled(&[2, 3, 4, 6], 6);
        for per_row in [false, true] {
            let lead: &[usize] = if per_row { &[2, 4, 3] } else { &[4, 3] };
            let angles = filled(lead, 7);
            let op = || Rope {
                cos_half: angles.cos().unwrap(),
                sin_half: angles.sin().unwrap(),
            };
            let fused = x.apply_op1(op()).unwrap();
            // x·cos + rotate_half(x)·sin with the tables repeated over both halves.
            let full = |t: Tensor| {
                let t = Tensor::cat(&[&t, &t], candle_core::D::Minus1).unwrap();
                if per_row {
                    t.unsqueeze(1).unwrap()
                } else {
                    t
                }
            };
            let x1 = x.narrow(3, 0, 3).unwrap();
            let x2 = x.narrow(3, 3, 3).unwrap();
            let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], 3).unwrap();
            let composed = (x.broadcast_mul(&full(angles.cos().unwrap())).unwrap()
                + rotated.broadcast_mul(&full(angles.sin().unwrap())).unwrap())
            .unwrap();
            let gap = (fused - composed)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert!(
                scalar(&gap) < 1e-12,
                "forward gap {gap} (per_row {per_row})"
            );
            check_gradient(&x, |x| weighted(&x.apply_op1(op()).unwrap(), 8), "rope");
        }
    }
}
