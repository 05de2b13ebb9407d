//! `cblas_sgemm` from OpenBLAS, loaded at run time where it is installed, for f32 products of
//! more rows than [`super::kernels`] takes: at 64 to 256 rows it runs the model's shapes 1.6–1.8×
//! faster than candle's gemm (`benches/kernels.rs`). Loading it at run time, not linking it,
//! lets one binary run on machines with and without it (Debian's runtime package `libopenblas0`
//! is enough), and lets kedit choose its kernels before it starts (see [`core_type_for_this_cpu`]).

use std::sync::OnceLock;

use libloading::Library;

use super::parallel;

const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

type Sgemm = unsafe extern "C" fn(
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
type SetNumThreads = unsafe extern "C" fn(n: i32);
type CoreName = unsafe extern "C" fn() -> *const std::ffi::c_char;

/// The shared library's names, most specific first: Debian's and Ubuntu's runtime package names
/// the versioned file, Fedora's and the `-dev` packages the plain one, Homebrew keeps it aside.
const LIBRARY_NAMES: &[&str] = &[
    "libopenblas.so.0",
    "libopenblas.so",
    "libopenblas.dylib",
    "/opt/homebrew/opt/openblas/lib/libopenblas.dylib",
    "/usr/local/opt/openblas/lib/libopenblas.dylib",
];

struct OpenBlas {
    sgemm: Sgemm,
    core: String,
    /// The kernels kedit asked for, `None` where the user's `OPENBLAS_CORETYPE` or OpenBLAS's own
    /// detection chose.
    asked: Option<&'static str>,
    /// Kept loaded for the life of the process: `sgemm` points into it.
    _library: Library,
}

static OPENBLAS: OnceLock<Option<OpenBlas>> = OnceLock::new();

/// OpenBLAS's kernels for this CPU, where its own detection may not know the CPU: an OpenBLAS
/// older than the processor falls back to its SSE3 kernels ("Prescott"), four times slower than
/// its AVX-512 ones on the shapes of an edit (a ROME edit took 30 s instead of 8 s with Debian
/// 12's OpenBLAS 0.3.21 on a Xeon it did not recognise). Its single-precision products need
/// AVX-512 F/CD/BW/DQ/VL for "SkylakeX" and AVX2 with FMA for "Haswell"; the newer targets
/// (Cooper Lake, Sapphire Rapids, Zen) use the same sgemm kernels.
fn core_type_for_this_cpu() -> Option<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f")
            && has!("avx512cd")
            && has!("avx512bw")
            && has!("avx512dq")
            && has!("avx512vl")
        {
            return Some("SkylakeX");
        }
        if has!("avx2") && has!("fma") {
            return Some("Haswell");
        }
    }
    None
}

fn load() -> Option<OpenBlas> {
    // OpenBLAS picks its kernels once, when it is loaded, from `OPENBLAS_CORETYPE` or its own
    // detection; a value the user set is theirs to keep. Set here only before the first load,
    // which the CLI does before it starts any thread.
    let asked = match std::env::var_os("OPENBLAS_CORETYPE") {
        Some(_) => None,
        None => core_type_for_this_cpu(),
    };
    if let Some(core) = asked {
        std::env::set_var("OPENBLAS_CORETYPE", core);
    }
    let library = LIBRARY_NAMES.iter().find_map(|name| {
        // SAFETY: loading OpenBLAS runs its initialisers, which only set up its own state.
        unsafe { Library::new(name) }.ok()
    })?;
    // SAFETY: the symbols have these C signatures in every OpenBLAS since 0.2.
    unsafe {
        let sgemm = *library.get::<Sgemm>(b"cblas_sgemm\0").ok()?;
        let set_threads = *library
            .get::<SetNumThreads>(b"openblas_set_num_threads\0")
            .ok()?;
        let core = match library.get::<CoreName>(b"openblas_get_corename\0") {
            Ok(name) => std::ffi::CStr::from_ptr(name())
                .to_string_lossy()
                .into_owned(),
            Err(_) => String::from("unknown"),
        };
        // OpenBLAS's own workers spin on `sched_yield` for a while after every product, taking
        // the cores from rayon's workers between products (a profile of a ROME edit found about
        // 12% of its time in that yielding and the scheduler): products are split over rayon's
        // pool instead, each part on the calling thread.
        set_threads(1);
        Some(OpenBlas {
            sgemm,
            core,
            asked,
            _library: library,
        })
    }
}

fn openblas() -> Option<&'static OpenBlas> {
    OPENBLAS.get_or_init(load).as_ref()
}

/// Whether OpenBLAS is installed and loaded (loading it on the first call).
pub fn available() -> bool {
    openblas().is_some()
}

/// Keeps OpenBLAS unloaded for the rest of the process (`KEDIT_BLAS=none`); `false` if it was
/// loaded already.
pub fn disable() -> bool {
    OPENBLAS.set(None).is_ok()
}

/// The kernels OpenBLAS runs on ("SkylakeX", "Haswell", ...) and whether kedit chose them (else
/// `OPENBLAS_CORETYPE` or OpenBLAS's own detection did), or `None` without OpenBLAS.
pub fn kernels() -> Option<(&'static str, bool)> {
    openblas().map(|o| (o.core.as_str(), o.asked.is_some()))
}

/// `x · wᵀ`; `x: [m, k]`, `w: [n, k]` → `[m, n]`. `None` without OpenBLAS or where a dimension
/// exceeds its 32-bit sizes.
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
fn sgemm(
    a: &[f32],
    b: &[f32],
    rows: usize,
    cols: usize,
    inner: usize,
    b_transposed: bool,
) -> Option<Vec<f32>> {
    let sgemm = openblas()?.sgemm;
    let fits = |v: usize| i32::try_from(v).ok();
    let (m, k, ldc) = (fits(rows)?, fits(inner)?, fits(cols)?);
    let mut out = vec![0f32; rows * cols];
    if out.is_empty() || inner == 0 {
        return Some(out);
    }
    // Parts of at least 64 columns, so each call still fills OpenBLAS's kernels.
    let parts = parallel::threads().min(cols.div_ceil(64)).max(1);
    let width = cols.div_ceil(parts);
    let (trans_b, ldb) = if b_transposed {
        (TRANS, k)
    } else {
        (NO_TRANS, ldc)
    };
    let out_ptr = parallel::SharedMut(out.as_mut_ptr());
    parallel::for_each(parts, |part| {
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
            sgemm(
                ROW_MAJOR,
                NO_TRANS,
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

/// `aᵀ a`, `a: [rows, cols]` → `[cols, cols]`: the Gram matrix of key statistics (`Σ k kᵀ`).
/// Only the upper triangle is multiplied (column blocks whose widths shrink as `√` so each
/// holds the same work, split over rayon's pool), then mirrored: about half of a full product.
/// `None` without OpenBLAS or where a dimension exceeds its 32-bit sizes.
pub fn gram(a: &[f32], rows: usize, cols: usize) -> Option<Vec<f32>> {
    assert_eq!(a.len(), rows * cols, "blas::gram: a is not [rows, cols]");
    let sgemm = openblas()?.sgemm;
    let fits = |v: usize| i32::try_from(v).ok();
    let (k, ld) = (fits(rows)?, fits(cols)?);
    let mut out = vec![0f32; cols * cols];
    if out.is_empty() || rows == 0 {
        return Some(out);
    }
    // Block p spans columns edge(p)..edge(p + 1) and rows 0..edge(p + 1) of the output; with
    // edges at cols·√(p/B) every block holds about cols²/(2B) products, and the total exceeds
    // the triangle by 1/B.
    let blocks = (2 * parallel::threads()).max(8).min(cols);
    let edge = |p: usize| ((cols as f64) * (p as f64 / blocks as f64).sqrt()).round() as usize;
    let out_ptr = parallel::SharedMut(out.as_mut_ptr());
    parallel::for_each(blocks, |p| {
        let (c0, c1) = (edge(p), edge(p + 1));
        if c1 <= c0 {
            return;
        }
        let out_ptr = &out_ptr;
        // SAFETY: `a` holds [rows, cols] with leading dimension `cols`; the block reads rows
        // 0..c1 of `aᵀ` (columns 0..c1 of `a`) and columns c0..c1 of `a`, and writes rows 0..c1
        // of columns c0..c1 of `out` ([cols, cols]): the blocks' column ranges are disjoint.
        unsafe {
            sgemm(
                ROW_MAJOR,
                TRANS,
                NO_TRANS,
                c1 as i32,
                (c1 - c0) as i32,
                k,
                1.0,
                a.as_ptr(),
                ld,
                a.as_ptr().add(c0),
                ld,
                0.0,
                out_ptr.0.add(c0),
                ld,
            )
        };
    });
    for i in 0..cols {
        for j in 0..i {
            out[i * cols + j] = out[j * cols + i];
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An OpenBLAS that does not know this CPU would otherwise run its SSE3 kernels.
    #[test]
    fn openblas_runs_the_kernels_chosen_for_this_cpu() {
        let Some(openblas) = openblas() else {
            eprintln!("skipped: OpenBLAS is not installed");
            return;
        };
        eprintln!("OpenBLAS kernels: {}", openblas.core);
        if let Some(asked) = openblas.asked {
            assert!(
                openblas.core.eq_ignore_ascii_case(asked),
                "asked OpenBLAS for {asked}, it runs {}",
                openblas.core
            );
        }
    }

    #[test]
    fn gram_matches_its_definition() {
        if !available() {
            eprintln!("skipped: OpenBLAS is not installed");
            return;
        }
        let value = |i: usize| ((i * 7919 % 2001) as f32 - 1000.0) / 1000.0;
        // Column counts around the block edges, and fewer columns than blocks.
        for (rows, cols) in [(37, 150), (5, 3), (64, 97), (1, 1)] {
            let a: Vec<f32> = (0..rows * cols).map(|i| value(i + cols)).collect();
            let g = gram(&a, rows, cols).unwrap();
            for i in 0..cols {
                for j in 0..cols {
                    let want: f64 = (0..rows)
                        .map(|r| a[r * cols + i] as f64 * a[r * cols + j] as f64)
                        .sum();
                    let got = g[i * cols + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "[{rows}, {cols}] entry ({i}, {j}): {got} against {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn products_match_their_definition() {
        if !available() {
            eprintln!("skipped: OpenBLAS is not installed");
            return;
        }
        let (m, k, n) = (40, 70, 150);
        let value = |i: usize| ((i * 7919 % 2001) as f32 - 1000.0) / 1000.0;
        let x: Vec<f32> = (0..m * k).map(value).collect();
        let w: Vec<f32> = (0..n * k).map(|i| value(i + 17)).collect();
        let dy: Vec<f32> = (0..m * n).map(|i| value(i + 31)).collect();
        let xw = x_wt(&x, &w, m, k, n).unwrap();
        let dw = dy_w(&dy, &w, m, n, k).unwrap();
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                    .sum();
                assert!((xw[i * n + j] as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()));
            }
            for c in 0..k {
                let want: f64 = (0..n)
                    .map(|j| dy[i * n + j] as f64 * w[j * k + c] as f64)
                    .sum();
                assert!((dw[i * k + c] as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()));
            }
        }
    }
}
