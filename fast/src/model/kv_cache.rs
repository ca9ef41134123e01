//! The key/value cache of incremental decoding: `MiniMindForCausalLM::forward` with a cache runs
//! only the new positions, attending to every cached one.

use tch::Tensor;

/// Keys (after RoPE) and values of every layer for the positions seen so far, `[B, KV, S, hd]`
/// each (kv heads before their repetition for the query groups).
#[derive(Default)]
pub struct KvCache {
    pub(crate) layers: Vec<(Tensor, Tensor)>,
}

impl KvCache {
    pub fn new() -> Self {
        KvCache::default()
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .map(|(k, _)| k.size()[2] as usize)
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends layer `i`'s new keys and values `[B, KV, t, hd]`; returns all of them so far.
    pub(crate) fn extend(&mut self, i: usize, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
        if i == self.layers.len() {
            self.layers.push((k.shallow_clone(), v.shallow_clone()));
            return (k, v);
        }
        let (ck, cv) = &self.layers[i];
        let k = Tensor::cat(&[ck, &k], 2);
        let v = Tensor::cat(&[cv, &v], 2);
        self.layers[i] = (k.shallow_clone(), v.shallow_clone());
        (k, v)
    }
}
