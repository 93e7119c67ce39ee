//! Part 6: memory per parked task. `n` `sleeper` guests are started and
//! left in a WASI sleep; the process's resident set (VmRSS) is read before
//! (after a warm-up task, so code and compiled plugin pages are not
//! counted) and once all of them run. Everything a parked task costs is in
//! the difference: its store, instance, fiber stack pages touched, the
//! sandbox, the driver task — and the pages of its linear memory it touched.

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

pub async fn part6(scale: &Scale) -> anyhow::Result<String> {
    let mut md = String::new();
    writeln!(md, "### 6. Memory per parked task\n")?;
    writeln!(
        md,
        "`n` `sleeper` guests started and parked in a WASI sleep; resident set of the process \
         (VmRSS) before and with all of them parked, divided by `n`. This includes each \
         guest's touched linear-memory pages (the guest's declared linear memory is shown \
         beside it).\n"
    )?;
    writeln!(
        md,
        "| parked tasks | allocator | RSS before | RSS parked | per task | guest linear memory |"
    )?;
    writeln!(md, "|---:|---|---:|---:|---:|---:|")?;
    for &n in &scale.parked {
        let rt = Runtime::new(RuntimeConfig {
            max_concurrent: n + 16,
            ..RuntimeConfig::default()
        })?;
        let g = Guests::load(&rt).await?;
        // Warm-up: one guest started and stopped; its report tells the
        // guest's linear memory size.
        let w = launch(&rt, &g, Work::Sleep).await?;
        w.cancel.cancel("bench", Duration::ZERO);
        let linear = w.done.await.map(|(_, r)| r.peak_memory).unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = rss_kib();
        let lives: Vec<Live> = launch_many(&rt, &g, Work::Sleep, n).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let parked = rss_kib();
        stop_all(lives).await;
        let per = parked.saturating_sub(before) as f64 / n as f64;
        writeln!(
            md,
            "| {} | {} | {} MiB | {} MiB | **{per:.1} KiB** | {} KiB |",
            count(n as f64),
            if rt.pooling() { "pooling" } else { "on demand" },
            before / 1024,
            parked / 1024,
            linear / 1024
        )?;
    }
    Ok(md)
}
