//! HTML escaping: the one place where text becomes markup.
//!
//! Every string the dashboard did not write itself — guest stdout/stderr,
//! logs, outputs, error messages, cancel reasons, plugin and run names, ids,
//! query values — reaches a page through [`Esc`] (text and double-quoted
//! attribute values) or [`Query`] (a value inside a URL's query, then
//! escaped as an attribute). Markup written by the renderer itself is
//! static. The embedded script never builds markup from data: it only
//! inserts fragments rendered here, so escaping happens in exactly one place.

use std::fmt::{self, Display, Write};

/// Displays its text with `& < > " '` replaced by character references, so
/// it is safe as element content and as a double- or single-quoted
/// attribute value. NUL, which HTML parsers refuse, is shown as U+FFFD.
pub struct Esc<'a>(pub &'a str);

impl Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        let mut last = 0;
        for (i, c) in s.char_indices() {
            let rep = match c {
                '&' => "&amp;",
                '<' => "&lt;",
                '>' => "&gt;",
                '"' => "&quot;",
                '\'' => "&#39;",
                '\0' => "\u{FFFD}",
                _ => continue,
            };
            f.write_str(&s[last..i])?;
            f.write_str(rep)?;
            last = i + c.len_utf8();
        }
        f.write_str(&s[last..])
    }
}

/// Displays its text percent-encoded for a URL query value (RFC 3986
/// unreserved characters stay), then HTML-escaped as [`Esc`] would (the
/// encoding leaves nothing to escape but keeps the rule in one place).
pub struct Query<'a>(pub &'a str);

impl Display for Query<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                f.write_char(char::from(b))?;
            } else {
                write!(f, "%{b:02X}")?;
            }
        }
        Ok(())
    }
}

/// A page or fragment being written. `raw` is for the renderer's own static
/// markup only; everything else goes through `text`/[`Esc`].
#[derive(Default)]
pub struct Html(String);

impl Html {
    pub fn new() -> Html {
        Html(String::with_capacity(4096))
    }

    /// The renderer's own markup.
    pub fn raw(&mut self, markup: &str) -> &mut Html {
        self.0.push_str(markup);
        self
    }

    /// Untrusted text, escaped.
    pub fn text(&mut self, text: &str) -> &mut Html {
        let _ = write!(self.0, "{}", Esc(text));
        self
    }

    /// Formatted markup: every `{}` argument that is not the renderer's own
    /// must be wrapped in [`Esc`] or [`Query`].
    pub fn fmt(&mut self, args: fmt::Arguments<'_>) -> &mut Html {
        let _ = self.0.write_fmt(args);
        self
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_quotes_and_nul() {
        let s = Esc("<script>alert('x&y')</script> \"q\"\0").to_string();
        assert_eq!(
            s,
            "&lt;script&gt;alert(&#39;x&amp;y&#39;)&lt;/script&gt; &quot;q&quot;\u{FFFD}"
        );
        assert_eq!(Esc("plain ünïcode").to_string(), "plain ünïcode");
    }

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(Query("a b&c=d/é").to_string(), "a%20b%26c%3Dd%2F%C3%A9");
        assert_eq!(Query("t_01-x.y~z").to_string(), "t_01-x.y~z");
    }
}
