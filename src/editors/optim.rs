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
        self.step += 1;
        let bc1 = 1.0 - self.beta1.powi(self.step);
        let bc2 = 1.0 - self.beta2.powi(self.step);
        for (i, var) in self.vars.iter().enumerate() {
            let Some(grad) = grads.get(var.as_tensor()) else {
                continue;
            };
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
}

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
}
