//! Cancellation: every way a guest can be busy is stopped by a cancel, the
//! tasks beside it are not disturbed, and graceful/forced cancels keep the
//! right partial results.
//!
//! "Promptly" is asserted only loosely here (well before the guest would have
//! ended on its own); the latency targets live in the benchmarks.

use std::time::Duration;

use serde_json::json;
use wasmtask_runtime::{CancelAck, GuestEvent, RunningTask, Stdin, TaskEnd, TaskReport};

use crate::support::{self, json, request, spawn, with_events};

/// Neighbours with known results, started before the target and still
/// running when it is cancelled.
fn neighbours() -> Vec<(RunningTask, serde_json::Value)> {
    let mut v = Vec::new();
    for i in 0..3 {
        let t = spawn(request(
            "cooperative",
            json!({"steps": 100, "work": 1_000_000}),
        ));
        v.push((t, json!({"done": 100, "partial": false, "i": i})));
    }
    let t = spawn(request(
        "hello",
        json!({"text": "neighbours stay intact", "op": "upper"}),
    ));
    v.push((t, json!({"text": "NEIGHBOURS STAY INTACT", "words": 3})));
    v
}

async fn check_neighbours(v: Vec<(RunningTask, serde_json::Value)>) {
    for (task, want) in v {
        let report = task.wait().await;
        let TaskEnd::Returned(out) = &report.end else {
            panic!("neighbour disturbed: {:?}", report.end);
        };
        let out = json(out);
        if want.get("words").is_some() {
            assert_eq!(out["text"], want["text"]);
            assert_eq!(out["words"], want["words"]);
        } else {
            assert_eq!(out["done"], want["done"], "{out}");
            assert_eq!(out["partial"], want["partial"], "{out}");
        }
        assert!(report.cancel.is_none(), "a neighbour saw a cancel");
    }
}

fn assert_forced_stop(report: &TaskReport, natural_end: Duration) {
    assert_eq!(report.end, TaskEnd::Cancelled, "{report:?}");
    let cancel = report.cancel.as_ref().expect("cancel outcome recorded");
    assert!(cancel.forced);
    assert_eq!(cancel.request.reason, "operator said so");
    assert!(
        cancel.latency < natural_end,
        "the guest was not stopped before it would have ended anyway: {:?}",
        cancel.latency
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spinning_guest_is_stopped_and_neighbours_finish() {
    let others = neighbours();
    let target = spawn(request("spin-loop", json!(null)));
    target.started().await;
    assert_eq!(
        target
            .cancel_handle()
            .cancel("operator said so", Duration::ZERO),
        CancelAck::Forced
    );
    let report = target.wait().await;
    // spin-loop never ends by itself: any stop is the cancel's doing.
    assert_forced_stop(&report, Duration::from_secs(30));
    check_neighbours(others).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleeping_guest_is_stopped_and_neighbours_finish() {
    let others = neighbours();
    let target = spawn(request("sleeper", json!({"ms": 120_000})));
    target.started().await;
    target
        .cancel_handle()
        .cancel("operator said so", Duration::ZERO);
    let report = target.wait().await;
    assert_forced_stop(&report, Duration::from_secs(120));
    check_neighbours(others).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_blocked_on_stdin_is_stopped_and_neighbours_finish() {
    let others = neighbours();
    // A pipe whose writer stays open: the guest's read never completes.
    let (_writer, reader) = tokio::io::duplex(64);
    let mut req = request("stdin-wait", json!(null));
    req.wasi.stdin = Stdin::Reader(Box::new(reader));
    let target = spawn(req);
    target.started().await;
    target
        .cancel_handle()
        .cancel("operator said so", Duration::ZERO);
    let report = target.wait().await;
    assert_forced_stop(&report, Duration::from_secs(60));
    check_neighbours(others).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_wait_reads_what_it_is_given() {
    let mut req = request("stdin-wait", json!(null));
    req.wasi.stdin = Stdin::Bytes(b"twelve bytes".to_vec());
    let report = support::run(req).await;
    let TaskEnd::Returned(out) = report.end else {
        panic!("{:?}", report.end)
    };
    assert_eq!(json(&out)["bytes"], 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_wait_reads_a_pipe_to_its_end() {
    // More than the pipe holds and than one read asks for, written in
    // pieces while the guest reads, then end of file.
    let (mut writer, reader) = tokio::io::duplex(1000);
    let feeder = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        for i in 0..100u32 {
            writer.write_all(&[i as u8; 1000]).await.unwrap();
            if i % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    });
    let mut req = request("stdin-wait", json!(null));
    req.wasi.stdin = Stdin::Reader(Box::new(reader));
    let report = support::run(req).await;
    feeder.await.unwrap();
    let TaskEnd::Returned(out) = report.end else {
        panic!("{:?}", report.end)
    };
    assert_eq!(json(&out)["bytes"], 100_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_cancel_lets_cooperative_return_its_partial_result() {
    let mut req = request("cooperative", json!({"steps": 1_000_000, "work": 100_000}));
    let mut events = with_events(&mut req);
    let task = spawn(req);
    support::wait_event(&mut events, |e| matches!(e, GuestEvent::Checkpoint { .. })).await;
    assert_eq!(
        task.cancel_handle()
            .cancel("please wrap up", Duration::from_secs(60)),
        CancelAck::Requested
    );
    let report = task.wait().await;
    let TaskEnd::Returned(out) = &report.end else {
        panic!("{:?}", report.end)
    };
    let out = json(out);
    assert_eq!(out["partial"], true, "{out}");
    assert!(out["done"].as_u64().unwrap() >= 1);
    let cancel = report.cancel.expect("cancel outcome");
    assert!(cancel.observed, "the guest saw the request");
    assert!(!cancel.forced, "the guest returned by itself");
    assert!(
        cancel.latency < Duration::from_secs(60),
        "returned within the grace"
    );
    // The guest's own cancel log line reached the event channel.
    let mut saw_warn = false;
    while let Ok(ev) = events.try_recv() {
        if let GuestEvent::Log {
            level: "warn",
            message,
            ..
        } = ev
        {
            saw_warn |= message.contains("please wrap up");
        }
    }
    assert!(saw_warn, "cooperative logs the reason it stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_cancel_keeps_the_last_checkpoint() {
    let mut req = request(
        "cooperative",
        json!({"steps": 1_000_000, "work": 100_000, "ignore_cancel": true}),
    );
    let mut events = with_events(&mut req);
    let task = spawn(req);
    support::wait_event(&mut events, |e| matches!(e, GuestEvent::Checkpoint { .. })).await;
    task.cancel_handle().cancel("now", Duration::ZERO);
    let report = task.wait().await;
    assert_eq!(report.end, TaskEnd::Cancelled);
    let checkpoint = json(
        report
            .checkpoint
            .as_deref()
            .expect("checkpoint survives the stop"),
    );
    assert!(checkpoint["done"].as_u64().unwrap() >= 1, "{checkpoint}");
    assert!(report.progress.is_some(), "last progress survives too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_runs_out_then_the_host_forces() {
    let mut req = request(
        "cooperative",
        json!({"steps": 1_000_000, "work": 100_000, "ignore_cancel": true}),
    );
    let mut events = with_events(&mut req);
    let task = spawn(req);
    support::wait_event(&mut events, |e| matches!(e, GuestEvent::Progress { .. })).await;
    let grace = Duration::from_millis(300);
    assert_eq!(
        task.cancel_handle().cancel("slowly", grace),
        CancelAck::Requested
    );
    let report = task.wait().await;
    assert_eq!(
        report.end,
        TaskEnd::Cancelled,
        "ignored the request, so it was forced"
    );
    let cancel = report.cancel.unwrap();
    assert!(cancel.forced);
    assert!(
        cancel.latency >= grace,
        "not forced before the grace ran out: {:?}",
        cancel.latency
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_cancel_without_grace_forces_at_once() {
    let mut req = request(
        "cooperative",
        json!({"steps": 1_000_000, "work": 100_000, "ignore_cancel": true}),
    );
    let mut events = with_events(&mut req);
    let task = spawn(req);
    support::wait_event(&mut events, |e| matches!(e, GuestEvent::Progress { .. })).await;
    let handle = task.cancel_handle();
    assert_eq!(
        handle.cancel("first", Duration::from_secs(600)),
        CancelAck::Requested
    );
    assert_eq!(
        handle.cancel("again", Duration::from_secs(900)),
        CancelAck::AlreadyRequested
    );
    assert_eq!(handle.cancel("force", Duration::ZERO), CancelAck::Escalated);
    let report = task.wait().await;
    assert_eq!(report.end, TaskEnd::Cancelled);
    let cancel = report.cancel.unwrap();
    assert_eq!(
        cancel.request.reason, "first",
        "the first request's reason stands"
    );
    assert!(cancel.latency < Duration::from_secs(600));
    assert_eq!(
        handle.cancel("late", Duration::ZERO),
        CancelAck::AlreadyFinished
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_spinning_guests_each_stop_on_cancel() {
    // More guests than guest threads: most wait in the pool's run queue
    // when cancelled, some are executing.
    let tasks: Vec<_> = (0..40)
        .map(|_| spawn(request("spin-loop", json!(null))))
        .collect();
    for t in &tasks {
        t.cancel_handle().cancel("operator said so", Duration::ZERO);
    }
    for t in tasks {
        let report = t.wait().await;
        assert_eq!(report.end, TaskEnd::Cancelled);
    }
    // The runtime still runs work afterwards.
    let report = support::run(request("hello", json!({"text": "still here"}))).await;
    assert!(
        matches!(report.end, TaskEnd::Returned(_)),
        "{:?}",
        report.end
    );
}
