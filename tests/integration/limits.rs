//! Limits and failures: each ends in its own recorded outcome and the host
//! stays usable afterwards.

use std::time::Duration;

use serde_json::json;
use wasmtask_runtime::{LimitKind, TaskEnd};

use crate::support::{json, request, run};

async fn host_still_works() {
    let report = run(request(
        "hello",
        json!({"text": "after the storm", "op": "reverse"}),
    ))
    .await;
    let TaskEnd::Returned(out) = report.end else {
        panic!("{:?}", report.end)
    };
    assert_eq!(json(&out)["text"], "mrots eht retfa");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_stops_a_spinning_guest() {
    let mut req = request("spin-loop", json!(null));
    req.limits.timeout = Some(Duration::from_millis(300));
    let report = run(req).await;
    assert_eq!(report.end, TaskEnd::TimedOut);
    assert!(report.cancel.is_none(), "a timeout is not a cancel");
    assert!(report.duration >= Duration::from_millis(300));
    host_still_works().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_stops_a_sleeping_guest() {
    let mut req = request("sleeper", json!({"ms": 120_000}));
    req.limits.timeout = Some(Duration::from_millis(200));
    let report = run(req).await;
    assert_eq!(report.end, TaskEnd::TimedOut);
    assert!(report.duration < Duration::from_secs(120));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_cap_refuses_growth_and_is_reported() {
    let mut req = request("mem-hog", json!({"mb": 64}));
    req.limits.max_memory = Some(16 << 20);
    let report = run(req).await;
    let TaskEnd::LimitExceeded(hit) = &report.end else {
        panic!("{:?}", report.end)
    };
    assert_eq!(hit.kind, LimitKind::Memory);
    assert_eq!(hit.allowed, 16 << 20);
    assert!(report.peak_memory <= 16 << 20);
    host_still_works().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_within_the_cap_is_fine_and_measured() {
    let mut req = request("mem-hog", json!({"mb": 8}));
    req.limits.max_memory = Some(64 << 20);
    let report = run(req).await;
    let TaskEnd::Returned(out) = &report.end else {
        panic!("{:?}", report.end)
    };
    assert_eq!(json(out)["allocated_mb"], 8);
    assert!(report.peak_memory >= 8 << 20, "peak {}", report.peak_memory);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_recursion_is_a_stack_overflow_trap() {
    let report = run(request("deep-recursion", json!({"depth": null}))).await;
    let TaskEnd::Trapped { kind, .. } = &report.end else {
        panic!("{:?}", report.end)
    };
    assert_eq!(kind, "stack_overflow");
    // Bounded recursion of the same plugin works.
    let report = run(request("deep-recursion", json!({"depth": 1000}))).await;
    assert!(
        matches!(report.end, TaskEnd::Returned(_)),
        "{:?}",
        report.end
    );
    host_still_works().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdout_flood_is_capped_and_flagged() {
    let report = run(request("stdout-flood", json!({"mb": 4}))).await;
    let TaskEnd::Returned(out) = &report.end else {
        panic!("{:?}", report.end)
    };
    assert_eq!(json(out)["written"], 4 << 20);
    let limit = crate::support::runtime().config().capture_limit;
    assert!(report.stdout.truncated);
    assert_eq!(report.stdout.total_bytes, 4 << 20);
    assert_eq!(
        report.stdout.data.len(),
        limit,
        "exactly the capture limit is kept"
    );
    assert!(String::from_utf8_lossy(&report.stdout.data).starts_with("flood line"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_panic_is_a_trap_with_the_panic_message() {
    let report = run(request("panicker", json!(null))).await;
    let TaskEnd::Trapped { kind, message } = &report.end else {
        panic!("{:?}", report.end)
    };
    assert_eq!(kind, "unreachable");
    assert!(message.contains("panicker: deliberate panic"), "{message}");
    assert!(String::from_utf8_lossy(&report.stderr.data).contains("about to panic"));
    host_still_works().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuel_runs_out_for_a_spinning_guest() {
    let mut req = request("spin-loop", json!(null));
    req.limits.fuel = Some(5_000_000);
    let report = run(req).await;
    let TaskEnd::LimitExceeded(hit) = &report.end else {
        panic!("{:?}", report.end)
    };
    assert_eq!(hit.kind, LimitKind::Fuel);
    assert_eq!(report.fuel_consumed, Some(5_000_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuel_is_metered_for_a_finishing_guest() {
    let mut req = request("hello", json!({"text": "metered"}));
    req.limits.fuel = Some(1_000_000_000);
    let report = run(req).await;
    assert!(
        matches!(report.end, TaskEnd::Returned(_)),
        "{:?}",
        report.end
    );
    let used = report.fuel_consumed.expect("fuel reported");
    assert!(used > 0 && used < 1_000_000_000, "{used}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_cap_above_the_ceiling_is_refused_up_front() {
    let mut req = request("hello", json!({"text": "x"}));
    req.limits.max_memory = Some(u64::MAX);
    let err = crate::support::runtime().spawn(req).unwrap_err();
    assert!(err.to_string().contains("ceiling"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_errors_are_typed() {
    let report = run(request("hello", json!({"text": "x", "op": "explode"}))).await;
    let TaskEnd::GuestError { kind, message } = &report.end else {
        panic!("{:?}", report.end)
    };
    assert_eq!(*kind, wasmtask_runtime::GuestErrorKind::InvalidInput);
    assert!(message.contains("explode"), "{message}");
    let report = run(request("hello", json!("not an object"))).await;
    assert!(
        matches!(
            &report.end,
            TaskEnd::GuestError {
                kind: wasmtask_runtime::GuestErrorKind::InvalidInput,
                ..
            }
        ),
        "{:?}",
        report.end
    );
}
