//! Fixture command: `cpu-burn loops N` runs N iterations of a tight loop,
//! `cpu-burn calls N` computes fib(N) by naive recursion, `cpu-burn mixed N`
//! runs N rounds of formatting, sorting and counting words; each prints the
//! checksum. The benchmark runs the same work natively (see `work.rs`).

use std::process::ExitCode;

mod work;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [what, n] => n.parse::<u64>().ok().and_then(|n| work::run(what, n)),
        _ => None,
    };
    match parsed {
        Some(sum) => {
            println!("{sum}");
            ExitCode::SUCCESS
        }
        None => {
            eprintln!("usage: cpu-burn loops|calls|mixed N");
            ExitCode::from(2)
        }
    }
}
