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

/// Runs `what` (`loops` or `calls`) of size `n`.
pub fn run(what: &str, n: u64) -> Option<u64> {
    match what {
        "loops" => Some(loops(n)),
        "calls" => Some(fib(n)),
        _ => None,
    }
}
