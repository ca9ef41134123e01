//! The data order for one rank and many.
//!
//! One rank: the seeded epoch permutation, MiniMind's SkipBatchSampler over it, torch's
//! DistributedSampler and the world-size step rescale. The permutation's definition is shared
//! with the reference oracle (reference/src/sampler.rs), written independently: both must give
//! identical orders.
//!
//! Many ranks: the order is defined globally so that it does not depend on the number of GPUs.
//! An epoch is a permutation `perm` of the n samples (the sampler's seeded order). Global batch g
//! is the contiguous slice `perm[g*W*b .. (g+1)*W*b]`; rank r takes its b: `[r*b .. (r+1)*b]` of
//! that slice. Concatenated in rank order, the ranks' batches are exactly one process's batch of
//! W*b, so W ranks with token-weighted gradient averaging train like one rank with W times the
//! batch (DistributedSampler semantics, without its interleaving).
//!
//! The trailing partial global batch (m < W*b samples) is split into W contiguous chunks whose
//! sizes differ by at most one. If m < W, ranks r >= m would be empty; they take sample `perm[r-m]`
//! (wrapping to the epoch's start, as DistributedSampler pads), so every rank has a batch and the
//! collectives stay in step; those few samples are then seen twice in that epoch.
//!
//! Resume on another world size: a checkpoint at micro-step s of an epoch on W ranks has consumed
//! s*W*b samples. The new run on W' ranks restarts at step `s*W/W'` (floor), i.e. at sample
//! `floor(s*W/W')*W'*b <= s*W*b`: it never skips a sample, and repeats `(s*W*b) mod (W'*b)` of them
//! (the start of the interrupted global batch). It is lossless (no repeat) exactly when the consumed
//! sample count s*W*b is divisible by the new global batch W'*b, i.e. when s*W is divisible by W'
//! (always when W' divides W, e.g. 2 -> 1; for 1 -> 2 when s is even). Same per-rank batch b assumed.

use std::ops::Range;

/// SplitMix64: `state += 0x9E3779B97F4A7C15`, output `mix64(state)`, wrapping arithmetic.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    pub state: u64,
}

impl SplitMix64 {
    pub fn new(state: u64) -> Self {
        SplitMix64 { state }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.state)
    }

    /// Uniform in [0, 1) from the top 53 bits of the next output.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// SplitMix64's output function.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The order of `0..n` for `(seed, epoch)`: SplitMix64 from state `seed ^ mix64(epoch)`, then
/// Fisher–Yates from the identity: for i = n-1 down to 1, `j = next_u64() % (i + 1)`, swap i, j.
pub fn epoch_permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = SplitMix64::new(seed ^ mix64(epoch));
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
    perm
}

/// [`epoch_permutation`] as u32 indices (`n` must fit in u32): the same order in half the memory,
/// the one structure of an epoch whose size grows with the corpus (4 bytes a row).
pub fn epoch_permutation_u32(n: usize, seed: u64, epoch: u64) -> Vec<u32> {
    assert!(
        n <= u32::MAX as usize + 1,
        "{n} rows do not fit u32 indices"
    );
    let mut rng = SplitMix64::new(seed ^ mix64(epoch));
    let mut perm: Vec<u32> = (0..n).map(|i| i as u32).collect();
    // The same swaps in the same order; the draws run AHEAD swaps in front so the random slot
    // each swap touches is prefetched while the earlier swaps run (a cache miss per swap made
    // 41.8M rows take ~4 s, the whole start of a run on a 10 GB corpus).
    const AHEAD: usize = 32;
    let swaps = n.saturating_sub(1);
    let mut ring = [0usize; AHEAD];
    let mut drawn = 0usize;
    let mut draw = |drawn: &mut usize, ring: &mut [usize; AHEAD], perm: &[u32]| {
        let i = n - 1 - *drawn;
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        ring[*drawn % AHEAD] = j;
        prefetch(&perm[j]);
        *drawn += 1;
    };
    while drawn < swaps.min(AHEAD) {
        draw(&mut drawn, &mut ring, &perm);
    }
    for k in 0..swaps {
        let j = ring[k % AHEAD];
        if drawn < swaps {
            draw(&mut drawn, &mut ring, &perm);
        }
        perm.swap(n - 1 - k, j);
    }
    perm
}

/// A hint that `x` is read soon (x86-64 only; elsewhere nothing).
#[inline(always)]
fn prefetch<T>(x: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: prefetching has no effect on memory; the pointer comes from a reference.
    unsafe {
        std::arch::x86_64::_mm_prefetch(x as *const T as *const i8, std::arch::x86_64::_MM_HINT_T0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// One rank's batches of an epoch, produced one at a time from the permutation (nothing per
/// batch is held ahead): global batches `skip..` of `perm`, this rank's share of each
/// ([`rank_positions`]); for one rank exactly MiniMind's SkipBatchSampler.
pub struct EpochOrder {
    perm: std::sync::Arc<Vec<u32>>,
    per_rank: usize,
    world: usize,
    rank: usize,
    next: usize,
    total: usize,
}

impl EpochOrder {
    pub fn new(
        perm: std::sync::Arc<Vec<u32>>,
        per_rank: usize,
        world: usize,
        rank: usize,
        skip: usize,
    ) -> EpochOrder {
        let total = num_global_batches(perm.len(), per_rank, world);
        EpochOrder {
            perm,
            per_rank,
            world,
            rank,
            next: skip.min(total),
            total,
        }
    }

    /// Batches left.
    pub fn remaining(&self) -> usize {
        self.total - self.next
    }
}

impl Iterator for EpochOrder {
    type Item = Vec<usize>;

    fn next(&mut self) -> Option<Vec<usize>> {
        if self.next >= self.total {
            return None;
        }
        let g = self.next;
        self.next += 1;
        Some(
            rank_positions(self.perm.len(), g, self.per_rank, self.world, self.rank)
                .into_iter()
                .map(|p| self.perm[p] as usize)
                .collect(),
        )
    }
}

/// MiniMind's SkipBatchSampler over a sampler's indices: batches of `batch_size`, the first
/// `skip` dropped, a trailing partial batch kept.
#[derive(Debug, Clone)]
pub struct SkipBatchSampler<'a> {
    pub indices: &'a [usize],
    pub batch_size: usize,
    pub skip: usize,
}

impl<'a> SkipBatchSampler<'a> {
    pub fn new(indices: &'a [usize], batch_size: usize, skip: usize) -> Self {
        assert!(batch_size > 0, "batch_size must be positive");
        SkipBatchSampler {
            indices,
            batch_size,
            skip,
        }
    }

    /// `max(0, ceil(n / bs) - skip)`.
    pub fn len(&self) -> usize {
        self.indices
            .len()
            .div_ceil(self.batch_size)
            .saturating_sub(self.skip)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &'a [usize]> + 'a {
        self.indices.chunks(self.batch_size).skip(self.skip)
    }
}

/// torch's DistributedSampler (given the epoch's order): pad by wrapping to `ceil(n/W)*W`, or
/// truncate to `floor(n/W)*W` with drop_last; rank r takes positions r, r+W, r+2W, ...
pub fn distributed_indices(
    indices: &[usize],
    world: usize,
    rank: usize,
    drop_last: bool,
) -> Vec<usize> {
    assert!(world > 0 && rank < world, "rank {rank} of world {world}");
    let n = indices.len();
    let total = if drop_last {
        n / world * world
    } else {
        n.div_ceil(world) * world
    };
    if n == 0 {
        return Vec::new();
    }
    (rank..total)
        .step_by(world)
        .map(|p| indices[p % n])
        .collect()
}

/// Number of global batches in an epoch of `n` samples: ceil(n / (world * per_rank)).
pub fn num_global_batches(n: usize, per_rank: usize, world: usize) -> usize {
    let gb = per_rank * world;
    if gb == 0 {
        0
    } else {
        n.div_ceil(gb)
    }
}

/// Positions in the epoch permutation of rank `rank`'s share of global batch `g`.
/// Empty only if `g` is past the end of the epoch.
pub fn rank_positions(
    n: usize,
    g: usize,
    per_rank: usize,
    world: usize,
    rank: usize,
) -> Vec<usize> {
    assert!(
        rank < world && per_rank > 0,
        "rank {rank} of {world}, per-rank batch {per_rank}"
    );
    let gb = per_rank * world;
    let start = g * gb;
    if start >= n {
        return Vec::new();
    }
    let m = (n - start).min(gb);
    if m == gb {
        let lo = start + rank * per_rank;
        return (lo..lo + per_rank).collect();
    }
    if m < world {
        // Too few samples for every rank: ranks past the end wrap to the epoch's start.
        return vec![if rank < m {
            start + rank
        } else {
            (rank - m) % n
        }];
    }
    let chunk = |r: usize| start + r * m / world;
    (chunk(rank)..chunk(rank + 1)).collect()
}

/// Positions of global batch `g` as one process sees it (world 1, batch W*b): the concatenation
/// of every rank's positions when the batch is full.
pub fn global_positions(n: usize, g: usize, per_rank: usize, world: usize) -> Range<usize> {
    let gb = per_rank * world;
    let start = (g * gb).min(n);
    start..(start + gb).min(n)
}

/// Rank `rank`'s batches of one epoch as sample indices, skipping the first `skip` global
/// batches (resume), including the trailing partial one.
pub fn rank_batches(
    perm: &[usize],
    per_rank: usize,
    world: usize,
    rank: usize,
    skip: usize,
) -> impl Iterator<Item = Vec<usize>> + '_ {
    let total = num_global_batches(perm.len(), per_rank, world);
    (skip.min(total)..total).map(move |g| {
        rank_positions(perm.len(), g, per_rank, world, rank)
            .into_iter()
            .map(|p| perm[p])
            .collect()
    })
}

/// The world-size step rescale on resume: `step * saved_world // current_world`.
pub fn rescale_step(step: usize, saved_world: usize, current_world: usize) -> usize {
    assert!(
        saved_world > 0 && current_world > 0,
        "world sizes must be positive"
    );
    step * saved_world / current_world
}

/// Where a resumed run restarts within the epoch, and what that costs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResumePoint {
    /// First micro-step (global batch index) of the resumed run.
    pub step: usize,
    /// Samples the interrupted run had consumed in this epoch (`saved_step * saved_world * b`).
    pub consumed: usize,
    /// Samples before the resumed run's first batch (`step * current_world * b`), <= consumed.
    pub restart_at: usize,
}

impl ResumePoint {
    /// Samples trained on twice (never any skipped).
    pub fn repeated(&self) -> usize {
        self.consumed - self.restart_at
    }
    /// True when nothing is repeated: `consumed` divisible by the new global batch.
    pub fn lossless(&self) -> bool {
        self.repeated() == 0
    }
}

/// Resume point of a checkpoint taken after `saved_step` micro-steps of the epoch on
/// `saved_world` ranks, continued on `current_world` ranks, `per_rank` samples per rank per step.
pub fn resume_point(
    saved_step: usize,
    saved_world: usize,
    current_world: usize,
    per_rank: usize,
) -> ResumePoint {
    let step = rescale_step(saved_step, saved_world, current_world);
    ResumePoint {
        step,
        consumed: saved_step * saved_world * per_rank,
        restart_at: step * current_world * per_rank,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_permutation_holds_every_index_once_and_depends_on_the_epoch() {
        let mut p = epoch_permutation(100, 42, 0);
        assert_ne!(p, epoch_permutation(100, 42, 1));
        assert_eq!(p, epoch_permutation(100, 42, 0));
        p.sort();
        assert_eq!(p, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn skipped_batches_are_never_yielded() {
        let idx: Vec<usize> = (0..10).collect();
        let s = SkipBatchSampler::new(&idx, 3, 2);
        let got: Vec<Vec<usize>> = s.iter().map(|b| b.to_vec()).collect();
        assert_eq!(got, vec![vec![6, 7, 8], vec![9]]);
        assert_eq!(s.len(), 2);
        assert_eq!(SkipBatchSampler::new(&idx, 3, 9).len(), 0);
    }

    #[test]
    fn the_prefetching_u32_shuffle_swaps_as_fisher_yates_does() {
        for n in [0, 1, 2, 31, 32, 33, 64, 65, 1000, 100_003] {
            let want = epoch_permutation(n, 11, 3);
            let got: Vec<usize> = epoch_permutation_u32(n, 11, 3)
                .iter()
                .map(|&i| i as usize)
                .collect();
            assert_eq!(got, want, "n {n}");
        }
    }

    #[test]
    fn the_lazy_u32_order_is_the_sampler_order() {
        for (n, bs, world, skip) in [(0, 3, 1, 0), (10, 3, 1, 2), (37, 4, 3, 1), (5, 4, 2, 0)] {
            let perm = epoch_permutation(n, 9, 4);
            let small = epoch_permutation_u32(n, 9, 4);
            assert_eq!(small.iter().map(|&i| i as usize).collect::<Vec<_>>(), perm);
            let small = std::sync::Arc::new(small);
            for rank in 0..world {
                let want: Vec<Vec<usize>> = if world == 1 {
                    SkipBatchSampler::new(&perm, bs, skip)
                        .iter()
                        .map(<[usize]>::to_vec)
                        .collect()
                } else {
                    rank_batches(&perm, bs, world, rank, skip).collect()
                };
                let order = EpochOrder::new(small.clone(), bs, world, rank, skip);
                assert_eq!(order.remaining(), want.len());
                assert_eq!(
                    order.collect::<Vec<_>>(),
                    want,
                    "n {n} bs {bs} world {world}"
                );
            }
        }
    }

    #[test]
    fn distributed_pads_by_wrapping() {
        let idx: Vec<usize> = (0..5).collect();
        assert_eq!(distributed_indices(&idx, 2, 1, false), vec![1, 3, 0]);
        assert_eq!(distributed_indices(&idx, 2, 1, true), vec![1, 3]);
    }
}
