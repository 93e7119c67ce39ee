//! The CPU-bound work of `cpu-burn`. The benchmark's native baseline and an
//! integration test include this very file, so the wasm guest and the native
//! code run the same source.

/// Loop-heavy work: a xorshift generator folded into a checksum. One tight
/// loop without calls, so epoch and fuel checks sit only on its back edge.
pub fn loops(iterations: u64) -> u64 {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut acc: u64 = 0;
    for i in 0..iterations {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        acc = acc.wrapping_add(x ^ i);
    }
    acc
}

/// Call-heavy work: naive recursive Fibonacci, almost all function entries
/// (where wasm also checks epochs and fuel).
#[inline(never)]
pub fn fib(n: u64) -> u64 {
    if n < 2 {
        n
    } else {
        fib(n - 1).wrapping_add(fib(n - 2))
    }
}

/// Words formatted, sorted and counted per round of [`mixed`].
const WORDS: usize = 1000;

/// Mixed work, as ordinary plugin code has it: each round formats 1,000
/// pseudo-random words, sorts and deduplicates them, and totals their
/// lengths by their first two letters in a `BTreeMap`. Allocation,
/// formatting, string comparisons and tree walks: calls and loops of every
/// size, none of them written for the benchmark.
pub fn mixed(rounds: u64) -> u64 {
    use std::collections::BTreeMap;
    use std::fmt::Write as _;
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut acc: u64 = 0;
    for _ in 0..rounds {
        let mut words: Vec<String> = Vec::with_capacity(WORDS);
        for _ in 0..WORDS {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut word = String::new();
            // At least three ASCII characters ("0-0"), so `[..2]` below is
            // on a character boundary.
            let _ = write!(word, "{:x}-{}", x >> 40, x % 1000);
            words.push(word);
        }
        words.sort_unstable();
        words.dedup();
        let mut lengths: BTreeMap<&str, u64> = BTreeMap::new();
        for word in &words {
            *lengths.entry(&word[..2]).or_default() += word.len() as u64;
        }
        for (prefix, total) in &lengths {
            let first = u64::from(prefix.as_bytes()[0]);
            acc = acc.wrapping_mul(31).wrapping_add(total ^ first);
        }
    }
    acc
}

/// Runs `what` (`loops`, `calls` or `mixed`) of size `n`.
pub fn run(what: &str, n: u64) -> Option<u64> {
    match what {
        "loops" => Some(loops(n)),
        "calls" => Some(fib(n)),
        "mixed" => Some(mixed(n)),
        _ => None,
    }
}
