//! Behaviour of the database layer, each test on a fresh file in a temporary
//! directory.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;

use serde_json::json;
use tempfile::TempDir;

use super::*;
use crate::model::{
    CancelRecord, CancelStop, Captured, DirSpec, ErrorKind, EventKind, Limits, Progress, RunAbort,
    RunWorkspace, TaskError, Usage, WorkspaceCleanup, now_millis,
};

async fn open_temp() -> (TempDir, Db) {
    let dir = tempfile::tempdir().unwrap();
    // A nested path: open creates the missing directories.
    let db = Db::open(&dir.path().join("nested/data/wasmtask.db"))
        .await
        .unwrap();
    (dir, db)
}

async fn add_plugin(db: &Db, name: &str) -> PluginRow {
    let row = PluginRow {
        id: format!("digest-of-{name}"),
        name: name.to_owned(),
        kind: PluginKind::Task,
        size_bytes: 1234,
        created_at: now_millis(),
    };
    db.upsert_plugin(row.clone()).await.unwrap();
    row
}

fn new_task(plugin: &PluginRow) -> NewTask {
    NewTask {
        id: new_task_id(),
        plugin_id: plugin.id.clone(),
        plugin_name: plugin.name.clone(),
        plugin_kind: plugin.kind,
        run_id: None,
        spec: TaskSpec::default(),
        max_attempts: 1,
        queued_at: now_millis(),
    }
}

async fn queued(db: &Db, plugin: &PluginRow) -> TaskRecord {
    db.insert_task(new_task(plugin)).await.unwrap()
}

async fn running(db: &Db, plugin: &PluginRow) -> TaskRecord {
    let task = queued(db, plugin).await;
    match db.mark_started(&task.id).await.unwrap() {
        StartDecision::Started(task) => task,
        other => panic!("not started: {other:?}"),
    }
}

fn outcome(state: TaskState) -> Finish {
    Finish {
        state,
        finished_at: now_millis(),
        output: None,
        partial_output: None,
        progress: None,
        error: None,
        exit_code: None,
        stdout: Captured::default(),
        stderr: Captured::default(),
        usage: Usage::default(),
        cancel_stopped: None,
    }
}

fn failure(kind: ErrorKind, detail: &str) -> Option<TaskError> {
    Some(TaskError {
        kind,
        detail: Some(detail.to_owned()),
        message: format!("{detail} happened"),
    })
}

fn cancel(actor: &str, grace_ms: u64) -> CancelRequest {
    CancelRequest {
        actor: actor.to_owned(),
        reason: format!("asked by {actor}"),
        grace_ms,
        requested_at: now_millis(),
    }
}

async fn event_kinds(db: &Db, task_id: &str) -> Vec<EventKind> {
    db.events(Some(task_id), 0, MAX_EVENTS_PAGE)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

async fn last_event(db: &Db, task_id: &str) -> Event {
    db.events(Some(task_id), 0, MAX_EVENTS_PAGE)
        .await
        .unwrap()
        .pop()
        .unwrap()
}

// ---------------------------------------------------------------------------
// Opening and migrations

#[tokio::test(flavor = "multi_thread")]
async fn migrations_are_idempotent_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wasmtask.db");
    let latest = i64::try_from(schema::MIGRATIONS.len()).unwrap();

    let db = Db::open(&path).await.unwrap();
    assert_eq!(db.read(schema::user_version).await.unwrap(), latest);
    let (mode, foreign_keys): (String, bool) = db
        .write(|c| {
            let mode = c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
            let fk = c.query_row("PRAGMA foreign_keys", [], |r| r.get(0))?;
            Ok((mode, fk))
        })
        .await
        .unwrap();
    assert_eq!((mode.as_str(), foreign_keys), ("wal", true));
    let plugin = add_plugin(&db, "echo").await;
    let task = queued(&db, &plugin).await;
    let instance = db.instance().to_owned();
    drop(db);

    // A second open finds the schema current, applies nothing and keeps the
    // data, the instance id included.
    let db = Db::open(&path).await.unwrap();
    assert_eq!(db.read(schema::user_version).await.unwrap(), latest);
    assert_eq!(db.get_task(&task.id).await.unwrap(), Some(task));
    assert_eq!(db.instance(), instance);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_database_has_an_instance_id_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let a = Db::open(&dir.path().join("a.db")).await.unwrap();
    let b = Db::open(&dir.path().join("b.db")).await.unwrap();
    for db in [&a, &b] {
        let id = db.instance();
        assert!(
            id.len() == 16
                && id
                    .bytes()
                    .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()),
            "{id:?}"
        );
    }
    assert_ne!(a.instance(), b.instance());
}

#[tokio::test(flavor = "multi_thread")]
async fn existing_runs_names_only_runs_of_this_database() {
    let (_dir, db) = open_temp().await;
    let plugin = add_plugin(&db, "echo").await;
    let view = db
        .insert_run(new_run("r_known", 1_000), vec![new_task(&plugin)])
        .await
        .unwrap();
    let known = view.run.id.clone();
    let found = db
        .existing_runs(vec![known.clone(), "r_unknown".into(), String::new()])
        .await
        .unwrap();
    assert_eq!(found, HashSet::from([known]));
    assert!(db.existing_runs(Vec::new()).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schema_newer_than_the_build_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wasmtask.db");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", 999).unwrap();
    drop(conn);

    match Db::open(&path).await {
        Err(DbError::SchemaTooNew { found: 999, .. }) => {}
        other => panic!("expected SchemaTooNew, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Plugins, runs and inserts

#[tokio::test(flavor = "multi_thread")]
async fn plugins_are_found_by_digest_or_newest_name() {
    let (_dir, db) = open_temp().await;
    let old = PluginRow {
        id: "aaaa".into(),
        name: "echo".into(),
        kind: PluginKind::Task,
        size_bytes: 10,
        created_at: 1_000,
    };
    let new = PluginRow {
        id: "bbbb".into(),
        name: "echo".into(),
        kind: PluginKind::Command,
        size_bytes: 20,
        created_at: 2_000,
    };
    db.upsert_plugin(old.clone()).await.unwrap();
    db.upsert_plugin(new.clone()).await.unwrap();

    assert_eq!(db.get_plugin("aaaa").await.unwrap(), Some(old.clone()));
    assert_eq!(db.get_plugin("echo").await.unwrap(), Some(new.clone()));
    assert_eq!(db.get_plugin("nope").await.unwrap(), None);

    // Same content under a new name: both names stand.
    let renamed = PluginRow {
        name: "echo-v0".into(),
        created_at: 9_000,
        ..old.clone()
    };
    db.upsert_plugin(renamed.clone()).await.unwrap();
    assert_eq!(db.get_plugin("aaaa").await.unwrap(), Some(renamed.clone()));
    assert_eq!(
        db.get_plugin("echo-v0").await.unwrap(),
        Some(renamed.clone())
    );
    assert_eq!(db.get_plugin("echo").await.unwrap(), Some(new.clone()));
    let rows: Vec<(String, String)> = db
        .list_plugins()
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.name, p.id))
        .collect();
    let pair = |n: &str, i: &str| (n.to_owned(), i.to_owned());
    assert_eq!(
        rows,
        [
            pair("echo", "bbbb"),
            pair("echo", "aaaa"),
            pair("echo-v0", "aaaa")
        ]
    );

    // Registering a name again for older content makes it current again.
    let back = PluginRow {
        created_at: 10_000,
        ..old.clone()
    };
    db.upsert_plugin(back.clone()).await.unwrap();
    assert_eq!(db.get_plugin("echo").await.unwrap(), Some(back));
    assert_eq!(db.list_plugins().await.unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn insert_checks_plugin_run_and_id() {
    let (_dir, db) = open_temp().await;
    let plugin = add_plugin(&db, "echo").await;

    let mut t = new_task(&plugin);
    t.plugin_id = "missing".into();
    assert!(matches!(db.insert_task(t).await, Err(DbError::PluginNotFound(id)) if id == "missing"));

    let mut t = new_task(&plugin);
    t.run_id = Some("r_missing".into());
    assert!(matches!(
        db.insert_task(t).await,
        Err(DbError::RunNotFound(_))
    ));

    let task = queued(&db, &plugin).await;
    let mut again = new_task(&plugin);
    again.id = task.id.clone();
    assert!(matches!(
        db.insert_task(again).await,
        Err(DbError::TaskExists(_))
    ));
    assert_eq!(event_kinds(&db, &task.id).await, [EventKind::TaskQueued]);
}

/// `insert` builds the record it returns instead of reading it back: it
/// must be the record as stored, the edge cases (0 attempts is stored as 1,
/// tasks inserted with their run) included.
#[tokio::test(flavor = "multi_thread")]
async fn an_inserted_task_is_returned_as_stored() {
    let (_dir, db) = open_temp().await;
    let plugin = add_plugin(&db, "echo").await;
    let mut t = new_task(&plugin);
    t.max_attempts = 0;
    let inserted = db.insert_task(t).await.unwrap();
    assert_eq!(inserted.max_attempts, 1);
    assert_eq!(db.get_task(&inserted.id).await.unwrap(), Some(inserted));

    let mut step = new_task(&plugin);
    step.spec.key = Some("only".into());
    step.max_attempts = 2;
    let view = db
        .insert_run(new_run("r_2", now_millis()), vec![step])
        .await
        .unwrap();
    assert_eq!(view.tasks.len(), 1);
    assert_eq!(view.tasks[0].run_id.as_deref(), Some("r_2"));
    assert_eq!(
        db.get_task(&view.tasks[0].id).await.unwrap().as_ref(),
        Some(&view.tasks[0])
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn insert_then_get_round_trips_every_field() {
    let (_dir, db) = open_temp().await;
    let plugin = add_plugin(&db, "echo").await;
    let view = db
        .insert_run(
            NewRun {
                id: "r_1".into(),
                name: Some("nightly".into()),
                fail_fast: false,
                created_at: 5,
                timeout_ms: None,
                workspace: None,
            },
            Vec::new(),
        )
        .await
        .unwrap();
    assert_eq!(view.run.state, RunState::Running);
    assert!(view.tasks.is_empty());
    assert_eq!(db.get_run("r_1").await.unwrap(), Some(view.run));

    let spec = TaskSpec {
        input: Some(json!({"n": 3, "words": ["a", "é"]})),
        args: vec!["--fast".into()],
        env: vec![("K".into(), "V".into())],
        stdin: Some("line\n".into()),
        dirs: vec![DirSpec {
            host: "/tmp/ws".into(),
            guest: "/ws".into(),
            writable: true,
        }],
        cwd: Some("/ws".into()),
        limits: Limits {
            timeout_ms: Some(5_000),
            max_memory_bytes: Some(64 << 20),
            fuel: Some(u64::MAX),
        },
        grace_ms: Some(250),
        locks: vec!["deploy".into()],
        key: Some("build".into()),
        needs: vec!["fetch".into()],
    };
    let new = NewTask {
        id: new_task_id(),
        plugin_id: plugin.id.clone(),
        plugin_name: plugin.name.clone(),
        plugin_kind: plugin.kind,
        run_id: Some("r_1".into()),
        spec: spec.clone(),
        max_attempts: 3,
        queued_at: 1_700_000_000_123,
    };
    let inserted = db.insert_task(new.clone()).await.unwrap();
    let expected_queued = TaskRecord {
        id: new.id.clone(),
        plugin_id: plugin.id.clone(),
        plugin_name: "echo".into(),
        plugin_kind: PluginKind::Task,
        state: TaskState::Queued,
        run_id: Some("r_1".into()),
        spec,
        attempt: 0,
        max_attempts: 3,
        queued_at: 1_700_000_000_123,
        started_at: None,
        cancel_requested_at: None,
        finished_at: None,
        output: None,
        partial_output: None,
        progress: None,
        error: None,
        exit_code: None,
        stdout: Captured::default(),
        stderr: Captured::default(),
        usage: Usage::default(),
        cancel: None,
    };
    assert_eq!(inserted, expected_queued);
    assert_eq!(
        db.get_task(&new.id).await.unwrap(),
        Some(expected_queued.clone())
    );

    let StartDecision::Started(started) = db.mark_started(&new.id).await.unwrap() else {
        panic!("not started");
    };
    let started_at = started.started_at.unwrap();
    let req = CancelRequest {
        actor: "api:ops".into(),
        reason: "deploy".into(),
        grace_ms: 100,
        requested_at: started_at + 1,
    };
    db.request_cancel(&new.id, req).await.unwrap();
    let finish = Finish {
        state: TaskState::Canceled,
        finished_at: started_at + 3,
        output: Some(json!({"partial": true})),
        partial_output: Some(json!({"done": 2})),
        progress: Some(Progress {
            fraction: 0.5,
            message: "halfway".into(),
        }),
        error: failure(ErrorKind::GuestError, "cancelled"),
        exit_code: Some(-3),
        stdout: Captured {
            data: vec![b'o', b'k', 0xff, 0],
            total_bytes: 4,
            truncated: false,
        },
        stderr: Captured {
            data: b"warn".to_vec(),
            total_bytes: u64::MAX,
            truncated: true,
        },
        usage: Usage {
            peak_memory_bytes: 1 << 40,
            fuel_consumed: Some(42),
        },
        cancel_stopped: Some(CancelStop {
            stopped_at: started_at + 3,
            acknowledged: true,
            forced: false,
            latency_us: 2_345,
        }),
    };
    let finished = db.finish(&new.id, finish.clone()).await.unwrap();
    let expected = TaskRecord {
        state: TaskState::Canceled,
        attempt: 1,
        started_at: Some(started_at),
        cancel_requested_at: Some(started_at + 1),
        finished_at: Some(started_at + 3),
        output: finish.output.clone(),
        partial_output: finish.partial_output.clone(),
        progress: finish.progress.clone(),
        error: finish.error.clone(),
        exit_code: Some(-3),
        stdout: finish.stdout.clone(),
        // u64::MAX does not fit SQLite's signed integers: it saturates.
        stderr: Captured {
            total_bytes: i64::MAX as u64,
            ..finish.stderr.clone()
        },
        usage: finish.usage.clone(),
        cancel: Some(CancelRecord {
            actor: "api:ops".into(),
            reason: "deploy".into(),
            grace_ms: 100,
            requested_at: started_at + 1,
            stopped_at: Some(started_at + 3),
            acknowledged: true,
            forced: false,
            latency_us: Some(2_345),
        }),
        ..expected_queued
    };
    assert_eq!(finished, expected);
    assert_eq!(db.get_task(&new.id).await.unwrap(), Some(expected));
    assert_eq!(
        event_kinds(&db, &new.id).await,
        [
            EventKind::TaskQueued,
            EventKind::TaskStarted,
            EventKind::TaskCancelRequested,
            EventKind::TaskCancelAcknowledged,
            EventKind::TaskCanceled,
        ]
    );
    // Task events carry the task's run, so a run's stream sees them.
    let run_kinds: Vec<EventKind> = db
        .run_events("r_1", 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(run_kinds.first(), Some(&EventKind::RunCreated));
    assert_eq!(run_kinds.len(), 6);
}

// ---------------------------------------------------------------------------
// Starting

#[tokio::test(flavor = "multi_thread")]
async fn start_happens_once_and_only_from_queued() {
    let (_dir, db) = open_temp().await;
    let plugin = add_plugin(&db, "echo").await;
    let task = running(&db, &plugin).await;
    assert_eq!((task.state, task.attempt), (TaskState::Running, 1));
    assert!(task.started_at.is_some());
    assert_eq!(last_event(&db, &task.id).await.data, json!({"attempt": 1}));

    match db.mark_started(&task.id).await.unwrap() {
        StartDecision::NotStartable(again) => assert_eq!(again, task),
        other => panic!("started twice: {other:?}"),
    }
    assert!(matches!(
        db.mark_started("t_unknown").await,
        Err(DbError::TaskNotFound(_))
    ));
}

// ---------------------------------------------------------------------------
// Cancel

#[tokio::test(flavor = "multi_thread")]
async fn cancel_of_a_queued_task_cancels_it_before_start() {
    let (_dir, db) = open_temp().await;
    let plugin = add_plugin(&db, "echo").await;
    let task = queued(&db, &plugin).await;
    let req = cancel("cli", 1_000);

    let CancelDecision::CanceledBeforeStart(record) =
        db.request_cancel(&task.id, req.clone()).await.unwrap()
    else {
        panic!("not canceled before start");
    };
    assert_eq!(record.state, TaskState::Canceled);
    assert!(record.finished_at.unwrap() >= req.requested_at);
    assert_eq!(record.cancel_requested_at, Some(req.requested_at));
    assert_eq!(
        record.cancel,
        Some(CancelRecord {
            actor: "cli".into(),
            reason: "asked by cli".into(),
            grace_ms: 1_000,
            requested_at: req.requested_at,
            stopped_at: Some(req.requested_at),
            acknowledged: false,
            forced: false,
            latency_us: Some(0),
        })
    );
    assert_eq!(
        event_kinds(&db, &task.id).await,
        [
            EventKind::TaskQueued,
            EventKind::TaskCancelRequested,
            EventKind::TaskCanceled
        ]
    );
    let events = db.events(Some(&task.id), 0, MAX_EVENTS_PAGE).await.unwrap();
    assert_eq!(
        events[1].data,
        json!({"actor": "cli", "reason": "asked by cli", "grace_ms": 1_000})
    );
    assert_eq!(events[2].data["cancel"]["actor"], "cli");
    assert_eq!(events[2].data["cancel"]["reason"], "asked by cli");
    assert_eq!(events[2].data["before_start"], true);
    // It never starts.
    assert_eq!(
        db.mark_started(&task.id).await.unwrap(),
        StartDecision::NotStartable(record)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_of_a_running_task_is_recorded_once_and_escalates() {
    let (_dir, db) = open_temp().await;
    let plugin = add_plugin(&db, "echo").await;
    let task = running(&db, &plugin).await;
    let first = cancel("api:alice", 5_000);

    let CancelDecision::Requested {
        record,
        first: true,
        escalated: false,
    } = db.request_cancel(&task.id, first.clone()).await.unwrap()
    else {
        panic!("not requested");
    };
    assert_eq!(record.state, TaskState::CancelRequested);
    assert_eq!(record.cancel_requested_at, Some(first.requested_at));
    let stored = record.cancel.clone().unwrap();
    assert_eq!(
        (stored.actor.as_str(), stored.grace_ms, stored.stopped_at),
        ("api:alice", 5_000, None)
    );
    assert_eq!(
        last_event(&db, &task.id).await.data,
        json!({"actor": "api:alice", "reason": "asked by api:alice", "grace_ms": 5_000})
    );

    // A repeat (even with a longer grace) returns the same record, unchanged.
    let repeat = db
        .request_cancel(&task.id, cancel("api:bob", 9_000))
        .await
        .unwrap();
    assert_eq!(
        repeat,
        CancelDecision::Requested {
            record: record.clone(),
            first: false,
            escalated: false
        }
    );

    // A repeat with a shorter grace lowers it and keeps who asked first.
    let CancelDecision::Requested {
        record: escalated,
        first: false,
        escalated: true,
    } = db
        .request_cancel(&task.id, cancel("api:bob", 0))
        .await
        .unwrap()
    else {
        panic!("not escalated");
    };
    assert_eq!(
        escalated.cancel,
        Some(CancelRecord {
            grace_ms: 0,
            ..stored
        })
    );
    assert_eq!(escalated.cancel_requested_at, record.cancel_requested_at);
    assert_eq!(
        event_kinds(&db, &task.id).await,
        [
            EventKind::TaskQueued,
            EventKind::TaskStarted,
            EventKind::TaskCancelRequested,
            EventKind::TaskCancelRequested,
        ]
    );
    assert_eq!(
        last_event(&db, &task.id).await.data["escalated"],
        json!(true)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_of_a_finished_or_unknown_task_changes_nothing() {
    let (_dir, db) = open_temp().await;
    let plugin = add_plugin(&db, "echo").await;
    let task = running(&db, &plugin).await;
    let done = db
        .finish(&task.id, outcome(TaskState::Succeeded))
        .await
        .unwrap();
    let events_before = event_kinds(&db, &task.id).await;

    assert_eq!(
        db.request_cancel(&task.id, cancel("cli", 0)).await.unwrap(),
        CancelDecision::AlreadyFinished(done.clone())
    );
    assert_eq!(db.get_task(&task.id).await.unwrap(), Some(done));
    assert_eq!(event_kinds(&db, &task.id).await, events_before);
    assert_eq!(
        db.request_cancel("t_unknown", cancel("cli", 0))
            .await
            .unwrap(),
        CancelDecision::NotFound
    );
}

// ---------------------------------------------------------------------------
// Finish

#[tokio::test(flavor = "multi_thread")]
async fn finish_after_cancel_turns_failure_into_canceled() {
    let (_dir, db) = open_temp().await;
    let plugin = add_plugin(&db, "echo").await;

    for reported in [TaskState::Failed, TaskState::TimedOut] {
        let task = running(&db, &plugin).await;
        let req = cancel("cli", 0);
        db.request_cancel(&task.id, req.clone()).await.unwrap();
        let f = Finish {
            error: failure(ErrorKind::Trap, "interrupt"),
            cancel_stopped: Some(CancelStop {
                stopped_at: req.requested_at,
                acknowledged: false,
                forced: true,
                latency_us: 180,
            }),
            ..outcome(reported)
        };
        let done = db.finish(&task.id, f).await.unwrap();
        assert_eq!(done.state, TaskState::Canceled, "reported {reported}");
        // The original error stays.
        assert_eq!(done.error, failure(ErrorKind::Trap, "interrupt"));
        let stored = done.cancel.unwrap();
        assert_eq!(
            (stored.forced, stored.acknowledged, stored.latency_us),
            (true, false, Some(180))
        );
        assert_eq!(
            event_kinds(&db, &task.id).await[3..],
            [EventKind::TaskCancelForced, EventKind::TaskCanceled]
        );
        let terminal = last_event(&db, &task.id).await.data;
        assert_eq!(terminal["reported_state"], json!(reported.as_str()));
        assert_eq!(terminal["error"]["kind"], json!("trap"));
        assert_eq!(terminal["cancel"]["forced"], json!(true));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn finish_after_cancel_keeps_a_success() {
    let (_dir, db) = open_temp().await;
    let plugin = add_plugin(&db, "echo").await;
    let task = running(&db, &plugin).await;
    let req = cancel("cli", 10_000);
    db.request_cancel(&task.id, req.clone()).await.unwrap();

    let f = Finish {
        output: Some(json!(42)),
        ..outcome(TaskState::Succeeded)
    };
    let done = db.finish(&task.id, f.clone()).await.unwrap();
    assert_eq!(done.state, TaskState::Succeeded);
    assert_eq!(done.output, Some(json!(42)));
    let stored = done.cancel.unwrap();
    assert_eq!(stored.stopped_at, Some(f.finished_at));
    assert!(!stored.acknowledged && !stored.forced);
    assert_eq!(
        event_kinds(&db, &task.id).await[3..],
        [EventKind::TaskSucceeded]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn finish_is_idempotent() {
    let (_dir, db) = open_temp().await;
    let plugin = add_plugin(&db, "echo").await;
    let task = running(&db, &plugin).await;
    let first = db
        .finish(
            &task.id,
            Finish {
                error: failure(ErrorKind::Trap, "unreachable"),
                ..outcome(TaskState::Failed)
            },
        )
        .await
        .unwrap();
    assert_eq!(first.state, TaskState::Failed);

    let second = db
        .finish(&task.id, outcome(TaskState::Succeeded))
        .await
        .unwrap();
    assert_eq!(second, first);
    assert_eq!(
        event_kinds(&db, &task.id).await,
        [
            EventKind::TaskQueued,
            EventKind::TaskStarted,
            EventKind::TaskFailed
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn finish_refuses_what_it_cannot_record() {
    let (_dir, db) = open_temp().await;
    let plugin = add_plugin(&db, "echo").await;
    let task = running(&db, &plugin).await;

    assert!(matches!(
        db.finish(&task.id, outcome(TaskState::Canceled)).await,
        Err(DbError::CancelNotRequested(_))
    ));
    assert!(matches!(
        db.finish(&task.id, outcome(TaskState::Running)).await,
        Err(DbError::NotTerminal { .. })
    ));
    assert!(matches!(
        db.finish("t_unknown", outcome(TaskState::Succeeded)).await,
        Err(DbError::TaskNotFound(_))
    ));
    // Nothing changed.
    assert_eq!(db.get_task(&task.id).await.unwrap(), Some(task));
}

// ---------------------------------------------------------------------------
// Recovery

#[tokio::test(flavor = "multi_thread")]
async fn recover_settles_what_a_dead_process_left() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wasmtask.db");
    let db = Db::open(&path).await.unwrap();
    let plugin = add_plugin(&db, "echo").await;

    let no_retry = running(&db, &plugin).await;
    let mut retry = new_task(&plugin);
    retry.max_attempts = 2;
    let retry = db.insert_task(retry).await.unwrap();
    db.mark_started(&retry.id).await.unwrap();
    let canceling = running(&db, &plugin).await;
    db.request_cancel(&canceling.id, cancel("cli", 60_000))
        .await
        .unwrap();
    let waiting = queued(&db, &plugin).await;
    let done = running(&db, &plugin).await;
    let done = db
        .finish(&done.id, outcome(TaskState::Succeeded))
        .await
        .unwrap();
    // The process dies.
    drop(db);

    let db = Db::open(&path).await.unwrap();
    let recovery = db.recover().await.unwrap();
    assert_eq!(
        recovery,
        Recovery {
            requeued: vec![retry.id.clone()],
            failed: vec![no_retry.id.clone()],
            canceled: vec![canceling.id.clone()],
        }
    );

    let failed = db.get_task(&no_retry.id).await.unwrap().unwrap();
    assert_eq!(failed.state, TaskState::Failed);
    assert_eq!(failed.error.unwrap().kind, ErrorKind::HostRestart);
    assert!(failed.finished_at.is_some());

    let requeued = db.get_task(&retry.id).await.unwrap().unwrap();
    assert_eq!((requeued.state, requeued.attempt), (TaskState::Queued, 1));
    assert_eq!(
        last_event(&db, &retry.id).await.data,
        json!({"requeued": true, "reason": "host_restart", "attempt": 1})
    );
    let StartDecision::Started(second) = db.mark_started(&retry.id).await.unwrap() else {
        panic!("requeued task does not start");
    };
    assert_eq!(second.attempt, 2);

    let canceled = db.get_task(&canceling.id).await.unwrap().unwrap();
    assert_eq!(canceled.state, TaskState::Canceled);
    let record = canceled.cancel.unwrap();
    assert!(record.forced && !record.acknowledged);
    assert_eq!(record.stopped_at, canceled.finished_at);
    assert_eq!(
        event_kinds(&db, &canceling.id).await[3..],
        [EventKind::TaskCancelForced, EventKind::TaskCanceled]
    );
    assert_eq!(
        last_event(&db, &canceling.id).await.data["reason"],
        json!("host_restart")
    );
    // It never runs again.
    assert!(matches!(
        db.mark_started(&canceling.id).await.unwrap(),
        StartDecision::NotStartable(_)
    ));

    assert_eq!(db.get_task(&waiting.id).await.unwrap(), Some(waiting));
    assert_eq!(db.get_task(&done.id).await.unwrap(), Some(done));

    // Only the task started again is left running; recovering a second time
    // settles exactly that.
    let again = db.recover().await.unwrap();
    assert_eq!(again.failed, vec![retry.id.clone()]);
    assert!(again.requeued.is_empty() && again.canceled.is_empty());
}

// ---------------------------------------------------------------------------
// Listing

#[tokio::test(flavor = "multi_thread")]
async fn list_filters_and_pages_by_cursor() {
    let (_dir, db) = open_temp().await;
    let echo = add_plugin(&db, "echo").await;
    let sleeper = add_plugin(&db, "sleeper").await;
    db.insert_run(
        NewRun {
            id: "r_a".into(),
            name: None,
            fail_fast: false,
            created_at: 1,
            timeout_ms: None,
            workspace: None,
        },
        Vec::new(),
    )
    .await
    .unwrap();

    // 30 tasks; queued_at repeats (10 per millisecond) so ordering must
    // break ties by id.
    let mut all = Vec::new();
    for i in 0..30_i64 {
        let plugin = if i % 3 == 0 { &sleeper } else { &echo };
        let mut t = new_task(plugin);
        t.queued_at = 1_000 + i / 10;
        if i % 2 == 0 {
            t.run_id = Some("r_a".into());
        }
        all.push(db.insert_task(t).await.unwrap());
    }
    for task in all.iter().take(5) {
        db.mark_started(&task.id).await.unwrap();
    }
    let newest_first: Vec<String> = all.iter().rev().map(|t| t.id.clone()).collect();

    // Default page: 50, newest first.
    let page = db.list_tasks(TaskFilter::default()).await.unwrap();
    let ids: Vec<String> = page.iter().map(|t| t.id.clone()).collect();
    assert_eq!(ids, newest_first);

    // Paging with a cursor walks the same order without gaps or repeats.
    let mut walked = Vec::new();
    let mut cursor = None;
    loop {
        let page = db
            .list_tasks(TaskFilter {
                limit: Some(7),
                cursor: cursor.clone(),
                ..TaskFilter::default()
            })
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 7);
        cursor = page.last().map(|t| t.id.clone());
        walked.extend(page.into_iter().map(|t| t.id));
    }
    assert_eq!(walked, newest_first);

    // Oldest first, from a cursor.
    let oldest = db
        .list_tasks(TaskFilter {
            oldest_first: true,
            cursor: Some(all[9].id.clone()),
            limit: Some(3),
            ..TaskFilter::default()
        })
        .await
        .unwrap();
    let ids: Vec<&str> = oldest.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            all[10].id.as_str(),
            all[11].id.as_str(),
            all[12].id.as_str()
        ]
    );

    // Filters, alone and combined.
    let running = db
        .list_tasks(TaskFilter {
            state: Some(TaskState::Running),
            ..TaskFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(running.len(), 5);
    assert!(running.iter().all(|t| t.state == TaskState::Running));

    let in_run = db
        .list_tasks(TaskFilter {
            run_id: Some("r_a".into()),
            ..TaskFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(in_run.len(), 15);

    let sleepers_in_run = db
        .list_tasks(TaskFilter {
            run_id: Some("r_a".into()),
            plugin: Some("sleeper".into()),
            state: Some(TaskState::Queued),
            ..TaskFilter::default()
        })
        .await
        .unwrap();
    // i in 0..30 with i % 6 == 0 (sleeper and in the run): 0, 6, …, 24; 0 is running.
    let expected: Vec<&str> = [24, 18, 12, 6]
        .iter()
        .map(|&i| all[i].id.as_str())
        .collect();
    let ids: Vec<&str> = sleepers_in_run.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, expected);

    // Limits are capped, zero is empty, an unknown cursor is an error.
    let capped = db
        .list_tasks(TaskFilter {
            limit: Some(1_000_000),
            ..TaskFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(capped.len(), 30);
    let none = db
        .list_tasks(TaskFilter {
            limit: Some(0),
            ..TaskFilter::default()
        })
        .await
        .unwrap();
    assert!(none.is_empty());
    assert!(matches!(
        db.list_tasks(TaskFilter {
            cursor: Some("t_gone".into()),
            ..TaskFilter::default()
        })
        .await,
        Err(DbError::BadCursor(_))
    ));
}

// ---------------------------------------------------------------------------
// Events

#[tokio::test(flavor = "multi_thread")]
async fn events_are_ordered_and_paged_by_seq() {
    let (_dir, db) = open_temp().await;
    let plugin = add_plugin(&db, "echo").await;
    let a = running(&db, &plugin).await;
    let b = running(&db, &plugin).await;
    let mut batch = Vec::new();
    for i in 0..20 {
        let task = if i % 2 == 0 { &a } else { &b };
        batch.push(NewEvent::task(
            &task.id,
            EventKind::TaskLog,
            json!({"level": "info", "message": format!("line {i}")}),
        ));
    }
    db.append_events(batch).await.unwrap();

    let all = db.events(None, 0, MAX_EVENTS_PAGE).await.unwrap();
    assert_eq!(all.len(), 4 + 20);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));

    // Task a's stream, 4 at a time, resuming from the last seq seen.
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = db.events(Some(&a.id), after, 4).await.unwrap();
        if page.is_empty() {
            break;
        }
        after = page.last().unwrap().seq;
        seen.extend(page);
    }
    assert_eq!(seen.len(), 2 + 10);
    assert!(
        seen.iter()
            .all(|e| e.task_id.as_deref() == Some(a.id.as_str()))
    );
    let lines: Vec<&str> = seen[2..]
        .iter()
        .map(|e| e.data["message"].as_str().unwrap())
        .collect();
    assert_eq!(
        lines,
        [
            "line 0", "line 2", "line 4", "line 6", "line 8", "line 10", "line 12", "line 14",
            "line 16", "line 18"
        ]
    );
    let expected: Vec<Event> = all
        .iter()
        .filter(|e| e.task_id.as_deref() == Some(a.id.as_str()))
        .cloned()
        .collect();
    assert_eq!(seen, expected);

    // after_seq beyond the end is empty.
    let end = all.last().unwrap().seq;
    assert!(db.events(None, end, 10).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn appended_events_are_bounded_and_update_progress_and_checkpoint() {
    let (_dir, db) = open_temp().await;
    let plugin = add_plugin(&db, "echo").await;
    let task = running(&db, &plugin).await;

    let long = "é".repeat(MAX_EVENT_MESSAGE_BYTES); // twice the cap in bytes
    let huge = "x".repeat(MAX_EVENT_DATA_BYTES * 2);
    db.append_events(vec![
        NewEvent::task(
            &task.id,
            EventKind::TaskProgress,
            json!({"fraction": 1.5, "message": "almost"}),
        ),
        NewEvent::task(
            &task.id,
            EventKind::TaskCheckpoint,
            json!({"partial_output": {"rows": 10}}),
        ),
        NewEvent::task(&task.id, EventKind::TaskLog, json!({"message": long})),
        NewEvent::task(&task.id, EventKind::TaskLog, json!({"blob": huge})),
    ])
    .await
    .unwrap();

    let record = db.get_task(&task.id).await.unwrap().unwrap();
    assert_eq!(
        record.progress,
        Some(Progress {
            fraction: 1.0,
            message: "almost".into()
        })
    );
    assert_eq!(record.partial_output, Some(json!({"rows": 10})));

    let events = db.events(Some(&task.id), 0, 100).await.unwrap();
    let cut = &events[4].data;
    assert_eq!(cut["message_truncated"], json!(true));
    let message = cut["message"].as_str().unwrap();
    assert!(message.len() <= MAX_EVENT_MESSAGE_BYTES && message.chars().all(|c| c == 'é'));
    let replaced = &events[5].data;
    assert_eq!(replaced["truncated"], json!(true));
    assert!(replaced["bytes"].as_u64().unwrap() > MAX_EVENT_DATA_BYTES as u64);

    // Lifecycle events are the database's own; unknown tasks are refused;
    // a refused append stores nothing, and is refused before it writes (the
    // writer has nothing to undo, so it does not run its batch again).
    let before = db.events(Some(&task.id), 0, 100).await.unwrap().len();
    let redone = db.write_stats().redone_batches;
    assert!(matches!(
        db.append_events(vec![NewEvent::task(
            &task.id,
            EventKind::TaskSucceeded,
            json!({})
        )])
        .await,
        Err(DbError::ReservedEvent { .. })
    ));
    assert!(matches!(
        db.append_events(vec![
            NewEvent::task(&task.id, EventKind::TaskLog, json!({"message": "kept?"})),
            NewEvent::task("t_unknown", EventKind::TaskLog, json!({})),
        ])
        .await,
        Err(DbError::TaskNotFound(_))
    ));
    assert_eq!(
        db.events(Some(&task.id), 0, 100).await.unwrap().len(),
        before
    );
    assert_eq!(db.write_stats().redone_batches, redone);

    // Once terminal, progress no longer changes the row (the event is kept).
    let done = db
        .finish(&task.id, outcome(TaskState::Succeeded))
        .await
        .unwrap();
    db.append_events(vec![NewEvent::task(
        &task.id,
        EventKind::TaskProgress,
        json!({"fraction": 0.1, "message": "late"}),
    )])
    .await
    .unwrap();
    assert_eq!(db.get_task(&task.id).await.unwrap(), Some(done));
    assert_eq!(
        last_event(&db, &task.id).await.kind,
        EventKind::TaskProgress
    );
}

// ---------------------------------------------------------------------------
// The writer: group commit and per-job savepoints

#[tokio::test(flavor = "multi_thread")]
async fn group_commit_stores_500_concurrent_inserts() {
    let (_dir, db) = open_temp().await;
    let plugin = add_plugin(&db, "echo").await;
    let before = db.write_stats();

    let handles: Vec<_> = (0..500)
        .map(|_| {
            let db = db.clone();
            let t = new_task(&plugin);
            tokio::spawn(async move { db.insert_task(t).await })
        })
        .collect();
    let mut ids = HashSet::new();
    for handle in handles {
        ids.insert(handle.await.unwrap().unwrap().id);
    }
    assert_eq!(ids.len(), 500);

    let listed: HashSet<String> = db
        .list_tasks(TaskFilter {
            limit: Some(MAX_TASKS_PAGE),
            ..TaskFilter::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(listed, ids);
    let queued_events = db.events(None, 0, MAX_EVENTS_PAGE).await.unwrap();
    assert_eq!(queued_events.len(), 500);

    let after = db.write_stats();
    assert_eq!(after.jobs - before.jobs, 500);
    assert_eq!(after.failed_batches, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_job_does_not_roll_back_its_batch() {
    let (_dir, db) = open_temp().await;
    let plugin = add_plugin(&db, "echo").await;
    let victim = running(&db, &plugin).await;
    let (gate, release) = hold_writer(&db).await;

    let inserts: Vec<_> = (0..10)
        .map(|_| {
            let db = db.clone();
            let t = new_task(&plugin);
            tokio::spawn(async move { db.insert_task(t).await })
        })
        .collect();
    let unknown = tokio::spawn({
        let db = db.clone();
        async move { db.finish("t_unknown", outcome(TaskState::Succeeded)).await }
    });
    wait_queued(&db, 11).await;
    // A job that writes, then fails: its own write must be undone before the
    // `finish` queued behind it runs.
    let half_done = tokio::spawn({
        let db = db.clone();
        let id = victim.id.clone();
        async move {
            db.write(move |conn| {
                conn.execute("UPDATE tasks SET state = 'succeeded' WHERE id = ?1", [&id])?;
                Err::<(), _>(DbError::TaskNotFound("on purpose".into()))
            })
            .await
        }
    });
    wait_queued(&db, 12).await;
    let finish = tokio::spawn({
        let db = db.clone();
        let id = victim.id.clone();
        async move { db.finish(&id, outcome(TaskState::Failed)).await }
    });
    let queued = 13;
    wait_queued(&db, queued).await;
    let before = db.write_stats();
    release.send(()).unwrap();
    gate.await.unwrap().unwrap();

    for insert in inserts {
        insert.await.unwrap().unwrap();
    }
    assert!(matches!(
        unknown.await.unwrap(),
        Err(DbError::TaskNotFound(_))
    ));
    assert!(matches!(
        half_done.await.unwrap(),
        Err(DbError::TaskNotFound(_))
    ));
    // Had the failed job's UPDATE survived, finish would have found a
    // terminal task and left it `succeeded`.
    let victim = finish.await.unwrap().unwrap();
    assert_eq!(victim.state, TaskState::Failed);

    let after = db.write_stats();
    // The gate's own transaction, then all 13 jobs in one: run once without
    // savepoints, rolled back at the job that failed after writing, run
    // again with a savepoint per job.
    assert_eq!(after.batches - before.batches, 2);
    assert_eq!(after.jobs - before.jobs, 1 + queued as u64);
    assert_eq!(after.redone_batches - before.redone_batches, 1);
    assert_eq!(
        db.get_task(&victim.id).await.unwrap().unwrap().state,
        TaskState::Failed
    );
    let all = db.list_tasks(TaskFilter::default()).await.unwrap();
    assert_eq!(all.len(), 11);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_failing_before_it_writes_costs_its_batch_nothing() {
    let (_dir, db) = open_temp().await;
    let plugin = add_plugin(&db, "echo").await;
    let (gate, release) = hold_writer(&db).await;
    let insert = |db: &Db| {
        let (db, t) = (db.clone(), new_task(&plugin));
        tokio::spawn(async move { db.insert_task(t).await })
    };
    let first: Vec<_> = (0..5).map(|_| insert(&db)).collect();
    wait_queued(&db, 5).await;
    // Fails on its check, before changing a row.
    let unknown = tokio::spawn({
        let db = db.clone();
        async move { db.finish("t_unknown", outcome(TaskState::Succeeded)).await }
    });
    wait_queued(&db, 6).await;
    let second: Vec<_> = (0..5).map(|_| insert(&db)).collect();
    wait_queued(&db, 11).await;
    let before = db.write_stats();
    release.send(()).unwrap();
    gate.await.unwrap().unwrap();
    for insert in first.into_iter().chain(second) {
        insert.await.unwrap().unwrap();
    }
    assert!(matches!(
        unknown.await.unwrap(),
        Err(DbError::TaskNotFound(_))
    ));
    let after = db.write_stats();
    assert_eq!(after.batches - before.batches, 2);
    assert_eq!(after.redone_batches - before.redone_batches, 0);
    assert_eq!(
        db.list_tasks(TaskFilter::default()).await.unwrap().len(),
        10
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_panics_after_writing_leaves_no_trace() {
    let (_dir, db) = open_temp().await;
    let plugin = add_plugin(&db, "echo").await;
    let victim = running(&db, &plugin).await;
    let (gate, release) = hold_writer(&db).await;
    let earlier = tokio::spawn({
        let (db, t) = (db.clone(), new_task(&plugin));
        async move { db.insert_task(t).await }
    });
    wait_queued(&db, 1).await;
    let panicking = tokio::spawn({
        let db = db.clone();
        let id = victim.id.clone();
        async move {
            db.write(move |conn| -> Result<(), DbError> {
                conn.execute("UPDATE tasks SET state = 'succeeded' WHERE id = ?1", [&id])?;
                panic!("a job panics after writing (on purpose)");
            })
            .await
        }
    });
    wait_queued(&db, 2).await;
    let later = tokio::spawn({
        let (db, t) = (db.clone(), new_task(&plugin));
        async move { db.insert_task(t).await }
    });
    wait_queued(&db, 3).await;
    release.send(()).unwrap();
    gate.await.unwrap().unwrap();
    let earlier = earlier.await.unwrap().unwrap();
    let later = later.await.unwrap().unwrap();
    assert!(matches!(
        panicking.await.unwrap(),
        Err(DbError::JobPanicked)
    ));
    assert_eq!(
        db.get_task(&victim.id).await.unwrap().unwrap().state,
        TaskState::Running
    );
    for t in [earlier, later] {
        assert_eq!(
            db.get_task(&t.id).await.unwrap().unwrap().state,
            TaskState::Queued
        );
    }
    assert_eq!(db.write_stats().failed_batches, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_wal_starts_over_under_steady_writes_and_reads() {
    let (_dir, db) = open_temp().await;
    let plugin = add_plugin(&db, "echo").await;
    // Readers busy all the time, as the dispatcher and the API keep them:
    // without the writer pause, the WAL never started over.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (db, stop) = (db.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    db.count_tasks_by_state().await.unwrap();
                }
            })
        })
        .collect();
    // Each commit appends a frame for every page it changes: a task insert
    // changes the task table, its id index and four more task indexes, the
    // event table and its two indexes, so at least eight pages, and an
    // append-only WAL would hold 8 frames per commit or more. Started over,
    // it holds the restart threshold plus what arrives between two rounds,
    // whatever the number of commits. Commits go on in rounds until the WAL
    // is below half the append-only length: a WAL that never starts over
    // never gets there, one that does gets there even on a machine so busy
    // that the checkpointer misses a few rounds.
    let wal_frames = || {
        std::fs::metadata(format!("{}-wal", db.path().display()))
            .map_or(0, |m| m.len() / (4096 + 24))
    };
    let before = db.write_stats();
    let (round, most) = (2_000_u64, 40_000_u64);
    let mut commits = 0;
    while commits < most {
        for _ in 0..round {
            db.insert_task(new_task(&plugin)).await.unwrap();
        }
        commits += round;
        if wal_frames() < 4 * commits {
            break;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    assert!(db.write_stats().batches - before.batches >= commits);
    let frames = wal_frames();
    assert!(
        frames < 4 * commits,
        "the WAL grew to {frames} frames over {commits} commits"
    );
}

/// Holds the writer inside a job until `release` is sent, so the jobs queued
/// meanwhile are drained into one batch. Returns once the writer is held.
async fn hold_writer(
    db: &Db,
) -> (
    tokio::task::JoinHandle<Result<(), DbError>>,
    std::sync::mpsc::Sender<()>,
) {
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let gate = tokio::spawn({
        let db = db.clone();
        async move {
            db.write(move |_| {
                let _ = entered_tx.send(());
                let _ = release_rx.recv();
                Ok(())
            })
            .await
        }
    });
    entered.recv().await.unwrap();
    (gate, release)
}

/// Waits (without sleeping) until `n` jobs wait for the writer.
async fn wait_queued(db: &Db, n: usize) {
    while db.write_stats().queued < n {
        tokio::task::yield_now().await;
    }
}

// ---------------------------------------------------------------------------
// Schema v2: runs with states, fail-fast and aborts

fn new_run(id: &str, created_at: UnixMillis) -> NewRun {
    NewRun {
        id: id.to_owned(),
        name: Some(format!("run {id}")),
        fail_fast: false,
        created_at,
        timeout_ms: None,
        workspace: None,
    }
}

fn abort(actor: &str) -> RunAbortRequest {
    RunAbortRequest {
        actor: actor.to_owned(),
        reason: format!("aborted by {actor}"),
        requested_at: now_millis(),
    }
}

async fn run_event_kinds(db: &Db, run_id: &str) -> Vec<EventKind> {
    db.run_events(run_id, 0, MAX_EVENTS_PAGE)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

async fn max_seq(db: &Db) -> i64 {
    db.read(writer::max_event_seq).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_v1_database_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wasmtask.db");
    // A file as a v1 build left it: schema v1, a run with a task and events.
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(schema::MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute_batch(
            r#"
            INSERT INTO plugins VALUES ('digest', 'echo', 'task', 10, 1);
            INSERT INTO runs (id, name, state, created_at) VALUES ('r_old', 'legacy', 'running', 100);
            INSERT INTO tasks (id, plugin_id, plugin_name, plugin_kind, run_id, state, spec, queued_at)
                VALUES ('t_old', 'digest', 'echo', 'task', 'r_old', 'queued', '{}', 200);
            INSERT INTO events (run_id, kind, at, data) VALUES ('r_old', 'run.created', 100, '{"name":"legacy"}');
            INSERT INTO events (task_id, run_id, kind, at, data)
                VALUES ('t_old', 'r_old', 'task.queued', 200, '{}');
            "#,
        )
        .unwrap();
    }

    let db = Db::open(&path).await.unwrap();
    assert_eq!(
        db.read(schema::user_version).await.unwrap(),
        schema::MIGRATIONS.len() as i64
    );
    // The plugin keeps its one name as its first registration.
    let plugin = db.get_plugin("echo").await.unwrap().unwrap();
    assert_eq!((plugin.id.as_str(), plugin.created_at), ("digest", 1));
    assert_eq!(db.get_plugin("digest").await.unwrap(), Some(plugin));
    let run = db.get_run("r_old").await.unwrap().unwrap();
    assert_eq!(
        run,
        RunRecord {
            id: "r_old".into(),
            name: Some("legacy".into()),
            state: RunState::Running,
            fail_fast: false,
            created_at: 100,
            finished_at: None,
            abort: None,
            timeout_ms: None,
            workspace: None,
        }
    );
    let view = db.run_view("r_old").await.unwrap().unwrap();
    assert_eq!(view.run, run);
    let ids: Vec<&str> = view.tasks.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, ["t_old"]);
    assert_eq!(
        run_event_kinds(&db, "r_old").await,
        [EventKind::RunCreated, EventKind::TaskQueued]
    );
    // The watch starts at the events already stored.
    assert_eq!(*db.watch_events().borrow(), 2);
    assert_eq!(db.unfinished_runs().await.unwrap(), vec![run]);

    // The new columns work on the upgraded rows.
    let RunAbortDecision::Requested { run, first: true } =
        db.request_run_abort("r_old", abort("cli")).await.unwrap()
    else {
        panic!("abort not recorded");
    };
    assert_eq!(run.state, RunState::Aborting);
    let run = db
        .finish_run("r_old", RunState::Aborted, 300)
        .await
        .unwrap();
    assert_eq!(run.state, RunState::Aborted);

    // The state rule holds on inserts and updates.
    let bad_update = db
        .write(|c| Ok(c.execute("UPDATE runs SET state = 'paused' WHERE id = 'r_old'", [])?))
        .await;
    assert!(bad_update.is_err(), "{bad_update:?}");
    let bad_insert = db
        .write(|c| {
            Ok(c.execute(
                "INSERT INTO runs (id, state, created_at) VALUES ('r_bad', 'sleeping', 1)",
                [],
            )?)
        })
        .await;
    assert!(bad_insert.is_err(), "{bad_insert:?}");
    let indexes: Vec<String> = db
        .read(|c| {
            let mut s = c.prepare(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'runs'
                 AND name NOT LIKE 'sqlite_%' ORDER BY name",
            )?;
            let names = s
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(names)
        })
        .await
        .unwrap();
    assert_eq!(indexes, ["runs_by_created", "runs_by_state"]);
    drop(db);

    // Reopening applies nothing more and keeps it all.
    let db = Db::open(&path).await.unwrap();
    assert_eq!(
        db.read(schema::user_version).await.unwrap(),
        schema::MIGRATIONS.len() as i64
    );
    assert_eq!(db.get_run("r_old").await.unwrap(), Some(run));
    assert_eq!(
        db.get_task("t_old").await.unwrap().unwrap().state,
        TaskState::Queued
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn insert_run_stores_the_run_and_its_tasks_in_one_transaction() {
    let (_dir, db) = open_temp().await;
    let plugin = add_plugin(&db, "echo").await;

    let mut tasks: Vec<NewTask> = (0..3).map(|_| new_task(&plugin)).collect();
    // Whatever run the tasks named, they join this one.
    tasks[1].run_id = Some("r_elsewhere".into());
    let workspace = RunWorkspace {
        host: "/var/lib/wasmtask/workspaces/r_1".into(),
        guest: "/workspace".into(),
        owned: true,
        cleanup: WorkspaceCleanup::OnSuccess,
    };
    let run = NewRun {
        fail_fast: true,
        timeout_ms: Some(60_000),
        workspace: Some(workspace.clone()),
        ..new_run("r_1", 1_000)
    };
    let view = db.insert_run(run, tasks.clone()).await.unwrap();
    assert_eq!(
        view.run,
        RunRecord {
            id: "r_1".into(),
            name: Some("run r_1".into()),
            state: RunState::Running,
            fail_fast: true,
            created_at: 1_000,
            finished_at: None,
            abort: None,
            timeout_ms: Some(60_000),
            workspace: Some(workspace),
        }
    );
    // A restarted process finds them among the unfinished runs.
    assert_eq!(db.unfinished_runs().await.unwrap(), vec![view.run.clone()]);
    let ids: Vec<&str> = view.tasks.iter().map(|t| t.id.as_str()).collect();
    let given: Vec<&str> = tasks.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(ids, given);
    assert!(
        view.tasks
            .iter()
            .all(|t| t.state == TaskState::Queued && t.run_id.as_deref() == Some("r_1"))
    );
    assert_eq!(db.run_view("r_1").await.unwrap(), Some(view.clone()));
    assert_eq!(db.get_run("r_1").await.unwrap(), Some(view.run.clone()));

    let events = db.run_events("r_1", 0, MAX_EVENTS_PAGE).await.unwrap();
    let kinds: Vec<EventKind> = events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::RunCreated,
            EventKind::TaskQueued,
            EventKind::TaskQueued,
            EventKind::TaskQueued
        ]
    );
    assert_eq!(events[0].task_id, None);
    assert_eq!(
        events[0].data,
        json!({"name": "run r_1", "fail_fast": true, "tasks": 3})
    );
    let queued_for: Vec<&str> = events[1..]
        .iter()
        .map(|e| e.task_id.as_deref().unwrap())
        .collect();
    assert_eq!(queued_for, given);

    // The same run id again: refused, nothing added.
    assert!(matches!(
        db.insert_run(new_run("r_1", 2_000), vec![new_task(&plugin)]).await,
        Err(DbError::RunExists(id)) if id == "r_1"
    ));

    // A task with an unknown plugin in the middle: nothing of the run is stored.
    let seq_before = *db.watch_events().borrow();
    let events_before = db.events(None, 0, MAX_EVENTS_PAGE).await.unwrap();
    let mut bad = vec![new_task(&plugin), new_task(&plugin), new_task(&plugin)];
    bad[1].plugin_id = "missing".into();
    let bad_ids: Vec<String> = bad.iter().map(|t| t.id.clone()).collect();
    assert!(matches!(
        db.insert_run(new_run("r_2", 3_000), bad).await,
        Err(DbError::PluginNotFound(id)) if id == "missing"
    ));
    assert_eq!(db.get_run("r_2").await.unwrap(), None);
    assert_eq!(db.run_view("r_2").await.unwrap(), None);
    for id in &bad_ids {
        assert_eq!(db.get_task(id).await.unwrap(), None);
    }
    assert_eq!(
        db.events(None, 0, MAX_EVENTS_PAGE).await.unwrap(),
        events_before
    );
    assert_eq!(*db.watch_events().borrow(), seq_before);

    // Two tasks with one id: refused as a whole too.
    let twin = new_task(&plugin);
    assert!(matches!(
        db.insert_run(new_run("r_3", 4_000), vec![twin.clone(), twin])
            .await,
        Err(DbError::TaskExists(_))
    ));
    assert_eq!(db.get_run("r_3").await.unwrap(), None);
    assert_eq!(db.list_runs(None, None).await.unwrap(), vec![view.run]);

    // A run without tasks is fine.
    let empty = db
        .insert_run(new_run("r_4", 5_000), Vec::new())
        .await
        .unwrap();
    assert!(empty.tasks.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn run_view_lists_tasks_by_queue_time_then_insertion_order() {
    let (_dir, db) = open_temp().await;
    let plugin = add_plugin(&db, "echo").await;

    // Ids that sort opposite to the order given, all in one millisecond but
    // the last, which was queued earlier than the rest.
    let mut ids: Vec<String> = (0..6).map(|_| new_task_id()).collect();
    ids.sort();
    ids.reverse();
    let tasks: Vec<NewTask> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| NewTask {
            id: id.clone(),
            queued_at: if i == 5 { 999 } else { 1_000 },
            ..new_task(&plugin)
        })
        .collect();
    let inserted = db.insert_run(new_run("r_1", 1_000), tasks).await.unwrap();
    let returned: Vec<&str> = inserted.tasks.iter().map(|t| t.id.as_str()).collect();
    assert_eq!(returned, ids.iter().map(String::as_str).collect::<Vec<_>>());

    // A task added to the run later, in the same millisecond.
    let mut late = new_task(&plugin);
    late.id = "t_000_sorts_first_by_id".into();
    late.run_id = Some("r_1".into());
    late.queued_at = 1_000;
    db.insert_task(late).await.unwrap();

    let view = db.run_view("r_1").await.unwrap().unwrap();
    let order: Vec<&str> = view.tasks.iter().map(|t| t.id.as_str()).collect();
    let mut expected: Vec<&str> = vec![ids[5].as_str()];
    expected.extend(ids[..5].iter().map(String::as_str));
    expected.push("t_000_sorts_first_by_id");
    assert_eq!(order, expected);
    assert_eq!(db.run_view("r_missing").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn run_abort_is_recorded_once() {
    let (_dir, db) = open_temp().await;
    let plugin = add_plugin(&db, "echo").await;
    let view = db
        .insert_run(new_run("r_1", 1_000), vec![new_task(&plugin)])
        .await
        .unwrap();

    assert_eq!(
        db.request_run_abort("r_missing", abort("cli"))
            .await
            .unwrap(),
        RunAbortDecision::NotFound
    );

    let req = abort("api:ops");
    let RunAbortDecision::Requested { run, first: true } =
        db.request_run_abort("r_1", req.clone()).await.unwrap()
    else {
        panic!("abort not recorded");
    };
    let stored = RunAbort {
        actor: "api:ops".into(),
        reason: "aborted by api:ops".into(),
        requested_at: req.requested_at,
    };
    assert_eq!(run.state, RunState::Aborting);
    assert_eq!(run.abort, Some(stored.clone()));
    assert_eq!(run.finished_at, None);
    assert_eq!(db.get_run("r_1").await.unwrap(), Some(run.clone()));
    // The tasks are the caller's to cancel.
    assert_eq!(
        db.get_task(&view.tasks[0].id).await.unwrap().unwrap().state,
        TaskState::Queued
    );
    let events = db.run_events("r_1", 0, MAX_EVENTS_PAGE).await.unwrap();
    let last = events.last().unwrap();
    assert_eq!(last.kind, EventKind::RunAbortRequested);
    assert_eq!(last.task_id, None);
    assert_eq!(last.at, req.requested_at);
    assert_eq!(
        last.data,
        json!({"actor": "api:ops", "reason": "aborted by api:ops"})
    );

    // A repeat returns the stored abort and writes nothing.
    let seq = *db.watch_events().borrow();
    let RunAbortDecision::Requested {
        run: again,
        first: false,
    } = db
        .request_run_abort("r_1", abort("someone-else"))
        .await
        .unwrap()
    else {
        panic!("repeat not recognised");
    };
    assert_eq!(again, run);
    assert_eq!(again.abort, Some(stored));
    assert_eq!(
        db.run_events("r_1", 0, MAX_EVENTS_PAGE).await.unwrap(),
        events
    );
    assert_eq!(max_seq(&db).await, seq);
    assert_eq!(db.unfinished_runs().await.unwrap(), vec![run]);

    // A finished run is left alone.
    let done = db
        .finish_run("r_1", RunState::Aborted, now_millis())
        .await
        .unwrap();
    assert_eq!(
        db.request_run_abort("r_1", abort("late")).await.unwrap(),
        RunAbortDecision::AlreadyFinished(done)
    );

    // Actor and reason are capped like a cancel's.
    db.insert_run(new_run("r_2", 2_000), Vec::new())
        .await
        .unwrap();
    let long = RunAbortRequest {
        actor: "é".repeat(MAX_ACTOR_BYTES),
        reason: "x".repeat(MAX_REASON_BYTES + 10),
        requested_at: 5,
    };
    let RunAbortDecision::Requested { run, first: true } =
        db.request_run_abort("r_2", long).await.unwrap()
    else {
        panic!("abort not recorded");
    };
    let abort = run.abort.unwrap();
    assert_eq!(abort.actor.len(), MAX_ACTOR_BYTES);
    assert_eq!(abort.reason.len(), MAX_REASON_BYTES);
}

#[tokio::test(flavor = "multi_thread")]
async fn finish_run_is_idempotent_and_announced() {
    let (_dir, db) = open_temp().await;
    db.insert_run(new_run("r_1", 1_000), Vec::new())
        .await
        .unwrap();
    db.insert_run(new_run("r_2", 2_000), Vec::new())
        .await
        .unwrap();

    for state in [RunState::Running, RunState::Aborting] {
        assert!(matches!(
            db.finish_run("r_1", state, 5_000).await,
            Err(DbError::RunNotTerminal { state: s, .. }) if s == state
        ));
    }
    assert!(matches!(
        db.finish_run("r_missing", RunState::Succeeded, 5_000).await,
        Err(DbError::RunNotFound(id)) if id == "r_missing"
    ));

    let done = db
        .finish_run("r_1", RunState::Succeeded, 5_000)
        .await
        .unwrap();
    assert_eq!(done.state, RunState::Succeeded);
    assert_eq!(done.finished_at, Some(5_000));
    assert_eq!(done.abort, None);
    let events = db.run_events("r_1", 0, MAX_EVENTS_PAGE).await.unwrap();
    let last = events.last().unwrap();
    assert_eq!(
        (last.kind, last.at, &last.data),
        (
            EventKind::RunFinished,
            5_000,
            &json!({"state": "succeeded"})
        )
    );

    // Again, even with another verdict: unchanged, no event.
    assert_eq!(
        db.finish_run("r_1", RunState::Failed, 9_000).await.unwrap(),
        done
    );
    assert_eq!(
        db.run_events("r_1", 0, MAX_EVENTS_PAGE).await.unwrap(),
        events
    );
    assert_eq!(
        db.unfinished_runs()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect::<Vec<_>>(),
        ["r_2"]
    );

    // Run lifecycle events are the database's own.
    for kind in [
        EventKind::RunAbortRequested,
        EventKind::RunFinished,
        EventKind::RunCreated,
    ] {
        let event = NewEvent {
            task_id: None,
            run_id: Some("r_2".into()),
            kind,
            at: 1,
            data: json!({}),
        };
        assert!(matches!(
            db.append_events(vec![event]).await,
            Err(DbError::ReservedEvent { .. })
        ));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn list_runs_pages_newest_first() {
    let (_dir, db) = open_temp().await;
    // created_at repeats (3 per millisecond): ties are broken by id.
    let mut ids = Vec::new();
    for i in 0..12_i64 {
        let id = new_run_id();
        db.insert_run(new_run(&id, 1_000 + i / 3), Vec::new())
            .await
            .unwrap();
        ids.push(id);
    }
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();

    let all: Vec<String> = db
        .list_runs(None, None)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(all, newest_first);

    let mut walked = Vec::new();
    let mut cursor = None;
    loop {
        let page = db.list_runs(Some(5), cursor.clone()).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 5);
        cursor = page.last().map(|r| r.id.clone());
        walked.extend(page.into_iter().map(|r| r.id));
    }
    assert_eq!(walked, newest_first);

    assert!(db.list_runs(Some(0), None).await.unwrap().is_empty());
    assert_eq!(
        db.list_runs(Some(usize::MAX), None).await.unwrap().len(),
        12
    );
    assert!(matches!(
        db.list_runs(None, Some("r_gone".into())).await,
        Err(DbError::BadCursor(_))
    ));
    assert!(ids.iter().all(|id| id.starts_with("r_") && id.len() == 28));
}

#[tokio::test(flavor = "multi_thread")]
async fn count_tasks_by_state_includes_every_state() {
    let (_dir, db) = open_temp().await;
    let zeros: Vec<(TaskState, u64)> = TaskState::ALL.iter().map(|&s| (s, 0)).collect();
    assert_eq!(db.count_tasks_by_state().await.unwrap(), zeros);

    let plugin = add_plugin(&db, "echo").await;
    queued(&db, &plugin).await;
    queued(&db, &plugin).await;
    running(&db, &plugin).await;
    let to_cancel = queued(&db, &plugin).await;
    db.request_cancel(&to_cancel.id, cancel("cli", 0))
        .await
        .unwrap();
    let to_stop = running(&db, &plugin).await;
    db.request_cancel(&to_stop.id, cancel("cli", 1_000))
        .await
        .unwrap();
    let to_finish = running(&db, &plugin).await;
    db.finish(&to_finish.id, outcome(TaskState::Succeeded))
        .await
        .unwrap();

    assert_eq!(
        db.count_tasks_by_state().await.unwrap(),
        vec![
            (TaskState::Queued, 2),
            (TaskState::Running, 1),
            (TaskState::CancelRequested, 1),
            (TaskState::Succeeded, 1),
            (TaskState::Failed, 0),
            (TaskState::TimedOut, 0),
            (TaskState::Canceled, 1),
        ]
    );
}

// ---------------------------------------------------------------------------
// Event watch

#[tokio::test(flavor = "multi_thread")]
async fn watch_events_follows_every_committed_write() {
    let (_dir, db) = open_temp().await;
    let mut rx = db.watch_events();
    assert_eq!(*rx.borrow_and_update(), 0);
    let plugin = add_plugin(&db, "echo").await;
    // No event written: no change.
    assert!(!rx.has_changed().unwrap());

    // After each write returns, the watch already shows its events, and
    // they are readable.
    let mut last = 0;
    let mut check = async |rx: &mut tokio::sync::watch::Receiver<i64>, what: &str| {
        let seen = *rx.borrow_and_update();
        assert!(seen > last, "{what}: {seen} after {last}");
        assert_eq!(seen, max_seq(&db).await, "{what}");
        let events = db.events(None, last, MAX_EVENTS_PAGE).await.unwrap();
        assert_eq!(events.last().map(|e| e.seq), Some(seen), "{what}");
        last = seen;
    };

    let task = queued(&db, &plugin).await;
    check(&mut rx, "insert_task").await;
    db.mark_started(&task.id).await.unwrap();
    check(&mut rx, "mark_started").await;
    db.append_events(vec![NewEvent::task(
        &task.id,
        EventKind::TaskLog,
        json!({"message": "hi"}),
    )])
    .await
    .unwrap();
    check(&mut rx, "append_events").await;
    db.request_cancel(&task.id, cancel("cli", 1_000))
        .await
        .unwrap();
    check(&mut rx, "request_cancel").await;
    db.finish(&task.id, outcome(TaskState::Failed))
        .await
        .unwrap();
    check(&mut rx, "finish").await;
    let other = queued(&db, &plugin).await;
    check(&mut rx, "insert_task").await;
    db.request_cancel(&other.id, cancel("cli", 0))
        .await
        .unwrap();
    check(&mut rx, "cancel before start").await;
    db.insert_run(new_run("r_1", 1), vec![new_task(&plugin)])
        .await
        .unwrap();
    check(&mut rx, "insert_run").await;
    db.request_run_abort("r_1", abort("cli")).await.unwrap();
    check(&mut rx, "request_run_abort").await;
    db.finish_run("r_1", RunState::Aborted, 2).await.unwrap();
    check(&mut rx, "finish_run").await;
    running(&db, &plugin).await;
    check(&mut rx, "running").await;
    db.recover().await.unwrap();
    check(&mut rx, "recover").await;

    // Writes without events, and failed writes, leave it alone.
    db.finish_run("r_1", RunState::Aborted, 3).await.unwrap();
    assert!(
        db.finish("t_unknown", outcome(TaskState::Failed))
            .await
            .is_err()
    );
    assert!(!rx.has_changed().unwrap());

    // A reopened database starts from the stored events.
    let path = db.path().to_path_buf();
    drop(rx);
    drop(db);
    let db = Db::open(&path).await.unwrap();
    assert_eq!(*db.watch_events().borrow(), last);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watcher_always_finds_the_events_it_was_told_about() {
    let (_dir, db) = open_temp().await;
    let plugin = add_plugin(&db, "echo").await;
    let mut rx = db.watch_events();
    const TASKS: usize = 300;

    let watcher = tokio::spawn({
        let db = db.clone();
        async move {
            let mut after = 0;
            let mut seen = 0;
            while seen < TASKS {
                rx.changed().await.unwrap();
                let told = *rx.borrow_and_update();
                // Everything up to `told` must be there already.
                while after < told {
                    let page = db.events(None, after, MAX_EVENTS_PAGE).await.unwrap();
                    let Some(last) = page.last() else {
                        panic!("told {told}, found nothing after {after}");
                    };
                    assert!(page.iter().all(|e| e.seq > after));
                    seen += page.len();
                    after = last.seq;
                }
            }
            seen
        }
    });
    let inserts: Vec<_> = (0..TASKS)
        .map(|_| {
            let db = db.clone();
            let t = new_task(&plugin);
            tokio::spawn(async move { db.insert_task(t).await })
        })
        .collect();
    for insert in inserts {
        insert.await.unwrap().unwrap();
    }
    assert_eq!(watcher.await.unwrap(), TASKS);
}

/// A run's progress is counted from the index and names the first task
/// that trips fail-fast — failed, timed out, or canceled by someone other
/// than the run — but not one the run canceled itself.
#[tokio::test(flavor = "multi_thread")]
async fn run_progress_counts_and_finds_the_first_failure() {
    let (_dir, db) = open_temp().await;
    let plugin = add_plugin(&db, "echo").await;
    let keyed = |key: &str| {
        let mut t = new_task(&plugin);
        t.run_id = Some("r_p".into());
        t.spec.key = Some(key.into());
        t
    };
    let (a, b, c, d) = (keyed("a"), keyed("b"), keyed("c"), keyed("d"));
    db.insert_run(
        NewRun {
            id: "r_p".into(),
            name: None,
            fail_fast: true,
            created_at: 1,
            timeout_ms: None,
            workspace: None,
        },
        vec![a.clone(), b.clone(), c.clone(), d.clone()],
    )
    .await
    .unwrap();
    let p = db.run_progress("r_p").await.unwrap().unwrap();
    assert_eq!((p.total, p.unfinished, p.succeeded), (4, 4, 0));
    assert_eq!(p.first_failure, None);
    assert_eq!(db.run_progress("r_nope").await.unwrap(), None);

    // a succeeds; b is canceled by its run (not a failure); c by an operator.
    db.mark_started(&a.id).await.unwrap();
    db.finish(&a.id, outcome(TaskState::Succeeded))
        .await
        .unwrap();
    db.request_cancel(&b.id, cancel("run", 0)).await.unwrap();
    let p = db.run_progress("r_p").await.unwrap().unwrap();
    assert_eq!((p.total, p.unfinished, p.succeeded), (4, 2, 1));
    assert_eq!(
        p.first_failure, None,
        "canceled by its run is not a failure"
    );
    db.request_cancel(&c.id, cancel("api", 0)).await.unwrap();
    let p = db.run_progress("r_p").await.unwrap().unwrap();
    assert_eq!(p.unfinished, 1);
    assert_eq!(
        p.first_failure,
        Some(RunFailure {
            task_id: c.id.clone(),
            key: Some("c".into()),
            state: TaskState::Canceled,
        })
    );
    // A later failure does not displace the first.
    db.mark_started(&d.id).await.unwrap();
    db.finish(&d.id, outcome(TaskState::Failed)).await.unwrap();
    let p = db.run_progress("r_p").await.unwrap().unwrap();
    assert_eq!((p.unfinished, p.succeeded), (0, 1));
    assert_eq!(p.first_failure.map(|f| f.task_id), Some(c.id));
}

/// Commits reach the database file through the checkpointer thread: the
/// writer's connection never checkpoints (automatic checkpoints are off on
/// it), and a few rows would not reach SQLite's own 1,000-page threshold.
#[tokio::test]
async fn the_checkpointer_copies_commits_into_the_database_file() {
    let (dir, db) = open_temp().await;
    let path = dir.path().join("nested/data/wasmtask.db");
    let plugin = add_plugin(&db, "echo").await;
    // Let any checkpoint of the schema settle, then measure.
    tokio::time::sleep(super::checkpoint::INTERVAL * 3).await;
    let before = std::fs::metadata(&path).unwrap().len();
    for _ in 0..200 {
        queued(&db, &plugin).await;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let now = std::fs::metadata(&path).unwrap().len();
        if now > before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the database file stayed at {before} bytes: nothing was checkpointed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // And the writer's connection has automatic checkpoints off.
    let auto: i64 = db
        .write(|conn| Ok(conn.query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))?))
        .await
        .unwrap();
    assert_eq!(auto, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn run_gate_has_each_keyed_task_state() {
    let (_dir, db) = open_temp().await;
    let plugin = add_plugin(&db, "echo").await;
    let task = |key: Option<&str>| {
        let mut t = new_task(&plugin);
        t.run_id = Some("r_g".into());
        t.spec.key = key.map(str::to_owned);
        t
    };
    let (a, b, unkeyed) = (task(Some("a")), task(Some("b")), task(None));
    db.insert_run(
        new_run("r_g", 1),
        vec![a.clone(), b.clone(), unkeyed.clone()],
    )
    .await
    .unwrap();
    db.mark_started(&a.id).await.unwrap();
    db.finish(&a.id, outcome(TaskState::Succeeded))
        .await
        .unwrap();
    let gate = db.run_gate("r_g").await.unwrap().unwrap();
    assert_eq!(gate.run.id, "r_g");
    assert_eq!(gate.run.state, RunState::Running);
    let mut states: Vec<(String, TaskState)> = gate.states.into_iter().collect();
    states.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        states,
        vec![
            ("a".to_owned(), TaskState::Succeeded),
            ("b".to_owned(), TaskState::Queued)
        ]
    );
    assert_eq!(db.run_gate("r_none").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dispatcher_reads_queued_tasks_oldest_first_with_their_locks_and_needs() {
    let (_dir, db) = open_temp().await;
    let plugin = add_plugin(&db, "echo").await;
    // Oldest first by `queued_at`: one per millisecond.
    let mut ids = Vec::new();
    for (i, (locks, needs)) in [
        (vec![], vec![]),
        (vec!["k"], vec![]),
        (vec![], vec!["build"]),
        (vec![], vec![]),
        (vec![], vec![]),
    ]
    .into_iter()
    .enumerate()
    {
        let mut t = new_task(&plugin);
        t.queued_at = 1_000 + i as i64;
        t.spec.input = Some(json!({"big": "x".repeat(1000)}));
        t.spec.locks = locks.into_iter().map(String::from).collect();
        t.spec.needs = needs.into_iter().map(String::from).collect();
        ids.push(db.insert_task(t).await.unwrap().id);
    }
    let started = running(&db, &plugin).await;
    let skip: std::collections::HashSet<String> = [ids[0].clone()].into();

    let got = db.queued_for_dispatch(10, 2, skip.clone()).await.unwrap();
    let got_ids: Vec<&str> = got.iter().map(|t| t.id.as_str()).collect();
    // The skipped one and the running one are not there; the gated ones are,
    // and do not count towards the two wanted.
    assert_eq!(got_ids, [&ids[1], &ids[2], &ids[3], &ids[4]]);
    assert!(!got_ids.contains(&started.id.as_str()));
    assert_eq!(
        got[0],
        QueuedTask {
            id: ids[1].clone(),
            plugin_name: "echo".into(),
            run_id: None,
            locks: vec!["k".into()],
            needs: vec![],
        }
    );
    assert_eq!(got[1].needs, ["build"]);
    assert!(got[2].locks.is_empty() && got[2].needs.is_empty());

    // The read stops once it has as many ungated tasks as wanted, and looks
    // no further than `scan` rows.
    let one = db.queued_for_dispatch(10, 1, skip.clone()).await.unwrap();
    assert_eq!(one.len(), 3, "{one:?}");
    let two_rows = db.queued_for_dispatch(2, 5, skip).await.unwrap();
    assert_eq!(two_rows.len(), 1, "{two_rows:?}");
    assert!(
        db.queued_for_dispatch(10, 0, Default::default())
            .await
            .unwrap()
            .is_empty()
    );
}
