//! Task ids (`t_`) and run ids (`r_`): the prefix followed by 26 characters
//! of lowercase Crockford base32.
//!
//! The 128 encoded bits are 48 bits of Unix milliseconds, then 80 random bits
//! (the ULID layout), so ids sort by creation time, are URL-safe, and two
//! processes creating ids at once do not collide. Within one process ids are
//! also strictly increasing: an id created in the same millisecond as (or,
//! after a clock step back, earlier than) the previous one is the previous one
//! plus one. Ids are unique, not secret: the random bits come from std's
//! per-process random SipHash keys, not a cryptographic generator.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::model::now_millis;

/// Lowercase Crockford base32: no `i`, `l`, `o`, `u`; ASCII order matches
/// value order, so ids sort as their numbers do.
const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// The last id value handed out by this process.
static LAST: Mutex<u128> = Mutex::new(0);
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A new task id, e.g. `t_01jb3k2m9x4q7r8s6t5v0w1y2z`.
pub fn new_task_id() -> String {
    format!("t_{}", encode(next_value()))
}

/// A new run id, e.g. `r_01jb3k2m9x4q7r8s6t5v0w1y2z` (same scheme as task ids).
pub fn new_run_id() -> String {
    format!("r_{}", encode(next_value()))
}

/// Whether `s` has the shape of a run id ([`new_run_id`]): `r_` and 26
/// characters of the alphabet.
pub fn is_run_id(s: &str) -> bool {
    s.strip_prefix("r_")
        .is_some_and(|rest| rest.len() == 26 && rest.bytes().all(|b| ALPHABET.contains(&b)))
}

fn next_value() -> u128 {
    let millis = u128::from(u64::try_from(now_millis()).unwrap_or(0) & 0xFFFF_FFFF_FFFF);
    let mut value = (millis << 80) | random_80();
    let mut last = LAST.lock().unwrap_or_else(PoisonError::into_inner);
    if value <= *last {
        value = last.wrapping_add(1);
    }
    *last = value;
    value
}

/// 80 bits that differ from call to call and from process to process.
fn random_80() -> u128 {
    // Each `RandomState::new()` has fresh keys (seeded from the OS once per
    // thread, then stepped), and the counter makes every input distinct.
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let state = RandomState::new();
    let high = u128::from(state.hash_one((n, 0u8)) & 0xFFFF);
    let low = u128::from(state.hash_one((n, 1u8)));
    (high << 64) | low
}

fn encode(mut value: u128) -> String {
    let mut out = [b'0'; 26];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(value & 31) as usize];
        value >>= 5;
    }
    out.iter().map(|&b| char::from(b)).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_url_safe_sorted_and_unique() {
        let ids: Vec<String> = (0..10_000).map(|_| new_task_id()).collect();
        for id in &ids {
            assert_eq!(id.len(), 28, "{id}");
            assert!(id.starts_with("t_"));
            assert!(id[2..].bytes().all(|b| ALPHABET.contains(&b)), "{id}");
        }
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, ids, "ids must be unique and increasing");
    }

    #[test]
    fn run_ids_are_recognised_by_their_shape() {
        assert!(is_run_id(&new_run_id()));
        assert!(!is_run_id(&new_task_id()));
        assert!(!is_run_id("r_backup"));
        assert!(!is_run_id(&format!("{}x", new_run_id())));
        assert!(
            !is_run_id("r_0123456789abcdefghjkmnpqrI"),
            "not in the alphabet"
        );
    }

    #[test]
    fn ids_start_with_the_creation_time() {
        let before = now_millis();
        let id = new_task_id();
        let after = now_millis();
        let mut value: u128 = 0;
        for b in id[2..].bytes() {
            let digit = ALPHABET.iter().position(|&a| a == b).unwrap_or_default();
            value = (value << 5) | digit as u128;
        }
        let millis = i64::try_from(value >> 80).unwrap_or_default();
        assert!(
            before <= millis && millis <= after,
            "{before} <= {millis} <= {after}"
        );
    }
}
