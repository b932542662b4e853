//! What the bounded `ps-bench` tests share: running the binary and reading
//! its one JSON line.

use std::process::Command;

/// Runs `ps-bench ARGS`, which must succeed, and parses its JSON report.
pub fn ps_bench(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_ps-bench"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
