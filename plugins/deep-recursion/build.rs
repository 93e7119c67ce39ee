//! Gives this fixture a 4 MiB shadow stack (the default is 1 MiB).
//!
//! A wasm32 program has two stacks: wasmtime's native stack for wasm frames
//! (capped by `max_wasm_stack`, 512 KiB by default) and the "shadow stack" in
//! linear memory for locals whose address is taken, like this fixture's
//! `black_box`ed array. Each level costs about the same on both, so with
//! equal sizes whichever is smaller overflows first: the native one traps
//! with "call stack exhausted", the shadow one runs below address 0 and traps
//! as an out-of-bounds memory access. A larger shadow stack makes the
//! recursion hit `max_wasm_stack` first for any host setting up to ~4 MiB,
//! so the fixture always shows a real stack-overflow trap. The cost is 4 MiB
//! of initial linear memory (reserved, touched only as far as it recurses).

fn main() {
    println!("cargo::rustc-link-arg-cdylib=-zstack-size=4194304");
}
