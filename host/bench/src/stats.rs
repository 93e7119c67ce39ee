//! Percentiles and the formatting of durations and rates in the tables.

use std::time::Duration;

/// Nearest-rank percentiles of a sample.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub n: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

pub fn summarize(mut v: Vec<Duration>) -> Summary {
    v.sort_unstable();
    let pick = |p: f64| -> Duration {
        if v.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len());
        v[rank - 1]
    };
    Summary {
        n: v.len(),
        p50: pick(0.50),
        p99: pick(0.99),
        max: v.last().copied().unwrap_or_default(),
    }
}

/// How many of `v` took longer than `limit`, with their share: `11 (1.1%)`.
pub fn over(v: &[Duration], limit: Duration) -> String {
    let n = v.iter().filter(|d| **d > limit).count();
    format!("{n} ({:.1}%)", n as f64 * 100.0 / v.len().max(1) as f64)
}

/// `12.3 µs`, `4.56 ms`, `1.23 s`.
pub fn dur(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1_000.0 {
        format!("{us:.1} µs")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

/// `12,345`.
pub fn count(n: f64) -> String {
    let n = n.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// How many times `a` is of `b`, as `×12.3`.
pub fn ratio(a: Duration, b: Duration) -> String {
    if b.is_zero() {
        return "–".to_owned();
    }
    format!("×{:.1}", a.as_secs_f64() / b.as_secs_f64())
}

/// CPU time (user + system) this process has used so far, all threads.
pub fn process_cpu() -> Duration {
    rusage_cpu(libc::RUSAGE_SELF)
}

/// CPU time (user + system) of the reaped children of this process.
pub fn children_cpu() -> Duration {
    rusage_cpu(libc::RUSAGE_CHILDREN)
}

fn rusage_cpu(who: libc::c_int) -> Duration {
    // SAFETY: getrusage writes a `rusage` into the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(who, &mut usage) != 0 {
            return Duration::ZERO;
        }
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let s = summarize(v);
        assert_eq!(s.p50, Duration::from_micros(50));
        assert_eq!(s.p99, Duration::from_micros(99));
        assert_eq!(s.max, Duration::from_micros(100));
        let one = summarize(vec![Duration::from_micros(7)]);
        let us7 = Duration::from_micros(7);
        assert_eq!((one.p50, one.p99, one.max), (us7, us7, us7));
    }

    #[test]
    fn formats() {
        assert_eq!(dur(Duration::from_nanos(12_340)), "12.3 µs");
        assert_eq!(dur(Duration::from_micros(4_560)), "4.56 ms");
        assert_eq!(count(12_345.4), "12,345");
        assert_eq!(count(999.0), "999");
        assert_eq!(
            ratio(Duration::from_millis(3), Duration::from_millis(2)),
            "×1.5"
        );
    }
}
