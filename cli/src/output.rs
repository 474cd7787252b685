//! Output every command shares: text from outside (a crash record) made inert for a terminal,
//! and JSON written as one line with the same characters escaped.

use std::io::Write;

/// `s` with every control character (C0, DEL, C1), every bidirectional-override character and
/// the backslash escaped, so text from a record prints as one inert line.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '\\' {
            out.push_str("\\\\");
        } else if needs_escape(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Characters a terminal may act on or reorder text by.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            // Bidi marks, embeddings, overrides and isolates (U+061C is the Arabic letter mark).
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
            // Line and paragraph separators (a new line to some terminals and viewers), the
            // zero-width space and the BOM / zero-width no-break space (invisible text).
            | '\u{2028}' | '\u{2029}' | '\u{200b}' | '\u{feff}'
        )
}

/// Writes `v` as one line of JSON in which the characters [`printable`] escapes are `\uXXXX`
/// escapes too (serde_json leaves DEL, C1 and bidi characters raw): still the same JSON value.
pub fn write_json(out: &mut impl Write, v: &impl serde::Serialize) -> std::io::Result<()> {
    let mut ser = serde_json::Serializer::with_formatter(&mut *out, InertJson);
    v.serialize(&mut ser).map_err(std::io::Error::from)?;
    writeln!(out)
}

struct InertJson;

impl serde_json::ser::Formatter for InertJson {
    fn write_string_fragment<W: ?Sized + Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let mut rest = fragment;
        while let Some((i, c)) = rest.char_indices().find(|&(_, c)| needs_escape(c)) {
            w.write_all(&rest.as_bytes()[..i])?;
            write!(w, "\\u{:04x}", c as u32)?;
            rest = &rest[i + c.len_utf8()..];
        }
        w.write_all(rest.as_bytes())
    }
}
