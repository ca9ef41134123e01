//! The golden fixtures (MiniMind's own PyTorch numbers) pass through the fast path on the CPU.

use std::path::Path;

use harness::report::format_table;
use harness::verify::{self, FastChecks, Target};

fn fast_rows(precision: &str) -> Vec<harness::report::Row> {
    let target = Target::Fast(FastChecks::new("cpu", precision).unwrap());
    verify::run(golden(), &target).expect("fast verification runs")
}

fn golden() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/golden/minimind"))
}

fn assert_all_ok(precision: &str) {
    let rows = fast_rows(precision);
    let table = format_table(&rows);
    println!("{table}");
    assert!(
        rows.iter().all(|r| r.ok),
        "fast path, {precision}, failed checks:\n{table}"
    );
}

/// fp32 logits, losses, every gradient, the clipped AdamW step, the 7-step trajectory with
/// accumulation, schedule, samplers, rescale, scaler and dataset encoding.
#[test]
fn golden_fixtures_pass_on_the_cpu_in_fp32() {
    assert_all_ok("fp32");
}

/// In fp64 libtorch's CPU kernels reproduce PyTorch's numbers to round-off (bitwise for the
/// forward and gradients): any formula difference, however small, would show here.
#[test]
fn golden_fixtures_pass_on_the_cpu_in_fp64_at_round_off() {
    assert_all_ok("fp64");
}

/// In fp64 the forward and gradients equal MiniMind's to a few ulps: same libtorch kernels, RMSNorm
/// in fp32, fp32 RoPE tables. Bound: 1e-14 relative to the tensor's largest magnitude (~45 ulps of
/// f64). Not bitwise: the CPU's BLAS picks AVX2 or AVX-512 kernels per machine, which reorders sums
/// (seen: 9e-17 on logits), and MoE's dispatch sums expert outputs in another order than MiniMind's
/// loop. A formula difference shows at 1e-8 or more (fp32 upcasts, a wrong eps), far above this.
#[test]
fn fp64_forward_and_gradients_equal_minimind_to_a_few_ulps() {
    let rows = fast_rows("fp64");
    let checked: Vec<_> = rows
        .iter()
        .filter(|r| {
            (r.fixture == "dense_tiny" || r.fixture == "moe_tiny")
                && (r.group == "logits"
                    || r.group.starts_with("grad.")
                    || r.group.starts_with("loss."))
        })
        .collect();
    assert!(
        checked.len() >= 6,
        "expected logits, losses and gradients rows"
    );
    for r in checked {
        assert!(
            r.max_rel <= 1e-14,
            "{} {} differs by {:e} (relative)",
            r.fixture,
            r.group,
            r.max_rel
        );
    }
}

/// bf16 mixed precision (fp32 master weights, bf16 matmuls) runs on the CPU too and stays within
/// the bf16 tolerances (norm-wise, see verify/fast.rs).
#[test]
fn golden_fixtures_pass_on_the_cpu_in_bf16() {
    assert_all_ok("bf16");
}

fn minimind3() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/golden/minimind3"))
}

/// MiniMind-3's fixtures through the fast path on the CPU in fp64, fp32 and bf16, with the
/// tolerances of golden/minimind (verify/fast.rs).
#[test]
fn minimind3_fixtures_pass_on_the_cpu() {
    for precision in ["fp64", "fp32", "bf16"] {
        let target = Target::Fast(FastChecks::new("cpu", precision).unwrap());
        let rows = verify::run(minimind3(), &target).expect("fast verification runs");
        let table = format_table(&rows);
        println!("{precision}\n{table}");
        assert!(
            rows.iter().all(|r| r.ok),
            "MiniMind-3, fast path, {precision}:\n{table}"
        );
    }
}

/// golden/seed004 (masked LM, linear schedule) and the reference-made packed-documents case
/// through the fast path on the CPU, fp64 / fp32 / bf16.
#[test]
fn seed004_fixtures_pass_on_the_cpu() {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/golden/seed004"));
    for precision in ["fp64", "fp32", "bf16"] {
        let target = Target::Fast(FastChecks::new("cpu", precision).unwrap());
        let rows = verify::run(dir, &target).expect("fast verification runs");
        let table = format_table(&rows);
        println!("{precision}\n{table}");
        assert!(
            rows.iter().all(|r| r.ok),
            "seed004, fast path, {precision}:\n{table}"
        );
        for name in ["mlm3_tiny", "ref_packed_documents"] {
            assert!(rows.iter().any(|r| r.fixture == name), "{name} not checked");
        }
    }
}
