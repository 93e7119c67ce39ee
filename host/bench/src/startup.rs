//! Part 4: start-up. Instantiation of a cached, pre-linked component (the
//! runtime's own store set-up and `InstancePre::instantiate`, timed by
//! `Runtime::probe_instantiate`), with the pooling allocator and on demand;
//! and the first compile of each built-in component, per MB.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use wasmtask_runtime::{Runtime, RuntimeConfig};

use crate::Scale;
use crate::stats::{dur, summarize};

async fn instantiations(pooling: bool, n: usize) -> anyhow::Result<(bool, crate::stats::Summary)> {
    let rt = Runtime::new(RuntimeConfig {
        pooling,
        ..RuntimeConfig::default()
    })?;
    let plugin = crate::load(&rt, "hello").await?;
    // Warm up: first touches of the pool's pages, the allocator.
    for _ in 0..(n / 10).max(5) {
        rt.probe_instantiate(&plugin)
            .await
            .map_err(anyhow::Error::msg)?;
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(
            rt.probe_instantiate(&plugin)
                .await
                .map_err(anyhow::Error::msg)?,
        );
    }
    Ok((rt.pooling(), summarize(v)))
}

pub async fn part4(scale: &Scale) -> anyhow::Result<String> {
    let mut md = String::new();
    writeln!(md, "### 4. Start-up\n")?;
    writeln!(
        md,
        "Instantiation of `hello` (a task component, {} KiB) from its pre-linked form, {} times \
         after a warm-up: a fresh store with the task's sandbox, limiter and cancel state, then \
         `instantiate_async` (no call).\n",
        wasmtask::builtin::find("hello").map_or(0, |p| p.bytes.len() / 1024),
        scale.instantiations
    )?;
    writeln!(md, "| allocator | p50 | p99 | max |")?;
    writeln!(md, "|---|---:|---:|---:|")?;
    for pooling in [true, false] {
        let (used, s) = instantiations(pooling, scale.instantiations).await?;
        let label = match (pooling, used) {
            (true, true) => "pooling (as shipped)",
            (true, false) => "pooling refused by the machine: on demand",
            _ => "on demand",
        };
        writeln!(
            md,
            "| {label} | {} | {} | {} |",
            dur(s.p50),
            dur(s.p99),
            dur(s.max)
        )?;
    }

    // First compile: a fresh runtime per component, no cache; as shipped,
    // then with the compiler's inlining (opt-in).
    for inlining in [false, true] {
        let mut rows = Vec::new();
        for p in wasmtask::builtin::PLUGINS {
            let bytes = p.bytes.to_vec();
            let took = tokio::task::spawn_blocking(move || -> anyhow::Result<Duration> {
                let rt = Runtime::new(RuntimeConfig {
                    compiler_inlining: inlining,
                    ..RuntimeConfig::default()
                })?;
                let t0 = Instant::now();
                rt.load(&bytes)?;
                Ok(t0.elapsed())
            })
            .await??;
            rows.push((p.name, p.bytes.len(), took));
            if scale.quick && rows.len() >= 2 {
                break;
            }
        }
        let total_bytes: usize = rows.iter().map(|r| r.1).sum();
        let total_time: Duration = rows.iter().map(|r| r.2).sum();
        let mb = total_bytes as f64 / (1024.0 * 1024.0);
        let what = if inlining {
            "With the compiler's inlining on (opt-in, `runtime.compiler_inlining`), the same"
        } else {
            "First compile (cranelift, parallel compilation on, then pre-linking), each component \
             in a fresh runtime without the compile cache:"
        };
        writeln!(
            md,
            "\n{what} {} components, {:.2} MiB in {} — **{:.0} ms per MiB**. Largest: {}.{}",
            rows.len(),
            mb,
            dur(total_time),
            total_time.as_secs_f64() * 1e3 / mb.max(1e-9),
            rows.iter()
                .max_by_key(|r| r.1)
                .map(|r| format!("`{}` ({} KiB) in {}", r.0, r.1 / 1024, dur(r.2)))
                .unwrap_or_default(),
            if inlining { "\n" } else { "" }
        )?;
    }
    Ok(md)
}
