//! The one integration-test binary of wasmtask. It drives the real
//! `wasmtask` binary and the library against the fixture plugins built from
//! `plugins/` by `host/build.rs`.
//!
//! Modules:
//! - `support`: fixtures, a shared runtime, spawning the binary.
//! - `cancel`: a spinning, a sleeping and a stdin-blocked guest are each
//!   stopped promptly by a cancel while neighbours finish correctly; graceful
//!   and forced cancels keep the right partial result.
//! - `limits`: timeout, memory cap, stack overflow, stdout flood, panic and
//!   fuel each end in their own outcome, and the host stays usable.
//! - `sandbox`: the sandbox probe finds nothing; read-only dirs stay read-only.
//! - `commands`: `wasi:cli` commands get args, env, stdin, dirs; exit codes.
//! - `cli`: the real binary: `run`, signals, exit statuses, `ps`/`show`,
//!   malformed input.
//! - `api`: handler tests through the router (no socket): cancel, abort,
//!   needs, fail-fast, locks, bad input, auth, metrics, SSE.
//! - `server`: the real `wasmtask serve` on port 0: kill -9 recovery, 1,000
//!   concurrent cancels, SIGTERM drain, auth, uploads, SSE resume, disconnect
//!   policies, guests blocked in host calls. `server_support` is its harness.
//! - `client`: the CLI's client commands against a real server.
//! - `pipeline`: `wasmtask pipeline run` and `submit`: the example pipeline,
//!   parallel and dependent steps, live output events, fail-fast, Ctrl+C
//!   aborting spinning/sleeping/stdin-blocked steps, workspace access and
//!   cleanup, bad manifests refused before anything runs.
//! - `dashboard`: the operator dashboard: handler tests for every page and
//!   fragment (escaping of guest text, paging, bad input), and end-to-end
//!   tests in headless Chromium (live updates, cancel with a token, run
//!   abort, disabled actions, screenshots). `browser` is its WebDriver client.
//! - `progress`: the CLI's live progress bars on a pseudo-terminal
//!   (`submit --follow`, `logs -f`, `pipeline run`), plain lines on a pipe.
//! - `fixtures`: every plugin in `plugins/` is exercised by some test.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod api;
mod browser;
mod cancel;
mod cli;
mod client;
mod commands;
mod dashboard;
mod fixtures;
mod limits;
mod pipeline;
mod progress;
mod sandbox;
mod server;
mod server_support;
mod support;
