//! Each fused op against the libtorch ops it replaces (see the command's doc).

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use super::{
    check_op, compare_op, diff, grads, report, report_loss, scalar, time_ms, KernelsArgs, EPS, SEQ,
};
use crate::kernels::{fused, Kernels};
use crate::model::{repeat_kv, rope};

pub(super) fn check_rms_norm(args: &KernelsArgs, device: Device) -> Result<bool> {
    let d = 512;
    let x = Tensor::randn([args.rows, d], (Kind::Float, device)).set_requires_grad(true);
    let w = (Tensor::randn([d], (Kind::Float, device)) * 0.1 + 1.0).set_requires_grad(true);
    check_op(
        args,
        device,
        "rms_norm",
        &["y"],
        &["x", "w"],
        &[x, w],
        &|l| Ok(vec![fused::rms_norm_bf16(&l[0], &l[1], EPS)?]),
        &|l| {
            vec![
                crate::model::rms_norm(&l[0], &l[1], EPS, &Kernels::default())
                    .to_kind(Kind::BFloat16),
            ]
        },
    )
}

/// The residual add fused into the norm: outputs h (fp32) and y (bf16), gradients for x (fp32),
/// the branch output a (bf16) and w; the reference is `h = x + a` then the unfused norm.
pub(super) fn check_add_rms_norm(args: &KernelsArgs, device: Device) -> Result<bool> {
    let d = 512;
    let x = Tensor::randn([args.rows, d], (Kind::Float, device)).set_requires_grad(true);
    let a = Tensor::randn([args.rows, d], (Kind::BFloat16, device)).set_requires_grad(true);
    let w = (Tensor::randn([d], (Kind::Float, device)) * 0.1 + 1.0).set_requires_grad(true);
    check_op(
        args,
        device,
        "add_norm",
        &["h", "y"],
        &["x", "a", "w"],
        &[x, a, w],
        &|l| {
            let (h, y) = fused::add_rms_norm_bf16(&l[0], &l[1], &l[2], EPS)?;
            Ok(vec![h, y])
        },
        &|l| {
            let h = &l[0] + &l[1];
            let y =
                crate::model::rms_norm(&h, &l[2], EPS, &Kernels::default()).to_kind(Kind::BFloat16);
            vec![h, y]
        },
    )
}

/// A MoE layer's entry (`moe_norm_router`): the residual add and norm of [`check_add_rms_norm`]
/// whose fp32 norm also gives the router's logits (4 experts) and, with shared experts, a second
/// bf16 copy; outputs h, y (y2), logits, gradients for x, a, w and the router weight wg. The
/// reference is `h = x + a`, the unfused fp32 norm n, `bf16(n)` once per consumer (each cast's
/// gradient upcast and summed in fp32 by autograd) and `n wg^T` in fp32. At MiniMind2-MoE's
/// width (640, 4 experts, one shared expert), MiniMind-3's (768, 4, none), and the 26M config's
/// (512, the kernels' narrow variant) with the most experts the kernel takes (16) and `--rows`
/// + 5 rows (the router gradient's last part partly filled).
pub(super) fn check_moe_norm_router(args: &KernelsArgs, device: Device) -> Result<bool> {
    let mut ok = true;
    for (case, d, e, copies, rows) in [
        ("moe_norm2", 640, 4, 2, args.rows),
        ("moe_norm", 768, 4, 1, args.rows),
        ("moe_norm16", 512, 16, 2, args.rows + 5),
    ] {
        let x = Tensor::randn([rows, d], (Kind::Float, device)).set_requires_grad(true);
        let a = Tensor::randn([rows, d], (Kind::BFloat16, device)).set_requires_grad(true);
        let w = (Tensor::randn([d], (Kind::Float, device)) * 0.1 + 1.0).set_requires_grad(true);
        let wg = (Tensor::randn([e, d], (Kind::Float, device)) * 0.02).set_requires_grad(true);
        let outs: &[&str] = if copies == 2 {
            &["h", "y", "y2", "logits"]
        } else {
            &["h", "y", "logits"]
        };
        ok &= check_op(
            args,
            device,
            case,
            outs,
            &["x", "a", "w", "wg"],
            &[x, a, w, wg],
            &|l| {
                let o = fused::moe_norm_router(&l[0], &l[1], &l[2], &l[3], EPS, copies)?;
                Ok([Some(o.h), Some(o.y), o.y2, Some(o.logits)]
                    .into_iter()
                    .flatten()
                    .collect())
            },
            &|l| {
                let h = &l[0] + &l[1];
                let n = crate::model::rms_norm(&h, &l[2], EPS, &Kernels::default());
                let logits = n.matmul(&l[3].tr());
                let mut v = vec![h, n.to_kind(Kind::BFloat16)];
                if copies == 2 {
                    v.push(n.to_kind(Kind::BFloat16));
                }
                v.push(logits);
                v
            },
        )?;
    }
    Ok(ok)
}

/// A MoE layer's weighted combine (`moe_combine`) at MiniMind2-MoE's shape (top-2 of the
/// `--rows` tokens, width 640), and at top-1 and top-4 of half as many: output and the gradients
/// of the experts' outputs ys and the weights w, against the gather, an fp32 multiply and sum,
/// and one rounding, under autograd.
pub(super) fn check_moe_combine(args: &KernelsArgs, device: Device) -> Result<bool> {
    let mut ok = true;
    for (case, n, k) in [
        ("combine", args.rows, 2),
        ("combine1", args.rows / 2, 1),
        ("combine4", args.rows / 2, 4),
    ] {
        ok &= check_combine_case(args, device, case, n, k)?;
    }
    Ok(ok)
}

fn check_combine_case(
    args: &KernelsArgs,
    device: Device,
    case: &str,
    n: i64,
    k: i64,
) -> Result<bool> {
    let d = 640;
    let ys = Tensor::randn([n * k, d], (Kind::BFloat16, device)).set_requires_grad(true);
    let w = Tensor::rand([n, k], (Kind::Float, device)).set_requires_grad(true);
    let slot = Tensor::randperm(n * k, (Kind::Int64, device));
    check_op(
        args,
        device,
        case,
        &["y"],
        &["ys", "w"],
        &[ys, w],
        &|l| Ok(vec![fused::moe_combine(&l[0], &slot, &l[1])?]),
        &|l| {
            let rows = l[0]
                .index_select(0, &slot)
                .view([n, k, d])
                .to_kind(Kind::Float);
            vec![(rows * l[1].unsqueeze(-1))
                .sum_dim_intlist(1, false, Kind::Float)
                .to_kind(Kind::BFloat16)]
        },
    )
}

pub(super) fn check_rope(args: &KernelsArgs, device: Device) -> Result<bool> {
    let (b, t, h, kv, hd) = ((args.rows / SEQ).max(1), SEQ, 8i64, 2i64, 64i64);
    let n_rep = h / kv;
    let (cos, sin) = rope::table(1e6, hd, t);
    let (cos, sin) = (cos.to_device(device), sin.to_device(device));
    // q, k, v as the model makes them: views of one merged projection output.
    let qkv =
        Tensor::randn([b, t, (h + 2 * kv) * hd], (Kind::BFloat16, device)).set_requires_grad(true);
    let split = |l: &[Tensor]| {
        let p = l[0].split_with_sizes([h * hd, kv * hd, kv * hd], -1);
        (
            p[0].view([b, t, h, hd]),
            p[1].view([b, t, kv, hd]),
            p[2].view([b, t, kv, hd]),
        )
    };
    check_op(
        args,
        device,
        "rope_heads",
        &["q", "k", "v"],
        &["qkv"],
        &[qkv],
        &|l| {
            // The model's op: one node over the merged projection. It writes [B, T, heads, hd];
            // attention reads the [B, heads, T, hd] view.
            let (q, k, v) = fused::qkv_heads(&l[0], &cos, &sin, h, kv)?;
            Ok(vec![
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
            ])
        },
        &|l| {
            let (q, k, v) = split(l);
            let bf = Kind::BFloat16;
            vec![
                rope::apply(&q, &cos, &sin, bf).transpose(1, 2),
                repeat_kv(rope::apply(&k, &cos, &sin, bf).transpose(1, 2), n_rep),
                repeat_kv(v.transpose(1, 2), n_rep),
            ]
        },
    )
}

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

/// `add_bf16_` (an fp32 `.grad` += a bf16 gradient, the lm_head's and, through `weights_bf16`,
/// every projection's) against libtorch's mixed-dtype `add_`: the same arithmetic (g widened to
/// fp32, one fp32 add), so the results must be equal bit for bit (tolerance 0). At the lm_head's
/// `[6400, 512]`.
pub(super) fn check_add_bf16(args: &KernelsArgs, device: Device) -> Result<bool> {
    let _g = tch::no_grad_guard();
    let acc = Tensor::randn([6400, 512], (Kind::Float, device));
    let g = Tensor::randn([6400, 512], (Kind::BFloat16, device));
    let ours = acc.copy();
    fused::add_bf16_(&ours, &g)?;
    let mut theirs = acc.copy();
    let _ = theirs.f_add_(&g)?;
    let ok = report("add_bf16", "acc", &diff(&ours, &theirs), 0.0);
    let tf = time_ms(device, args.warmup, args.iters, || {
        fused::add_bf16_(&ours, &g)
    })?;
    let tr = time_ms(device, args.warmup, args.iters, || {
        let _ = theirs.f_add_(&g)?;
        Ok(())
    })?;
    println!(
        "{:<10} add_     ours {tf:.3} ms  libtorch {tr:.3} ms  speedup {:.2}x",
        "add_bf16",
        tr / tf
    );
    Ok(ok)
}

pub(super) fn check_swiglu(args: &KernelsArgs, device: Device) -> Result<bool> {
    let f = 1408;
    let gu = Tensor::randn([args.rows, 2 * f], (Kind::BFloat16, device)).set_requires_grad(true);
    check_op(
        args,
        device,
        "swiglu",
        &["h"],
        &["gu"],
        &[gu],
        &|l| Ok(vec![fused::swiglu(&l[0], f)?]),
        &|l| {
            let p = l[0].split_with_sizes([f, f], -1);
            vec![p[0].silu() * &p[1]]
        },
    )
}

/// The fused cross-entropy over one lm_head chunk (bf16 logits `[4096, 6400]`, about 10% of the
/// labels ignored, labels 0 and V-1 present) against libtorch: `cross_entropy(logits.float(),
/// Sum, ignore -100) * seed` under autograd, the gradient cast back to bf16 as the lm_head's
/// cast-backward does.
pub(super) fn check_cross_entropy(args: &KernelsArgs, device: Device) -> Result<bool> {
    let (n, v) = (4096i64, 6400i64);
    let logits = (Tensor::randn([n, v], (Kind::Float, device)) * 3.0).to_kind(Kind::BFloat16);
    let ignored = Tensor::rand([n], (Kind::Float, device)).lt(0.1);
    let labels = Tensor::randint(v, [n], (Kind::Int64, device)).masked_fill(&ignored, -100);
    let _ = labels.get(0).fill_(0);
    let _ = labels.get(1).fill_(v - 1);
    // A positive scale of the order the step uses (1 / counted labels, times the weight).
    let seed = (Tensor::rand([], (Kind::Float, device)) + 0.5) * 1e-3;
    let reference = |x: &Tensor| -> (Tensor, Tensor) {
        let leaf = x.detach().set_requires_grad(true);
        let loss = leaf.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
            &labels,
            None,
            tch::Reduction::Sum,
            crate::model::loss::IGNORE_INDEX,
            0.0,
        );
        let g = Tensor::run_backward(&[&loss * &seed], &[&leaf], false, false);
        (loss.detach(), g[0].shallow_clone())
    };
    let (loss_r, grad_r) = reference(&logits);
    let grad_f = logits.copy();
    let loss_f = fused::cross_entropy_bf16(&grad_f, &labels, &seed)?;
    let mut ok = true;
    ok &= report_loss(
        "cross_ent",
        "loss",
        scalar(loss_f.shallow_clone()),
        scalar(loss_r),
        1e-5,
    );
    if grad_f.kind() != grad_r.kind() || loss_f.kind() != Kind::Float || loss_f.dim() != 0 {
        println!(
            "cross_ent  kinds    FAIL: gradient {:?} (reference {:?}), loss {:?} of {} dims",
            grad_f.kind(),
            grad_r.kind(),
            loss_f.kind(),
            loss_f.dim()
        );
        ok = false;
    }
    ok &= report("cross_ent", "dlogits", &diff(&grad_f, &grad_r), 1e-2);
    // Labels outside [0, V) other than -100 count as ignored: loss 0, gradient 0.
    let bad = logits.narrow(0, 0, 3).copy();
    let bad_labels = Tensor::from_slice(&[v, -7, 5]).to_device(device);
    let bad_loss = scalar(fused::cross_entropy_bf16(&bad, &bad_labels, &seed)?);
    // Only the third row (label 5) counts.
    let ref_loss = scalar(
        logits
            .narrow(0, 2, 1)
            .to_kind(Kind::Float)
            .cross_entropy_loss::<Tensor>(
                &bad_labels.narrow(0, 2, 1),
                None,
                tch::Reduction::Sum,
                crate::model::loss::IGNORE_INDEX,
                0.0,
            ),
    );
    let bad_zero = scalar(bad.narrow(0, 0, 2).abs().sum(Kind::Float)) == 0.0;
    let bad_ok = bad_zero && (bad_loss - ref_loss).abs() <= 1e-5 * ref_loss.abs();
    println!(
        "cross_ent  range    labels V and -7 ignored (zero gradient {bad_zero}, loss {bad_loss:.6} vs {ref_loss:.6})  {}",
        if bad_ok { "ok" } else { "FAIL" }
    );
    ok &= bad_ok;
    drop((grad_f, grad_r, bad));
    // In place: later iterations run on the previous one's gradient, the same work.
    let buf = logits.copy();
    let tf = time_ms(device, args.warmup, args.iters, || {
        let _ = fused::cross_entropy_bf16(&buf, &labels, &seed)?;
        Ok(())
    })?;
    let tr = time_ms(device, args.warmup, args.iters, || {
        let _ = reference(&logits);
        Ok(())
    })?;
    println!(
        "cross_ent  fwd+bwd  fused {tf:.3} ms  unfused {tr:.3} ms  speedup {:.2}x  (N {n}, V {v})",
        tr / tf
    );
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
