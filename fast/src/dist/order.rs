//! The data order, defined globally so that it does not depend on the number of GPUs.
//!
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
