//! The benchmark cannot rot: its quick mode (tiny counts) runs every part
//! end to end through the real binary and writes every table. No time is
//! asserted — speed lives in BENCHMARKS.md, not in tests.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[test]
fn quick_mode_runs_every_part_and_writes_every_table() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("BENCHMARKS.md");
    std::fs::write(&out, "# Benchmarks\n\nAnalysis written by hand.\n").unwrap();
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_wasmtask-bench"))
        .arg("--quick")
        .arg("--out")
        .arg(&out)
        .env("RUST_LIB_BACKTRACE", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    let md = std::fs::read_to_string(&out).unwrap();
    assert!(
        md.starts_with("# Benchmarks\n\nAnalysis written by hand.\n"),
        "{md}"
    );
    for heading in [
        "### 1. Cancel → guest stopped",
        "### 2. HTTP cancel → terminal state committed",
        "### 3. Interruption overhead",
        "### 4. Start-up",
        "### 5. Throughput of trivial tasks",
        "### 6. Memory per parked task",
    ] {
        assert!(md.contains(heading), "missing {heading}:\n{md}");
    }
    for row in [
        "| spinning | 10 |",
        "| WASI sleep | 1 |",
        "| blocked in a stdin read | 10 |",
        "| cancel → committed (HTTP round trip) | 5 |",
        "| baseline: native chain of 6 thread hand-offs | 5 |",
    ] {
        assert!(md.contains(row), "missing row {row}:\n{md}");
    }
    assert!(md.contains("**wasmtask as shipped**"), "{md}");
    assert!(
        md.contains("| variant | loops | ratio | calls | ratio | mixed | ratio |"),
        "{md}"
    );
    assert!(
        md.contains(
            "| wasmtask with `compiler_inlining = true` (epochs + guest pool + inlining) |"
        ),
        "{md}"
    );
    assert!(
        md.contains(
            "epochs as shipped cost (fastest runs, to the inlined uninterrupted run): loops "
        ),
        "{md}"
    );
    assert!(md.contains("With the compiler's inlining on"), "{md}");
    assert!(md.contains("**The machine's own stalls**"), "{md}");
    assert!(
        md.contains("pooling (as shipped)") || md.contains("pooling refused"),
        "{md}"
    );

    // A second run replaces the block and keeps the text around it.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_wasmtask-bench"))
        .args(["--quick", "--only", "4", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let md = std::fs::read_to_string(&out).unwrap();
    assert_eq!(md.matches("<!-- bench:begin").count(), 1, "{md}");
    assert!(
        md.contains("### 4. Start-up") && !md.contains("### 1. Cancel"),
        "{md}"
    );
    assert!(md.contains("Analysis written by hand."), "{md}");
}
