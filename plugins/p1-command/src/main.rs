//! Fixture: an ordinary `fn main` built for `wasm32-wasip1`, so the host sees
//! a WASI preview-1 *core module* (`_start`), not a component.
//!
//! It prints `p1 arg: <a>` per argument, `p1 stdin: <n> bytes` after reading
//! stdin to the end, and `p1 cwd: <dir>`; with `$WRITE_TO` set it writes
//! `written by p1\n` to that path (reporting an error on stderr and exiting 2
//! if it cannot); it exits with `$EXIT_CODE` (default 0). With `$SPIN` set it
//! first spins forever without calling the host (only a forced stop — an
//! epoch trap — ends it), before reading stdin. Unlike
//! `wasm32-wasip2`, preview-1's `proc_exit` carries the exact code.

use std::io::Read;

fn main() {
    if std::env::var_os("SPIN").is_some() {
        let mut n = 0u64;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
    for arg in std::env::args().skip(1) {
        println!("p1 arg: {arg}");
    }
    let mut input = Vec::new();
    let n = std::io::stdin().read_to_end(&mut input).unwrap_or(0);
    println!("p1 stdin: {n} bytes");
    match std::env::current_dir() {
        Ok(dir) => println!("p1 cwd: {}", dir.display()),
        Err(e) => println!("p1 cwd: unknown ({e})"),
    }
    if let Ok(path) = std::env::var("WRITE_TO")
        && let Err(e) = std::fs::write(&path, "written by p1\n")
    {
        eprintln!("p1: cannot write {path}: {e}");
        std::process::exit(2);
    }
    let code = std::env::var("EXIT_CODE")
        .ok()
        .and_then(|c| c.parse::<i32>().ok())
        .unwrap_or(0);
    std::process::exit(code);
}
