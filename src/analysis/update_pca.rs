//! The principal components of a trained editor's updates (InstructEdit's Fig. 4): each edit's
//! change to the edited weights, taken as one long vector, projected on the directions along
//! which the edits differ most. The changes are low-rank, so the projection works from their
//! inner products alone (the Gram matrix, kernel PCA) and never forms a weight-sized vector.

use candle_core::{DType, Tensor};
use faer::{Mat, Side};

use crate::error::{Error, Result};
use crate::model::LowRankChange;

/// `⟨ΔW_a, ΔW_b⟩` summed over the edited weights, for every pair of edits. For `ΔW = L R`,
/// `⟨L₁R₁, L₂R₂⟩ = Σ (L₁ᵀL₂) ⊙ (R₁R₂ᵀ)`, products of the factors' small sides.
pub fn gram(changes: &[Vec<LowRankChange>]) -> Result<Mat<f64>> {
    let n = changes.len();
    let wide = |t: &Tensor| t.to_dtype(DType::F64);
    let factors: Vec<Vec<(Tensor, Tensor)>> = changes
        .iter()
        .map(|edit| {
            edit.iter()
                .map(|c| Ok((wide(&c.left)?, wide(&c.right)?)))
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<_>>()?;
    let mut g = Mat::<f64>::zeros(n, n);
    for a in 0..n {
        for b in a..n {
            if factors[a].len() != factors[b].len() {
                return Err(Error::Invalid(format!(
                    "edits {a} and {b} change different numbers of weights"
                )));
            }
            let mut sum = 0.0;
            for ((l1, r1), (l2, r2)) in factors[a].iter().zip(&factors[b]) {
                let left = l1.t()?.matmul(l2)?;
                let right = r1.matmul(&r2.t()?)?;
                sum += (left * right)?.sum_all()?.to_scalar::<f64>()?;
            }
            g[(a, b)] = sum;
            g[(b, a)] = sum;
        }
    }
    Ok(g)
}

/// The Gram matrix of the updates scaled to unit norm, `G_ab / √(G_aa G_bb)` (their cosines): the
/// components then separate the updates' directions, not their sizes, which a few large updates
/// would otherwise decide alone.
///
/// # Errors
/// An update that changes nothing, which has no direction.
pub fn cosines(gram: &Mat<f64>) -> Result<Mat<f64>> {
    let n = gram.nrows();
    let norms: Vec<f64> = (0..n).map(|i| gram[(i, i)].sqrt()).collect();
    if let Some(i) = norms.iter().position(|&x| !(x > 0.0 && x.is_finite())) {
        return Err(Error::Invalid(format!(
            "edit {i}'s update has norm {}: it has no direction to compare",
            norms[i]
        )));
    }
    Ok(Mat::from_fn(n, n, |a, b| {
        gram[(a, b)] / (norms[a] * norms[b])
    }))
}

/// The projection of each point on the first `k` principal components, and each component's
/// share of the variance, from the points' Gram matrix: the centred matrix `H G H` (`H = I −
/// 11ᵀ/n`) has eigenvectors `u` and eigenvalues `λ`, and the coordinates are `u √λ`. The sign of a
/// component is fixed so that its largest coordinate is positive.
pub fn principal_components(gram: &Mat<f64>, k: usize) -> Result<(Vec<Vec<f64>>, Vec<f64>)> {
    let n = gram.nrows();
    if n < 2 || gram.ncols() != n {
        return Err(Error::Invalid(format!(
            "principal components need at least two points (got a {n} × {} Gram matrix)",
            gram.ncols()
        )));
    }
    let row_mean: Vec<f64> = (0..n)
        .map(|i| (0..n).map(|j| gram[(i, j)]).sum::<f64>() / n as f64)
        .collect();
    let total_mean = row_mean.iter().sum::<f64>() / n as f64;
    let centred = Mat::from_fn(n, n, |i, j| {
        gram[(i, j)] - row_mean[i] - row_mean[j] + total_mean
    });
    let eig = centred
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| Error::Invalid(format!("eigendecomposition failed: {e:?}")))?;
    let values = eig.S().column_vector();
    let vectors = eig.U();
    // faer sorts eigenvalues ascending: the components are the last columns.
    let variance: f64 = (0..n).map(|i| values[i].max(0.0)).sum();
    let mut coords = vec![vec![0.0; k]; n];
    let mut shares = Vec::with_capacity(k);
    for c in 0..k.min(n) {
        let col = n - 1 - c;
        let lambda = values[col].max(0.0);
        shares.push(if variance > 0.0 {
            lambda / variance
        } else {
            0.0
        });
        let scale = lambda.sqrt();
        let largest = (0..n)
            .max_by(|&a, &b| vectors[(a, col)].abs().total_cmp(&vectors[(b, col)].abs()))
            .unwrap_or(0);
        let sign = if vectors[(largest, col)] < 0.0 {
            -1.0
        } else {
            1.0
        };
        for (i, point) in coords.iter_mut().enumerate() {
            point[c] = sign * vectors[(i, col)] * scale;
        }
    }
    Ok((coords, shares))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Four rank-one edits of a 2 × 2 weight whose flattened changes are (3, 0, 0, 0),
    /// (−3, 0, 0, 0), (0, 1, 0, 0) and (0, −1, 0, 0): by hand the first component
    /// is the first coordinate (variance 18 of 20, points at ±3), the second the second
    /// (variance 2, points at ±1).
    #[test]
    fn low_rank_changes_project_as_their_flattened_vectors_do() {
        let d = &Device::Cpu;
        let edit = |l: [f64; 2], r: [f64; 2]| {
            vec![LowRankChange {
                left: Tensor::new(&[[l[0]], [l[1]]], d).unwrap(),
                right: Tensor::new(&[r], d).unwrap(),
            }]
        };
        // ΔW[0][0] = l0·r0, ΔW[0][1] = l0·r1.
        let edits = [
            edit([3.0, 0.0], [1.0, 0.0]),
            edit([-3.0, 0.0], [1.0, 0.0]),
            edit([1.0, 0.0], [0.0, 1.0]),
            edit([1.0, 0.0], [0.0, -1.0]),
        ];
        let g = gram(&edits).unwrap();
        assert_eq!(g[(0, 1)], -9.0);
        assert_eq!(g[(2, 3)], -1.0);
        assert_eq!(g[(0, 2)], 0.0);
        let (coords, shares) = principal_components(&g, 2).unwrap();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(coords[0][0].abs(), 3.0) && close(coords[1][0], -coords[0][0]));
        assert!(close(coords[2][0], 0.0) && close(coords[3][0], 0.0));
        assert!(close(coords[2][1].abs(), 1.0) && close(coords[3][1], -coords[2][1]));
        assert!(close(coords[0][1], 0.0));
        assert!(close(shares[0], 0.9) && close(shares[1], 0.1), "{shares:?}");
        assert!(principal_components(&Mat::zeros(1, 1), 2).is_err());
    }

    /// Cosines by hand: (3, 0, 0, 0) against (1, 1, 0, 0) is 3 / (3 √2); an update of zeros is
    /// refused.
    #[test]
    fn cosines_scale_updates_to_unit_norm() {
        let d = &Device::Cpu;
        let edit = |l: [f64; 2], r: [f64; 2]| {
            vec![LowRankChange {
                left: Tensor::new(&[[l[0]], [l[1]]], d).unwrap(),
                right: Tensor::new(&[r], d).unwrap(),
            }]
        };
        let c =
            cosines(&gram(&[edit([3.0, 0.0], [1.0, 0.0]), edit([1.0, 0.0], [1.0, 1.0])]).unwrap())
                .unwrap();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(c[(0, 0)], 1.0) && close(c[(1, 1)], 1.0));
        assert!(close(c[(0, 1)], 1.0 / 2f64.sqrt()) && close(c[(1, 0)], c[(0, 1)]));
        let zero = gram(&[edit([0.0, 0.0], [1.0, 0.0]), edit([1.0, 0.0], [1.0, 0.0])]).unwrap();
        assert!(cosines(&zero).unwrap_err().to_string().contains("edit 0"));
    }
}
