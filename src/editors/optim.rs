//! Adam as `torch.optim.Adam` computes it: L2 weight decay added to the gradient (coupled), bias
//! correction, β = (0.9, 0.999), ε = 1e-8. candle-nn's AdamW decouples the decay, which changes
//! EasyEdit's numbers whenever `weight_decay` is not zero.

use candle_core::{Result, Tensor, Var};

pub struct Adam {
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: i32,
    pub lr: f64,
    pub weight_decay: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
}

impl Adam {
    pub fn new(vars: Vec<Var>, lr: f64, weight_decay: f64) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        Ok(Self {
            m: vars.iter().map(zeros).collect::<Result<_>>()?,
            v: vars.iter().map(zeros).collect::<Result<_>>()?,
            vars,
            step: 0,
            lr,
            weight_decay,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        })
    }

    /// One step from the gradients of `loss`. A variable the loss does not reach is left alone.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        let grads: Vec<Option<Tensor>> = self
            .vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).cloned())
            .collect();
        self.apply_gradients(&grads)
    }

    /// The optimiser's state: steps taken, then each variable's first and second moments.
    pub fn state(&self) -> (i32, &[Tensor], &[Tensor]) {
        (self.step, &self.m, &self.v)
    }

    /// Takes back a state from [`Adam::state`] of an optimiser over variables of the same shapes.
    pub fn restore(&mut self, step: i32, m: Vec<Tensor>, v: Vec<Tensor>) -> Result<()> {
        if m.len() != self.m.len() || v.len() != self.v.len() {
            candle_core::bail!(
                "Adam state for {} variables, this optimiser has {}",
                m.len(),
                self.m.len()
            )
        }
        for (i, (m, v)) in m.iter().zip(&v).enumerate() {
            let want = self.vars[i].as_tensor();
            if m.dims() != want.dims() || v.dims() != want.dims() {
                candle_core::bail!(
                    "Adam state of variable {i} has shape {:?}, the variable {:?}",
                    m.dims(),
                    want.dims()
                )
            }
        }
        // The moments are written in place ([`Adam::fused_update`]): each gets storage of its own.
        let place = |t: Tensor, like: &Tensor| {
            t.to_device(like.device())?
                .to_dtype(like.dtype())?
                .contiguous()?
                .copy()
        };
        self.m = m
            .into_iter()
            .zip(&self.vars)
            .map(|(t, var)| place(t, var.as_tensor()))
            .collect::<Result<_>>()?;
        self.v = v
            .into_iter()
            .zip(&self.vars)
            .map(|(t, var)| place(t, var.as_tensor()))
            .collect::<Result<_>>()?;
        self.step = step;
        Ok(())
    }

    /// One step from gradients given per variable, in the order of `vars` (`None`: left alone),
    /// for callers that accumulate or clip gradients first.
    pub fn apply_gradients(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        if grads.len() != self.vars.len() {
            candle_core::bail!(
                "Adam: {} gradients for {} variables",
                grads.len(),
                self.vars.len()
            )
        }
        self.step += 1;
        let bc1 = 1.0 - self.beta1.powi(self.step);
        let bc2 = 1.0 - self.beta2.powi(self.step);
        for (i, var) in self.vars.iter().enumerate() {
            let Some(grad) = &grads[i] else {
                continue;
            };
            if self.fused_update(i, grad, bc1, bc2)? {
                continue;
            }
            let mut grad = grad.clone();
            if self.weight_decay != 0.0 {
                grad = (grad + (var.as_tensor() * self.weight_decay)?)?;
            }
            self.m[i] = ((&self.m[i] * self.beta1)? + (&grad * (1.0 - self.beta1))?)?;
            self.v[i] = ((&self.v[i] * self.beta2)? + (grad.sqr()? * (1.0 - self.beta2))?)?;
            let denom = ((&self.v[i] / bc2)?.sqrt()? + self.eps)?;
            let update = ((&self.m[i] / bc1)? / denom)?;
            var.set(&(var.as_tensor() - (update * self.lr)?)?)?;
        }
        Ok(())
    }

    /// The update of variable `i` in one pass over its elements, for f32 on the CPU: the composed
    /// form above makes eleven tensors the size of the weight per step (for a 576 × 1536 matrix,
    /// 5 of an FT-L step's 80 ms). It computes what those ops compute, operation for operation:
    /// candle's tensor-by-scalar ops are `x · mul + add` in f32, with division by a scalar as
    /// multiplication by its reciprocal. It goes a block of rows at a time and writes the
    /// variable and both moments in place, so a step needs no copy of any of them (KE's
    /// embedding table and its moments are 113 MB each on SmolLM2). Returns whether it applied.
    fn fused_update(&self, i: usize, grad: &Tensor, bc1: f64, bc2: f64) -> Result<bool> {
        let w = self.vars[i].as_tensor();
        let (m, v) = (&self.m[i], &self.v[i]);
        let all_f32_cpu = [w, grad, m, v]
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32);
        if !all_f32_cpu || w.rank() == 0 || grad.dims() != w.dims() {
            return Ok(false);
        }
        let f = |x: f64| x as f32;
        let (decay, b1, one_b1, b2, one_b2) = (
            f(self.weight_decay),
            f(self.beta1),
            f(1.0 - self.beta1),
            f(self.beta2),
            f(1.0 - self.beta2),
        );
        let (inv_bc1, inv_bc2, eps, lr) = (f(1.0 / bc1), f(1.0 / bc2), f(self.eps), f(self.lr));
        let rows = w.dim(0)?;
        let row_len = w.elem_count() / rows.max(1);
        let block = (FUSED_BLOCK / row_len.max(1)).max(1);
        for start in (0..rows).step_by(block) {
            let len = block.min(rows - start);
            let read = |t: &Tensor| t.narrow(0, start, len)?.flatten_all()?.to_vec1::<f32>();
            let (mut w_new, g, mut m_new, mut v_new) = (read(w)?, read(grad)?, read(m)?, read(v)?);
            for (((w, &g), m), v) in w_new.iter_mut().zip(&g).zip(&mut m_new).zip(&mut v_new) {
                let g = if self.weight_decay != 0.0 {
                    g + (*w * decay + 0.0)
                } else {
                    g
                };
                *m = (*m * b1 + 0.0) + (g * one_b1 + 0.0);
                *v = (*v * b2 + 0.0) + ((g * g) * one_b2 + 0.0);
                let denom = (*v * inv_bc2 + 0.0).sqrt() * 1.0 + eps;
                let update = (*m * inv_bc1 + 0.0) / denom;
                *w -= update * lr + 0.0;
            }
            let mut shape = w.dims().to_vec();
            shape[0] = len;
            for (target, values) in [(w, w_new), (m, m_new), (v, v_new)] {
                target.slice_set(
                    &Tensor::from_vec(values, shape.as_slice(), w.device())?,
                    0,
                    start,
                )?;
            }
        }
        Ok(true)
    }
}

/// Elements per block of the fused update: small enough to stay in cache.
const FUSED_BLOCK: usize = 1 << 15;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Against torch's update rule written out in scalar arithmetic, on loss = (w - 3)², w0 = 1.
    #[test]
    fn matches_torch_adam_with_coupled_decay() -> Result<()> {
        let (lr, wd, b1, b2, eps) = (0.1, 0.5, 0.9f64, 0.999f64, 1e-8);
        let w = Var::new(&[1f64], &Device::Cpu)?;
        let mut adam = Adam::new(vec![w.clone()], lr, wd)?;
        let (mut x, mut m, mut v) = (1f64, 0f64, 0f64);
        for t in 1..=5 {
            let g = 2.0 * (x - 3.0) + wd * x;
            m = b1 * m + (1.0 - b1) * g;
            v = b2 * v + (1.0 - b2) * g * g;
            let (mh, vh) = (m / (1.0 - b1.powi(t)), v / (1.0 - b2.powi(t)));
            x -= lr * mh / (vh.sqrt() + eps);
            let loss = (w.as_tensor() - 3.0)?.sqr()?.sum_all()?;
            adam.backward_step(&loss)?;
            let got = w.as_tensor().to_vec1::<f64>()?[0];
            assert!((got - x).abs() < 1e-12, "step {t}: {got} vs {x}");
        }
        assert!((x - 1.0).abs() > 0.3, "the reference itself moved");
        Ok(())
    }

    /// The one-pass f32 update against torch's rule in f32 scalar arithmetic, on a vector whose
    /// elements see gradients of very different sizes (Adam's normalisation at work).
    #[test]
    fn the_f32_update_matches_torch_adam() -> Result<()> {
        let (lr, wd, b1, b2, eps) = (0.05f32, 0.1f32, 0.9f32, 0.999f32, 1e-8f32);
        let start = [1f32, -2.0, 0.5, 30.0];
        let scale = [1f32, 1e-3, 10.0, 0.2];
        let w = Var::new(&start, &Device::Cpu)?;
        let mut adam = Adam::new(vec![w.clone()], f64::from(lr), f64::from(wd))?;
        let (mut x, mut m, mut v) = (start, [0f32; 4], [0f32; 4]);
        for t in 1..=6 {
            for j in 0..4 {
                let g = scale[j] * 2.0 * (x[j] - 3.0) + wd * x[j];
                m[j] = b1 * m[j] + (1.0 - b1) * g;
                v[j] = b2 * v[j] + (1.0 - b2) * g * g;
                let mh = m[j] / (1.0 - b1.powi(t));
                let vh = v[j] / (1.0 - b2.powi(t));
                x[j] -= lr * mh / (vh.sqrt() + eps);
            }
            let scales = Tensor::new(&scale, &Device::Cpu)?;
            let loss = ((w.as_tensor() - 3.0)?.sqr()? * scales)?.sum_all()?;
            adam.backward_step(&loss)?;
            let got = w.as_tensor().to_vec1::<f32>()?;
            for j in 0..4 {
                let tol = 1e-5 * x[j].abs().max(1.0);
                assert!(
                    (got[j] - x[j]).abs() <= tol,
                    "step {t}, element {j}: {} vs {}",
                    got[j],
                    x[j]
                );
            }
        }
        Ok(())
    }

    /// A matrix of several blocks of rows is updated in place block by block: the variable and
    /// both moments follow torch's rule in f32 scalar arithmetic in every block.
    #[test]
    fn the_blocked_update_covers_every_row() -> Result<()> {
        let (lr, b1, b2, eps) = (0.05f32, 0.9f32, 0.999f32, 1e-8f32);
        let (rows, cols) = (3, 20_000);
        assert!(
            cols < FUSED_BLOCK && 2 * cols > FUSED_BLOCK,
            "one row per block"
        );
        let start: Vec<f32> = (0..rows * cols).map(|k| (k % 7) as f32 - 3.0).collect();
        let scale: Vec<f32> = (0..rows * cols).map(|k| 1.0 + (k / cols) as f32).collect();
        let w = Var::from_tensor(&Tensor::from_vec(
            start.clone(),
            (rows, cols),
            &Device::Cpu,
        )?)?;
        let mut adam = Adam::new(vec![w.clone()], f64::from(lr), 0.0)?;
        let (mut x, mut m, mut v) = (start, vec![0f32; rows * cols], vec![0f32; rows * cols]);
        for t in 1..=3 {
            for j in 0..rows * cols {
                let g = scale[j] * 2.0 * (x[j] - 3.0);
                m[j] = b1 * m[j] + (1.0 - b1) * g;
                v[j] = b2 * v[j] + (1.0 - b2) * g * g;
                let mh = m[j] / (1.0 - b1.powi(t));
                let vh = v[j] / (1.0 - b2.powi(t));
                x[j] -= lr * mh / (vh.sqrt() + eps);
            }
            let scales = Tensor::from_vec(scale.clone(), (rows, cols), &Device::Cpu)?;
            let loss = ((w.as_tensor() - 3.0)?.sqr()? * scales)?.sum_all()?;
            adam.backward_step(&loss)?;
        }
        let (_, ms, vs) = adam.state();
        for (got, want) in [
            (w.as_tensor().flatten_all()?.to_vec1::<f32>()?, &x),
            (ms[0].flatten_all()?.to_vec1::<f32>()?, &m),
            (vs[0].flatten_all()?.to_vec1::<f32>()?, &v),
        ] {
            // f32 rounding in the two orders of operations stays near 1e-5; a row skipped or
            // written to the wrong place would be off by lr-sized steps.
            for (j, (a, b)) in got.iter().zip(want.iter()).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                    "element {j}: {a} vs {b}"
                );
            }
        }
        Ok(())
    }
}
