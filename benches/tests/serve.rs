//! `ps-bench serve` in a bounded form: a second of each load phase and a
//! few freshness probes while a worker trains. It checks what must hold
//! whatever the machine's speed: no request fails, every phase answers,
//! and every acknowledged write shows in a prediction (within the bench's
//! 30 s give-up); the figures themselves are in the README and the closing
//! note, from the full-size run.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::process::Command;

#[test]
fn serving_from_a_follower_answers_every_request_and_shows_every_write_while_training() {
    let out = Command::new(env!("CARGO_BIN_EXE_ps-bench"))
        .args(["serve", "--seconds", "1", "--clients", "2", "--probes", "3"])
        .args(["--train-batch", "256"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for phase in ["batch_1", "batch_256"] {
        assert_eq!(report[phase]["errors"], 0, "{report}");
        assert!(report[phase]["requests"].as_u64().unwrap() > 0, "{report}");
    }
    let freshness = report["freshness_max_ms"].as_f64().unwrap();
    assert!(freshness.is_finite() && freshness >= 0.0, "{report}");
    assert!(
        report["training_samples_per_sec"].as_f64().unwrap() > 0.0,
        "{report}"
    );
}
