//! Part 6: memory per parked task. `n` `sleeper` guests are started and
//! left in a WASI sleep; the process's resident set (VmRSS) is read before
//! (after a warm-up task, so code and compiled plugin pages are not
//! counted) and once all of them run. Everything a parked task costs is in
//! the difference: its store, instance, fiber stack pages touched, the
//! sandbox, the driver task — and the pages of its linear memory it touched.
//! It runs in a fresh process of the bench binary (see `main.rs`), so no
//! heap freed by the other parts hides what the parked tasks allocate.

use std::fmt::Write as _;
use std::time::Duration;

use wasmtask_runtime::{Runtime, RuntimeConfig};

use crate::Scale;
use crate::cancel::{Guests, Live, launch, launch_many, stop_all};
use crate::native::Work;
use crate::stats::count;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Memory mappings of this process (lines of `/proc/self/maps`): the kernel
/// caps them per process (`vm.max_map_count`).
fn mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .map(|m| m.lines().count())
        .unwrap_or(0)
}

pub async fn part6(scale: &Scale) -> anyhow::Result<String> {
    let mut md = String::new();
    writeln!(md, "### 6. Memory per parked task\n")?;
    writeln!(
        md,
        "`n` `sleeper` guests started and parked in a WASI sleep; resident set of the process \
         (VmRSS) before and with all of them parked, divided by `n`. This includes each \
         guest's touched linear-memory pages (the guest's declared linear memory is shown \
         beside it). Memory mappings (`/proc/self/maps`) are counted the same way: the kernel \
         caps them per process (`vm.max_map_count`, {} here).\n",
        wasmtask_runtime::max_map_count().map_or("unknown".to_owned(), |n| count(n as f64))
    )?;
    writeln!(
        md,
        "| parked tasks | allocator | RSS before | RSS parked | per task | guest linear memory | mappings per task |"
    )?;
    writeln!(md, "|---:|---|---:|---:|---:|---:|---:|")?;
    for &n in &scale.parked {
        let rt = Runtime::new(RuntimeConfig {
            max_concurrent: n + 16,
            ..RuntimeConfig::default()
        })?;
        if rt.config().max_concurrent < n + 16 {
            // The runtime lowered it to what the kernel's map cap allows.
            writeln!(
                md,
                "| {} | – | not run: the runtime admits {} tasks at once under this kernel's \
                 `vm.max_map_count`; raise it to run more | | | | |",
                count(n as f64),
                count(rt.config().max_concurrent as f64)
            )?;
            continue;
        }
        let g = Guests::load(&rt).await?;
        // Warm-up: one guest started and stopped; its report tells the
        // guest's linear memory size.
        let w = launch(&rt, &g, Work::Sleep).await?;
        w.cancel.cancel("bench", Duration::ZERO);
        let linear = w.done.await.map(|(_, r)| r.peak_memory).unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (before, maps_before) = (rss_kib(), mappings());
        let lives: Vec<Live> = launch_many(&rt, &g, Work::Sleep, n).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (parked, maps_parked) = (rss_kib(), mappings());
        stop_all(lives).await;
        let per = parked.saturating_sub(before) as f64 / n as f64;
        writeln!(
            md,
            "| {} | {} | {} MiB | {} MiB | **{per:.1} KiB** | {} KiB | {:.1} |",
            count(n as f64),
            if rt.pooling() { "pooling" } else { "on demand" },
            before / 1024,
            parked / 1024,
            linear / 1024,
            maps_parked.saturating_sub(maps_before) as f64 / n as f64
        )?;
    }
    Ok(md)
}
