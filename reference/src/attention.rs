//! Grouped-query self-attention with RoPE and optional qk-norm, under one of three masks:
//! causal (MiniMind pretraining: no padding mask, pads attend causally), causal within the
//! segments of a packed row (documents do not see each other), or bidirectional (masked LM).

use ndarray::{s, Array1, Array2, ArrayView1, ArrayView2, Axis};

use crate::{linear, rmsnorm, rope};

/// Weights of one attention block: q/o [H*hd, C] / [C, H*hd], k/v [KV*hd, C], qk-norm [hd].
pub struct AttnWeights<'a> {
    pub q: ArrayView2<'a, f64>,
    pub k: ArrayView2<'a, f64>,
    pub v: ArrayView2<'a, f64>,
    pub o: ArrayView2<'a, f64>,
    pub q_norm: Option<ArrayView1<'a, f64>>,
    pub k_norm: Option<ArrayView1<'a, f64>>,
}

/// Which keys each query sees, and the RoPE position of every token.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AttnMask {
    /// Query i sees keys 0..=i; token t has position t.
    #[default]
    Causal,
    /// One entry per batch row: query i sees keys `start(seg(i))..=i`, where `start(seg(i))` is
    /// the last segment start <= i; positions restart at 0 at every segment start.
    Segments(Vec<RowSegments>),
    /// Every query sees every key of its row; token t has position t.
    Bidirectional,
}

/// The segments of one packed row.
///
/// `first_position` is the RoPE position given to the row's first token; later tokens of the
/// first segment count on from it, later segments restart at 0. Packed rows use 0 even when the
/// first segment continues a document from the previous row, and that is equivalent to giving it
/// the document's true offset: RoPE rotates each (x_i, x_{i+hd/2}) pair of q and k by the angle
/// `pos * f_i`, so the score `q_a . k_b` depends on the rotations only through the angle
/// difference `(pos_a - pos_b) * f_i`; shifting every position of a segment by the same offset
/// leaves every score of that segment, hence its softmax and outputs, unchanged (up to the
/// round-off of cos/sin at larger angles). Keys of other segments are masked, so no score mixes
/// two offsets. A proptest pins this (continued vs restarted positions, equal logits to 1e-10).
/// The same argument makes restarting at later segments equivalent to numbering the whole row;
/// restarting gives every document the positions it would have alone, wherever packing put it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RowSegments {
    /// Sorted, distinct positions where a segment begins; `starts[0] == 0`.
    pub starts: Vec<usize>,
    pub first_position: usize,
}

impl RowSegments {
    /// The start of the segment holding position `i`.
    pub fn segment_start(&self, i: usize) -> usize {
        self.starts[self.starts.partition_point(|&s| s <= i) - 1]
    }

    /// RoPE position of token `i`.
    pub fn position(&self, i: usize) -> usize {
        match self.segment_start(i) {
            0 => self.first_position + i,
            s => i - s,
        }
    }
}

impl AttnMask {
    /// Causal-within-segments from each row's segment starts (positions restart, offset 0).
    pub fn segments(starts: Vec<Vec<usize>>) -> AttnMask {
        AttnMask::Segments(
            starts
                .into_iter()
                .map(|starts| RowSegments {
                    starts,
                    first_position: 0,
                })
                .collect(),
        )
    }

    /// Keys `lo..hi` visible to query `i` of batch row `row` (a row of `t` tokens).
    pub fn key_range(&self, row: usize, i: usize, t: usize) -> (usize, usize) {
        match self {
            AttnMask::Causal => (0, i + 1),
            AttnMask::Segments(rows) => (rows[row].segment_start(i), i + 1),
            AttnMask::Bidirectional => (0, t),
        }
    }

    /// RoPE position of every token, row-major: [B*T].
    pub fn positions(&self, b: usize, t: usize) -> Vec<usize> {
        (0..b)
            .flat_map(|row| {
                (0..t).map(move |i| match self {
                    AttnMask::Segments(rows) => rows[row].position(i),
                    _ => i,
                })
            })
            .collect()
    }

    /// Panics unless the mask fits a batch of `b` rows of `t` tokens (a caller's bug).
    pub fn check(&self, b: usize, t: usize) {
        if let AttnMask::Segments(rows) = self {
            assert_eq!(
                rows.len(),
                b,
                "segment lists for {} rows, batch has {b}",
                rows.len()
            );
            for (r, seg) in rows.iter().enumerate() {
                let s = &seg.starts;
                assert!(
                    s.first() == Some(&0)
                        && s.windows(2).all(|w| w[0] < w[1])
                        && s.last().is_some_and(|&l| l < t.max(1)),
                    "row {r}: segment starts {s:?} must be increasing, begin at 0 and stay below {t}"
                );
            }
        }
    }
}

/// Sizes: batch, time, query heads, kv heads, head dim, rope theta, rms eps.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub b: usize,
    pub t: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub theta: f64,
    pub eps: f64,
}

/// Everything backward needs.
pub struct AttnCache {
    x: Array2<f64>,
    /// Projections before qk-norm: [N, H*hd] and [N, KV*hd].
    q_raw: Array2<f64>,
    k_raw: Array2<f64>,
    /// qk-norm rstd per (token, head): [N*H] and [N*KV].
    q_rstd: Option<Array1<f64>>,
    k_rstd: Option<Array1<f64>>,
    /// After qk-norm and RoPE.
    q: Array2<f64>,
    k: Array2<f64>,
    v: Array2<f64>,
    /// Softmax probabilities per (b, h), index b*H + h: [T, T], zero where the mask hides a key.
    probs: Vec<Array2<f64>>,
    /// Concatenated head outputs before o_proj: [N, H*hd].
    y: Array2<f64>,
    /// RoPE tables at every token's position: [B*T, hd].
    cos: Array2<f64>,
    sin: Array2<f64>,
}

/// Gradients of one attention block.
pub struct AttnGrads {
    pub q: Array2<f64>,
    pub k: Array2<f64>,
    pub v: Array2<f64>,
    pub o: Array2<f64>,
    pub q_norm: Option<Array1<f64>>,
    pub k_norm: Option<Array1<f64>>,
}

/// RMSNorm over each head's `hd` slice. x: [N, nh*hd] -> same, rstd [N*nh].
fn head_norm(
    x: &Array2<f64>,
    nh: usize,
    w: ArrayView1<f64>,
    eps: f64,
) -> (Array2<f64>, Array1<f64>) {
    let (n, width) = x.dim();
    let rows = x.to_shape((n * nh, width / nh)).expect("contiguous");
    let (y, rstd) = rmsnorm::forward(rows.view(), w, eps);
    (
        y.into_shape_with_order((n, width)).expect("contiguous"),
        rstd,
    )
}

/// Backward of [`head_norm`]: (dx [N, nh*hd], dw [hd]).
fn head_norm_backward(
    dy: &Array2<f64>,
    x: &Array2<f64>,
    nh: usize,
    w: ArrayView1<f64>,
    rstd: &Array1<f64>,
) -> (Array2<f64>, Array1<f64>) {
    let (n, width) = x.dim();
    let shape = (n * nh, width / nh);
    let dy2 = dy.to_shape(shape).expect("contiguous");
    let x2 = x.to_shape(shape).expect("contiguous");
    let (dx, dw) = rmsnorm::backward(dy2.view(), x2.view(), w, rstd.view());
    (
        dx.into_shape_with_order((n, width)).expect("contiguous"),
        dw,
    )
}

/// x: [B*T, C] -> [B*T, C]. Query head h uses kv head h / n_rep; position t attends to 0..=t.
pub fn forward(x: ArrayView2<f64>, w: &AttnWeights, sh: AttnShape) -> (Array2<f64>, AttnCache) {
    forward_masked(x, w, sh, &AttnMask::Causal)
}

/// x: [B*T, C] -> [B*T, C] under `mask` (keys it hides get probability 0, positions from it).
/// Caches x, the projections before and after qk-norm / RoPE, the probabilities, the head
/// outputs and the RoPE tables; [`backward`] needs nothing else, whatever the mask.
pub fn forward_masked(
    x: ArrayView2<f64>,
    w: &AttnWeights,
    sh: AttnShape,
    mask: &AttnMask,
) -> (Array2<f64>, AttnCache) {
    let AttnShape {
        b,
        t,
        heads,
        kv_heads,
        head_dim: hd,
        ..
    } = sh;
    mask.check(b, t);
    let n_rep = heads / kv_heads;
    let q_raw = linear::forward(x, w.q);
    let k_raw = linear::forward(x, w.k);
    let v = linear::forward(x, w.v);
    let (mut q, q_rstd) = match w.q_norm {
        Some(qw) => {
            let (y, r) = head_norm(&q_raw, heads, qw, sh.eps);
            (y, Some(r))
        }
        None => (q_raw.clone(), None),
    };
    let (mut k, k_rstd) = match w.k_norm {
        Some(kw) => {
            let (y, r) = head_norm(&k_raw, kv_heads, kw, sh.eps);
            (y, Some(r))
        }
        None => (k_raw.clone(), None),
    };
    let (cos, sin) = rope::tables_at(&mask.positions(b, t), hd, sh.theta);
    for bi in 0..b {
        let rows = bi * t..(bi + 1) * t;
        let (c, sn) = (
            cos.slice(s![rows.clone(), ..]),
            sin.slice(s![rows.clone(), ..]),
        );
        for h in 0..heads {
            let mut blk = q.slice_mut(s![rows.clone(), h * hd..(h + 1) * hd]);
            let r = rope::forward(blk.view(), c, sn);
            blk.assign(&r);
        }
        for h in 0..kv_heads {
            let mut blk = k.slice_mut(s![rows.clone(), h * hd..(h + 1) * hd]);
            let r = rope::forward(blk.view(), c, sn);
            blk.assign(&r);
        }
    }
    let scale = 1.0 / (hd as f64).sqrt();
    let mut y = Array2::zeros((b * t, heads * hd));
    let mut probs = Vec::with_capacity(b * heads);
    for bi in 0..b {
        let rows = bi * t..(bi + 1) * t;
        for h in 0..heads {
            let kvh = h / n_rep;
            let qh = q.slice(s![rows.clone(), h * hd..(h + 1) * hd]);
            let kh = k.slice(s![rows.clone(), kvh * hd..(kvh + 1) * hd]);
            let vh = v.slice(s![rows.clone(), kvh * hd..(kvh + 1) * hd]);
            let mut p = qh.dot(&kh.t()) * scale;
            for i in 0..t {
                let (lo, hi) = mask.key_range(bi, i, t);
                let mut row = p.row_mut(i);
                let m = row
                    .slice(s![lo..hi])
                    .fold(f64::NEG_INFINITY, |a, &v| a.max(v));
                let mut sum = 0.0;
                for j in 0..t {
                    row[j] = if (lo..hi).contains(&j) {
                        (row[j] - m).exp()
                    } else {
                        0.0
                    };
                    sum += row[j];
                }
                row /= sum;
            }
            y.slice_mut(s![rows.clone(), h * hd..(h + 1) * hd])
                .assign(&p.dot(&vh));
            probs.push(p);
        }
    }
    let out = linear::forward(y.view(), w.o);
    let cache = AttnCache {
        x: x.to_owned(),
        q_raw,
        k_raw,
        q_rstd,
        k_rstd,
        q,
        k,
        v,
        probs,
        y,
        cos,
        sin,
    };
    (out, cache)
}

/// dout: [B*T, C] -> (dx [B*T, C], weight grads), for the mask the forward ran under (hidden
/// keys have probability 0 in the cache, so they get no gradient).
pub fn backward(
    dout: ArrayView2<f64>,
    w: &AttnWeights,
    c: &AttnCache,
    sh: AttnShape,
) -> (Array2<f64>, AttnGrads) {
    let AttnShape {
        b,
        t,
        heads,
        kv_heads,
        head_dim: hd,
        ..
    } = sh;
    let n_rep = heads / kv_heads;
    let scale = 1.0 / (hd as f64).sqrt();
    let (dy, do_w) = linear::backward(dout, c.y.view(), w.o);
    let mut dq = Array2::zeros(c.q.raw_dim());
    let mut dk = Array2::zeros(c.k.raw_dim());
    let mut dv = Array2::zeros(c.v.raw_dim());
    for bi in 0..b {
        let rows = bi * t..(bi + 1) * t;
        for h in 0..heads {
            let kvh = h / n_rep;
            let kv_cols = kvh * hd..(kvh + 1) * hd;
            let p = &c.probs[bi * heads + h];
            let dyh = dy.slice(s![rows.clone(), h * hd..(h + 1) * hd]);
            let qh = c.q.slice(s![rows.clone(), h * hd..(h + 1) * hd]);
            let kh = c.k.slice(s![rows.clone(), kv_cols.clone()]);
            let vh = c.v.slice(s![rows.clone(), kv_cols.clone()]);
            let dp = dyh.dot(&vh.t());
            let mut dvh = dv.slice_mut(s![rows.clone(), kv_cols.clone()]);
            dvh += &p.t().dot(&dyh);
            // softmax backward; masked entries have p = 0 and get no gradient
            let rowdot = (&dp * p).sum_axis(Axis(1)).insert_axis(Axis(1));
            let ds = p * &(&dp - &rowdot) * scale;
            let mut dqh = dq.slice_mut(s![rows.clone(), h * hd..(h + 1) * hd]);
            dqh += &ds.dot(&kh);
            let mut dkh = dk.slice_mut(s![rows.clone(), kv_cols]);
            dkh += &ds.t().dot(&qh);
        }
    }
    for bi in 0..b {
        let rows = bi * t..(bi + 1) * t;
        let (cos, sin) = (
            c.cos.slice(s![rows.clone(), ..]),
            c.sin.slice(s![rows.clone(), ..]),
        );
        for (d, nh) in [(&mut dq, heads), (&mut dk, kv_heads)] {
            for h in 0..nh {
                let mut blk = d.slice_mut(s![rows.clone(), h * hd..(h + 1) * hd]);
                let r = rope::backward(blk.view(), cos, sin);
                blk.assign(&r);
            }
        }
    }
    let (dq, dq_norm) = match (w.q_norm, &c.q_rstd) {
        (Some(qw), Some(r)) => {
            let (dx, dw) = head_norm_backward(&dq, &c.q_raw, heads, qw, r);
            (dx, Some(dw))
        }
        _ => (dq, None),
    };
    let (dk, dk_norm) = match (w.k_norm, &c.k_rstd) {
        (Some(kw), Some(r)) => {
            let (dx, dw) = head_norm_backward(&dk, &c.k_raw, kv_heads, kw, r);
            (dx, Some(dw))
        }
        _ => (dk, None),
    };
    let (dx_q, dq_w) = linear::backward(dq.view(), c.x.view(), w.q);
    let (dx_k, dk_w) = linear::backward(dk.view(), c.x.view(), w.k);
    let (dx_v, dv_w) = linear::backward(dv.view(), c.x.view(), w.v);
    let grads = AttnGrads {
        q: dq_w,
        k: dk_w,
        v: dv_w,
        o: do_w,
        q_norm: dq_norm,
        k_norm: dk_norm,
    };
    (dx_q + dx_k + dx_v, grads)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(r: usize, c: usize, k: f64) -> Array2<f64> {
        Array2::from_shape_fn((r, c), |(i, j)| ((i * c + j) as f64 * k).sin() * 0.5)
    }

    #[test]
    fn one_segment_per_row_is_exactly_the_causal_mask() {
        let sh = AttnShape {
            b: 2,
            t: 5,
            heads: 2,
            kv_heads: 1,
            head_dim: 6,
            theta: 1e6,
            eps: 1e-6,
        };
        let (x, q, k, v, o) = (
            det(10, 4, 0.7),
            det(12, 4, 1.1),
            det(6, 4, 1.3),
            det(6, 4, 1.7),
            det(4, 12, 1.9),
        );
        let qn = Array1::from_elem(6, 1.1);
        let w = AttnWeights {
            q: q.view(),
            k: k.view(),
            v: v.view(),
            o: o.view(),
            q_norm: Some(qn.view()),
            k_norm: Some(qn.view()),
        };
        let causal = forward(x.view(), &w, sh).0;
        let one = forward_masked(x.view(), &w, sh, &AttnMask::segments(vec![vec![0]; 2])).0;
        assert_eq!(causal, one);
        let bidi = forward_masked(x.view(), &w, sh, &AttnMask::Bidirectional).0;
        // the last query sees every key either way
        for bi in 0..2 {
            assert_eq!(bidi.row(bi * 5 + 4), causal.row(bi * 5 + 4));
        }
        assert_ne!(bidi.row(0), causal.row(0));
    }

    #[test]
    fn positions_restart_at_segment_starts_and_the_first_segment_may_be_offset() {
        let seg = RowSegments {
            starts: vec![0, 3, 5],
            first_position: 10,
        };
        let p: Vec<usize> = (0..7).map(|i| seg.position(i)).collect();
        assert_eq!(p, vec![10, 11, 12, 0, 1, 0, 1]);
        let mask = AttnMask::Segments(vec![seg]);
        assert_eq!(mask.key_range(0, 4, 7), (3, 5));
        assert_eq!(mask.positions(1, 7), p);
    }
}
