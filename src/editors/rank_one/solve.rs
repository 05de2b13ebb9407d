//! Closed-form updates (SPEC-editors §3–5), in `[out, in]` orientation for every architecture.
//! The linear algebra runs on the host in f64 with faer (candle has no solve or eigensolver).

use candle_core::{DType, Device, Tensor};
use faer::{Mat, Side};

use crate::error::{Error, Result};

/// ROME's update `ΔW = w uᵀ` (`[out, in]`), with `w = (v* − o*) / (k*·u)`: the output at key `k*`
/// becomes `v*`, and any key `k` moves by `w (u·k)`.
pub fn rank_one(
    u: &Tensor,
    k_star: &Tensor,
    o_star: &Tensor,
    v_star: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let denom = (u * k_star)?.sum_all()?.to_scalar::<f32>()? as f64;
    if denom == 0.0 || !denom.is_finite() {
        return Err(Error::Invalid(format!(
            "the subject's key is orthogonal to the update direction (k*·u = {denom})"
        )));
    }
    let w = ((v_star - o_star)? / denom)?;
    let delta = w.unsqueeze(1)?.matmul(&u.unsqueeze(0)?)?;
    Ok((w, delta))
}

/// A 2-D tensor as an f64 matrix.
pub fn to_mat(t: &Tensor) -> Result<Mat<f64>> {
    let (r, c) = t.dims2()?;
    let flat: Vec<f64> = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    Ok(Mat::from_fn(r, c, |i, j| flat[i * c + j]))
}

/// An f64 matrix as an f32 tensor.
pub fn from_mat(m: &Mat<f64>, device: &Device) -> Result<Tensor> {
    let (r, c) = (m.nrows(), m.ncols());
    let mut flat = Vec::with_capacity(r * c);
    for i in 0..r {
        for j in 0..c {
            flat.push(m[(i, j)] as f32);
        }
    }
    Ok(Tensor::from_vec(flat, (r, c), device)?)
}

/// `a⁻¹ b` for a square `a`, by LU with partial pivoting; an error if the result is not finite.
/// The factors overwrite `a` (at LLaMA-2-7B's MLP width the system is 969 MB of f64; faer's
/// `partial_piv_lu` would copy it and allocate a separate `U`), with the same arithmetic.
fn solve_consuming(mut a: Mat<f64>, mut b: Mat<f64>) -> Result<Mat<f64>> {
    use faer::dyn_stack::{MemBuffer, MemStack};
    use faer::linalg::lu::partial_pivoting::{factor, solve};
    let n = a.nrows();
    let par = faer::get_global_parallelism();
    let scratch = factor::lu_in_place_scratch::<usize, f64>(n, n, par, Default::default()).or(
        solve::solve_in_place_scratch::<usize, f64>(n, b.ncols(), par),
    );
    let mut buffer = MemBuffer::new(scratch);
    let stack = MemStack::new(&mut buffer);
    let (mut forward, mut inverse) = (vec![0usize; n], vec![0usize; n]);
    let (_, permutation) = factor::lu_in_place(
        a.as_mut(),
        &mut forward,
        &mut inverse,
        par,
        stack,
        Default::default(),
    );
    solve::solve_in_place(a.as_ref(), a.as_ref(), permutation, b.as_mut(), par, stack);
    if b.col_iter().any(|c| c.iter().any(|v| !v.is_finite())) {
        return Err(Error::Invalid(
            "the update's linear system is singular".into(),
        ));
    }
    Ok(b)
}

/// `a⁻¹ b`, leaving `a` as it is (through one copy of it).
#[cfg(test)]
fn solve(a: &Mat<f64>, b: &Mat<f64>) -> Result<Mat<f64>> {
    solve_consuming(a.clone(), b.clone())
}

/// `a⁻¹ b` for a vector `b` (`[n]`, returned f32); `a` is consumed by the factorisation.
pub fn solve_vector(a: Mat<f64>, b: &Tensor) -> Result<Tensor> {
    let x = solve_consuming(a, to_mat(&b.unsqueeze(1)?)?)?;
    Ok(from_mat(&x, b.device())?.squeeze(1)?)
}

/// MEMIT's update for one layer (`[out, in]`): with keys `K` (`[n, d_ff]`, one per row), residuals
/// `R` (`[n, d]`) and key covariance `C`, `ΔW = R (λC + KᵀK)⁻¹ Kᵀ`-transposed, i.e. the least-squares
/// `argmin ‖(W+Δ)K − (WK + R)‖² + λ tr(Δ C Δᵀ)`. The system is formed and factored in `cov`'s
/// storage, so a layer's solve holds one `d_ff²` matrix.
pub fn memit_delta(
    keys: &Mat<f64>,
    resid: &Mat<f64>,
    mut cov: Mat<f64>,
    lambda: f64,
) -> Result<Mat<f64>> {
    let kc = keys.transpose();
    cov *= faer::Scale(lambda);
    faer::linalg::matmul::matmul(
        cov.as_mut(),
        faer::Accum::Add,
        kc,
        keys,
        1.0,
        faer::get_global_parallelism(),
    );
    let a = solve_consuming(cov, kc.to_owned())?;
    Ok(resid.transpose() * a.transpose())
}

/// AlphaEdit's projector onto the directions the preserved keys do not use: the eigenvectors of
/// the key covariance whose eigenvalues are below `threshold`, `P = Û Ûᵀ`.
pub fn null_space_projector(cov: &Mat<f64>, threshold: f64) -> Result<Mat<f64>> {
    let eig = cov
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| Error::Invalid(format!("eigendecomposition failed: {e:?}")))?;
    let values = eig.S().column_vector();
    let keep: Vec<usize> = (0..values.nrows())
        .filter(|&i| values[i] < threshold)
        .collect();
    let u = eig.U();
    let basis = Mat::from_fn(u.nrows(), keep.len(), |i, j| u[(i, keep[j])]);
    Ok(&basis * basis.transpose())
}

/// AlphaEdit's update for one layer (`[out, in]`): `X = (P(KᵀK + Σ) + L2·I)⁻¹ P Kᵀ R`, `ΔW = Xᵀ`,
/// given `PΣ` (the editor keeps it up to date edit by edit; forming it here would cost a `d_ff³`
/// product on every edit; `None` before any edit is remembered). The system is solved for the `n` columns of `P Kᵀ` and multiplied by
/// `R` afterwards, so the triangular solves see `n` right-hand sides instead of `d`.
/// Every column of `X` lies in the range of `P`, so `ΔW k = 0` for a preserved key `k`.
pub fn alphaedit_delta(
    keys: &Mat<f64>,
    resid: &Mat<f64>,
    projector: &Mat<f64>,
    projected_memory: Option<&Mat<f64>>,
    l2: f64,
) -> Result<Mat<f64>> {
    let projected_keys = projector * keys.transpose();
    let mut lhs = &projected_keys * keys;
    if let Some(memory) = projected_memory {
        lhs += memory;
    }
    for i in 0..lhs.nrows() {
        lhs[(i, i)] += l2;
    }
    let x = solve_consuming(lhs, projected_keys)?;
    Ok(resid.transpose() * x.transpose())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};

    fn random(r: usize, c: usize, rng: &mut rand::rngs::StdRng) -> Mat<f64> {
        Mat::from_fn(r, c, |_, _| rng.random_range(-1.0..1.0))
    }

    fn max_abs(m: &Mat<f64>) -> f64 {
        m.col_iter()
            .flat_map(|c| c.iter().copied().collect::<Vec<_>>())
            .fold(0.0, |a, v| a.max(v.abs()))
    }

    /// ROME with covariance: `ΔW = (v − Wk)(C⁻¹k)ᵀ / (kᵀC⁻¹k)`.
    fn rome_with_cov(w: &Mat<f64>, c: &Mat<f64>, k: &Mat<f64>, v: &Mat<f64>) -> Mat<f64> {
        let cinv_k = solve(c, k).unwrap();
        let denom = (k.transpose() * &cinv_k)[(0, 0)];
        let r = v - w * k;
        (r * cinv_k.transpose()) * (1.0 / denom)
    }

    #[test]
    fn factoring_in_place_gives_faers_own_lu_solution() {
        use faer::linalg::solvers::Solve;
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let (n, k) = (70, 3);
        let a = random(n, n, &mut rng);
        let b = random(n, k, &mut rng);
        let ours = solve(&a, &b).unwrap();
        let theirs = a.partial_piv_lu().solve(&b);
        assert!(
            ours.col_iter().zip(theirs.col_iter()).all(|(x, y)| x
                .iter()
                .zip(y.iter())
                .all(|(p, q)| p.to_bits() == q.to_bits())),
            "in-place LU differs from faer's PartialPivLu"
        );
        let residual = &a * &ours - &b;
        assert!(max_abs(&residual) < 1e-9, "{}", max_abs(&residual));
        let singular = Mat::<f64>::zeros(4, 4);
        assert!(solve(&singular, &Mat::<f64>::identity(4, 1)).is_err());
    }

    #[test]
    fn rank_one_update_is_the_constrained_least_squares_solution() {
        // min over Ŵ of ‖(Ŵ − W) K‖² subject to Ŵ k = v, solved row by row from its KKT system.
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (d, dff, n) = (4, 6, 40);
        let w = random(d, dff, &mut rng);
        let keys = random(dff, n, &mut rng);
        let c = &keys * keys.transpose();
        let k = random(dff, 1, &mut rng);
        let v = random(d, 1, &mut rng);
        let closed = rome_with_cov(&w, &c, &k, &v);
        let mut kkt = Mat::<f64>::zeros(dff + 1, dff + 1);
        for i in 0..dff {
            for j in 0..dff {
                kkt[(i, j)] = 2.0 * c[(i, j)];
            }
            kkt[(i, dff)] = k[(i, 0)];
            kkt[(dff, i)] = k[(i, 0)];
        }
        for row in 0..d {
            let mut rhs = Mat::<f64>::zeros(dff + 1, 1);
            let cw = &c * w.row(row).transpose();
            for i in 0..dff {
                rhs[(i, 0)] = 2.0 * cw[i];
            }
            rhs[(dff, 0)] = v[(row, 0)];
            let x = solve(&kkt, &rhs).unwrap();
            for i in 0..dff {
                let direct = x[(i, 0)] - w[(row, i)];
                assert!(
                    (direct - closed[(row, i)]).abs() < 1e-9,
                    "row {row} col {i}"
                );
            }
        }
        // and the candle rank-one form gives the same matrix
        let dev = Device::Cpu;
        let cinv_k = solve(&c, &k).unwrap();
        let norm = (cinv_k.transpose() * &cinv_k)[(0, 0)].sqrt();
        let u = from_mat(&(&cinv_k * (1.0 / norm)), &dev)
            .unwrap()
            .flatten_all()
            .unwrap();
        let k_t = from_mat(&k, &dev).unwrap().flatten_all().unwrap();
        let o = from_mat(&(&w * &k), &dev).unwrap().flatten_all().unwrap();
        let v_t = from_mat(&v, &dev).unwrap().flatten_all().unwrap();
        let (_, delta) = rank_one(&u, &k_t, &o, &v_t).unwrap();
        let diff = &to_mat(&delta).unwrap() - &closed;
        assert!(max_abs(&diff) < 1e-4, "{}", max_abs(&diff));
    }

    #[test]
    fn memit_on_one_edit_is_rome_with_covariance_scaled() {
        // Sherman–Morrison: r kᵀ(λC + kkᵀ)⁻¹ = r (C⁻¹k)ᵀ / (λ + kᵀC⁻¹k), so MEMIT's single-edit
        // update is ROME's times kᵀC⁻¹k / (λ + kᵀC⁻¹k).
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (d, dff, n) = (5, 8, 50);
        let w = random(d, dff, &mut rng);
        let sample = random(dff, n, &mut rng);
        let c = (&sample * sample.transpose()) * (1.0 / n as f64);
        let k = random(dff, 1, &mut rng);
        let v = random(d, 1, &mut rng);
        let lambda = 0.7;
        let memit = memit_delta(
            &k.transpose().to_owned(),
            &(&v - &w * &k).transpose().to_owned(),
            c.clone(),
            lambda,
        )
        .unwrap();
        let rome = rome_with_cov(&w, &c, &k, &v);
        let q = (k.transpose() * solve(&c, &k).unwrap())[(0, 0)];
        let diff = &memit - &(rome * (q / (lambda + q)));
        assert!(max_abs(&diff) < 1e-10, "{}", max_abs(&diff));
    }

    #[test]
    fn alphaedit_update_is_the_papers_formula_with_a_key_memory() {
        // X = (P(KᵀK + Σ) + L2·I)⁻¹ P Kᵀ R evaluated as written (SPEC-editors §5), with a non-zero
        // memory of earlier keys, against the factored form the editor uses.
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (d, dff, n, earlier) = (5, 9, 2, 4);
        let preserved = random(dff, 3, &mut rng);
        let p = null_space_projector(&(&preserved * preserved.transpose()), 1e-8).unwrap();
        let old_keys = random(earlier, dff, &mut rng);
        let sigma = old_keys.transpose() * &old_keys;
        let keys = random(n, dff, &mut rng);
        let resid = random(n, d, &mut rng);
        let l2 = 0.3;
        let mut lhs = &p * (keys.transpose() * &keys + &sigma);
        for i in 0..dff {
            lhs[(i, i)] += l2;
        }
        let x = solve(&lhs, &(&p * keys.transpose() * &resid)).unwrap();
        let factored = alphaedit_delta(&keys, &resid, &p, Some(&(&p * &sigma)), l2).unwrap();
        let diff = &factored - x.transpose();
        assert!(
            max_abs(&diff) < 1e-10 * max_abs(&x).max(1.0),
            "{}",
            max_abs(&diff)
        );
        assert!(max_abs(&x) > 1e-3, "the update is not trivially zero");
    }

    #[test]
    fn alphaedit_update_leaves_preserved_keys_alone() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let (d, dff, rank, n) = (6, 12, 5, 3);
        // Preserved keys span a 5-dimensional subspace: C has 7 zero eigenvalues.
        let preserved = random(dff, rank, &mut rng);
        let c = &preserved * preserved.transpose();
        let p = null_space_projector(&c, 1e-8).unwrap();
        let keys = random(n, dff, &mut rng);
        let resid = random(n, d, &mut rng);
        let delta = alphaedit_delta(&keys, &resid, &p, None, 1.0).unwrap();
        assert_eq!((delta.nrows(), delta.ncols()), (d, dff));
        let leak = max_abs(&(&delta * &preserved));
        assert!(leak < 1e-10 * max_abs(&delta).max(1.0), "ΔW K0 = {leak}");
        assert!(max_abs(&delta) > 1e-3, "the update is not trivially zero");
        // P is a projector of rank dff − rank
        let pp = &p * &p - &p;
        assert!(max_abs(&pp) < 1e-10);
        let trace: f64 = (0..dff).map(|i| p[(i, i)]).sum();
        assert!((trace - (dff - rank) as f64).abs() < 1e-9);
    }
}
