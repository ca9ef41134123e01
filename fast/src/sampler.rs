//! Data order: the seeded epoch permutation, SkipBatchSampler, DistributedSampler and the
//! world-size step rescale. The permutation's definition is shared with the reference oracle
//! (reference/src/sampler.rs), written independently: both must give identical orders.

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

/// Resume on another world size: `step * saved_ws // current_ws`.
pub fn rescale_step(step: u64, saved_ws: u64, current_ws: u64) -> u64 {
    assert!(current_ws > 0, "current world size must be positive");
    step * saved_ws / current_ws
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
    fn distributed_pads_by_wrapping() {
        let idx: Vec<usize> = (0..5).collect();
        assert_eq!(distributed_indices(&idx, 2, 1, false), vec![1, 3, 0]);
        assert_eq!(distributed_indices(&idx, 2, 1, true), vec![1, 3]);
    }
}
