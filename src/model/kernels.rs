//! f32 matrix products on the CPU for inputs of a few dozen rows against a weight stored
//! `[out, in]`: the shapes of editing and training, where one prompt of ten to thirty tokens meets
//! every weight of the model.
//!
//! A packing GEMM (candle's `gemm`, OpenBLAS) copies the weight into panels on every call, and
//! with so few rows that copy costs as much as the product (`benches/kernels.rs` measures both).
//! These kernels read each weight row once, straight from where it lies, against rows of the input
//! held in the L1 cache: `x · wᵀ` as 4 × 4 tiles of dot products, `dy · w` as 4-row × 64-column
//! tiles of outer-product updates, both in AVX-512 with the work split over the CPU pool ([`super::parallel`]) by
//! runs of weight rows. Summation order differs from a GEMM's, so
//! results agree with it to float rounding, not bit for bit.
//!
//! Where AVX-512 is missing, [`available`] is false and callers keep candle's matmul.

use super::packed::PackedRows;
use super::parallel;

/// The most input rows the kernels take from f32 weights; above it a packing GEMM amortises its
/// copies and wins.
pub const MAX_ROWS: usize = 32;

/// The most input rows the kernels take from quantised rows ([`x_wt_packed`], [`dy_w_packed`]).
/// Reading a sixth of the bytes does not move the crossover: with weights beyond the cache
/// (`cargo bench --bench kernels -- "(48|64)x576x1536"`), OpenBLAS from f32 ran `x·wᵀ` at 108 and
/// 118 GFLOP/s against 84 and 91 from Q4_1 rows.
pub const MAX_PACKED_ROWS: usize = MAX_ROWS;

/// Whether this CPU runs the kernels.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Weight rows per parallel task of [`x_wt`]: small enough to spread one matrix over the pool,
/// large enough that a task outweighs handing it out.
const ROWS_PER_TASK: usize = 24;
/// Output columns per tile of [`dy_w`]: four AVX-512 vectors.
const COLS_PER_TILE: usize = 64;

/// `x · wᵀ`.
///
/// # Shapes
/// `x: [m, k]`, `w: [n, k]` (both row-major) → `[m, n]`
///
/// # Panics
/// If the slices do not have those lengths, or [`available`] is false.
pub fn x_wt(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(w.len(), n * k, "x_wt: w is not [n, k]");
    x_wt_from(x, F32Rows(w), m, k, n)
}

/// A half-precision weight (`[n, k]`, row-major), read as f32 a few rows at a time: a product
/// with a few input rows then reads each weight element once, two bytes of it, where widening the
/// whole weight first would write and read back four more (and, allocated afresh, fault in every
/// page of the copy).
#[derive(Clone, Copy)]
pub enum HalfRows<'a> {
    Bf16(&'a [half::bf16]),
    F16(&'a [half::f16]),
}

impl HalfRows<'_> {
    /// The number of elements.
    pub(crate) fn len(&self) -> usize {
        match self {
            Self::Bf16(w) => w.len(),
            Self::F16(w) => w.len(),
        }
    }
}

/// [`x_wt`] with a half-precision weight: the same sums over its exact f32 values.
///
/// # Shapes
/// `x: [m, k]`, `w: [n, k]` → `[m, n]`
///
/// # Panics
/// As [`x_wt`].
pub fn x_wt_half(x: &[f32], w: HalfRows<'_>, m: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(w.len(), n * k, "x_wt_half: w is not [n, k]");
    x_wt_from(x, w, m, k, n)
}

/// [`dy_w`] with a half-precision weight: the same sums over its exact f32 values.
///
/// # Shapes
/// `dy: [m, n]`, `w: [n, k]` → `[m, k]`
///
/// # Panics
/// As [`dy_w`].
pub fn dy_w_half(dy: &[f32], w: HalfRows<'_>, m: usize, n: usize, k: usize) -> Vec<f32> {
    assert_eq!(w.len(), n * k, "dy_w_half: w is not [n, k]");
    dy_w_from(dy, w, m, n, k)
}

/// [`x_wt`] with the weight as quantised rows: the same bits, a sixth of the memory traffic.
///
/// # Shapes
/// `x: [m, k]`, `w: [n, k]` → `[m, n]`
pub fn x_wt_packed(x: &[f32], w: &PackedRows, m: usize) -> Vec<f32> {
    x_wt_from(x, w, m, w.cols(), w.rows())
}

fn x_wt_from(x: &[f32], w: impl RowSource, m: usize, k: usize, n: usize) -> Vec<f32> {
    assert!(available(), "kernels::x_wt needs AVX-512");
    assert_eq!(x.len(), m * k, "x_wt: x is not [m, k]");
    // Each task fills rows of the transposed product, which are contiguous, so tasks write
    // disjoint slices; one small transpose at the end puts it back as [m, n].
    let mut out_t = vec![0f32; n * m];
    if m == 0 || n == 0 {
        return out_t;
    }
    let step = w.rows_at_once().min(ROWS_PER_TASK);
    parallel::for_each_chunk_mut(&mut out_t, ROWS_PER_TASK * m, |task, out| {
        for (s, out) in out.chunks_mut(step * m).enumerate() {
            let j0 = task * ROWS_PER_TASK + s * step;
            w.with_rows(j0, j0 + out.len() / m, k, |rows| {
                // SAFETY: `available()` checked AVX-512; `rows` holds the rows `out` covers.
                unsafe { avx512::x_wt_rows(x, rows, m, k, out) }
            });
        }
    });
    let mut out = vec![0f32; m * n];
    for (j, col) in out_t.chunks_exact(m).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            out[i * n + j] = v;
        }
    }
    out
}

/// `dy · w`: the gradient of `x` through `x · wᵀ`.
///
/// # Shapes
/// `dy: [m, n]`, `w: [n, k]` (both row-major) → `[m, k]`
///
/// # Panics
/// If the slices do not have those lengths, or [`available`] is false.
pub fn dy_w(dy: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    assert_eq!(w.len(), n * k, "dy_w: w is not [n, k]");
    dy_w_from(dy, F32Rows(w), m, n, k)
}

/// [`dy_w`] with the weight as quantised rows: the same bits.
///
/// # Shapes
/// `dy: [m, n]`, `w: [n, k]` → `[m, k]`
pub fn dy_w_packed(dy: &[f32], w: &PackedRows, m: usize) -> Vec<f32> {
    dy_w_from(dy, w, m, w.rows(), w.cols())
}

fn dy_w_from(dy: &[f32], w: impl RowSource, m: usize, n: usize, k: usize) -> Vec<f32> {
    assert!(available(), "kernels::dy_w needs AVX-512");
    assert_eq!(dy.len(), m * n, "dy_w: dy is not [m, n]");
    if m == 0 || k == 0 || n == 0 {
        return vec![0f32; m * k];
    }
    // Groups take contiguous runs of weight rows (a stream the prefetcher follows) and sum into
    // private partial products, added up in group order at the end. The groups depend on `n`
    // alone, never on the pool or on which thread stole what, so the sum's order and hence its
    // rounding are the same on every run: an optimiser (Adam divides by the gradient's scale)
    // would otherwise amplify run-to-run rounding into visibly different edits.
    let tasks = n.div_ceil(ROWS_PER_TASK);
    let tasks_per_group = tasks.div_ceil(MAX_PARTIALS);
    let partials: Vec<Vec<f32>> = parallel::map(tasks.div_ceil(tasks_per_group), |group| {
        let mut partial = vec![0f32; m * k];
        let first = group * tasks_per_group;
        for task in first..(first + tasks_per_group).min(tasks) {
            let j0 = task * ROWS_PER_TASK;
            let j1 = (j0 + ROWS_PER_TASK).min(n);
            w.with_rows(j0, j1, k, |rows| {
                // SAFETY: `available()` checked AVX-512; `rows` holds rows j0..j1 of `w`, and
                // they lie inside `dy`'s columns.
                unsafe { avx512::dy_w_rows(dy, rows, m, n, k, j0, j1, &mut partial) }
            });
        }
        partial
    });
    // Summed over the pool, element by element in group order: the same bits as a serial sum,
    // without leaving the other threads idle while one adds up to sixteen [m, k] partials.
    let mut partials = partials.into_iter();
    let mut total = partials.next().unwrap_or_else(|| vec![0f32; m * k]);
    let rest: Vec<Vec<f32>> = partials.collect();
    parallel::for_each_chunk_mut(&mut total, SUM_CHUNK, |chunk, out| {
        let start = chunk * SUM_CHUNK;
        for partial in &rest {
            let part = &partial[start..start + out.len()];
            out.iter_mut().zip(part).for_each(|(x, y)| *x += y);
        }
    });
    total
}

/// Elements per parallel task when [`dy_w`] adds its partial products.
const SUM_CHUNK: usize = 2048;

/// Where the kernels read weight rows from: an f32 matrix in place, or quantised or
/// half-precision rows expanded into a per-thread buffer a few at a time.
trait RowSource: Sync {
    /// The most rows worth expanding at once for [`x_wt`]: its tiles read each row once.
    fn rows_at_once(&self) -> usize;

    /// `f` on rows `j0..j1` (`[j1 - j0, k]`, row-major).
    fn with_rows<R>(&self, j0: usize, j1: usize, k: usize, f: impl FnOnce(&[f32]) -> R) -> R;
}

#[derive(Clone, Copy)]
struct F32Rows<'a>(&'a [f32]);

impl RowSource for F32Rows<'_> {
    fn rows_at_once(&self) -> usize {
        usize::MAX
    }

    fn with_rows<R>(&self, j0: usize, j1: usize, k: usize, f: impl FnOnce(&[f32]) -> R) -> R {
        f(&self.0[j0 * k..j1 * k])
    }
}

impl RowSource for &PackedRows {
    fn rows_at_once(&self) -> usize {
        // One tile's rows: with 1536 columns, 36 KiB, which stays in the L1 cache while the tile
        // runs over every input row.
        6
    }

    fn with_rows<R>(&self, j0: usize, j1: usize, k: usize, f: impl FnOnce(&[f32]) -> R) -> R {
        debug_assert_eq!(k, self.cols());
        with_expanded(
            (j1 - j0) * k,
            |buffer| self.dequantize_rows(j0, j1, buffer),
            f,
        )
    }
}

impl RowSource for HalfRows<'_> {
    fn rows_at_once(&self) -> usize {
        // As for quantised rows: one tile's rows, converted where the tile will read them.
        6
    }

    fn with_rows<R>(&self, j0: usize, j1: usize, k: usize, f: impl FnOnce(&[f32]) -> R) -> R {
        use half::slice::HalfFloatSliceExt;
        let rows = j0 * k..j1 * k;
        with_expanded(
            rows.len(),
            |buffer| match self {
                Self::Bf16(w) => widen_bf16(&w[rows], buffer),
                Self::F16(w) => w[rows].convert_to_f32_slice(buffer),
            },
            f,
        )
    }
}

/// Writes `src` widened to f32 into `dst` (of the same length). A bf16 is the top half of the f32
/// with the same value, so this is a shift, sixteen lanes at a time where AVX-512 is there: the
/// `half` crate's element-by-element conversion took more time than the products it fed.
///
/// # Panics
/// If the lengths differ.
pub fn widen_bf16(src: &[half::bf16], dst: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    assert_eq!(src.len(), dst.len(), "widen_bf16: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: `available()` checked AVX-512; the lengths are equal.
        unsafe { avx512::widen_bf16(src, dst) };
        return;
    }
    src.convert_to_f32_slice(dst);
}

/// `f` on `len` f32s that `fill` wrote into this thread's expansion buffer, which is kept from
/// call to call: the kernels expand a few weight rows per call, far too often to allocate each.
fn with_expanded<R>(len: usize, fill: impl FnOnce(&mut [f32]), f: impl FnOnce(&[f32]) -> R) -> R {
    thread_local! {
        static EXPANDED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    EXPANDED.with_borrow_mut(|buffer| {
        buffer.resize(len, 0.0);
        fill(&mut buffer[..len]);
        f(&buffer[..len])
    })
}

/// Partial products of [`dy_w`]: enough groups to keep a pool of a few dozen threads busy, few
/// enough that adding them up stays small beside the product.
const MAX_PARTIALS: usize = 16;

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    const LANES: usize = 16;

    /// The lanes of the last, partial vector of a row of `k`.
    fn tail_mask(k: usize) -> __mmask16 {
        match k % LANES {
            0 => 0xFFFF,
            r => (1u32 << r) as u16 - 1,
        }
    }

    /// `out_t[j, i] = w[j] · x[i]` for the weight rows given, all `m` input rows.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn x_wt_rows(x: &[f32], w: &[f32], m: usize, k: usize, out_t: &mut [f32]) {
        let rows = w.len() / k;
        let groups = m.div_ceil(4).max(1);
        let mut j = 0;
        while j + TILE_ROWS <= rows {
            // The next tile's rows are one contiguous block: fetch it a line per step
            // while this tile runs, since four short row streams give the prefetcher too little
            // to lock on to.
            let next_lines = if j + 2 * TILE_ROWS <= rows {
                (TILE_ROWS * k).div_ceil(LANES)
            } else {
                0
            };
            let per_group = next_lines.div_ceil(groups);
            let mut ahead = Prefetch {
                at: w.as_ptr().wrapping_add((j + TILE_ROWS) * k),
                lines: 0,
            };
            let mut i = 0;
            while i + 4 <= m {
                ahead.lines = per_group.min(next_lines.saturating_sub((i / 4) * per_group));
                tile_x_wt::<4, TILE_ROWS>(x, w, m, k, i, j, &mut ahead, out_t);
                i += 4;
            }
            while i < m {
                ahead.lines = per_group.min(next_lines.saturating_sub((i / 4) * per_group));
                tile_x_wt::<1, TILE_ROWS>(x, w, m, k, i, j, &mut ahead, out_t);
                i += 1;
            }
            j += TILE_ROWS;
        }
        let mut none = Prefetch::none();
        while j < rows {
            let mut i = 0;
            while i + 4 <= m {
                tile_x_wt::<4, 1>(x, w, m, k, i, j, &mut none, out_t);
                i += 4;
            }
            while i < m {
                tile_x_wt::<1, 1>(x, w, m, k, i, j, &mut none, out_t);
                i += 1;
            }
            j += 1;
        }
    }

    /// [`super::widen_bf16`]: each bf16's bits moved to the top of an f32.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn widen_bf16(src: &[half::bf16], dst: &mut [f32]) {
        let n = src.len();
        let mut i = 0;
        while i + LANES <= n {
            let halves = _mm256_loadu_si256(src.as_ptr().add(i) as *const __m256i);
            let bits = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(halves));
            _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_castsi512_ps(bits));
            i += LANES;
        }
        for (d, s) in dst[i..].iter_mut().zip(&src[i..]) {
            *d = f32::from_bits(u32::from(s.to_bits()) << 16);
        }
    }

    /// Weight rows per tile of `x_wt`: each input vector fetched from L2 meets six of them.
    const TILE_ROWS: usize = 6;

    /// Lines to fetch into the cache ahead of use, one per step of a tile's loop.
    struct Prefetch {
        at: *const f32,
        lines: usize,
    }

    impl Prefetch {
        fn none() -> Self {
            Self {
                at: std::ptr::null(),
                lines: 0,
            }
        }

        /// Fetches the next line, if any are left for this tile.
        #[inline(always)]
        unsafe fn step(&mut self) {
            if self.lines > 0 {
                _mm_prefetch::<_MM_HINT_T0>(self.at as *const i8);
                self.at = self.at.wrapping_add(LANES);
                self.lines -= 1;
            }
        }
    }

    /// One `MI × NJ` tile of dot products: input rows `i..i + MI`, weight rows `j..j + NJ`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_x_wt<const MI: usize, const NJ: usize>(
        x: &[f32],
        w: &[f32],
        m: usize,
        k: usize,
        i: usize,
        j: usize,
        ahead: &mut Prefetch,
        out_t: &mut [f32],
    ) {
        let xp = x.as_ptr().add(i * k);
        let wp = w.as_ptr().add(j * k);
        let mut acc = [[_mm512_setzero_ps(); MI]; NJ];
        let full = k / LANES;
        for c in 0..full {
            let off = c * LANES;
            ahead.step();
            let mut xv = [_mm512_setzero_ps(); MI];
            for (r, v) in xv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(xp.add(r * k + off));
            }
            for (q, row) in acc.iter_mut().enumerate() {
                let wv = _mm512_loadu_ps(wp.add(q * k + off));
                for (a, v) in row.iter_mut().zip(xv.iter()) {
                    *a = _mm512_fmadd_ps(wv, *v, *a);
                }
            }
        }
        if !k.is_multiple_of(LANES) {
            let mask = tail_mask(k);
            let off = full * LANES;
            let mut xv = [_mm512_setzero_ps(); MI];
            for (r, v) in xv.iter_mut().enumerate() {
                *v = _mm512_maskz_loadu_ps(mask, xp.add(r * k + off));
            }
            for (q, row) in acc.iter_mut().enumerate() {
                let wv = _mm512_maskz_loadu_ps(mask, wp.add(q * k + off));
                for (a, v) in row.iter_mut().zip(xv.iter()) {
                    *a = _mm512_fmadd_ps(wv, *v, *a);
                }
            }
        }
        for (q, row) in acc.iter().enumerate() {
            for (r, a) in row.iter().enumerate() {
                out_t[(j + q) * m + i + r] = _mm512_reduce_add_ps(*a);
            }
        }
    }

    /// `out[i, :] += Σ_{j0 ≤ j < j1} dy[i, j] · w[j, :]` for every input row `i`, with `w_rows`
    /// holding rows `j0..j1` of `w`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn dy_w_rows(
        dy: &[f32],
        w_rows: &[f32],
        m: usize,
        n: usize,
        k: usize,
        j0: usize,
        j1: usize,
        out: &mut [f32],
    ) {
        let mut c0 = 0;
        while c0 < k {
            let cols = super::COLS_PER_TILE.min(k - c0);
            let mut masks = [0 as __mmask16; 4];
            for (v, mask) in masks.iter_mut().enumerate() {
                let live = cols.saturating_sub(v * LANES).min(LANES);
                *mask = ((1u32 << live) - 1) as u16;
            }
            // The next column block's segments lie a row apart, a stride the prefetcher does not
            // follow: fetch them, a line per step, while this block runs.
            let mut ahead = SegmentPrefetch {
                next: c0 + super::COLS_PER_TILE < k,
                row: 0,
                part: 0,
            };
            let mut i = 0;
            while i + 4 <= m {
                tile_dy_w::<4>(dy, w_rows, n, k, c0, i, j0, j1, &masks, &mut ahead, out);
                i += 4;
            }
            while i < m {
                tile_dy_w::<1>(dy, w_rows, n, k, c0, i, j0, j1, &masks, &mut ahead, out);
                i += 1;
            }
            c0 += super::COLS_PER_TILE;
        }
    }

    /// The lines of the next column block of `dy_w`: four per weight row, from row `row` (counted
    /// within the task's rows) on.
    pub(super) struct SegmentPrefetch {
        next: bool,
        row: usize,
        part: usize,
    }

    impl SegmentPrefetch {
        /// Fetches the next line of the block after the one at `block` (a row of `k`).
        #[inline(always)]
        unsafe fn step(&mut self, block: *const f32, k: usize, rows: usize) {
            if self.next && self.row < rows {
                let line =
                    block.wrapping_add(self.row * k + super::COLS_PER_TILE + self.part * LANES);
                _mm_prefetch::<_MM_HINT_T0>(line as *const i8);
                self.part += 1;
                if self.part == 4 {
                    self.part = 0;
                    self.row += 1;
                }
            }
        }
    }

    /// Input rows `i..i + MI`, output columns `c0..c0 + 64` (masked past `k`), weight rows
    /// `j0..j1` (held in `w_rows`), added into `out` (`[m, k]`).
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_dy_w<const MI: usize>(
        dy: &[f32],
        w_rows: &[f32],
        n: usize,
        k: usize,
        c0: usize,
        i: usize,
        j0: usize,
        j1: usize,
        masks: &[__mmask16; 4],
        ahead: &mut SegmentPrefetch,
        out: &mut [f32],
    ) {
        let outp = out.as_mut_ptr().add(i * k + c0);
        let mut acc = [[_mm512_setzero_ps(); 4]; MI];
        for (r, a) in acc.iter_mut().enumerate() {
            for (v, x) in a.iter_mut().enumerate() {
                *x = _mm512_maskz_loadu_ps(masks[v], outp.add(r * k + v * LANES));
            }
        }
        let dyp = dy.as_ptr().add(i * n);
        let wp = w_rows.as_ptr().add(c0);
        for j in j0..j1 {
            let row = wp.add((j - j0) * k);
            ahead.step(wp, k, j1 - j0);
            let mut wv = [_mm512_setzero_ps(); 4];
            for (v, x) in wv.iter_mut().enumerate() {
                *x = _mm512_maskz_loadu_ps(masks[v], row.add(v * LANES));
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*dyp.add(r * n + j));
                for (x, v) in a.iter_mut().zip(wv.iter()) {
                    *x = _mm512_fmadd_ps(b, *v, *x);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (v, x) in a.iter().enumerate() {
                _mm512_mask_storeu_ps(outp.add(r * k + v * LANES), masks[v], *x);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx512 {
    pub(super) unsafe fn x_wt_rows(_: &[f32], _: &[f32], _: usize, _: usize, _: &mut [f32]) {
        unreachable!("available() is false off x86_64")
    }
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn dy_w_rows(
        _: &[f32],
        _: &[f32],
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
        _: &mut [f32],
    ) {
        unreachable!("available() is false off x86_64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The products by their definition, in f64.
    fn reference_x_wt(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                    .sum();
            }
        }
        out
    }

    fn reference_dy_w(dy: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f64> {
        let mut out = vec![0f64; m * k];
        for i in 0..m {
            for c in 0..k {
                out[i * k + c] = (0..n)
                    .map(|j| dy[i * n + j] as f64 * w[j * k + c] as f64)
                    .sum();
            }
        }
        out
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104_729) % 2001) as f32 - 1000.0) / 1000.0)
            .collect()
    }

    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len());
        for (idx, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "{what}[{idx}] = {g}, expected {w}"
            );
        }
    }

    /// Every tile path: row counts off and on the 4-row tiles, widths off and on the 16-lane
    /// vectors and the 64-column tiles, a single row (the LM head at one position).
    const TILE_EDGES: &[(usize, usize, usize)] = &[
        (1, 16, 4),
        (3, 17, 5),
        (4, 64, 16),
        (5, 70, 33),
        (12, 576, 37),
        (32, 129, 66),
        (1, 33, 200),
    ];

    /// The inputs of a `(m, k, n)` case: `x`, `dy` and the weight as f32.
    fn case_inputs(m: usize, k: usize, n: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        (values(m * k, 1), values(m * n, 3), values(n * k, 2))
    }

    /// Both products of a case, as computed, against their definition on the weight `w`.
    #[allow(clippy::too_many_arguments)]
    fn assert_products(
        what: &str,
        (m, k, n): (usize, usize, usize),
        x: &[f32],
        dy: &[f32],
        w: &[f32],
        x_wt_got: &[f32],
        dy_w_got: &[f32],
    ) {
        let shape = format!("{m}x{k}x{n}");
        assert_close(
            x_wt_got,
            &reference_x_wt(x, w, m, k, n),
            &format!("x_wt {what} {shape}"),
        );
        assert_close(
            dy_w_got,
            &reference_dy_w(dy, w, m, n, k),
            &format!("dy_w {what} {shape}"),
        );
    }

    #[test]
    fn products_match_their_definition_at_every_tile_edge() {
        if !available() {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        for &(m, k, n) in TILE_EDGES {
            let (x, dy, w) = case_inputs(m, k, n);
            let got = (x_wt(&x, &w, m, k, n), dy_w(&dy, &w, m, n, k));
            assert_products("f32", (m, k, n), &x, &dy, &w, &got.0, &got.1);
        }
    }

    /// Every bf16 bit pattern, at every position of a vector and in the tail, widens to the f32
    /// whose top half it is (the definition of bf16; NaNs keep their payload).
    #[test]
    fn bf16_widening_is_the_top_half_of_the_f32() {
        let all: Vec<half::bf16> = (0..=u16::MAX).map(half::bf16::from_bits).collect();
        for skip in [0, 5] {
            let src = &all[skip..];
            let mut dst = vec![0f32; src.len()];
            widen_bf16(src, &mut dst);
            for (s, d) in src.iter().zip(&dst) {
                assert_eq!(
                    d.to_bits(),
                    u32::from(s.to_bits()) << 16,
                    "bf16 {:#06x}",
                    s.to_bits()
                );
            }
        }
    }

    /// Half-precision weights give the products of their exact values (bf16 and f16 widen to f32
    /// without rounding), at the same tile edges and across the rows expanded at once.
    #[test]
    fn half_precision_weights_match_the_definition_on_their_values() {
        if !available() {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        for &(m, k, n) in TILE_EDGES {
            let (x, dy, w) = case_inputs(m, k, n);
            let bf16: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let f16: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
            for (name, rows, exact) in [
                (
                    "bf16",
                    HalfRows::Bf16(&bf16),
                    bf16.iter().map(|v| v.to_f32()).collect::<Vec<_>>(),
                ),
                (
                    "f16",
                    HalfRows::F16(&f16),
                    f16.iter().map(|v| v.to_f32()).collect(),
                ),
            ] {
                assert_ne!(
                    exact, w,
                    "{name}: the test weights must not be exact in half precision"
                );
                let got = (x_wt_half(&x, rows, m, k, n), dy_w_half(&dy, rows, m, n, k));
                assert_products(name, (m, k, n), &x, &dy, &exact, &got.0, &got.1);
            }
        }
    }
}
