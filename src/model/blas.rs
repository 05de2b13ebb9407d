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

/// Keeps OpenBLAS on the calling thread, once, before its first product. Its own workers spin on
/// `sched_yield` for a while after every product, taking the cores from rayon's workers between
/// products (a profile of a ROME edit found about 12% of its time in that yielding and the
/// scheduler), so products are split over rayon's pool instead.
#[cfg(kedit_openblas)]
fn use_calling_thread_only() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: a plain setter of OpenBLAS's thread count.
    ONCE.call_once(|| unsafe { ffi::openblas_set_num_threads(1) });
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

/// `a · b` or `a · bᵀ` (`b_transposed`) with `a: [rows, inner]`, into `[rows, cols]`, split by
/// columns of the output over rayon's pool, one single-threaded `cblas_sgemm` per part.
#[cfg(kedit_openblas)]
fn sgemm(
    a: &[f32],
    b: &[f32],
    rows: usize,
    cols: usize,
    inner: usize,
    b_transposed: bool,
) -> Option<Vec<f32>> {
    use rayon::prelude::*;

    use_calling_thread_only();
    let fits = |v: usize| i32::try_from(v).ok();
    let (m, k, ldc) = (fits(rows)?, fits(inner)?, fits(cols)?);
    let mut out = vec![0f32; rows * cols];
    if out.is_empty() || inner == 0 {
        return Some(out);
    }
    // Parts of at least 64 columns, so each call still fills OpenBLAS's kernels.
    let parts = rayon::current_num_threads().min(cols.div_ceil(64)).max(1);
    let width = cols.div_ceil(parts);
    let (trans_b, ldb) = if b_transposed {
        (ffi::TRANS, k)
    } else {
        (ffi::NO_TRANS, ldc)
    };
    let out_ptr = SendPtr(out.as_mut_ptr());
    (0..parts).into_par_iter().for_each(|part| {
        let c0 = part * width;
        let n = width.min(cols.saturating_sub(c0));
        if n == 0 {
            return;
        }
        // Columns c0.. of the [inner, cols] operand: rows c0.. of `b` when it is stored
        // transposed, else an offset into each of its rows.
        let b_part = if b_transposed {
            &b[c0 * inner..]
        } else {
            &b[c0..]
        };
        let out_ptr = &out_ptr;
        // SAFETY: `a` holds [rows, inner]; `b_part` the [inner, n] block with leading dimension
        // `ldb`; the parts write disjoint column ranges c0..c0 + n of `out` ([rows, cols],
        // leading dimension `ldc`), which outlives the parallel loop.
        unsafe {
            ffi::cblas_sgemm(
                ffi::ROW_MAJOR,
                ffi::NO_TRANS,
                trans_b,
                m,
                n as i32,
                k,
                1.0,
                a.as_ptr(),
                k,
                b_part.as_ptr(),
                ldb,
                0.0,
                out_ptr.0.add(c0),
                ldc,
            )
        };
    });
    Some(out)
}

/// The output's address, shared by parts that write disjoint columns of it.
#[cfg(kedit_openblas)]
struct SendPtr(*mut f32);
// SAFETY: every part writes only its own columns, and the buffer outlives the parallel loop.
#[cfg(kedit_openblas)]
unsafe impl Sync for SendPtr {}

#[cfg(not(kedit_openblas))]
fn sgemm(_: &[f32], _: &[f32], _: usize, _: usize, _: usize, _: bool) -> Option<Vec<f32>> {
    None
}
