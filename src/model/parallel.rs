//! The pool that CPU kernels split their work over: candle's barrier pool, the one candle's own
//! elementwise ops use. Its calling thread takes a share of the work and its workers spin for a
//! while between calls before they sleep, so the hundreds of short products of an editing step
//! run back to back without waking threads (with rayon's pool, whose idle workers sleep within
//! microseconds, a tenth of an FT-L edit went to waking them). Sized, as candle sizes it, by
//! `$RAYON_NUM_THREADS`, which `--threads` sets; one pool for kedit's kernels and candle's ops
//! leaves one helper thread per core, not one per pool.

use candle_core::utils::barrier_pool;

/// The threads that share a parallel call: the pool's workers and the calling thread.
pub fn threads() -> usize {
    barrier_pool().n_workers() + 1
}

/// Runs `f(i)` once for every `i < n` over the pool and returns when all have run.
pub fn for_each(n: usize, f: impl Fn(usize) + Sync) {
    barrier_pool().execute_chunked(n, |range| range.for_each(&f));
}

/// `(0..n).map(f)` over the pool, in index order.
pub fn map<R: Send>(n: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let mut out: Vec<R> = Vec::with_capacity(n);
    let slots = SharedMut(out.as_mut_ptr());
    for_each(n, |i| {
        let slots = &slots;
        // SAFETY: each index is visited once, so each slot has one writer, inside the capacity.
        unsafe { slots.0.add(i).write(f(i)) };
    });
    // SAFETY: `for_each` returned, so every slot below `n` was written (a panic in `f` leaves
    // them leaked, never read).
    unsafe { out.set_len(n) };
    out
}

/// `f(i, chunk)` for the `i`-th chunk of `chunk` elements of `out` (the last may be shorter), over
/// the pool.
pub fn for_each_chunk_mut<T: Send>(
    out: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    let chunks = ChunkedMut::new(out, chunk);
    for_each(chunks.count(), |i| {
        // SAFETY: `for_each` visits each index once.
        f(i, unsafe { chunks.take(i) })
    });
}

/// A buffer cut into chunks of a fixed size that parallel tasks take by index, for tasks that
/// write several buffers at once.
pub struct ChunkedMut<'a, T> {
    base: *mut T,
    len: usize,
    chunk: usize,
    _buffer: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: tasks reach the elements only through `take`, whose contract keeps them disjoint.
unsafe impl<T: Send> Sync for ChunkedMut<'_, T> {}

impl<'a, T: Send> ChunkedMut<'a, T> {
    pub fn new(buffer: &'a mut [T], chunk: usize) -> Self {
        assert!(chunk > 0, "parallel::ChunkedMut: chunks of 0");
        Self {
            base: buffer.as_mut_ptr(),
            len: buffer.len(),
            chunk,
            _buffer: std::marker::PhantomData,
        }
    }

    pub fn count(&self) -> usize {
        self.len.div_ceil(self.chunk)
    }

    /// Chunk `i` (elements `i·chunk..`, the last one shorter).
    ///
    /// # Safety
    /// No chunk may be taken twice while an earlier take of it is alive.
    pub unsafe fn take(&self, i: usize) -> &'a mut [T] {
        let start = i * self.chunk;
        assert!(
            start < self.len.max(1),
            "parallel::ChunkedMut: chunk {i} of {}",
            self.count()
        );
        let end = self.len.min(start + self.chunk);
        std::slice::from_raw_parts_mut(self.base.add(start), end - start)
    }
}

/// A buffer that parallel tasks write at disjoint places.
pub(crate) struct SharedMut<T>(pub(crate) *mut T);
// SAFETY: tasks write disjoint elements only (each use says how), and the buffer outlives them.
unsafe impl<T: Send> Sync for SharedMut<T> {}
