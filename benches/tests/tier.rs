//! `ps-bench tier` in a bounded form: a small table with most rows on the
//! disk tier. It checks what must hold whatever the machine's speed: every
//! kind of pull is measured, and rows read from disk cost more than rows in
//! memory; the figures are in the README, from the full-size run.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

#[test]
fn pulls_of_rows_on_disk_are_measured_beside_pulls_of_rows_in_memory() {
    let report = common::ps_bench(&["tier", "--rows", "20000", "--pulls", "100"]);
    let on_disk = report["rows_on_disk"].as_u64().unwrap();
    assert!((17_000..19_000).contains(&on_disk), "{report}");
    let batches = report["batches"].as_array().unwrap();
    assert_eq!(batches.len(), 2, "{report}");
    for batch in batches {
        let p50 = |kind: &str| batch[kind]["p50_us"].as_f64().unwrap();
        assert!(p50("memory") > 0.0 && p50("tier_hot") > 0.0, "{report}");
        assert!(p50("tier_cold") > p50("tier_hot"), "{report}");
    }
}
