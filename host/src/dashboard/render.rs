//! Pages and fragments as HTML, from the model's records. Pure functions:
//! no I/O, so handler tests and unit tests see exactly what a browser gets.
//! Every dynamic string goes through [`Esc`] or [`Query`] (see `html.rs`).

use std::time::Duration;

use serde_json::Value;

use super::html::{Esc, Html, Query};
use crate::model::{Event, EventKind, RunRecord, RunView, TaskRecord, TaskState};

/// Most bytes of one stdout/stderr/output block shown on a page; the rest is
/// in the JSON record.
pub const MAX_SHOWN_BYTES: usize = 64 * 1024;

/// What the layout needs to know about the page.
pub struct Page<'a> {
    pub title: &'a str,
    /// Which nav entry is current: `overview`, `tasks` or `runs`.
    pub nav: &'a str,
    /// The server requires a bearer token for actions.
    pub auth: bool,
    /// The SSE stream the page follows for live updates (`None`: static).
    pub stream: Option<String>,
    /// Event kinds that end that stream (the page then closes it).
    pub stream_end: &'a [EventKind],
    /// The asset version, for cache-busting URLs.
    pub version: &'a str,
}

/// A whole page around `body`.
pub fn layout(p: &Page<'_>, body: &str) -> String {
    let mut h = Html::new();
    h.raw("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">")
        .raw("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">")
        .fmt(format_args!("<title>{} · wasmtask</title>", Esc(p.title)))
        .fmt(format_args!(
            "<link rel=\"icon\" href=\"/ui/favicon.svg?v={0}\" type=\"image/svg+xml\">\
             <link rel=\"stylesheet\" href=\"/ui/style.css?v={0}\">\
             <script src=\"/ui/app.js?v={0}\" defer></script>",
            Esc(p.version)
        ))
        .raw("</head><body");
    h.fmt(format_args!(
        " data-auth=\"{}\"",
        if p.auth { "token" } else { "none" }
    ));
    if let Some(s) = &p.stream {
        h.fmt(format_args!(" data-stream=\"{}\"", Esc(s)));
        let ends: Vec<&str> = p.stream_end.iter().map(|k| k.as_str()).collect();
        h.fmt(format_args!(
            " data-stream-end=\"{}\"",
            Esc(&ends.join(" "))
        ));
    }
    h.raw(">");
    h.raw("<header class=\"top\"><a class=\"brand\" href=\"/\">wasmtask</a><nav>");
    for (key, href, label) in [
        ("overview", "/", "Overview"),
        ("tasks", "/tasks", "Tasks"),
        ("runs", "/runs", "Runs"),
    ] {
        let cur = if key == p.nav {
            " aria-current=\"page\""
        } else {
            ""
        };
        h.fmt(format_args!("<a href=\"{href}\"{cur}>{label}</a>"));
    }
    h.raw(
        "</nav><span class=\"grow\"></span>\
         <span id=\"live-status\" class=\"live\" role=\"status\" aria-live=\"polite\"></span>\
         <button type=\"button\" id=\"refresh\" class=\"small\" title=\"Reload this view's data\">Refresh</button>\
         <span id=\"token-status\" class=\"token-status\" hidden>token set for this tab \
         <button type=\"button\" id=\"token-forget\" class=\"link\">forget</button></span>\
         </header>",
    );
    h.raw(
        "<form id=\"token-form\" class=\"token-form\" hidden>\
         <label for=\"token-input\">This server needs its API token for actions. \
         It is kept for this tab only.</label>\
         <span id=\"token-why\" class=\"muted\"></span>\
         <input id=\"token-input\" type=\"password\" autocomplete=\"off\" required>\
         <button type=\"submit\">Use token</button>\
         <button type=\"button\" id=\"token-cancel\" class=\"link\">not now</button></form>",
    );
    h.raw("<main>").raw(body).raw("</main></body></html>\n");
    h.into_string()
}

/// An error page's body (`what` is shown as text).
pub fn error_body(status: u16, what: &str) -> String {
    let mut h = Html::new();
    h.fmt(format_args!(
        "<h1>{status}</h1><p class=\"error\">{}</p><p><a href=\"/\">Back to the overview</a></p>",
        Esc(what)
    ));
    h.into_string()
}

// ---------------------------------------------------------------------
// Small pieces
// ---------------------------------------------------------------------

fn when(ms: Option<i64>) -> String {
    match ms {
        Some(ms) => {
            let t = std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
            humantime::format_rfc3339_millis(t)
                .to_string()
                .replace('T', " ")
        }
        None => "—".to_owned(),
    }
}

fn time_el(h: &mut Html, ms: Option<i64>) {
    match ms {
        Some(m) => {
            h.fmt(format_args!(
                "<time datetime=\"{}\">{}</time>",
                m,
                Esc(&when(Some(m)))
            ));
        }
        None => {
            h.raw("<span class=\"muted\">—</span>");
        }
    }
}

/// `1.2s`, `340ms`, `2m 5s`.
pub fn span_ms(ms: i64) -> String {
    let ms = u64::try_from(ms).unwrap_or(0);
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
    }
}

fn micros(us: u64) -> String {
    if us < 1000 {
        format!("{us} µs")
    } else if us < 1_000_000 {
        format!("{:.2} ms", us as f64 / 1000.0)
    } else {
        format!("{:.2} s", us as f64 / 1e6)
    }
}

fn bytes(n: u64) -> String {
    const K: u64 = 1024;
    if n < K {
        format!("{n} B")
    } else if n < K * K {
        format!("{:.1} KiB", n as f64 / K as f64)
    } else if n < K * K * K {
        format!("{:.1} MiB", n as f64 / (K * K) as f64)
    } else {
        format!("{:.1} GiB", n as f64 / (K * K * K) as f64)
    }
}

fn state_badge(h: &mut Html, state: &str) {
    h.fmt(format_args!(
        "<span class=\"state s-{0}\" data-state=\"{0}\">{1}</span>",
        Esc(state),
        Esc(&state.replace('_', " "))
    ));
}

fn task_link(h: &mut Html, id: &str) {
    h.fmt(format_args!(
        "<a class=\"id\" href=\"/tasks/{0}\">{0}</a>",
        Esc(id)
    ));
}

fn run_link(h: &mut Html, id: &str, name: Option<&str>) {
    h.fmt(format_args!(
        "<a class=\"id\" href=\"/runs/{0}\">{0}</a>",
        Esc(id)
    ));
    if let Some(n) = name.filter(|n| !n.is_empty()) {
        h.fmt(format_args!(" <span class=\"muted\">{}</span>", Esc(n)));
    }
}

fn progress_el(h: &mut Html, t: &TaskRecord) {
    match &t.progress {
        Some(p) => {
            let f = if p.fraction.is_finite() {
                p.fraction.clamp(0.0, 1.0)
            } else {
                0.0
            };
            let pct = (f64::from(f) * 100.0).round();
            h.fmt(format_args!(
                "<span class=\"progress\"><progress max=\"100\" value=\"{pct}\" \
                 aria-label=\"progress\">{pct}%</progress> <span class=\"pct\">{pct}%</span> \
                 <span class=\"pmsg\">{}</span></span>",
                Esc(&p.message)
            ));
        }
        None if t.state == TaskState::Succeeded => {
            h.raw("<span class=\"progress\"><progress max=\"100\" value=\"100\">100%</progress></span>");
        }
        None if matches!(t.state, TaskState::Running | TaskState::CancelRequested) => {
            h.raw("<span class=\"progress\"><progress aria-label=\"running\"></progress></span>");
        }
        None => {
            h.raw("<span class=\"muted\">—</span>");
        }
    }
}

/// Elapsed time of a task: run time once started, else time queued.
fn elapsed(t: &TaskRecord, now: i64) -> String {
    match (t.started_at, t.finished_at) {
        (Some(s), Some(f)) => span_ms(f - s),
        (Some(s), None) => span_ms(now - s),
        (None, Some(f)) => span_ms(f - t.queued_at),
        (None, None) => format!("queued {}", span_ms(now - t.queued_at)),
    }
}

/// [`elapsed`] as an element; while the task has not ended the script keeps
/// it ticking (`data-elapsed`: milliseconds at render time).
fn elapsed_el(h: &mut Html, t: &TaskRecord, now: i64) {
    let text = elapsed(t, now);
    match (t.started_at, t.finished_at) {
        (Some(s), None) => {
            h.fmt(format_args!(
                "<span class=\"elapsed\" data-elapsed=\"{}\">{}</span>",
                (now - s).max(0),
                Esc(&text)
            ));
        }
        (None, None) => {
            h.fmt(format_args!(
                "<span class=\"elapsed\" data-elapsed=\"{}\" data-prefix=\"queued \">{}</span>",
                (now - t.queued_at).max(0),
                Esc(&text)
            ));
        }
        _ => {
            h.text(&text);
        }
    }
}

/// Which columns a task table shows.
#[derive(Clone, Copy)]
pub struct Columns {
    pub run: bool,
    pub key: bool,
}

/// A table of tasks (or a line saying there are none).
pub fn task_table(h: &mut Html, tasks: &[TaskRecord], cols: Columns, now: i64, empty: &str) {
    if tasks.is_empty() {
        h.fmt(format_args!("<p class=\"muted empty\">{}</p>", Esc(empty)));
        return;
    }
    h.raw("<div class=\"scroll\"><table class=\"tasks\"><thead><tr>");
    if cols.key {
        h.raw("<th>key</th>");
    }
    h.raw("<th>task</th><th>plugin</th><th>state</th><th>progress</th><th class=\"wide\">queued</th><th>time</th>");
    if cols.run {
        h.raw("<th class=\"wide\">run</th>");
    }
    h.raw("<th>note</th></tr></thead><tbody>");
    for t in tasks {
        h.fmt(format_args!(
            "<tr data-task=\"{}\" data-state=\"{}\">",
            Esc(&t.id),
            t.state.as_str()
        ));
        if cols.key {
            h.fmt(format_args!(
                "<td>{}</td>",
                Esc(t.spec.key.as_deref().unwrap_or(""))
            ));
        }
        h.raw("<td>");
        task_link(h, &t.id);
        h.fmt(format_args!("</td><td>{}</td><td>", Esc(&t.plugin_name)));
        state_badge(h, t.state.as_str());
        h.raw("</td><td>");
        progress_el(h, t);
        h.raw("</td><td class=\"wide\">");
        time_el(h, Some(t.queued_at));
        h.raw("</td><td>");
        elapsed_el(h, t, now);
        h.raw("</td>");
        if cols.run {
            h.raw("<td class=\"wide\">");
            if let Some(r) = &t.run_id {
                run_link(h, r, None);
            }
            h.raw("</td>");
        }
        h.raw("<td class=\"note\">");
        if let Some(c) = &t.cancel {
            h.fmt(format_args!(
                "canceled by {}: {}",
                Esc(&c.actor),
                Esc(&short(&c.reason, 80))
            ));
        } else if let Some(e) = &t.error {
            h.fmt(format_args!(
                "{}: {}",
                Esc(e.kind.as_str()),
                Esc(&short(&e.message, 80))
            ));
        }
        h.raw("</td></tr>");
    }
    h.raw("</tbody></table></div>");
}

fn short(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(n).collect();
        out.push('…');
        out
    }
}

/// A `<pre>` of guest text, capped at [`MAX_SHOWN_BYTES`].
fn pre_block(h: &mut Html, text: &str, class: &str) {
    let (shown, cut) = cap(text);
    h.fmt(format_args!("<pre class=\"{class}\">{}</pre>", Esc(shown)));
    if cut > 0 {
        h.fmt(format_args!(
            "<p class=\"muted\">… {} more not shown here (the JSON record has all that was kept)</p>",
            Esc(&bytes(cut as u64))
        ));
    }
}

/// The first [`MAX_SHOWN_BYTES`] of `s` (on a char boundary) and how many
/// bytes were left out.
fn cap(s: &str) -> (&str, usize) {
    if s.len() <= MAX_SHOWN_BYTES {
        return (s, 0);
    }
    let mut end = MAX_SHOWN_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    (&s[..end], s.len() - end)
}

fn json_pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

// ---------------------------------------------------------------------
// Overview
// ---------------------------------------------------------------------

/// What the overview shows.
pub struct Overview {
    pub counts: Vec<(TaskState, u64)>,
    /// Guests executing in this process, and waiting for a CPU slot.
    pub running_now: usize,
    pub waiting_for_cpu: usize,
    pub active: Vec<TaskRecord>,
    /// More active tasks than shown.
    pub active_more: bool,
    pub runs: Vec<RunRecord>,
    pub recent: Vec<TaskRecord>,
    pub now: i64,
}

pub fn overview(o: &Overview) -> String {
    let mut h = Html::new();
    let total: u64 = o.counts.iter().map(|(_, n)| n).sum();
    h.raw("<section aria-labelledby=\"counts-h\"><h2 id=\"counts-h\">Tasks by state</h2><ul class=\"counts\">");
    h.fmt(format_args!(
        "<li><a href=\"/tasks\"><span class=\"n\" data-count=\"all\">{total}</span><span class=\"l\">all</span></a></li>"
    ));
    for (s, n) in &o.counts {
        h.fmt(format_args!(
            "<li class=\"s-{0}\"><a href=\"/tasks?state={0}\"><span class=\"n\" data-count=\"{0}\">{n}</span>\
             <span class=\"l\">{1}</span></a></li>",
            s.as_str(),
            s.as_str().replace('_', " ")
        ));
    }
    h.raw("</ul>");
    h.fmt(format_args!(
        "<p class=\"muted\">{} guest(s) executing in this process, {} waiting for a CPU slot.</p></section>",
        o.running_now, o.waiting_for_cpu
    ));
    h.raw("<section aria-labelledby=\"active-h\"><h2 id=\"active-h\">Running now</h2>");
    task_table(
        &mut h,
        &o.active,
        Columns {
            run: true,
            key: false,
        },
        o.now,
        "Nothing is running.",
    );
    if o.active_more {
        h.raw("<p><a href=\"/tasks?state=running\">All running tasks →</a></p>");
    }
    h.raw("</section><section aria-labelledby=\"runs-h\"><h2 id=\"runs-h\">Recent runs</h2>");
    run_table(&mut h, &o.runs, "No runs yet.");
    h.raw("<p><a href=\"/runs\">All runs →</a></p></section>");
    h.raw("<section aria-labelledby=\"recent-h\"><h2 id=\"recent-h\">Recent tasks</h2>");
    task_table(
        &mut h,
        &o.recent,
        Columns {
            run: true,
            key: false,
        },
        o.now,
        "No tasks yet. Submit one with `wasmtask submit` or POST /v1/tasks.",
    );
    h.raw("<p><a href=\"/tasks\">All tasks →</a></p></section>");
    h.into_string()
}

// ---------------------------------------------------------------------
// Task list
// ---------------------------------------------------------------------

/// The task list's filters, as given in the query.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    pub state: Option<TaskState>,
    pub plugin: Option<String>,
    pub run: Option<String>,
    pub limit: usize,
}

impl Filters {
    /// The query string of these filters (without paging), `&`-joined.
    fn query(&self) -> String {
        let mut parts = Vec::new();
        if let Some(s) = self.state {
            parts.push(format!("state={}", s.as_str()));
        }
        if let Some(p) = &self.plugin {
            parts.push(format!("plugin={}", Query(p)));
        }
        if let Some(r) = &self.run {
            parts.push(format!("run={}", Query(r)));
        }
        parts.push(format!("limit={}", self.limit));
        parts.join("&")
    }
}

pub struct TaskList {
    pub filters: Filters,
    pub tasks: Vec<TaskRecord>,
    /// This page is not the newest (a "newer" link makes sense).
    pub has_newer: bool,
    /// There may be older tasks.
    pub has_older: bool,
    pub now: i64,
}

/// The filter form (outside the live fragment, so typing is never lost).
pub fn task_filters(f: &Filters, plugins: &[String]) -> String {
    let mut h = Html::new();
    h.raw("<form class=\"filters\" method=\"get\" action=\"/tasks\"><label>state <select name=\"state\"><option value=\"\">any</option>");
    for s in TaskState::ALL {
        let sel = if f.state == Some(s) { " selected" } else { "" };
        h.fmt(format_args!(
            "<option value=\"{0}\"{sel}>{1}</option>",
            s.as_str(),
            s.as_str().replace('_', " ")
        ));
    }
    h.raw("</select></label>");
    h.fmt(format_args!(
        "<label>plugin <input name=\"plugin\" list=\"plugin-names\" value=\"{}\" size=\"14\"></label>",
        Esc(f.plugin.as_deref().unwrap_or(""))
    ));
    h.raw("<datalist id=\"plugin-names\">");
    for p in plugins {
        h.fmt(format_args!("<option value=\"{}\">", Esc(p)));
    }
    h.raw("</datalist>");
    h.fmt(format_args!(
        "<label>run <input name=\"run\" value=\"{}\" size=\"30\" placeholder=\"r_…\"></label>",
        Esc(f.run.as_deref().unwrap_or(""))
    ));
    h.raw("<label>per page <select name=\"limit\">");
    for n in [20, 50, 100, 200] {
        let sel = if f.limit == n { " selected" } else { "" };
        h.fmt(format_args!("<option{sel}>{n}</option>"));
    }
    h.raw("</select></label><button type=\"submit\">Filter</button> <a href=\"/tasks\">clear</a></form>");
    h.into_string()
}

pub fn task_list(l: &TaskList) -> String {
    let mut h = Html::new();
    let q = l.filters.query();
    h.fmt(format_args!(
        "<div class=\"list\" data-count=\"{}\">",
        l.tasks.len()
    ));
    task_table(
        &mut h,
        &l.tasks,
        Columns {
            run: true,
            key: false,
        },
        l.now,
        "No task matches these filters.",
    );
    h.raw("<nav class=\"pager\" aria-label=\"pages\">");
    if l.has_newer {
        h.fmt(format_args!("<a href=\"/tasks?{}\">« newest</a>", Esc(&q)));
        if let Some(first) = l.tasks.first() {
            h.fmt(format_args!(
                "<a rel=\"prev\" href=\"/tasks?{}&amp;before={}\">‹ newer</a>",
                Esc(&q),
                Query(&first.id)
            ));
        }
    }
    if l.has_older
        && let Some(last) = l.tasks.last()
    {
        h.fmt(format_args!(
            "<a rel=\"next\" href=\"/tasks?{}&amp;cursor={}\">older ›</a>",
            Esc(&q),
            Query(&last.id)
        ));
    }
    h.raw("</nav></div>");
    h.into_string()
}

// ---------------------------------------------------------------------
// Runs
// ---------------------------------------------------------------------

fn run_table(h: &mut Html, runs: &[RunRecord], empty: &str) {
    if runs.is_empty() {
        h.fmt(format_args!("<p class=\"muted empty\">{}</p>", Esc(empty)));
        return;
    }
    h.raw(
        "<div class=\"scroll\"><table class=\"runs\"><thead><tr><th>run</th><th>state</th>\
           <th>created</th><th class=\"wide\">finished</th><th>note</th></tr></thead><tbody>",
    );
    for r in runs {
        h.fmt(format_args!(
            "<tr data-run=\"{}\" data-state=\"{}\"><td>",
            Esc(&r.id),
            r.state.as_str()
        ));
        run_link(h, &r.id, r.name.as_deref());
        h.raw("</td><td>");
        state_badge(h, r.state.as_str());
        h.raw("</td><td>");
        time_el(h, Some(r.created_at));
        h.raw("</td><td class=\"wide\">");
        time_el(h, r.finished_at);
        h.raw("</td><td class=\"note\">");
        if let Some(a) = &r.abort {
            h.fmt(format_args!(
                "aborted by {}: {}",
                Esc(&a.actor),
                Esc(&short(&a.reason, 80))
            ));
        } else if r.fail_fast {
            h.raw("fail-fast");
        }
        h.raw("</td></tr>");
    }
    h.raw("</tbody></table></div>");
}

pub struct RunList {
    pub runs: Vec<RunRecord>,
    pub limit: usize,
    pub has_older: bool,
    pub paged: bool,
}

pub fn run_list(l: &RunList) -> String {
    let mut h = Html::new();
    run_table(&mut h, &l.runs, "No runs yet.");
    h.raw("<nav class=\"pager\" aria-label=\"pages\">");
    if l.paged {
        h.fmt(format_args!(
            "<a href=\"/runs?limit={}\">« newest</a>",
            l.limit
        ));
    }
    if l.has_older
        && let Some(last) = l.runs.last()
    {
        h.fmt(format_args!(
            "<a rel=\"next\" href=\"/runs?limit={}&amp;cursor={}\">older ›</a>",
            l.limit,
            Query(&last.id)
        ));
    }
    h.raw("</nav>");
    h.into_string()
}

/// A run's record and its tasks (the live part of the run page).
pub fn run_detail(v: &RunView, now: i64) -> String {
    let r = &v.run;
    let mut h = Html::new();
    h.fmt(format_args!(
        "<div class=\"run\" data-state=\"{}\" data-terminal=\"{}\">",
        r.state.as_str(),
        r.state.is_terminal()
    ));
    h.raw("<dl class=\"facts\"><dt>state</dt><dd>");
    state_badge(&mut h, r.state.as_str());
    h.raw("</dd><dt>name</dt><dd>");
    h.text(r.name.as_deref().unwrap_or("—"));
    h.fmt(format_args!(
        "</dd><dt>fail-fast</dt><dd>{}</dd><dt>created</dt><dd>",
        if r.fail_fast { "yes" } else { "no" }
    ));
    time_el(&mut h, Some(r.created_at));
    h.raw("</dd><dt>finished</dt><dd>");
    time_el(&mut h, r.finished_at);
    if let Some(f) = r.finished_at {
        h.fmt(format_args!(
            " <span class=\"muted\">after {}</span>",
            Esc(&span_ms(f - r.created_at))
        ));
    }
    h.raw("</dd>");
    if let Some(a) = &r.abort {
        h.raw("<dt>abort</dt><dd class=\"abort-record\">by <b>");
        h.text(&a.actor);
        h.raw("</b>: <span class=\"reason\">");
        h.text(&a.reason);
        h.raw("</span> at ");
        time_el(&mut h, Some(a.requested_at));
        h.raw("</dd>");
    }
    let mut counts: Vec<(TaskState, usize)> = Vec::new();
    for s in TaskState::ALL {
        let n = v.tasks.iter().filter(|t| t.state == s).count();
        if n > 0 {
            counts.push((s, n));
        }
    }
    h.fmt(format_args!("<dt>tasks</dt><dd>{} ", v.tasks.len()));
    for (s, n) in counts {
        h.fmt(format_args!(
            "<span class=\"state s-{0}\">{n} {1}</span> ",
            s.as_str(),
            s.as_str().replace('_', " ")
        ));
    }
    h.raw("</dd></dl><h2>Tasks</h2>");
    task_table(
        &mut h,
        &v.tasks,
        Columns {
            run: false,
            key: true,
        },
        now,
        "This run has no tasks.",
    );
    h.raw("</div>");
    h.into_string()
}

// ---------------------------------------------------------------------
// Task detail
// ---------------------------------------------------------------------

/// The task's record (the live part of the task page). `cancel_failed` is
/// the reason of a `task.cancel_failed` event newer than the last cancel
/// request, if any.
pub fn task_detail(t: &TaskRecord, cancel_failed: Option<&str>, now: i64) -> String {
    let mut h = Html::new();
    h.fmt(format_args!(
        "<div class=\"task\" data-state=\"{}\" data-terminal=\"{}\">",
        t.state.as_str(),
        t.state.is_terminal()
    ));
    if let Some(why) = cancel_failed
        && !t.state.is_terminal()
    {
        h.raw("<p class=\"warn\" role=\"alert\" id=\"cancel-failed\">The cancel could not be delivered: ");
        h.text(why);
        h.raw(" The request is recorded; retrying is safe.</p>");
    }
    h.raw("<div class=\"grid\"><section><h2>State</h2><dl class=\"facts\"><dt>state</dt><dd id=\"task-state\">");
    state_badge(&mut h, t.state.as_str());
    h.raw("</dd><dt>progress</dt><dd>");
    progress_el(&mut h, t);
    h.raw("</dd><dt>plugin</dt><dd>");
    h.fmt(format_args!(
        "<a href=\"/tasks?plugin={}\">{}</a> <span class=\"muted\">{} · {}</span>",
        Query(&t.plugin_name),
        Esc(&t.plugin_name),
        t.plugin_kind.as_str(),
        Esc(&short(&t.plugin_id, 19))
    ));
    h.raw("</dd>");
    if let Some(r) = &t.run_id {
        h.raw("<dt>run</dt><dd>");
        run_link(&mut h, r, None);
        if let Some(k) = &t.spec.key {
            h.fmt(format_args!(" <span class=\"muted\">key</span> {}", Esc(k)));
        }
        if !t.spec.needs.is_empty() {
            h.fmt(format_args!(
                " <span class=\"muted\">needs</span> {}",
                Esc(&t.spec.needs.join(", "))
            ));
        }
        h.raw("</dd>");
    }
    h.fmt(format_args!(
        "<dt>attempt</dt><dd>{} of {}</dd>",
        t.attempt, t.max_attempts
    ));
    if !t.spec.locks.is_empty() {
        h.fmt(format_args!(
            "<dt>locks</dt><dd>{}</dd>",
            Esc(&t.spec.locks.join(", "))
        ));
    }
    if let Some(code) = t.exit_code {
        h.fmt(format_args!("<dt>exit code</dt><dd>{code}</dd>"));
    }
    h.fmt(format_args!(
        "<dt>peak memory</dt><dd>{}</dd>",
        Esc(&bytes(t.usage.peak_memory_bytes))
    ));
    if let Some(f) = t.usage.fuel_consumed {
        h.fmt(format_args!("<dt>fuel</dt><dd>{f}</dd>"));
    }
    h.raw("</dl></section>");

    h.raw("<section><h2>Timings</h2><dl class=\"facts\"><dt>queued</dt><dd>");
    time_el(&mut h, Some(t.queued_at));
    h.raw("</dd><dt>started</dt><dd>");
    time_el(&mut h, t.started_at);
    if let Some(s) = t.started_at {
        h.fmt(format_args!(
            " <span class=\"muted\">waited {}</span>",
            Esc(&span_ms(s - t.queued_at))
        ));
    }
    h.raw("</dd><dt>cancel requested</dt><dd>");
    time_el(&mut h, t.cancel_requested_at);
    h.raw("</dd><dt>finished</dt><dd>");
    time_el(&mut h, t.finished_at);
    h.fmt(format_args!(
        "</dd><dt>{}</dt><dd>",
        match (t.started_at, t.finished_at) {
            (_, Some(_)) => "took",
            (Some(_), None) => "running for",
            (None, None) => "waiting for",
        }
    ));
    elapsed_el(&mut h, t, now);
    h.raw("</dd>");
    let limits = &t.spec.limits;
    if let Some(ms) = limits.timeout_ms {
        h.fmt(format_args!(
            "<dt>timeout</dt><dd>{}</dd>",
            Esc(&span_ms(i64::try_from(ms).unwrap_or(i64::MAX)))
        ));
    }
    if let Some(g) = t.spec.grace_ms {
        h.fmt(format_args!(
            "<dt>default grace</dt><dd>{}</dd>",
            Esc(&span_ms(i64::try_from(g).unwrap_or(i64::MAX)))
        ));
    }
    h.raw("</dl></section>");

    h.raw("<section id=\"cancel-record\"><h2>Cancel</h2>");
    match &t.cancel {
        None => {
            h.raw("<p class=\"muted\">No cancel was requested.</p>");
        }
        Some(c) => {
            h.raw("<dl class=\"facts\"><dt>by</dt><dd class=\"actor\">");
            h.text(&c.actor);
            h.raw("</dd><dt>reason</dt><dd class=\"reason\">");
            h.text(&c.reason);
            h.fmt(format_args!(
                "</dd><dt>grace</dt><dd>{}</dd><dt>requested</dt><dd>",
                Esc(&span_ms(i64::try_from(c.grace_ms).unwrap_or(i64::MAX)))
            ));
            time_el(&mut h, Some(c.requested_at));
            h.raw("</dd><dt>stopped</dt><dd>");
            time_el(&mut h, c.stopped_at);
            h.raw("</dd><dt>how</dt><dd class=\"how\">");
            let how = match (c.stopped_at.is_some(), c.acknowledged, c.forced) {
                (false, _, _) if t.state.is_terminal() => "ended before the cancel took effect",
                (false, _, _) => "stopping…",
                (true, true, _) => "acknowledged: the guest stopped by itself",
                (true, false, true) => "forced: the host stopped the guest",
                (true, false, false) => "stopped before it started",
            };
            h.text(how);
            h.raw("</dd><dt>request → stop</dt><dd class=\"latency\">");
            match c.latency_us {
                Some(us) => h.text(&micros(us)),
                None => h.raw("<span class=\"muted\">—</span>"),
            };
            h.raw("</dd></dl>");
        }
    }
    h.raw("</section></div>");

    if let Some(e) = &t.error {
        h.raw("<section><h2>Error</h2><p class=\"error\"><b>");
        h.text(e.kind.as_str());
        if let Some(d) = &e.detail {
            h.raw(" (");
            h.text(d);
            h.raw(")");
        }
        h.raw("</b>: ");
        h.text(&e.message);
        h.raw("</p></section>");
    }

    h.raw("<section><h2>Output</h2>");
    match &t.output {
        Some(v) => pre_block(&mut h, &json_pretty(v), "output"),
        None => {
            h.raw("<p class=\"muted\">No output.</p>");
        }
    }
    if let Some(p) = &t.partial_output {
        h.raw("<h3>Partial output (latest checkpoint)</h3>");
        pre_block(&mut h, &json_pretty(p), "partial");
    }
    h.raw("</section>");

    for (name, cap) in [("stdout", &t.stdout), ("stderr", &t.stderr)] {
        h.fmt(format_args!("<section><h2>{name}"));
        h.fmt(format_args!(
            " <span class=\"muted\">{}{}</span></h2>",
            Esc(&bytes(cap.total_bytes)),
            if cap.truncated { ", truncated" } else { "" }
        ));
        if cap.data.is_empty() {
            h.raw("<p class=\"muted\">Nothing written.</p>");
        } else {
            pre_block(&mut h, &String::from_utf8_lossy(&cap.data), name);
        }
        h.raw("</section>");
    }

    h.raw("<details><summary>Spec</summary>");
    let spec = serde_json::to_value(&t.spec).unwrap_or(Value::Null);
    pre_block(&mut h, &json_pretty(&spec), "spec");
    h.fmt(format_args!(
        "<p><a href=\"/v1/tasks/{0}\">JSON record</a> · <a href=\"/v1/tasks/{0}/events\">events as JSON</a></p></details>",
        Esc(&t.id)
    ));
    h.raw("</div>");
    h.into_string()
}

/// Rows of an event trail. A run of consecutive progress and checkpoint
/// events of one task is folded into one row showing the latest progress (a
/// guest may report progress and checkpoints thousands of times).
pub fn trail_rows(events: &[Event], with_task: bool) -> String {
    let noisy = |e: &Event| matches!(e.kind, EventKind::TaskProgress | EventKind::TaskCheckpoint);
    let mut h = Html::new();
    let mut i = 0;
    while i < events.len() {
        let e = &events[i];
        let mut j = i + 1;
        if noisy(e) {
            while j < events.len() && noisy(&events[j]) && events[j].task_id == e.task_id {
                j += 1;
            }
        }
        let group = &events[i..j];
        let last_seq = group.last().map_or(e.seq, |l| l.seq);
        // The row speaks for the latest progress of the group, if any.
        let shown = group
            .iter()
            .rev()
            .find(|x| x.kind == EventKind::TaskProgress)
            .unwrap_or(&events[j - 1]);
        let kind = shown.kind.as_str();
        let class = kind.replace('.', "-");
        h.fmt(format_args!(
            "<tr data-seq=\"{last_seq}\" data-kind=\"{kind}\" class=\"{}\"><td class=\"seq\">{}</td><td>",
            Esc(&class),
            shown.seq
        ));
        time_el(&mut h, Some(shown.at));
        h.raw("</td>");
        if with_task {
            h.raw("<td>");
            if let Some(t) = &shown.task_id {
                task_link(&mut h, t);
            }
            h.raw("</td>");
        }
        h.fmt(format_args!(
            "<td class=\"kind\">{kind}</td><td class=\"summary\">"
        ));
        h.text(&crate::cli::event_summary(shown));
        if noisy(e) {
            // The script folds a live row into the one before it, adding
            // these counts (data-progress, data-checkpoints).
            let progress = group
                .iter()
                .filter(|x| x.kind == EventKind::TaskProgress)
                .count();
            let checkpoints = group.len() - progress;
            h.fmt(format_args!(
                " <span class=\"muted fold\" data-progress=\"{progress}\" data-checkpoints=\"{checkpoints}\">"
            ));
            if group.len() > 1 {
                h.fmt(format_args!(
                    "({progress} progress report(s), {checkpoints} checkpoint(s))"
                ));
            }
            h.raw("</span>");
        }
        h.raw("</td></tr>");
        i = j;
    }
    h.into_string()
}

/// The trail table around its first rows. `live` adds rows after it.
pub fn trail(events: &[Event], with_task: bool, omitted: bool, url: &str, after: i64) -> String {
    let mut h = Html::new();
    h.raw("<section class=\"trail\"><h2>Events</h2><div class=\"scroll trail-box\"><table class=\"events\"><thead><tr><th>seq</th><th>time</th>");
    if with_task {
        h.raw("<th>task</th>");
    }
    h.fmt(format_args!(
        "<th>kind</th><th>what</th></tr></thead><tbody id=\"trail\" data-url=\"{}\" data-after=\"{after}\">",
        Esc(url)
    ));
    h.raw(&trail_rows(events, with_task));
    if omitted {
        h.fmt(format_args!(
            "<tr class=\"omitted\"><td colspan=\"{}\">… later events are not shown here; see the JSON events. New events appear below.</td></tr>",
            if with_task { 5 } else { 4 }
        ));
    }
    h.raw("</tbody></table></div></section>");
    h.into_string()
}

/// The action forms of a task page.
pub fn task_actions(t: &TaskRecord) -> String {
    let mut h = Html::new();
    let dis = if t.state.is_terminal() {
        " disabled"
    } else {
        ""
    };
    let force_dis = if t.state == TaskState::CancelRequested {
        ""
    } else {
        " disabled"
    };
    h.fmt(format_args!(
        "<form id=\"cancel-form\" class=\"actions\" data-task=\"{}\">\
         <label>reason <input id=\"cancel-reason\" name=\"reason\" maxlength=\"1024\" \
         placeholder=\"why (recorded)\"{dis}></label>\
         <label>grace (s) <input id=\"cancel-grace\" name=\"grace\" type=\"number\" min=\"0\" \
         step=\"0.1\" placeholder=\"task default\" size=\"6\"{dis}></label>\
         <button type=\"submit\" id=\"cancel-btn\" class=\"danger\"{dis}>Cancel task</button>\
         <button type=\"button\" id=\"force-btn\" class=\"danger\" \
         title=\"Stop it now, without waiting for the grace to end\"{force_dis}>Force stop now</button>\
         <output id=\"action-result\" class=\"result\" role=\"status\" aria-live=\"polite\"></output>\
         </form>",
        Esc(&t.id)
    ));
    h.into_string()
}

/// The action form of a run page.
pub fn run_actions(r: &RunRecord) -> String {
    let mut h = Html::new();
    let dis = if r.state.is_terminal() {
        " disabled"
    } else {
        ""
    };
    h.fmt(format_args!(
        "<form id=\"abort-form\" class=\"actions\" data-run=\"{}\">\
         <label>reason <input id=\"abort-reason\" name=\"reason\" maxlength=\"1024\" \
         placeholder=\"why (recorded)\"{dis}></label>\
         <label>grace (s) <input id=\"abort-grace\" name=\"grace\" type=\"number\" min=\"0\" \
         step=\"0.1\" placeholder=\"tasks' default\" size=\"6\"{dis}></label>\
         <button type=\"submit\" id=\"abort-btn\" class=\"danger\"{dis}>Abort run</button>\
         <output id=\"action-result\" class=\"result\" role=\"status\" aria-live=\"polite\"></output>\
         </form>",
        Esc(&r.id)
    ));
    h.into_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(span_ms(340), "340ms");
        assert_eq!(span_ms(1250), "1.2s");
        assert_eq!(span_ms(125_000), "2m 5s");
        assert_eq!(micros(250), "250 µs");
        assert_eq!(micros(1500), "1.50 ms");
    }

    #[test]
    fn long_text_is_capped_on_a_char_boundary() {
        let s = "é".repeat(MAX_SHOWN_BYTES);
        let (shown, cut) = cap(&s);
        assert!(shown.len() <= MAX_SHOWN_BYTES);
        assert_eq!(shown.len() + cut, s.len());
        assert!(s.is_char_boundary(shown.len()));
    }
}
