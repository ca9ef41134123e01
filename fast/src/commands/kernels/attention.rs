//! Our attention (`qkv_attention`, fast/csrc/attention.cu) against libtorch's qk-norm, RoPE,
//! repeat_kv and SDPA at every head dim and mask (see [`check_attention`]).

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use super::{compare_op, grads, time_ms, KernelsArgs, EPS, SEQ};
use crate::kernels::fused;
use crate::model::{repeat_kv, rope};

/// The masks of the attention check (what [`fused::AttnMask`] chooses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mask {
    Causal,
    Segments,
    Bidirectional,
}

/// One case of [`check_attention`].
#[derive(Clone, Copy, Debug)]
struct AttnCase {
    hd: i64,
    b: i64,
    t: i64,
    heads: i64,
    kv_heads: i64,
    mask: Mask,
    qk_norm: bool,
    /// Also time ours against the reference (the main shapes).
    timed: bool,
}

impl AttnCase {
    /// `a{hd}{c|s|b}{n}_{T}` (causal / segments / bidirectional, n with qk-norm); the three
    /// cases of the check before head dims, masks and qk-norm keep their names.
    fn name(&self) -> String {
        if self.hd == 64 && self.mask == Mask::Causal && !self.qk_norm {
            match self.t {
                SEQ => return "attention".into(),
                129 | 64 => return format!("attn_t{}", self.t),
                _ => {}
            }
        }
        let m = match self.mask {
            Mask::Causal => 'c',
            Mask::Segments => 's',
            Mask::Bidirectional => 'b',
        };
        let n = if self.qk_norm { "n" } else { "" };
        format!("a{}{m}{n}_{}", self.hd, self.t)
    }
}

/// seg_start `[B, T]` (int32, on the CPU) of packed rows: row 0 one document (the causal mask);
/// row 1 a document continued from the previous row (seg_start 0 for its first 5 tokens), then
/// single-token documents up to token 40, then documents from the cycle below; every other row
/// documents of the cycle's lengths, starting at a different point of it (its first document
/// continued from the previous row). The cycle has single tokens and boundaries on and beside
/// the 64-row tile edges.
fn segment_starts(b: i64, t: i64) -> Tensor {
    const LENS: [i64; 12] = [37, 1, 64, 1, 1, 130, 63, 2, 65, 17, 1, 200];
    let mut v = Vec::with_capacity((b * t) as usize);
    for row in 0..b {
        let mut k = row as usize;
        let (mut start, mut next) = match row {
            0 => (0, t),
            1 => (0, 5),
            _ => (0, LENS[k % LENS.len()]),
        };
        for tok in 0..t {
            if tok == next {
                start = tok;
                k += 1;
                next = tok
                    + if row == 1 && tok < 40 {
                        1
                    } else {
                        LENS[k % LENS.len()]
                    };
            }
            v.push(start as i32);
        }
    }
    Tensor::from_slice(&v).view([b, t])
}

/// Our attention over the merged projection (`qkv_attention`) against libtorch's ops under
/// autograd: the split views, `rms_norm` over head_dim with the two weights (qk-norm, in fp32),
/// RoPE from the tables gathered by position (t, or t - seg_start[t] with segments), repeat_kv
/// and SDPA (`is_causal` for causal, an explicit boolean mask `seg_start[i] <= j <= i` for
/// segments, no mask for bidirectional). The output and the gradients of qkv and of both norm
/// weights (fp32) are held to the bf16 tolerance, 1e-2 norm-wise relative error. Head dims 64,
/// 80, 96 and 128, each at the b128 shape (T 340: five full tiles and one of 20 rows; 8 heads
/// over 2 kv heads at 64 and 80 (MiniMind2 at hidden 512 and 640), over 4 at 96 and 128,
/// MiniMind-3's grouping) causal without and with
/// qk-norm, segments and bidirectional with qk-norm, all timed; then at the edge shapes (T 129
/// with 3 query heads per kv head, T 64 exactly one tile) every mask without and with qk-norm.
/// Extra timings at b128: the causal cases without qk-norm against the path the model takes
/// otherwise (`qkv_heads` then cuDNN's SDPA), segments against our causal (packed rows should
/// cost less); and one repeat of a qk-norm case's backward must give the same bits.
pub(super) fn check_attention(args: &KernelsArgs, device: Device) -> Result<bool> {
    let b128 = (args.rows / SEQ).max(1);
    let mut cases = Vec::new();
    for hd in [64i64, 80, 96, 128] {
        let kv = if hd <= 80 { 2 } else { 4 };
        for (mask, qk_norm) in [
            (Mask::Causal, false),
            (Mask::Causal, true),
            (Mask::Segments, true),
            (Mask::Bidirectional, true),
        ] {
            cases.push(AttnCase {
                hd,
                b: b128,
                t: SEQ,
                heads: 8,
                kv_heads: kv,
                mask,
                qk_norm,
                timed: true,
            });
        }
    }
    for hd in [64i64, 80, 96, 128] {
        for (b, t, heads, kv_heads) in [(3, 129, 6, 2), (2, 64, 4, 4)] {
            for mask in [Mask::Causal, Mask::Segments, Mask::Bidirectional] {
                for qk_norm in [false, true] {
                    cases.push(AttnCase {
                        hd,
                        b,
                        t,
                        heads,
                        kv_heads,
                        mask,
                        qk_norm,
                        timed: false,
                    });
                }
            }
        }
    }
    println!(
        "attention cases: a{{head dim}}{{c causal | s segments | b bidirectional}}{{n: qk-norm}}_{{T}}; tolerance 1e-2 for every output and gradient"
    );
    let mut ok = true;
    // Our b128 causal time with qk-norm per head dim, for the segments line.
    let mut causal_ms = std::collections::HashMap::new();
    for case in cases {
        ok &= check_attention_case(args, device, &case, &mut causal_ms)?;
    }
    Ok(ok)
}

fn check_attention_case(
    args: &KernelsArgs,
    device: Device,
    case: &AttnCase,
    causal_ms: &mut std::collections::HashMap<i64, f64>,
) -> Result<bool> {
    let AttnCase {
        hd,
        b,
        t,
        heads: h,
        kv_heads: kv,
        mask,
        qk_norm,
        timed,
    } = *case;
    let name = case.name();
    let name = name.as_str();
    let (cos, sin) = rope::table(1e6, hd, t);
    let (cos, sin) = (cos.to_device(device), sin.to_device(device));
    let seg = (mask == Mask::Segments).then(|| segment_starts(b, t).to_device(device));
    let qkv =
        Tensor::randn([b, t, (h + 2 * kv) * hd], (Kind::BFloat16, device)).set_requires_grad(true);
    let mut leaves = vec![qkv];
    if qk_norm {
        for _ in 0..2 {
            let w = Tensor::randn([hd], (Kind::Float, device)) * 0.1 + 1.0;
            leaves.push(w.set_requires_grad(true));
        }
    }
    let ours = |l: &[Tensor]| -> Result<Tensor> {
        let norm = qk_norm.then(|| fused::QkNorm {
            q: &l[1],
            k: &l[2],
            eps: EPS,
        });
        let m = match (mask, &seg) {
            (Mask::Segments, Some(sg)) => fused::AttnMask::Segments(sg),
            (Mask::Bidirectional, _) => fused::AttnMask::Bidirectional,
            _ => fused::AttnMask::Causal,
        };
        fused::qkv_attention(&l[0], &cos, &sin, h, kv, norm, m)
    };
    // The RoPE tables at each token's position, broadcast over heads: [T, 1, hd], or
    // [B, T, 1, hd] gathered at t - seg_start[t].
    let (c_pos, s_pos) = match &seg {
        None => (cos.unsqueeze(1), sin.unsqueeze(1)),
        Some(sg) => {
            let pos = (Tensor::arange(t, (Kind::Int64, device)).unsqueeze(0)
                - sg.to_kind(Kind::Int64))
            .flatten(0, 1);
            (
                cos.index_select(0, &pos).view([b, t, 1, hd]),
                sin.index_select(0, &pos).view([b, t, 1, hd]),
            )
        }
    };
    // Key j visible to query i: seg_start[i] <= j <= i, as [B, 1, T, T].
    let seg_mask = seg.as_ref().map(|sg| {
        let i = Tensor::arange(t, (Kind::Int64, device)).view([1, t, 1]);
        let j = Tensor::arange(t, (Kind::Int64, device)).view([1, 1, t]);
        let lo = sg.to_kind(Kind::Int64).unsqueeze(2);
        j.le_tensor(&i).logical_and(&j.ge_tensor(&lo)).unsqueeze(1)
    });
    let sdpa = |q: &Tensor, k: &Tensor, v: &Tensor| {
        let o = match mask {
            Mask::Causal => Tensor::scaled_dot_product_attention::<Tensor>(
                q, k, v, None, 0.0, true, None, false,
            ),
            Mask::Segments => Tensor::scaled_dot_product_attention(
                q,
                k,
                v,
                seg_mask.as_ref(),
                0.0,
                false,
                None,
                false,
            ),
            Mask::Bidirectional => Tensor::scaled_dot_product_attention::<Tensor>(
                q, k, v, None, 0.0, false, None, false,
            ),
        };
        o.transpose(1, 2).reshape([b, t, h * hd])
    };
    let reference = |l: &[Tensor]| -> Vec<Tensor> {
        let bf = Kind::BFloat16;
        let p = l[0].split_with_sizes([h * hd, kv * hd, kv * hd], -1);
        let (mut q, mut k, v) = (
            p[0].view([b, t, h, hd]),
            p[1].view([b, t, kv, hd]),
            p[2].view([b, t, kv, hd]),
        );
        if qk_norm {
            q = q.to_kind(Kind::Float).rms_norm([hd], Some(&l[1]), EPS);
            k = k.to_kind(Kind::Float).rms_norm([hd], Some(&l[2]), EPS);
        }
        // In fp32 (bf16 x fp32 tables promotes), one rounding to bf16.
        let rot = |x: &Tensor| (x * &c_pos + rope::rotate_half(x) * &s_pos).to_kind(bf);
        let q = rot(&q).transpose(1, 2);
        let k = rot(&k).transpose(1, 2);
        let v = v.transpose(1, 2);
        let n_rep = h / kv;
        let (k, v) = (repeat_kv(k, n_rep), repeat_kv(v, n_rep));
        vec![sdpa(&q, &k, &v)]
    };
    let leaf_names: &[&str] = if qk_norm {
        &["qkv", "q_norm", "k_norm"]
    } else {
        &["qkv"]
    };
    let (mut ok, gs) = compare_op(
        name,
        &["o"],
        leaf_names,
        &leaves,
        &|l| Ok(vec![ours(l)?]),
        &reference,
        Some(1e-2),
    )?;
    if !timed {
        return Ok(ok);
    }
    if qk_norm {
        // The weights' gradients are reduced in a fixed order, dqkv has one writer per element.
        let run = || -> Result<Vec<Tensor>> { Ok(grads(&[ours(&leaves)?], &gs, &leaves)) };
        let (first, second) = (run()?, run()?);
        let same = first.iter().zip(&second).all(|(x, y)| x.equal(y));
        println!(
            "{name:<10} repeat   gradients of {} bit-identical over two runs: {same}  {}",
            leaf_names.join(", "),
            if same { "ok" } else { "FAIL" }
        );
        ok &= same;
    }
    let tf = time_ms(device, args.warmup, args.iters, || {
        grads(&[ours(&leaves)?], &gs, &leaves);
        Ok(())
    })?;
    let tr = time_ms(device, args.warmup, args.iters, || {
        grads(&reference(&leaves), &gs, &leaves);
        Ok(())
    })?;
    println!(
        "{name:<10} fwd+bwd  fused {tf:.3} ms  unfused {tr:.3} ms  speedup {:.2}x",
        tr / tf
    );
    match (mask, qk_norm) {
        (Mask::Causal, false) => {
            let qkv = &leaves[0];
            let before = time_ms(device, args.warmup, args.iters, || {
                let (q, k, v) = fused::qkv_heads(qkv, &cos, &sin, h, kv)?;
                let o = sdpa(&q.transpose(1, 2), &k.transpose(1, 2), &v.transpose(1, 2));
                grads(&[o], &gs, std::slice::from_ref(qkv));
                Ok(())
            })?;
            println!(
                "{name:<10} fwd+bwd  ours {tf:.3} ms  qkv_heads + cuDNN SDPA {before:.3} ms  speedup {:.2}x",
                before / tf
            );
        }
        (Mask::Causal, true) => {
            causal_ms.insert(hd, tf);
        }
        (Mask::Segments, true) => {
            if let Some(c) = causal_ms.get(&hd) {
                println!(
                    "{name:<10} fwd+bwd  ours segments {tf:.3} ms  ours causal {c:.3} ms  {:.2}x of causal",
                    tf / c
                );
            }
        }
        _ => {}
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check's packed rows keep seg_start's contract and hold the cases it is meant to
    /// reach: one document, a continued prefix, single-token documents, boundaries at tile edges.
    #[test]
    fn segment_starts_are_valid_packed_rows() {
        let (b, t) = (5, SEQ);
        let s = Vec::<i32>::try_from(segment_starts(b, t).flatten(0, 1)).unwrap();
        let (mut singles, mut edges) = (0, 0);
        for row in s.chunks(t as usize) {
            assert_eq!(row[0], 0);
            for (i, &v) in row.iter().enumerate() {
                assert!(v >= 0 && v as usize <= i, "seg_start {v} at {i}");
                if i > 0 {
                    // A segment either continues or starts here.
                    assert!(v == row[i - 1] || v as usize == i, "seg_start {v} at {i}");
                }
                let starts_next = i + 1 == row.len() || row[i + 1] as usize == i + 1;
                if v as usize == i && starts_next {
                    singles += 1;
                }
                if v as usize == i && [63, 64, 65, 128, 192].contains(&i) {
                    edges += 1;
                }
            }
        }
        assert!(
            s[..t as usize].iter().all(|&v| v == 0),
            "row 0 is one document"
        );
        assert_eq!(&s[t as usize..t as usize + 6], &[0, 0, 0, 0, 0, 5]);
        assert!(
            singles > 30 && edges > 0,
            "{singles} single tokens, {edges} tile edges"
        );
    }
}
