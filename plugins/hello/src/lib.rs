//! Example task: transform a text and count its words and characters.
//!
//! Input `{"text": "...", "op": "upper" | "lower" | "reverse" | "title"}`
//! (`op` defaults to `"upper"`); output `{"text": ..., "words": n, "chars": n}`
//! where the counts are those of the input text (words are separated by
//! whitespace, chars are Unicode scalar values). An unknown `op` is an
//! `invalid-input` error that names it.

use serde::{Deserialize, Serialize};
use wasmtask_guest::{Context, Error, Result};

#[derive(Deserialize)]
struct Input {
    text: String,
    #[serde(default = "default_op")]
    op: String,
}

fn default_op() -> String {
    "upper".to_owned()
}

#[derive(Serialize)]
struct Output {
    text: String,
    words: usize,
    chars: usize,
}

fn run(ctx: &Context, input: Input) -> Result<Output> {
    let text = match input.op.as_str() {
        "upper" => input.text.to_uppercase(),
        "lower" => input.text.to_lowercase(),
        "reverse" => input.text.chars().rev().collect(),
        "title" => title_case(&input.text),
        other => {
            return Err(Error::invalid_input(format!(
                "unknown op {other:?} (expected \"upper\", \"lower\", \"reverse\" or \"title\")"
            )));
        }
    };
    let words = input.text.split_whitespace().count();
    let chars = input.text.chars().count();
    ctx.info(format!("{}: {words} words, {chars} chars", input.op));
    Ok(Output { text, words, chars })
}

/// Upper-cases the first character of every whitespace-separated word and
/// lower-cases the rest, keeping the whitespace as it is.
fn title_case(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at_word_start = true;
    for c in text.chars() {
        if c.is_whitespace() {
            out.push(c);
            at_word_start = true;
        } else if at_word_start {
            out.extend(c.to_uppercase());
            at_word_start = false;
        } else {
            out.extend(c.to_lowercase());
        }
    }
    out
}

wasmtask_guest::task!(run);
