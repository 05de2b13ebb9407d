//! Closed-form updates (SPEC-editors §3–5).

use candle_core::Tensor;

use crate::error::Result;

/// ROME's update `ΔW = w uᵀ` (`[out, in]`), with `w = (v* − o*) / (k*·u)`: the output at key `k*`
/// becomes `v*`, and a key `k` moves by `w (u·k)`.
pub fn rank_one(
    u: &Tensor,
    k_star: &Tensor,
    o_star: &Tensor,
    v_star: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let denom = (u * k_star)?.sum_all()?.to_scalar::<f32>()? as f64;
    let w = ((v_star - o_star)? / denom)?;
    let delta = w.unsqueeze(1)?.matmul(&u.unsqueeze(0)?)?;
    Ok((w, delta))
}
