//! MEND's gradient transform (SPEC-editors §8.3): per shape of edited weight, a residual low-rank
//! network over the normalised factors `[x̂, δ̂]`, with a learned scale and shift per weight of that
//! shape (its mode). With `U = 0` it is the identity on the normalised factors, so an untrained
//! editor applies a (normalised) fine-tuning step.

use candle_core::{DType, Device, Tensor, Var};
use rand::{RngExt, SeedableRng};

use super::Purpose;
use crate::error::{Error, Result};

/// Running per-coordinate mean and spread of the factor rows a network has seen in training
/// (Welford's update, one row at a time in the order they come, as EasyEdit accumulates them).
#[derive(Debug, Clone, PartialEq)]
pub struct RunningMoments {
    pub count: u64,
    pub mean: Vec<f64>,
    /// Sum of squared deviations from the running mean.
    pub m2: Vec<f64>,
}

impl RunningMoments {
    pub fn new(dim: usize) -> Self {
        RunningMoments {
            count: 0,
            mean: vec![0.0; dim],
            m2: vec![0.0; dim],
        }
    }

    /// Takes `rows` (`[n, dim]`, row-major) into the moments.
    pub fn update(&mut self, rows: &[f64]) {
        let dim = self.mean.len();
        for row in rows.chunks_exact(dim) {
            self.count += 1;
            let k = self.count as f64;
            for ((&x, mean), m2) in row.iter().zip(&mut self.mean).zip(&mut self.m2) {
                let old = *mean;
                *mean += (x - old) / k;
                *m2 += (x - old) * (x - *mean);
            }
        }
    }

    /// The sample standard deviation per coordinate.
    ///
    /// # Errors
    /// Fewer than two rows seen: there is no spread to normalise by.
    pub fn std(&self) -> Result<Vec<f64>> {
        if self.count < 2 {
            return Err(Error::Invalid(format!(
                "MEND's normalisation has seen {} factor row(s); it needs at least 2 (train on an \
                 edit with more tokens, or load a trained editor)",
                self.count
            )));
        }
        let n = (self.count - 1) as f64;
        Ok(self.m2.iter().map(|s| (s / n).sqrt()).collect())
    }
}

/// One residual layer `z ← z + clamp₀((U V z + b) ⊙ scale[mode] + shift[mode])`.
#[derive(Debug, Clone)]
pub struct LowRankLayer {
    /// `[dim, rank]`, zero at initialisation.
    pub u: Var,
    /// `[rank, dim]`, standard normal at initialisation.
    pub v: Var,
    /// `[dim]`.
    pub bias: Var,
    /// `[n_modes, dim]`, ones.
    pub mode_scale: Var,
    /// `[n_modes, dim]`, zeros.
    pub mode_shift: Var,
}

impl LowRankLayer {
    /// `z: [n, dim]`, row `i` of weight mode `modes[i]` (`[n]`, u32).
    fn forward(&self, z: &Tensor, modes: &Tensor, purpose: Purpose) -> Result<Tensor> {
        let pre = z
            .matmul(&purpose.read(&self.v).t()?)?
            .matmul(&purpose.read(&self.u).t()?)?
            .broadcast_add(&purpose.read(&self.bias))?;
        let scale = purpose.read(&self.mode_scale).index_select(modes, 0)?;
        let shift = purpose.read(&self.mode_shift).index_select(modes, 0)?;
        let pre = pre.mul(&scale)?.add(&shift)?;
        // A clamp at zero whose gradient passes where the input is zero, as torch's `clamp(min=0)`:
        // at initialisation every pre-activation is exactly zero, and a ReLU (or candle's
        // `maximum`, which halves it) would stop the gradient that trains U from the start.
        let open = pre.ge(0.0)?.to_dtype(pre.dtype())?.detach();
        Ok((z + pre.mul(&open)?)?)
    }

    fn vars(&self) -> [&Var; 5] {
        [
            &self.u,
            &self.v,
            &self.bias,
            &self.mode_scale,
            &self.mode_shift,
        ]
    }
}

/// The gradient transform of the weights of one shape `(x_dim, delta_dim)` = `(in, out)`.
#[derive(Debug, Clone)]
pub struct GradientNet {
    pub x_dim: usize,
    pub delta_dim: usize,
    pub n_modes: usize,
    pub layers: Vec<LowRankLayer>,
    pub moments: RunningMoments,
    /// Normalise the factors by the running moments before the layers (`norm: true`).
    pub normalise: bool,
}

/// How a [`GradientNet`] is built (EasyEdit's `n_hidden`, `rank`, `norm`).
#[derive(Debug, Clone, Copy)]
pub struct NetShape {
    pub n_hidden: usize,
    pub rank: usize,
    pub normalise: bool,
}

impl GradientNet {
    /// A network at its identity initialisation; `seed` draws `V`. Its parameters are f32 (f64
    /// for f64 models, where gradients are checked against finite differences).
    pub fn new(
        x_dim: usize,
        delta_dim: usize,
        n_modes: usize,
        shape: NetShape,
        seed: u64,
        (device, dtype): (&Device, DType),
    ) -> Result<Self> {
        let dim = x_dim + delta_dim;
        let rank = shape.rank.min(dim);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let layers = (0..shape.n_hidden + 1)
            .map(|_| {
                let normal: Vec<f64> = (0..rank * dim).map(|_| standard_normal(&mut rng)).collect();
                let v = Tensor::from_vec(normal, (rank, dim), device)?.to_dtype(dtype)?;
                Ok(LowRankLayer {
                    u: Var::zeros((dim, rank), dtype, device)?,
                    v: Var::from_tensor(&v)?,
                    bias: Var::zeros(dim, dtype, device)?,
                    mode_scale: Var::ones((n_modes, dim), dtype, device)?,
                    mode_shift: Var::zeros((n_modes, dim), dtype, device)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(GradientNet {
            x_dim,
            delta_dim,
            n_modes,
            layers,
            moments: RunningMoments::new(dim),
            normalise: shape.normalise,
        })
    }

    /// The trainable parameters, layer by layer.
    pub fn vars(&self) -> Vec<Var> {
        self.layers
            .iter()
            .flat_map(|l| l.vars().into_iter().cloned())
            .collect()
    }

    /// Transforms factor rows `x: [n, x_dim]`, `delta: [n, delta_dim]` of the weight in `mode`.
    /// In training the rows first enter the running moments (so the first batch normalises by
    /// itself); otherwise the stored moments are used as they are.
    pub fn forward(
        &mut self,
        x: &Tensor,
        delta: &Tensor,
        mode: usize,
        purpose: Purpose,
    ) -> Result<(Tensor, Tensor)> {
        let mut out = self.forward_many(&[(x, delta, mode)], purpose)?;
        out.pop()
            .ok_or_else(|| Error::Invalid("the network transformed nothing".into()))
    }

    /// [`GradientNet::forward`] of several weights of this shape in turn (each normalised by the
    /// moments as they stand after its own rows, as one call per weight would), with the layers
    /// run once over all their rows: one product per layer, and one gradient for U and V instead
    /// of one per weight for the backward pass to add up.
    pub fn forward_many(
        &mut self,
        inputs: &[(&Tensor, &Tensor, usize)],
        purpose: Purpose,
    ) -> Result<Vec<(Tensor, Tensor)>> {
        let dtype = self.layers[0].u.as_tensor().dtype();
        let mut normalised = Vec::with_capacity(inputs.len());
        let mut modes: Vec<u32> = Vec::new();
        let mut rows = Vec::with_capacity(inputs.len());
        for &(x, delta, mode) in inputs {
            if mode >= self.n_modes {
                return Err(Error::Invalid(format!(
                    "mode {mode} of a network with {} modes",
                    self.n_modes
                )));
            }
            let z = Tensor::cat(&[x, delta], 1)?.to_dtype(dtype)?;
            if purpose == Purpose::Training {
                self.moments
                    .update(&z.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?);
            }
            let z = if self.normalise {
                let dim = self.x_dim + self.delta_dim;
                let device = z.device();
                let mean = self.moments.mean.clone();
                let spread: Vec<f64> = self.moments.std()?.iter().map(|&s| s + 1e-7).collect();
                let mean = Tensor::from_vec(mean, dim, device)?.to_dtype(dtype)?;
                let spread = Tensor::from_vec(spread, dim, device)?.to_dtype(dtype)?;
                z.broadcast_sub(&mean)?.broadcast_div(&spread)?
            } else {
                z
            };
            let n = z.dim(0)?;
            modes.extend(std::iter::repeat_n(mode as u32, n));
            rows.push(n);
            normalised.push(z);
        }
        let mut z = Tensor::cat(&normalised, 0)?;
        let modes = Tensor::new(modes.as_slice(), z.device())?;
        for layer in &self.layers {
            z = layer.forward(&z, &modes, purpose)?;
        }
        let mut out = Vec::with_capacity(rows.len());
        let mut start = 0;
        for n in rows {
            let part = z.narrow(0, start, n)?;
            out.push((
                part.narrow(1, 0, self.x_dim)?.contiguous()?,
                part.narrow(1, self.x_dim, self.delta_dim)?.contiguous()?,
            ));
            start += n;
        }
        Ok(out)
    }
}

/// A standard normal draw (Box–Muller).
fn standard_normal(rng: &mut rand::rngs::StdRng) -> f64 {
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_moments_match_the_two_pass_formulas() {
        // Rows (1, 10), (2, 20), (4, 60): means 7/3 and 30, sample variances 7/3 and 700.
        let mut m = RunningMoments::new(2);
        m.update(&[1.0, 10.0]);
        assert!(m.std().is_err(), "one row has no spread");
        m.update(&[2.0, 20.0, 4.0, 60.0]);
        assert_eq!(m.count, 3);
        assert!((m.mean[0] - 7.0 / 3.0).abs() < 1e-12);
        assert!((m.mean[1] - 30.0).abs() < 1e-12);
        let std = m.std().unwrap();
        assert!((std[0] - (7.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert!((std[1] - 700.0f64.sqrt()).abs() < 1e-12);
    }

    /// Three factor rows of a weight with 2 inputs and 3 outputs, spread enough to normalise.
    fn three_factor_rows(dev: &Device) -> Result<(Tensor, Tensor)> {
        Ok((
            Tensor::new(&[[1f32, 2.], [3., -4.], [0.5, 0.]], dev)?,
            Tensor::new(&[[1f32, 0., 2.], [-1., 1., 0.], [2., 2., 2.]], dev)?,
        ))
    }

    #[test]
    fn an_initial_network_is_the_identity_on_normalised_factors() -> Result<()> {
        let dev = Device::Cpu;
        let shape = NetShape {
            n_hidden: 1,
            rank: 3,
            normalise: true,
        };
        let mut net = GradientNet::new(2, 3, 2, shape, 0, (&dev, DType::F32))?;
        let (x, d) = three_factor_rows(&dev)?;
        let (xt, dt) = net.forward(&x, &d, 1, Purpose::Training)?;
        // Column by column, by hand: (v − mean) / sample std.
        let norm = |col: [f32; 3]| -> Vec<f32> {
            let mean = col.iter().sum::<f32>() / 3.0;
            let var = col.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 2.0;
            col.iter()
                .map(|v| (v - mean) / (var.sqrt() + 1e-7))
                .collect()
        };
        let xt = xt.t()?.to_vec2::<f32>()?;
        let dt = dt.t()?.to_vec2::<f32>()?;
        let want = [
            norm([1., 3., 0.5]),
            norm([2., -4., 0.]),
            norm([1., -1., 2.]),
            norm([0., 1., 2.]),
            norm([2., 0., 2.]),
        ];
        for (got, want) in xt.iter().chain(&dt).zip(&want) {
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
            }
        }
        Ok(())
    }

    /// With normalisation off an initial network returns its input bit for bit, whatever V is
    /// (U = 0 zeroes V's contribution), for each mode.
    #[test]
    fn with_normalisation_off_and_u_zero_the_network_is_the_identity_for_any_v() -> Result<()> {
        let dev = Device::Cpu;
        let shape = NetShape {
            n_hidden: 1,
            rank: 4,
            normalise: false,
        };
        let mut net = GradientNet::new(2, 3, 2, shape, 9, (&dev, DType::F32))?;
        for layer in &net.layers {
            layer.v.set(&layer.v.as_tensor().randn_like(0.0, 5.0)?)?;
        }
        let x = Tensor::new(&[[1f32, 2.], [3., -4.], [0.5, 0.]], &dev)?;
        let d = Tensor::new(&[[1f32, 0., 2.], [-1., 1., 0.], [2., -2., 7.]], &dev)?;
        for mode in 0..2 {
            let (xt, dt) = net.forward(&x, &d, mode, Purpose::Training)?;
            assert_eq!(xt.to_vec2::<f32>()?, x.to_vec2::<f32>()?);
            assert_eq!(dt.to_vec2::<f32>()?, d.to_vec2::<f32>()?);
        }
        Ok(())
    }

    /// With U = 0 the pre-activations are exactly zero, where torch's clamp passes the gradient
    /// and a ReLU would not: U must receive a gradient on the very first step.
    #[test]
    fn the_first_step_reaches_u() -> Result<()> {
        let dev = Device::Cpu;
        let shape = NetShape {
            n_hidden: 0,
            rank: 2,
            normalise: false,
        };
        let mut net = GradientNet::new(2, 1, 1, shape, 1, (&dev, DType::F32))?;
        let x = Tensor::new(&[[1f32, 2.]], &dev)?;
        let d = Tensor::new(&[[3f32]], &dev)?;
        let (xt, dt) = net.forward(&x, &d, 0, Purpose::Differentiable)?;
        let loss = (xt.sum_all()? + dt.sum_all()?)?;
        let grads = loss.backward()?;
        let gu = grads
            .get(net.layers[0].u.as_tensor())
            .expect("U has a gradient")
            .abs()?
            .sum_all()?
            .to_scalar::<f32>()?;
        assert!(gu > 0.0, "U's gradient is zero");
        Ok(())
    }

    /// Validation and test-time editing read the network without a graph: the same numbers as
    /// a differentiable pass, nothing tracked (so the intermediates are freed as they go), and the
    /// running moments left as training made them.
    #[test]
    fn an_inference_pass_gives_the_same_numbers_without_a_graph() -> Result<()> {
        let dev = Device::Cpu;
        let shape = NetShape {
            n_hidden: 1,
            rank: 2,
            normalise: true,
        };
        let mut net = GradientNet::new(2, 3, 2, shape, 5, (&dev, DType::F32))?;
        let (x, d) = three_factor_rows(&dev)?;
        net.forward(&x, &d, 1, Purpose::Training)?;
        for l in &net.layers {
            l.u.set(&l.u.as_tensor().randn_like(0.0, 0.3)?)?;
        }
        let moments = (net.moments.mean.clone(), net.moments.m2.clone());
        let (xg, dg) = net.forward(&x, &d, 1, Purpose::Differentiable)?;
        let (xi, di) = net.forward(&x, &d, 1, Purpose::Inference)?;
        assert!(
            xg.track_op() && dg.track_op(),
            "the differentiable pass has no graph"
        );
        assert!(
            !xi.track_op() && !di.track_op(),
            "the inference pass kept a graph"
        );
        assert_eq!(xi.to_vec2::<f32>()?, xg.to_vec2::<f32>()?);
        assert_eq!(di.to_vec2::<f32>()?, dg.to_vec2::<f32>()?);
        assert_eq!((net.moments.mean.clone(), net.moments.m2.clone()), moments);
        Ok(())
    }

    /// Every parameter kind's gradient against central finite differences, in f64, away from the
    /// clamp's kink (U random, so no pre-activation sits at zero), for two weights of different
    /// modes transformed together.
    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let shape = NetShape {
            n_hidden: 1,
            rank: 2,
            normalise: true,
        };
        let mut net = GradientNet::new(2, 3, 2, shape, 3, (&dev, DType::F64))?;
        let x = Tensor::new(&[[1f64, 2.], [3., -4.], [0.5, 0.]], &dev)?;
        let d = Tensor::new(&[[1f64, 0., 2.], [-1., 1., 0.], [2., 2., 2.]], &dev)?;
        let x2 = Tensor::new(&[[0.5f64, -1.], [2., 1.]], &dev)?;
        let d2 = Tensor::new(&[[0f64, 1., -2.], [1., 3., 1.]], &dev)?;
        let inputs = [(&x, &d, 1), (&x2, &d2, 0)];
        net.forward_many(&inputs, Purpose::Training)?;
        for l in &net.layers {
            l.u.set(&l.u.as_tensor().randn_like(0.0, 0.3)?)?;
            l.mode_scale
                .set(&l.mode_scale.as_tensor().randn_like(1.0, 0.2)?)?;
        }
        // A loss of the pseudo-gradients, as MEND's training sees them.
        let graph = |net: &mut GradientNet| -> Result<Tensor> {
            let mut total = Tensor::zeros((), DType::F64, &dev)?;
            for (k, (xt, dt)) in net
                .forward_many(&inputs, Purpose::Differentiable)?
                .iter()
                .enumerate()
            {
                let p = dt.t()?.matmul(xt)?;
                total = (total + (p.sqr()?.sum_all()? * (k + 1) as f64)?)?;
            }
            Ok(total)
        };
        let loss = |net: &mut GradientNet| -> Result<f64> { Ok(graph(net)?.to_scalar::<f64>()?) };
        let grads = graph(&mut net)?.backward()?;
        let mut checked = 0;
        for layer in net.layers.clone() {
            for var in layer.vars() {
                let g: Vec<f64> = grads
                    .get(var.as_tensor())
                    .expect("a gradient")
                    .flatten_all()?
                    .to_vec1()?;
                let base = var.as_tensor().clone().copy()?;
                let flat: Vec<f64> = base.flatten_all()?.to_vec1()?;
                for i in [0, flat.len() / 2, flat.len() - 1] {
                    let mut at = |h: f64| -> Result<f64> {
                        let mut v = flat.clone();
                        v[i] += h;
                        var.set(&Tensor::from_vec(v, base.shape(), &dev)?)?;
                        loss(&mut net)
                    };
                    let fd = (at(1e-6)? - at(-1e-6)?) / 2e-6;
                    var.set(&base)?;
                    let scale = g[i].abs().max(fd.abs()).max(1e-8);
                    assert!(
                        (g[i] - fd).abs() / scale < 1e-6,
                        "entry {i}: autograd {} vs finite difference {fd}",
                        g[i]
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 30);
        // The two modes' scale rows are different parameters: both were reached (entries 0 and
        // last of mode_scale lie in modes 0 and 1).
        Ok(())
    }
}
