//! `ps-bench serve` in a bounded form: a second of each load phase and a
//! few freshness probes while a worker trains. It checks what must hold
//! whatever the machine's speed: no request fails, every phase answers,
//! and every acknowledged write shows in a prediction (within the bench's
//! 30 s give-up); the figures themselves are in the README and the closing
//! note, from the full-size run.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

#[test]
fn serving_from_a_follower_answers_every_request_and_shows_every_write_while_training() {
    let report = common::ps_bench(&[
        "serve",
        "--seconds",
        "1",
        "--clients",
        "2",
        "--probes",
        "3",
        "--train-batch",
        "256",
    ]);
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
