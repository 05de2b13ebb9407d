//! A weight kept as the GGUF file stores it (Q4_1 or Q8_0 blocks of 32), beside its f32 tensor,
//! for the short products of editing and training.
//!
//! Those products stream every weight once per step against a few dozen input rows, and on a
//! machine whose memory delivers ~20 GB/s to two cores they wait on the f32 weights (4 bytes per
//! weight); Q4_1 blocks are 0.625 bytes per weight, Q8_0 1.06. [`super::kernels`] expands a few
//! rows at a time into a cache-resident f32 buffer and runs its usual tiles on it.
//!
//! The expansion gives exactly the f32 values the loader made (`q · d + m` with `q · d` exact in
//! f32, as candle computes it), and the tiles sum in the same order, so a product from the packed
//! rows is bit for bit the product from the f32 tensor.

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

/// Weights per block, in both formats.
const BLOCK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// `d: f16, m: f16, 16 bytes of nibbles`: weight `j` is `q_j · d + m`, the low nibbles
    /// holding weights 0–15 and the high nibbles 16–31.
    Q4_1,
    /// `d: f16, 32 × i8`: weight `j` is `q_j · d`.
    Q8_0,
}

impl BlockFormat {
    fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q8_0 => 34,
        }
    }
}

/// A `[rows, cols]` matrix as rows of quantised blocks.
#[derive(Debug, Clone)]
pub struct PackedRows {
    format: BlockFormat,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl PackedRows {
    /// The blocks of a 2-D Q4_1 or Q8_0 tensor; `None` for other formats and shapes.
    pub fn from_gguf(q: &QTensor) -> candle_core::Result<Option<Self>> {
        let format = match q.dtype() {
            GgmlDType::Q4_1 => BlockFormat::Q4_1,
            GgmlDType::Q8_0 => BlockFormat::Q8_0,
            _ => return Ok(None),
        };
        let &[rows, cols] = q.shape().dims() else {
            return Ok(None);
        };
        if !cols.is_multiple_of(BLOCK) {
            return Ok(None);
        }
        let data = q.data()?.into_owned();
        if data.len() != rows * cols / BLOCK * format.block_bytes() {
            candle_core::bail!(
                "a {format:?} tensor of {rows}x{cols} has {} bytes of blocks",
                data.len()
            );
        }
        Ok(Some(Self {
            format,
            rows,
            cols,
            data,
        }))
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn format(&self) -> BlockFormat {
        self.format
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        self.data.len()
    }

    fn row_bytes(&self) -> usize {
        self.cols / BLOCK * self.format.block_bytes()
    }

    /// The same matrix with row `r` taken from row `order[r]` of this one.
    ///
    /// # Panics
    /// If `order` does not have one index per row, each below the row count.
    pub fn with_rows_from(&self, order: &[usize]) -> Self {
        assert_eq!(order.len(), self.rows, "with_rows_from: one index per row");
        let width = self.row_bytes();
        let mut data = Vec::with_capacity(self.data.len());
        for &r in order {
            data.extend_from_slice(&self.data[r * width..(r + 1) * width]);
        }
        Self { data, ..*self }
    }

    /// The whole matrix in f32: the values the loader made beside it.
    pub fn dequantize(&self) -> candle_core::Result<candle_core::Tensor> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0, self.rows, &mut out);
        candle_core::Tensor::from_vec(out, (self.rows, self.cols), &candle_core::Device::Cpu)
    }

    /// Writes rows `j0..j1` as f32 into `out` (`(j1 - j0) · cols` long).
    ///
    /// # Panics
    /// If the rows are out of range or `out` has another length.
    pub fn dequantize_rows(&self, j0: usize, j1: usize, out: &mut [f32]) {
        assert!(
            j0 <= j1 && j1 <= self.rows,
            "dequantize_rows: rows {j0}..{j1} of {}",
            self.rows
        );
        assert_eq!(
            out.len(),
            (j1 - j0) * self.cols,
            "dequantize_rows: output length"
        );
        let width = self.row_bytes();
        let blocks = &self.data[j0 * width..j1 * width];
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: AVX-512 and F16C checked; `blocks` holds exactly `out.len() / 32` blocks.
            unsafe { avx512::dequantize(self.format, blocks, out) };
            return;
        }
        dequantize_scalar(self.format, blocks, out);
    }
}

fn scale(bytes: &[u8]) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[0], bytes[1]])).to_f32()
}

/// The reference expansion, written as candle's `to_float` computes it.
fn dequantize_scalar(format: BlockFormat, blocks: &[u8], out: &mut [f32]) {
    let size = format.block_bytes();
    for (block, ys) in blocks.chunks_exact(size).zip(out.chunks_exact_mut(BLOCK)) {
        let d = scale(&block[0..2]);
        match format {
            BlockFormat::Q4_1 => {
                let m = scale(&block[2..4]);
                for (j, &q) in block[4..20].iter().enumerate() {
                    ys[j] = f32::from(q & 0x0F) * d + m;
                    ys[j + BLOCK / 2] = f32::from(q >> 4) * d + m;
                }
            }
            BlockFormat::Q8_0 => {
                for (y, &q) in ys.iter_mut().zip(&block[2..34]) {
                    *y = f32::from(q as i8) * d;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{BlockFormat, BLOCK};

    /// The f16 at `at` (little-endian), as f32.
    #[target_feature(enable = "f16c")]
    #[inline]
    unsafe fn scale(at: *const u8) -> f32 {
        let bits = (at as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }

    /// [`super::dequantize_scalar`], sixteen weights at a time. `q · d` is exact in f32 (a 4- or
    /// 8-bit integer times an 11-bit mantissa), so the fused `q · d + m` rounds once, exactly as
    /// the separate product and sum do.
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) unsafe fn dequantize(format: BlockFormat, blocks: &[u8], out: &mut [f32]) {
        let size = format.block_bytes();
        let nibble = _mm_set1_epi8(0x0F);
        for (block, ys) in blocks.chunks_exact(size).zip(out.chunks_exact_mut(BLOCK)) {
            let d = _mm512_set1_ps(scale(block.as_ptr()));
            let (lo, hi) = match format {
                BlockFormat::Q4_1 => {
                    let m = _mm512_set1_ps(scale(block.as_ptr().add(2)));
                    let q = _mm_loadu_si128(block.as_ptr().add(4) as *const __m128i);
                    let lo = _mm_and_si128(q, nibble);
                    let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), nibble);
                    (
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), d, m),
                        _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), d, m),
                    )
                }
                BlockFormat::Q8_0 => {
                    let lo = _mm_loadu_si128(block.as_ptr().add(2) as *const __m128i);
                    let hi = _mm_loadu_si128(block.as_ptr().add(18) as *const __m128i);
                    (
                        _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)), d),
                        _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)), d),
                    )
                }
            };
            _mm512_storeu_ps(ys.as_mut_ptr(), lo);
            _mm512_storeu_ps(ys.as_mut_ptr().add(BLOCK / 2), hi);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Values that quantise to every nibble and to extreme scales and offsets.
    fn matrix(rows: usize, cols: usize) -> Tensor {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let row = i / cols;
                let spread = [1e-3f32, 0.37, 5.0, 60_000.0][row % 4];
                let offset = [0.0f32, -2.5, 0.75, -1e4][(row / 4) % 4];
                ((i * 7919) % 1013) as f32 / 1013.0 * spread + offset
            })
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn rows_expand_to_candles_dequantisation_bit_for_bit() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&matrix(20, 96), dtype).unwrap();
            let want: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let packed = PackedRows::from_gguf(&q)
                .unwrap()
                .expect("a 2-D Q4_1/Q8_0 tensor packs");
            let mut got = vec![0f32; 17 * 96];
            packed.dequantize_rows(3, 20, &mut got);
            let mut scalar = vec![0f32; 17 * 96];
            dequantize_scalar(
                packed.format,
                &packed.data[3 * packed.row_bytes()..],
                &mut scalar,
            );
            for (i, ((g, s), w)) in got.iter().zip(&scalar).zip(&want[3 * 96..]).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{dtype:?} element {i}: {g} vs candle's {w}"
                );
                assert_eq!(
                    s.to_bits(),
                    w.to_bits(),
                    "{dtype:?} element {i} (scalar): {s} vs {w}"
                );
            }
        }
    }

    #[test]
    fn reordered_rows_are_the_rows_asked_for() {
        let q = QTensor::quantize(&matrix(8, 64), GgmlDType::Q8_0).unwrap();
        let packed = PackedRows::from_gguf(&q).unwrap().unwrap();
        let order = [7, 0, 3, 3, 1, 2, 6, 5];
        let moved = packed.with_rows_from(&order);
        let (mut a, mut b) = (vec![0f32; 64], vec![0f32; 64]);
        for (r, &from) in order.iter().enumerate() {
            moved.dequantize_rows(r, r + 1, &mut a);
            packed.dequantize_rows(from, from + 1, &mut b);
            assert_eq!(a, b, "row {r} should be row {from}");
        }
    }

    #[test]
    fn other_formats_and_shapes_are_not_packed() {
        let q = QTensor::quantize(&matrix(4, 256), GgmlDType::Q4K).unwrap();
        assert!(PackedRows::from_gguf(&q).unwrap().is_none());
        let q = QTensor::quantize(&matrix(4, 64).flatten_all().unwrap(), GgmlDType::Q8_0).unwrap();
        assert!(PackedRows::from_gguf(&q).unwrap().is_none());
    }
}
