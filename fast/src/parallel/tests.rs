//! Unit tests: torchrun environment parsing, the global data order and resume rescale, and the
//! in-process communicator's collectives and bucketing.

use super::*;
use crate::data::order::*;
use std::collections::HashMap;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

fn env_of(pairs: &[(&str, &str)]) -> Result<DistEnv> {
    let map: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    DistEnv::from_vars(|k| map.get(k).cloned())
}

const TORCHRUN: &[(&str, &str)] = &[
    ("RANK", "1"),
    ("LOCAL_RANK", "1"),
    ("WORLD_SIZE", "2"),
    ("LOCAL_WORLD_SIZE", "2"),
    ("MASTER_ADDR", "127.0.0.1"),
    ("MASTER_PORT", "29500"),
    ("TORCHELASTIC_USE_AGENT_STORE", "True"),
    ("TORCHELASTIC_RESTART_COUNT", "0"),
];

fn with(over: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut v: Vec<_> = TORCHRUN
        .iter()
        .filter(|(k, _)| !over.iter().any(|(o, _)| o == k))
        .cloned()
        .collect();
    v.extend(over.iter().filter(|(_, val)| !val.is_empty()).cloned());
    v
}

#[test]
fn no_torchrun_variables_means_one_process() {
    let env = env_of(&[]).unwrap();
    assert_eq!(env, DistEnv::single());
    assert!(!env.is_distributed());
    assert_eq!(env.device(Device::Cpu), Device::Cpu);
}

#[test]
fn torchrun_variables_are_read() {
    let env = env_of(TORCHRUN).unwrap();
    assert_eq!((env.rank, env.local_rank, env.world_size), (1, 1, 2));
    assert_eq!(
        (env.master_addr.as_str(), env.master_port),
        ("127.0.0.1", 29500)
    );
    assert!(env.use_agent_store && !env.is_store_server());
    assert_eq!(env.device(Device::Cpu), Device::Cuda(1));
    assert_eq!(env.timeout, DEFAULT_TIMEOUT);
    assert_eq!(env.store_prefix(), "/worker/attempt_0/fast_pg");
}

#[test]
fn without_the_agent_store_rank_zero_hosts_it() {
    let env = env_of(&with(&[
        ("TORCHELASTIC_USE_AGENT_STORE", ""),
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
    ]))
    .unwrap();
    assert!(!env.use_agent_store && env.is_store_server());
    let env = env_of(&with(&[("TORCHELASTIC_USE_AGENT_STORE", "False")])).unwrap();
    assert!(!env.is_store_server(), "rank 1 is a client");
}

#[test]
fn world_size_one_needs_no_store() {
    let env = env_of(&[("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")]).unwrap();
    assert!(!env.is_distributed());
    assert!(matches!(
        communicator_from_env(&env).unwrap().world_size(),
        1
    ));
}

#[test]
fn timeout_is_configurable() {
    let env = env_of(&with(&[(TIMEOUT_ENV, "90")])).unwrap();
    assert_eq!(env.timeout, Duration::from_secs(90));
    assert!(env_of(&with(&[(TIMEOUT_ENV, "-1")])).is_err());
    assert!(env_of(&with(&[(TIMEOUT_ENV, "soon")])).is_err());
}

#[test]
fn inconsistent_variables_are_clear_errors() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("RANK", "2")], "outside WORLD_SIZE"),
        (&[("WORLD_SIZE", "0")], "WORLD_SIZE=0"),
        (&[("WORLD_SIZE", "two")], "not a non-negative integer"),
        (&[("RANK", "")], "RANK is not set"),
        (&[("LOCAL_RANK", "")], "LOCAL_RANK is not set"),
        (
            &[("LOCAL_RANK", "2"), ("LOCAL_WORLD_SIZE", "")],
            "exceeds RANK",
        ),
        (&[("LOCAL_WORLD_SIZE", "1")], "inconsistent"),
        (&[("MASTER_ADDR", "")], "MASTER_ADDR is not set"),
        (&[("MASTER_PORT", "")], "MASTER_PORT is not set"),
        (&[("MASTER_PORT", "70000")], "not a port number"),
        (&[("MASTER_PORT", "0")], "not a port number"),
        (
            &[("TORCHELASTIC_USE_AGENT_STORE", "maybe")],
            "expected True or False",
        ),
    ];
    for (over, want) in cases {
        let err = env_of(&with(over)).expect_err(&format!("{over:?} must fail"));
        assert!(
            format!("{err:#}").contains(want),
            "{over:?}: {err:#} lacks {want:?}"
        );
    }
    let err = env_of(&[("RANK", "0")]).unwrap_err();
    assert!(format!("{err:#}").contains("WORLD_SIZE is not"), "{err:#}");
}

// ---- global data order -------------------------------------------------------------------

/// Every (n, b, W) small enough to enumerate.
fn shapes() -> impl Iterator<Item = (usize, usize, usize)> {
    (1..=23).flat_map(|n| (1..=4).flat_map(move |b| (1..=4).map(move |w| (n, b, w))))
}

#[test]
fn ranks_of_a_full_global_batch_concatenate_to_the_single_process_batch() {
    for (n, b, w) in shapes() {
        for g in 0..num_global_batches(n, b, w) {
            let joined: Vec<usize> = (0..w).flat_map(|r| rank_positions(n, g, b, w, r)).collect();
            let single: Vec<usize> = global_positions(n, g, b, w).collect();
            if single.len() == w * b || single.len() >= w {
                assert_eq!(joined, single, "n {n} b {b} W {w} g {g}");
            }
        }
    }
}

#[test]
fn an_epoch_covers_every_sample_once_unless_padding_is_needed() {
    for (n, b, w) in shapes() {
        let mut seen = vec![0usize; n];
        let mut padded = false;
        for g in 0..num_global_batches(n, b, w) {
            let sizes: Vec<usize> = (0..w)
                .map(|r| rank_positions(n, g, b, w, r).len())
                .collect();
            assert!(
                sizes.iter().all(|&s| s >= 1 && s <= b),
                "every rank gets 1..=b samples: {sizes:?}"
            );
            padded |= n - g * b * w < w;
            for r in 0..w {
                for p in rank_positions(n, g, b, w, r) {
                    seen[p] += 1;
                }
            }
        }
        if padded {
            assert!(
                seen.iter().all(|&c| c >= 1),
                "n {n} b {b} W {w}: nothing skipped"
            );
            assert_eq!(
                seen.iter().sum::<usize>() - n,
                w - n % (b * w),
                "only the pad repeats"
            );
        } else {
            assert!(seen.iter().all(|&c| c == 1), "n {n} b {b} W {w}: {seen:?}");
        }
    }
}

#[test]
fn partial_global_batch_is_split_evenly() {
    // 10 samples, b 4, W 2: global batch 1 holds 2 samples, one per rank.
    assert_eq!(rank_positions(10, 1, 4, 2, 0), vec![8]);
    assert_eq!(rank_positions(10, 1, 4, 2, 1), vec![9]);
    // 11 samples, b 4, W 2: 3 left -> 1 and 2.
    assert_eq!(rank_positions(11, 1, 4, 2, 0), vec![8]);
    assert_eq!(rank_positions(11, 1, 4, 2, 1), vec![9, 10]);
    // 9 samples, b 4, W 2: 1 left -> rank 1 wraps to position 0.
    assert_eq!(rank_positions(9, 1, 4, 2, 0), vec![8]);
    assert_eq!(rank_positions(9, 1, 4, 2, 1), vec![0]);
}

#[test]
fn rank_batches_map_positions_through_the_permutation_and_skip() {
    let perm: Vec<usize> = (0..10).rev().collect();
    let r1: Vec<Vec<usize>> = rank_batches(&perm, 2, 2, 1, 0).collect();
    assert_eq!(r1, vec![vec![7, 6], vec![3, 2], vec![0]]);
    let r1: Vec<Vec<usize>> = rank_batches(&perm, 2, 2, 1, 2).collect();
    assert_eq!(r1, vec![vec![0]]);
    assert_eq!(rank_batches(&perm, 2, 2, 1, 9).count(), 0);
}

#[test]
fn resume_rescale_never_skips_and_repeats_only_the_remainder() {
    for b in 1..=4 {
        for w0 in 1..=4 {
            for w1 in 1..=4 {
                for s in 0..=12 {
                    let rp = resume_point(s, w0, w1, b);
                    assert_eq!(
                        rp.step,
                        s * w0 / w1,
                        "the formula step*saved_ws//current_ws"
                    );
                    assert!(rp.restart_at <= rp.consumed, "never skips");
                    assert!(
                        rp.repeated() < w1 * b,
                        "repeats less than one new global batch"
                    );
                    assert_eq!(rp.repeated(), rp.consumed % (w1 * b));
                    assert_eq!(rp.lossless(), (s * w0 * b) % (w1 * b) == 0);
                }
            }
        }
    }
    // 2 GPUs -> 1 is always lossless; 1 -> 2 only after an even number of steps.
    assert!(resume_point(7, 2, 1, 32).lossless());
    assert!(resume_point(6, 1, 2, 32).lossless());
    assert_eq!(resume_point(7, 1, 2, 32).repeated(), 32);
}

#[test]
fn resumed_run_sees_exactly_the_samples_the_interrupted_run_had_not() {
    // Epoch of 40 samples, b 2; 3 steps on 4 ranks (24 samples), then resume on 2 ranks.
    let (n, b) = (40, 2);
    let done: Vec<usize> = (0..3)
        .flat_map(|g| (0..4).flat_map(move |r| rank_positions(n, g, b, 4, r)))
        .collect();
    let rp = resume_point(3, 4, 2, b);
    assert!(rp.lossless());
    let rest: Vec<usize> = (rp.step..num_global_batches(n, b, 2))
        .flat_map(|g| (0..2).flat_map(move |r| rank_positions(n, g, b, 2, r)))
        .collect();
    let mut all = [done, rest].concat();
    all.sort();
    assert_eq!(all, (0..n).collect::<Vec<_>>());
}

// ---- communicators -------------------------------------------------------------------------

#[test]
fn single_process_collectives_are_identity() {
    let c = SingleProcess;
    let mut t = vec![Tensor::from_slice(&[1.0f32, 2.0])];
    c.all_reduce_sum(&mut t).unwrap();
    c.broadcast(&mut t, 0).unwrap();
    assert_eq!(Vec::<f32>::try_from(&t[0]).unwrap(), vec![1.0, 2.0]);
    assert_eq!(c.all_reduce_scalar(3.5).unwrap(), 3.5);
    assert!(c.broadcast(&mut t, 1).is_err());
    c.barrier().unwrap();
}

/// Per-rank tensors of mixed shapes and dtypes: rank r's element i is (r+1)*(i+1) (+ offset).
fn rank_tensors(r: usize) -> Vec<Tensor> {
    let f = (r + 1) as f64;
    vec![
        (Tensor::arange(6, (Kind::Float, Device::Cpu)) + 1.0).reshape([2, 3]) * f,
        Tensor::from_slice(&[f]).reshape([]).to_kind(Kind::Float),
        ((Tensor::arange(5, (Kind::Double, Device::Cpu)) + 1.0) * f),
        // Non-contiguous: a transposed view.
        ((Tensor::arange(12, (Kind::Float, Device::Cpu)) + 1.0).reshape([3, 4]) * f).tr(),
        (Tensor::arange(4, (Kind::BFloat16, Device::Cpu)) + 1.0) * f,
    ]
}

#[test]
fn in_process_all_reduce_sums_every_tensor_for_any_bucket_size() {
    for w in 1..=3 {
        for bucket in [1usize, 16, 40, DEFAULT_BUCKET_BYTES] {
            let handles = InProcess::world(w, Duration::from_secs(20));
            let outs: Vec<Vec<Tensor>> = std::thread::scope(|s| {
                let js: Vec<_> = handles
                    .into_iter()
                    .map(|h| {
                        s.spawn(move || {
                            let h = h.with_bucket_bytes(bucket);
                            let mut ts = rank_tensors(h.rank());
                            h.all_reduce_sum(&mut ts).unwrap();
                            ts
                        })
                    })
                    .collect();
                js.into_iter().map(|j| j.join().unwrap()).collect()
            });
            let factor = (w * (w + 1) / 2) as f64; // sum over ranks of (r+1)
            for ts in &outs {
                for (got, want) in ts.iter().zip(rank_tensors(0)) {
                    assert_eq!(got.size(), want.size());
                    assert_eq!(got.kind(), want.kind());
                    let diff = (got.to_kind(Kind::Double) - want.to_kind(Kind::Double) * factor)
                        .abs()
                        .max();
                    assert_eq!(diff.double_value(&[]), 0.0, "W {w} bucket {bucket}");
                }
            }
        }
    }
}

#[test]
fn in_process_broadcast_scalar_and_barrier() {
    let outs = run_ranks(3, Duration::from_secs(20), |c| {
        let mut ts = rank_tensors(c.rank());
        c.broadcast(&mut ts, 2)?;
        let total = c.all_reduce_scalar(c.rank() as f64 + 0.5)?;
        c.barrier()?;
        let mut v = [1.0, c.rank() as f64];
        c.all_reduce_f64(&mut v)?;
        Ok((ts, total, v))
    });
    for out in outs {
        let (ts, total, v) = out.unwrap();
        for (got, want) in ts.iter().zip(rank_tensors(2)) {
            assert_eq!(
                Vec::<f64>::try_from(&got.to_kind(Kind::Double).reshape([-1])).unwrap(),
                Vec::<f64>::try_from(&want.to_kind(Kind::Double).reshape([-1])).unwrap()
            );
        }
        assert_eq!(total, 4.5);
        assert_eq!(v, [3.0, 3.0]);
    }
}

#[test]
fn average_gradients_rank_mean_divides_by_world() {
    let outs = run_ranks(2, Duration::from_secs(20), |c| {
        let mut g = vec![Tensor::from_slice(&[c.rank() as f32 * 2.0 + 1.0])];
        average_gradients(c, &mut g, GradAverage::RankMean)?;
        let mut h = vec![Tensor::from_slice(&[c.rank() as f32 * 2.0 + 1.0])];
        average_gradients(c, &mut h, GradAverage::TokenWeighted)?;
        Ok((
            g[0].double_value(&[0]),
            h[0].double_value(&[0]),
            global_token_count(c, 10 + c.rank())?,
        ))
    });
    for out in outs {
        assert_eq!(out.unwrap(), (2.0, 4.0, 21));
    }
}

#[test]
fn a_failing_rank_does_not_leave_the_others_hanging() {
    let start = std::time::Instant::now();
    let outs = run_ranks(3, Duration::from_secs(30), |c| {
        if c.rank() == 1 {
            anyhow::bail!("rank 1 hit an error before the collective");
        }
        c.barrier()
    });
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "peers failed fast on abort"
    );
    for out in outs {
        assert!(out.is_err());
    }
    // A rank that never arrives (no abort): the others time out.
    let handles = InProcess::world(2, Duration::from_millis(200));
    let err = handles[0].barrier().unwrap_err();
    assert!(format!("{err:#}").contains("timed out"), "{err:#}");
}

#[test]
fn mismatched_collectives_fail_on_every_rank() {
    let outs = run_ranks(2, Duration::from_secs(20), |c| {
        let mut v = vec![0.0; 1 + c.rank()];
        c.all_reduce_f64(&mut v)
    });
    for out in outs {
        let err = out.unwrap_err();
        assert!(format!("{err:#}").contains("ranks disagree"), "{err:#}");
    }
}

#[test]
fn undefined_gradients_are_an_error() {
    let c = InProcess::world(1, Duration::from_secs(1)).pop().unwrap();
    let mut g = vec![Tensor::from_slice(&[1.0f32]), Tensor::new()];
    let err = c.all_reduce_sum(&mut g).unwrap_err();
    assert!(format!("{err:#}").contains("undefined"), "{err:#}");
}

#[test]
fn weight_checksum_sees_a_changed_weight() {
    let a = rank_tensors(0);
    let b = rank_tensors(0);
    assert_eq!(weight_checksum(&a).unwrap(), weight_checksum(&b).unwrap());
    let _ = b[0].get(0).get(0).fill_(100.0);
    assert_ne!(weight_checksum(&a).unwrap(), weight_checksum(&b).unwrap());
}

#[test]
fn consolidated_partial_gradients_keep_their_sum_on_rank_zero() {
    let outs = run_ranks(3, Duration::from_secs(20), |c| {
        let mut g = vec![Tensor::from_slice(&[c.rank() as f32 + 1.0, 10.0])];
        consolidate_partial_gradients(c, &mut g)?;
        Ok(Vec::<f32>::try_from(&g[0])?)
    });
    let got: Vec<Vec<f32>> = outs.into_iter().map(|o| o.unwrap()).collect();
    assert_eq!(got, vec![vec![6.0, 30.0], vec![0.0, 0.0], vec![0.0, 0.0]]);
}

#[test]
fn a_logged_row_describes_the_global_batch() {
    use crate::train::metrics::MetricRow;
    let outs = run_ranks(2, Duration::from_secs(20), |c| {
        let r = c.rank() as f64;
        let mut row = MetricRow {
            step: 5,
            epoch: 1,
            epoch_step: 5,
            loss: 0.0,
            ce: 2.0 + r, // rank 0: 2.0 over 30 labels, rank 1: 3.0 over 10
            aux: 0.1 * (r + 1.0),
            loss_avg: 4.0 + 2.0 * r,
            lr: 1e-3,
            grad_norm: Some(1.5),
            tokens_per_s: 100.0,
            useful_tokens_per_s: 40.0,
            useful_tokens_seen: 1000,
            data_wait_share: 0.0,
            elapsed_s: 1.0,
            eval_loss: None,
        };
        globalize_metric_row(c, &mut row, if r == 0.0 { 30 } else { 10 })?;
        Ok(row)
    });
    for o in outs {
        let row = o.unwrap();
        assert!(
            (row.ce - 2.25).abs() < 1e-12,
            "token-weighted ce {}",
            row.ce
        );
        assert!((row.aux - 0.15).abs() < 1e-12 && (row.loss - 2.4).abs() < 1e-12);
        assert_eq!(
            (row.loss_avg, row.tokens_per_s, row.useful_tokens_seen),
            (5.0, 200.0, 1000)
        );
    }
}
