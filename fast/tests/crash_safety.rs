//! Nothing lost on a crash. A small CPU run is killed with SIGKILL at pseudo-random moments (many
//! land during a checkpoint write: it saves every micro-step) and resumed each time with
//! `--from-resume 1`; every checkpoint left on disk loads, and the final weights are bit-identical
//! to an uninterrupted run's. SIGINT and SIGTERM save a resume checkpoint and exit 130 / 143.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{assert_same_tensors, read_tensors};

/// 480 poems, rows of 32 tokens, batch 8 -> 60 steps per epoch, 2 epochs, accumulation 3 (so
/// saves fall mid-window too), a save every micro-step.
const RUN: &[&str] = &[
    "pretrain",
    "--device",
    "cpu",
    "--max-docs",
    "480",
    "--hidden-size",
    "32",
    "--num-hidden-layers",
    "1",
    "--num-attention-heads",
    "2",
    "--num-key-value-heads",
    "1",
    "--max-seq-len",
    "32",
    "--batch-size",
    "8",
    "--epochs",
    "2",
    "--accumulation-steps",
    "3",
    "--learning-rate",
    "5e-3",
    "--log-interval",
    "10",
    "--save-interval",
    "1",
    "--num-workers",
    "1",
    "--sample-tokens",
    "0",
    "--no-progress",
];

const WEIGHTS: &str = "out/pretrain_32.safetensors";
const RESUME: &str = "checkpoints/pretrain_32_resume.safetensors";

fn fast(dir: &Path, extra: &[&str]) -> Command {
    let mut c = common::fast();
    c.current_dir(dir).args(RUN).args(extra);
    c
}

fn spawn(dir: &Path, extra: &[&str]) -> Child {
    fast(dir, extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting fast")
}

fn run_to_end(dir: &Path, extra: &[&str]) -> String {
    let out = fast(dir, extra).output().expect("running fast");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "fast failed:\n{text}");
    text
}

fn assert_same_files(a: &Path, b: &Path) {
    assert_same_tensors(a, b, &[WEIGHTS, RESUME]);
}

/// Files a killed write left behind (`.{name}.tmp{pid}`).
fn temp_files(dir: &Path) -> usize {
    ["out", "checkpoints"]
        .iter()
        .filter_map(|d| std::fs::read_dir(dir.join(d)).ok())
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
        .count()
}

/// SplitMix64: reproducible kill times.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[test]
fn sigkill_at_random_moments_then_resume_ends_bit_identical() {
    let reference = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    run_to_end(reference.path(), &[]);
    let full = t0.elapsed();

    let dir = tempfile::tempdir().unwrap();
    let mut rng = 0x5EED_u64;
    let (mut kills, mut mid_write, mut finished_early) = (0, 0, 0);
    // Odd trials: SIGKILL the moment a checkpoint temp file appears (inside a write). Even trials:
    // at a pseudo-random time over the whole run (start-up, a step, a write, before the first
    // checkpoint).
    let span = full.as_millis().max(200) as u64;
    while kills < 12 {
        let mut child = spawn(dir.path(), &["--from-resume", "1"]);
        let in_write = kills % 2 == 1;
        let deadline = Instant::now()
            + if in_write {
                Duration::from_secs(30)
            } else {
                Duration::from_millis(100 + next(&mut rng) % span)
            };
        let mut done = None;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                done = Some(status);
                break;
            }
            if in_write && temp_files(dir.path()) > 0 {
                break;
            }
            std::thread::sleep(Duration::from_micros(if in_write { 200 } else { 2000 }));
        }
        match done {
            Some(status) => {
                assert!(status.success(), "a resumed run failed: {status}");
                // It reached the end before its kill: start the chase again from scratch.
                finished_early += 1;
                assert!(
                    finished_early < 20,
                    "runs keep finishing before their kill time"
                );
                std::fs::remove_dir_all(dir.path().join("out")).unwrap();
                std::fs::remove_dir_all(dir.path().join("checkpoints")).unwrap();
                continue;
            }
            None => {
                child.kill().unwrap();
                child.wait().unwrap();
                kills += 1;
            }
        }
        if temp_files(dir.path()) > 0 {
            mid_write += 1;
        }
        // Whatever the moment, every checkpoint on disk is whole and loads.
        let resume = dir.path().join(RESUME);
        if resume.exists() {
            fast::io::checkpoint::load_resume(&resume)
                .unwrap_or_else(|e| panic!("after kill {kills}: {e:#}"))
                .expect("the checkpoint file exists");
        }
        if dir.path().join(WEIGHTS).exists() {
            read_tensors(&dir.path().join(WEIGHTS));
        }
    }
    assert!(mid_write >= 1, "no kill landed inside a checkpoint write");
    let log = run_to_end(dir.path(), &["--from-resume", "1"]);
    assert!(log.contains("resume: "), "{log}");
    assert_same_files(reference.path(), dir.path());
    assert_eq!(temp_files(dir.path()), 0, "stale temp files are cleaned up");
    println!(
        "{kills} SIGKILLs ({mid_write} left a half-written temp file), {finished_early} runs ended first; uninterrupted run {:.2}s",
        full.as_secs_f64()
    );
}

/// Sends `sig` once the run logs its first line from the training loop (signal handlers are in
/// place by then), and returns its exit code and stderr.
fn interrupt(dir: &Path, sig: i32, extra: &[&str]) -> (i32, String) {
    use std::io::BufRead;
    let mut child = fast(dir, extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting fast");
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    let mut seen = String::new();
    loop {
        match lines.next() {
            Some(Ok(line)) => {
                seen.push_str(&line);
                seen.push('\n');
                if line.starts_with("Epoch:") {
                    break;
                }
            }
            _ => panic!("the run ended before it logged a step:\n{seen}"),
        }
    }
    let rc = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(rc, 0, "kill failed");
    for _ in lines.by_ref() {}
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn sigint_and_sigterm_save_a_checkpoint_and_exit_130_and_143() {
    // No periodic saves: what a resume finds is what the signal handler saved.
    let quiet = ["--save-interval", "1000"];
    let reference = tempfile::tempdir().unwrap();
    run_to_end(reference.path(), &quiet);

    let dir = tempfile::tempdir().unwrap();
    let (code, err) = interrupt(dir.path(), libc::SIGINT, &quiet);
    assert_eq!(code, 130, "{err}");
    assert!(err.contains("interrupted by SIGINT"), "{err}");
    assert!(err.contains("resume checkpoint saved to"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let saved = fast::io::checkpoint::load_resume(&dir.path().join(RESUME))
        .unwrap()
        .expect("a checkpoint was saved");
    assert!(saved.state.global_step < 120, "{}", saved.state.global_step);
    // Resume, and stop again with SIGTERM.
    let (code, err) = interrupt(
        dir.path(),
        libc::SIGTERM,
        &[&quiet[..], &["--from-resume", "1"]].concat(),
    );
    // The resumed run may reach its end before the signal lands; then it exits 0.
    assert!(code == 143 || code == 0, "exit {code}: {err}");
    if code == 143 {
        assert!(err.contains("interrupted by SIGTERM"), "{err}");
    }
    run_to_end(dir.path(), &[&quiet[..], &["--from-resume", "1"]].concat());
    assert_same_files(reference.path(), dir.path());
}
