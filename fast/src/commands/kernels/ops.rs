//! Each fused op against the libtorch ops it replaces (see the command's doc).

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use super::{check_op, diff, report, report_loss, scalar, time_ms, KernelsArgs, EPS, SEQ};
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
