//! Data order: a seeded epoch permutation, SkipBatchSampler, DistributedSampler, resume
//! rescaling, and a global-batch order that survives a change of world size.

/// SplitMix64 (Steele, Lea, Flood 2014): `state += 0x9E3779B97F4A7C15`, then the output is
/// `z = state; z = (z ^ z>>30) * 0xBF58476D1CE4E5B9; z = (z ^ z>>27) * 0x94D049BB133111EB;
/// z ^ z>>31`, all arithmetic wrapping mod 2^64.
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
}

/// The SplitMix64 output function on its own.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The order of `0..n` for `(seed, epoch)`, identical on every machine and path:
/// a SplitMix64 generator starts at state `seed ^ mix64(epoch)`; starting from the identity,
/// for i = n-1 down to 1: `j = next_u64() % (i + 1)`, swap elements i and j (Fisher–Yates).
/// (The modulo bias is below n / 2^64 and accepted for simplicity.)
pub fn epoch_permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng = SplitMix64::new(seed ^ mix64(epoch));
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
    perm
}

/// MiniMind's SkipBatchSampler: batches of `bs` consecutive indices, the first `skip` dropped,
/// a trailing partial batch kept.
pub fn skip_batches(indices: &[usize], bs: usize, skip: usize) -> Vec<Vec<usize>> {
    indices.chunks(bs).skip(skip).map(|c| c.to_vec()).collect()
}

/// `max(0, ceil(n / bs) - skip)`.
pub fn skip_batch_len(n: usize, bs: usize, skip: usize) -> usize {
    n.div_ceil(bs).saturating_sub(skip)
}

/// torch DistributedSampler: pad `indices` by wrapping to `ceil(n/W)*W` (or truncate to
/// `floor(n/W)*W` with drop_last); rank r takes positions r, r+W, r+2W, ...
pub fn distributed_indices(
    indices: &[usize],
    world: usize,
    rank: usize,
    drop_last: bool,
) -> Vec<usize> {
    let n = indices.len();
    let total = if drop_last {
        n / world * world
    } else {
        n.div_ceil(world) * world
    };
    let padded: Vec<usize> = if total <= n || n == 0 {
        indices[..total.min(n)].to_vec()
    } else {
        indices.iter().copied().cycle().take(total).collect()
    };
    padded.into_iter().skip(rank).step_by(world).collect()
}

/// Resume on another world size: `step * saved_ws / current_ws` (integer division).
pub fn rescale_step(step: u64, saved_ws: u64, current_ws: u64) -> u64 {
    step * saved_ws / current_ws
}

/// Global data order: global batch g is the contiguous slice
/// `perm[g*bs*W .. (g+1)*bs*W]` (clipped to n) of the epoch permutation; rank r takes its
/// r-th contiguous piece of `bs` samples (possibly short or empty at the end).
/// Resuming after `g` global batches on W' ranks continues at global batch `g*W/W'` whenever
/// `g*W` is a multiple of `W'`, so no sample is repeated or skipped.
pub fn global_batch(perm: &[usize], g: usize, bs: usize, world: usize, rank: usize) -> Vec<usize> {
    let n = perm.len();
    let start = (g * bs * world + rank * bs).min(n);
    let end = (start + bs).min(n).min((g + 1) * bs * world);
    perm[start..end.max(start)].to_vec()
}

/// Number of global batches in an epoch of n samples: `ceil(n / (bs * W))`.
pub fn global_batches(n: usize, bs: usize, world: usize) -> usize {
    n.div_ceil(bs * world)
}
