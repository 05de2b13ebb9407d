//! `cblas_sgemm` from OpenBLAS, linked by `build.rs` where it is installed, for f32 products of
//! more rows than [`super::kernels`] takes: at 64 to 256 rows it runs the model's shapes 1.6–1.8×
//! faster than candle's gemm (`benches/kernels.rs`).

/// Whether OpenBLAS was linked into this build.
pub const LINKED: bool = cfg!(kedit_openblas);

#[cfg(kedit_openblas)]
mod ffi {
    pub const ROW_MAJOR: i32 = 101;
    pub const NO_TRANS: i32 = 111;
    pub const TRANS: i32 = 112;

    extern "C" {
        #[allow(clippy::too_many_arguments)]
        pub fn cblas_sgemm(
            layout: i32,
            trans_a: i32,
            trans_b: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const f32,
            lda: i32,
            b: *const f32,
            ldb: i32,
            beta: f32,
            c: *mut f32,
            ldc: i32,
        );
        pub fn openblas_set_num_threads(n: i32);
    }
}

/// How many threads OpenBLAS runs a product on.
pub fn set_threads(n: usize) {
    #[cfg(kedit_openblas)]
    // SAFETY: a plain setter of OpenBLAS's thread count.
    unsafe {
        ffi::openblas_set_num_threads(n.clamp(1, i32::MAX as usize) as i32)
    };
    let _ = n;
}

/// `x · wᵀ`; `x: [m, k]`, `w: [n, k]` → `[m, n]`. `None` where OpenBLAS is not linked or a
/// dimension exceeds its 32-bit sizes.
pub fn x_wt(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Option<Vec<f32>> {
    assert_eq!(x.len(), m * k, "blas::x_wt: x is not [m, k]");
    assert_eq!(w.len(), n * k, "blas::x_wt: w is not [n, k]");
    sgemm(x, w, m, n, k, true)
}

/// `dy · w`; `dy: [m, n]`, `w: [n, k]` → `[m, k]`.
pub fn dy_w(dy: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Option<Vec<f32>> {
    assert_eq!(dy.len(), m * n, "blas::dy_w: dy is not [m, n]");
    assert_eq!(w.len(), n * k, "blas::dy_w: w is not [n, k]");
    sgemm(dy, w, m, k, n, false)
}

/// `a · b` or `a · bᵀ` (`b_transposed`) with `a: [rows, inner]`, into `[rows, cols]`.
#[cfg(kedit_openblas)]
fn sgemm(
    a: &[f32],
    b: &[f32],
    rows: usize,
    cols: usize,
    inner: usize,
    b_transposed: bool,
) -> Option<Vec<f32>> {
    let fits = |v: usize| i32::try_from(v).ok();
    let (m, n, k) = (fits(rows)?, fits(cols)?, fits(inner)?);
    let mut out = vec![0f32; rows * cols];
    if out.is_empty() || inner == 0 {
        return Some(out);
    }
    let (trans_b, ldb) = if b_transposed {
        (ffi::TRANS, k)
    } else {
        (ffi::NO_TRANS, n)
    };
    // SAFETY: the slices hold [rows, inner], the [inner, cols] operand (as `b_transposed` says)
    // and [rows, cols], row-major with the leading dimensions given.
    unsafe {
        ffi::cblas_sgemm(
            ffi::ROW_MAJOR,
            ffi::NO_TRANS,
            trans_b,
            m,
            n,
            k,
            1.0,
            a.as_ptr(),
            k,
            b.as_ptr(),
            ldb,
            0.0,
            out.as_mut_ptr(),
            n,
        )
    };
    Some(out)
}

#[cfg(not(kedit_openblas))]
fn sgemm(_: &[f32], _: &[f32], _: usize, _: usize, _: usize, _: bool) -> Option<Vec<f32>> {
    None
}
