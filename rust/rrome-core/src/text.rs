//! Text read from untrusted files, made safe to print: the one home of rrome's escaping
//! (docs/design.md §7). A name read from a model folder, a lock holder's description or a file
//! name must neither break a message into lines nor send a terminal an escape sequence.
//! [`py_repr`] quotes a string as Python's `repr` does (messages from Rust and Python read
//! alike); [`escape_unprintable`] escapes only what is not printable, for output lines (the
//! command line prints names with it, through the bindings).

use std::fmt::Write as _;

/// `s` quoted as Python's `repr` quotes a string, so that a message reads the same whichever
/// side wrote it: in single quotes (double ones where `s` holds a single quote and no double
/// one), with backslash escapes for the quote, `\`, tab, newline and carriage return, and
/// `\xNN`, `\uNNNN` or `\UNNNNNNNN` for characters that are not printable (controls,
/// separators, private use, the common format characters). A name read from a file can then
/// neither break a message into lines nor send a terminal an escape sequence.
pub fn py_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if !printable(c) => push_escaped(&mut out, c),
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// Python's `str.isprintable` for one character, as far as the standard library can tell
/// Unicode categories apart (unassigned code points count as printable here).
fn printable(c: char) -> bool {
    c == ' '
        || !(c.is_control()
            || c.is_whitespace()
            || matches!(
                c,
                '\u{ad}'
                    | '\u{600}'..='\u{605}'
                    | '\u{61c}'
                    | '\u{6dd}'
                    | '\u{70f}'
                    | '\u{180e}'
                    | '\u{200b}'..='\u{200f}'
                    | '\u{202a}'..='\u{202e}'
                    | '\u{2060}'..='\u{206f}'
                    | '\u{e000}'..='\u{f8ff}'
                    | '\u{feff}'
                    | '\u{fff9}'..='\u{fffb}'
                    | '\u{f0000}'..
            ))
}

/// `s` with every character that is not printable written as Python writes it in `ascii()`
/// (`\t`, `\n`, `\r`, `\xNN`, `\uNNNN`, `\UNNNNNNNN`); everything else, backslashes
/// included, unchanged. What the command line prints for a name read from a folder.
pub fn escape_unprintable(s: &str) -> String {
    if s.chars().all(printable) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if printable(c) {
            out.push(c);
        } else {
            push_escaped(&mut out, c);
        }
    }
    out
}

fn push_escaped(out: &mut String, c: char) {
    let n = u32::from(c);
    let _ = match c {
        '\t' => write!(out, "\\t"),
        '\n' => write!(out, "\\n"),
        '\r' => write!(out, "\\r"),
        _ if n <= 0xff => write!(out, "\\x{n:02x}"),
        _ if n <= 0xffff => write!(out, "\\u{n:04x}"),
        _ => write!(out, "\\U{n:08x}"),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted_as_python_quotes_them() {
        for (name, want) in [
            ("model.layers.0.mlp.down_proj.weight", "'model.layers.0.mlp.down_proj.weight'"),
            ("it's", "\"it's\""),
            ("both ' and \"", "'both \\' and \"'"),
            ("a\\b", "'a\\\\b'"),
            ("line\nbreak\r\t", "'line\\nbreak\\r\\t'"),
            ("\u{1b}[31mred", "'\\x1b[31mred'"),
            ("nb\u{a0}sp\u{2028}", "'nb\\xa0sp\\u2028'"),
            ("zero\u{200b}width", "'zero\\u200bwidth'"),
            ("ünïcödé 名前", "'ünïcödé 名前'"),
        ] {
            assert_eq!(py_repr(name), want, "{name:?}");
        }
    }

    #[test]
    fn only_what_is_not_printable_is_escaped() {
        for (text, want) in [
            ("model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight"),
            ("a\\b 'q' \"d\"", "a\\b 'q' \"d\""),
            ("x\u{1b}]0;owned\u{7}\nrecovered: ok", "x\\x1b]0;owned\\x07\\nrecovered: ok"),
            ("tab\there\r", "tab\\there\\r"),
            ("nb\u{a0}sp\u{2028}\u{200b}\u{f0000}", "nb\\xa0sp\\u2028\\u200b\\U000f0000"),
            ("ünïcödé 名前", "ünïcödé 名前"),
        ] {
            assert_eq!(escape_unprintable(text), want, "{text:?}");
        }
    }
}
