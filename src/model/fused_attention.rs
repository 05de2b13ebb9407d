//! Scaled dot-product attention over grouped query heads as one CPU op with its backward pass
//! written out.
//!
//! Composed from candle ops, attention is a dozen graph nodes per layer (the score product, the
//! scale, the mask, the softmax, the value product and the reshapes around them), and candle's
//! backward pass allocates a zeroed gradient and adds into it for every argument of every node.
//! On the short sequences of editing and training that bookkeeping, not arithmetic, was half of a
//! backward pass. Here the whole of it is one node; the backward pass recomputes the attention
//! weights (a few thousand scores per head) rather than keeping them. Used only where a gradient
//! flows (see `ops::attention`): evaluation keeps candle's products and their numbers.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use num_traits::Float;

use super::fused_grad::contiguous;
use super::parallel::{self, ChunkedMut};

/// `softmax(scale · q·kᵀ + mask) · v` for each key/value head and the `group` query heads that
/// share it, stacked as rows (`[b, kv_heads, group·s, head_dim]`, the query heads of a group
/// contiguous). The output is laid out as the attention projection reads it: `[b, s, heads·head_dim]`.
pub(super) struct GroupedAttention {
    pub scale: f64,
    pub group: usize,
    /// Additive, 0 or −∞: `[group·s, keys]` for every row of the batch or `[b, 1, group·s, keys]`.
    pub mask: Tensor,
}

/// The shapes of one call, read off `q: [b, kv, group·s, d]` and `k: [b, kv, keys, d]`.
#[derive(Clone, Copy)]
struct Dims {
    kv: usize,
    group: usize,
    s: usize,
    keys: usize,
    d: usize,
    /// Whether the mask has one block per batch row.
    mask_per_row: bool,
}

impl Dims {
    /// Query rows per key/value head.
    fn rows(&self) -> usize {
        self.group * self.s
    }

    /// Where output row `qr` of head block `(bi, h)` goes in `[b, s, heads·d]`.
    fn out_at(&self, bi: usize, h: usize, qr: usize) -> usize {
        let (r, i) = (qr / self.s, qr % self.s);
        let heads = self.kv * self.group;
        ((bi * self.s + i) * heads + h * self.group + r) * self.d
    }
}

/// One call's inputs, contiguous: `q`, `k`, `v` as [`GroupedAttention`] takes them, and its mask.
struct Operands<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    mask: &'a [T],
}

fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    // Eight independent sums, so that the compiler can keep them in one vector register.
    let mut acc = [T::zero(); 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .fold(T::zero(), |s, (&x, &y)| s + x * y);
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            acc[l] = acc[l] + x[l] * y[l];
        }
    }
    acc.iter().fold(tail, |s, &v| s + v)
}

fn axpy<T: Float>(alpha: T, x: &[T], y: &mut [T]) {
    y.iter_mut().zip(x).for_each(|(y, &x)| *y = *y + alpha * x);
}

impl GroupedAttention {
    fn dims(&self, q: &Layout, k: &Layout, v: &Layout) -> Result<Dims> {
        let (&[b, kv, rows, d], &[kb, kkv, keys, kd]) = (q.shape().dims(), k.shape().dims()) else {
            candle_core::bail!(
                "attention: q {:?} and k {:?} are not [b, kv_heads, rows, head_dim]",
                q.shape(),
                k.shape()
            );
        };
        if (kb, kkv, kd) != (b, kv, d) || v.shape() != k.shape() {
            candle_core::bail!(
                "attention: q {:?}, k {:?}, v {:?} do not match",
                q.shape(),
                k.shape(),
                v.shape()
            );
        }
        if self.group == 0 || rows % self.group != 0 {
            candle_core::bail!("attention: {rows} query rows for groups of {}", self.group);
        }
        let mask = self.mask.dims();
        let mask_per_row = match mask {
            [r, k] if (*r, *k) == (rows, keys) => false,
            [mb, 1, r, k] if (*r, *k) == (rows, keys) && (*mb == b || *mb == 1) => {
                *mb == b && b > 1
            }
            _ => candle_core::bail!("attention: mask {mask:?} for {rows} queries and {keys} keys"),
        };
        Ok(Dims {
            kv,
            group: self.group,
            s: rows / self.group,
            keys,
            d,
            mask_per_row,
        })
    }

    /// The attention weights of query row `qr` of head block `bh` (`[keys]`, zero where masked).
    fn weights<T: Float>(
        &self,
        dims: &Dims,
        bh: usize,
        qr: usize,
        x: &Operands<'_, T>,
        p: &mut [T],
    ) {
        let (q, k, mask) = (x.q, x.k, x.mask);
        let (d, keys) = (dims.d, dims.keys);
        let bi = bh / dims.kv;
        let mask_row = if dims.mask_per_row { bi } else { 0 } * dims.rows() + qr;
        let mask = &mask[mask_row * keys..][..keys];
        let q = &q[(bh * dims.rows() + qr) * d..][..d];
        let scale: T = T::from(self.scale).unwrap_or_else(T::nan);
        let mut max = T::neg_infinity();
        for (j, (pj, &m)) in p.iter_mut().zip(mask).enumerate() {
            *pj = if m == T::neg_infinity() {
                m
            } else {
                scale * dot(q, &k[(bh * keys + j) * d..][..d]) + m
            };
            max = max.max(*pj);
        }
        if max == T::neg_infinity() {
            p.fill(T::zero());
            return;
        }
        let mut sum = T::zero();
        for pj in p.iter_mut() {
            *pj = (*pj - max).exp();
            sum = sum + *pj;
        }
        p.iter_mut().for_each(|pj| *pj = *pj / sum);
    }

    fn forward<T: Float + Send + Sync>(&self, dims: Dims, b: usize, x: &Operands<'_, T>) -> Vec<T> {
        let v = x.v;
        let (d, keys, rows) = (dims.d, dims.keys, dims.rows());
        let blocks: Vec<Vec<T>> = parallel::map(b * dims.kv, |bh| {
            let mut o = vec![T::zero(); rows * d];
            let mut p = vec![T::zero(); keys];
            for (qr, o) in o.chunks_exact_mut(d).enumerate() {
                self.weights(&dims, bh, qr, x, &mut p);
                for (j, &pj) in p.iter().enumerate() {
                    if pj != T::zero() {
                        axpy(pj, &v[(bh * keys + j) * d..][..d], o);
                    }
                }
            }
            o
        });
        let mut out = vec![T::zero(); b * rows * dims.kv * d];
        for (bh, block) in blocks.iter().enumerate() {
            for (qr, o) in block.chunks_exact(d).enumerate() {
                let at = dims.out_at(bh / dims.kv, bh % dims.kv, qr);
                out[at..at + d].copy_from_slice(o);
            }
        }
        out
    }

    /// `(∂q, ∂k, ∂v)` from `∂out` (`[b, s, heads·d]`), with `ds = p ⊙ (dp − Σ p ⊙ dp)`,
    /// `dp = ∂o · vᵀ`, `∂q = scale · ds · k`, `∂k = scale · dsᵀ · q`, `∂v = pᵀ · ∂o`.
    fn backward<T: Float + Send + Sync>(
        &self,
        dims: Dims,
        x: &Operands<'_, T>,
        grad: &[T],
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (q, k, v) = (x.q, x.k, x.v);
        let (d, keys, rows) = (dims.d, dims.keys, dims.rows());
        let scale: T = T::from(self.scale).unwrap_or_else(T::nan);
        let mut dq = vec![T::zero(); q.len()];
        let mut dk = vec![T::zero(); k.len()];
        let mut dv = vec![T::zero(); v.len()];
        let dqs = ChunkedMut::new(&mut dq, rows * d);
        let dks = ChunkedMut::new(&mut dk, keys * d);
        let dvs = ChunkedMut::new(&mut dv, keys * d);
        parallel::for_each(dqs.count(), |bh| {
            // SAFETY: `for_each` visits each head once.
            let (dq, dk, dv) = unsafe { (dqs.take(bh), dks.take(bh), dvs.take(bh)) };
            {
                let (bi, h) = (bh / dims.kv, bh % dims.kv);
                let mut p = vec![T::zero(); keys];
                let mut dp = vec![T::zero(); keys];
                for (qr, dq) in dq.chunks_exact_mut(d).enumerate() {
                    self.weights(&dims, bh, qr, x, &mut p);
                    let at = dims.out_at(bi, h, qr);
                    let g = &grad[at..at + d];
                    let mut weighted = T::zero();
                    for (j, (&pj, dpj)) in p.iter().zip(dp.iter_mut()).enumerate() {
                        *dpj = if pj == T::zero() {
                            T::zero()
                        } else {
                            dot(g, &v[(bh * keys + j) * d..][..d])
                        };
                        weighted = weighted + pj * *dpj;
                    }
                    let qrow = &q[(bh * rows + qr) * d..][..d];
                    for (j, (&pj, &dpj)) in p.iter().zip(&dp).enumerate() {
                        if pj == T::zero() {
                            continue;
                        }
                        let ds = scale * pj * (dpj - weighted);
                        axpy(ds, &k[(bh * keys + j) * d..][..d], dq);
                        axpy(ds, qrow, &mut dk[j * d..][..d]);
                        axpy(pj, g, &mut dv[j * d..][..d]);
                    }
                }
            }
        });
        (dq, dk, dv)
    }
}

type Gradients = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

impl GroupedAttention {
    fn forward_on<T: Float + Send + Sync + candle_core::WithDType>(
        &self,
        dims: Dims,
        b: usize,
        q: (&[T], &Layout),
        k: (&[T], &Layout),
        v: (&[T], &Layout),
    ) -> Result<Vec<T>> {
        let mask = self.mask.flatten_all()?.to_vec1::<T>()?;
        Ok(self.forward(
            dims,
            b,
            &Operands {
                q: contiguous(q.0, q.1, "attention")?,
                k: contiguous(k.0, k.1, "attention")?,
                v: contiguous(v.0, v.1, "attention")?,
                mask: &mask,
            },
        ))
    }

    fn gradients<T: Float + Send + Sync + candle_core::WithDType>(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        grad: &Tensor,
    ) -> Result<Gradients> {
        let dims = self.dims(q.layout(), k.layout(), v.layout())?;
        let values = |t: &Tensor| t.flatten_all()?.to_vec1::<T>();
        let (dq, dk, dv) = self.backward(
            dims,
            &Operands {
                q: &values(q)?,
                k: &values(k)?,
                v: &values(v)?,
                mask: &values(&self.mask)?,
            },
            &values(grad)?,
        );
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), q.device())?),
            Some(Tensor::from_vec(dk, k.shape(), k.device())?),
            Some(Tensor::from_vec(dv, v.shape(), v.device())?),
        ))
    }
}

impl CustomOp3 for GroupedAttention {
    fn name(&self) -> &'static str {
        "grouped-attention-with-backward"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(lq, lk, lv)?;
        let b = lq.shape().dims()[0];
        let out = match (sq, sk, sv) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                CpuStorage::F32(self.forward_on(dims, b, (q, lq), (k, lk), (v, lv))?)
            }
            (CpuStorage::F64(q), CpuStorage::F64(k), CpuStorage::F64(v)) => {
                CpuStorage::F64(self.forward_on(dims, b, (q, lq), (k, lk), (v, lv))?)
            }
            _ => candle_core::bail!("attention: f32 or f64, one dtype for q, k, v and the mask"),
        };
        Ok((out, Shape::from((b, dims.s, dims.kv * dims.group * dims.d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<Gradients> {
        match q.dtype() {
            DType::F32 => self.gradients::<f32>(q, k, v, grad),
            DType::F64 => self.gradients::<f64>(q, k, v, grad),
            dtype => candle_core::bail!("attention backward: {dtype:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fused_grad::tests::{check_gradient, filled, scalar, weighted};

    /// Two key/value heads with three query heads each, four new tokens after three cached keys
    /// (`[b, 1, …]` mask: the second row has only one of its cached keys, as a ragged prefix does).
    fn case() -> (Tensor, Tensor, Tensor, Tensor) {
        let (b, kv, group, s, keys, d) = (2, 2, 3, 4, 7, 5);
        let q = filled(&[b, kv, group * s, d], 1);
        let k = filled(&[b, kv, keys, d], 2);
        let v = filled(&[b, kv, keys, d], 3);
        let cached = [3usize, 1];
        let mut mask = vec![f64::NEG_INFINITY; b * group * s * keys];
        for (bi, &c) in cached.iter().enumerate() {
            for qr in 0..group * s {
                let i = qr % s;
                let row = &mut mask[(bi * group * s + qr) * keys..][..keys];
                row[..c].fill(0.0);
                row[3..=3 + i].fill(0.0);
            }
        }
        let mask =
            Tensor::from_vec(mask, (b, 1, group * s, keys), &candle_core::Device::Cpu).unwrap();
        (q, k, v, mask)
    }

    fn op(mask: &Tensor) -> GroupedAttention {
        GroupedAttention {
            scale: 0.4,
            group: 3,
            mask: mask.clone(),
        }
    }

    #[test]
    fn forward_is_softmax_of_masked_scores_times_values() {
        let (q, k, v, mask) = case();
        let fused = q.apply_op3(&k, &v, op(&mask)).unwrap();
        // By the definition, one query head at a time: head h·3 + r reads rows r·4.. of block h.
        let (b, s, d) = (2, 4, 5);
        let mut worst = 0f64;
        for bi in 0..b {
            for h in 0..2 {
                for r in 0..3 {
                    let qh = q
                        .get(bi)
                        .unwrap()
                        .get(h)
                        .unwrap()
                        .narrow(0, r * s, s)
                        .unwrap();
                    let kh = k.get(bi).unwrap().get(h).unwrap();
                    let vh = v.get(bi).unwrap().get(h).unwrap();
                    let m = mask
                        .get(bi)
                        .unwrap()
                        .get(0)
                        .unwrap()
                        .narrow(0, r * s, s)
                        .unwrap();
                    let scores =
                        ((qh.matmul(&kh.t().unwrap()).unwrap() * 0.4).unwrap() + m).unwrap();
                    let e = scores.exp().unwrap();
                    let p = e.broadcast_div(&e.sum_keepdim(1).unwrap()).unwrap();
                    let want = p.matmul(&vh).unwrap();
                    let head = h * 3 + r;
                    let got = fused.get(bi).unwrap().narrow(1, head * d, d).unwrap();
                    let gap = (got - want).unwrap().abs().unwrap().max_all().unwrap();
                    worst = worst.max(scalar(&gap));
                }
            }
        }
        assert!(worst < 1e-12, "forward gap {worst}");
    }

    #[test]
    fn backward_is_the_derivative_in_q_k_and_v() {
        let (q, k, v, mask) = case();
        check_gradient(
            &q,
            |q| weighted(&q.apply_op3(&k, &v, op(&mask)).unwrap(), 4),
            "attention ∂q",
        );
        check_gradient(
            &k,
            |k| weighted(&q.apply_op3(k, &v, op(&mask)).unwrap(), 4),
            "attention ∂k",
        );
        check_gradient(
            &v,
            |v| weighted(&q.apply_op3(&k, v, op(&mask)).unwrap(), 4),
            "attention ∂v",
        );
    }

    #[test]
    fn a_mask_shared_by_the_rows_is_the_same_as_one_copied_per_row() {
        let (q, k, v, mask) = case();
        let shared = mask.get(0).unwrap().get(0).unwrap();
        let copied = Tensor::stack(&[&shared, &shared], 0)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let a = q.apply_op3(&k, &v, op(&shared)).unwrap();
        let b = q.apply_op3(&k, &v, op(&copied)).unwrap();
        let gap = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(scalar(&gap), 0.0);
    }
}
