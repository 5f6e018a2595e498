//! A fast reader for the record lines [`super::ExportWriter`] writes — the compact JSON of a
//! `Line::Record`, `type` first, fields in declaration order — which are nearly every line of an
//! export. It borrows every field and unescapes only `details_json`. Whatever it does not recognise
//! exactly (whitespace, another field order, an extra field, a sign or a leading zero in a number, a
//! `\u` escape, a control byte, a backslash outside `details_json`) gives `None`, and the caller parses
//! the line with serde_json instead; so both readers agree on every line (property-tested below).

use std::borrow::Cow;

use super::RecordRef;

struct Cursor<'a> {
    s: &'a str,
    i: usize,
}

impl<'a> Cursor<'a> {
    fn lit(&mut self, want: &str) -> Option<()> {
        self.s.as_bytes()[self.i..].starts_with(want.as_bytes()).then(|| self.i += want.len())
    }

    /// A non-negative integer without a leading zero that fits an i64.
    fn int(&mut self) -> Option<i64> {
        let b = &self.s.as_bytes()[self.i..];
        let n = b.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 || n > 19 || (n > 1 && b[0] == b'0') {
            return None;
        }
        let mut v: i64 = 0;
        for &c in &b[..n] {
            v = v.checked_mul(10)?.checked_add(i64::from(c - b'0'))?;
        }
        self.i += n;
        Some(v)
    }

    /// The rest of a string without escapes, up to and past its closing quote.
    fn plain(&mut self) -> Option<&'a str> {
        let b = &self.s.as_bytes()[self.i..];
        let n = b.iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20)?;
        if b[n] != b'"' {
            return None;
        }
        let out = &self.s[self.i..self.i + n];
        self.i += n + 1;
        Some(out)
    }

    /// The rest of a string with the short escapes (`\" \\ \/ \b \f \n \r \t`), past its closing quote.
    fn escaped(&mut self) -> Option<Cow<'a, str>> {
        let start = self.i;
        let b = self.s.as_bytes();
        let mut owned: Option<String> = None;
        let mut run = start;
        loop {
            let c = *b.get(self.i)?;
            match c {
                b'"' => {
                    let tail = &self.s[run..self.i];
                    self.i += 1;
                    return Some(match owned {
                        None => Cow::Borrowed(tail),
                        Some(mut o) => {
                            o.push_str(tail);
                            Cow::Owned(o)
                        }
                    });
                }
                b'\\' => {
                    let o = owned.get_or_insert_with(String::new);
                    o.push_str(&self.s[run..self.i]);
                    let e = match *b.get(self.i + 1)? {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        _ => return None,
                    };
                    o.push(e);
                    self.i += 2;
                    run = self.i;
                }
                c if c < 0x20 => return None,
                _ => self.i += 1,
            }
        }
    }
}

/// The record in `line` (which may end in one newline), or `None` to parse it with serde_json.
pub(super) fn scan(line: &str) -> Option<RecordRef<'_>> {
    let mut p = Cursor { s: line, i: 0 };
    p.lit("{\"type\":\"record\",\"seq\":")?;
    let seq = p.int()?;
    p.lit(",\"at_ms\":")?;
    let at_ms = p.int()?;
    p.lit(",\"actor\":\"")?;
    let actor = p.plain()?;
    p.lit(",\"event\":\"")?;
    let event = p.plain()?;
    p.lit(",\"subject\":\"")?;
    let subject = p.plain()?;
    p.lit(",\"details_json\":\"")?;
    let details_json = p.escaped()?;
    p.lit(",\"prev_hash\":\"")?;
    let prev_hash = p.plain()?;
    p.lit(",\"hash\":\"")?;
    let hash = p.plain()?;
    p.lit("}")?;
    if !matches!(&line[p.i..], "" | "\n") {
        return None;
    }
    Some(RecordRef {
        _kind: Cow::Borrowed("record"),
        seq,
        at_ms,
        actor: Cow::Borrowed(actor),
        event: Cow::Borrowed(event),
        subject: Cow::Borrowed(subject),
        details_json,
        prev_hash: Cow::Borrowed(prev_hash),
        hash: Cow::Borrowed(hash),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::audit_export::{Line, RecordLine};

    /// seq, at_ms, then actor, event, subject, details_json, prev_hash, hash.
    type Fields = (i64, i64, [String; 6]);

    fn via_serde(line: &str) -> Option<Fields> {
        let r: RecordRef = serde_json::from_str(line).ok()?;
        Some(fields(&r))
    }

    fn fields(r: &RecordRef) -> Fields {
        let s = |c: &Cow<str>| c.to_string();
        (r.seq, r.at_ms, [s(&r.actor), s(&r.event), s(&r.subject), s(&r.details_json), s(&r.prev_hash), s(&r.hash)])
    }

    fn line(r: RecordLine) -> String {
        let mut s = serde_json::to_string(&Line::Record(r)).unwrap();
        s.push('\n');
        s
    }

    proptest! {
        /// Every line the writer produces is read by the scanner exactly as serde_json reads it.
        #[test]
        fn written_lines_scan_as_serde_reads_them(
            seq in 0i64..i64::MAX, at in 0i64..i64::MAX, actor in ".{0,20}", event in "[a-z.]{0,20}",
            subject in ".{0,40}", details in ".{0,80}", prev in "[0-9a-f]{0,64}", hash in "[0-9A-F]{0,64}",
        ) {
            let text = line(RecordLine {
                seq, at_ms: at, actor, event, subject, details_json: details, prev_hash: prev, hash,
            });
            let serde = via_serde(&text).unwrap();
            if let Some(r) = scan(&text) {
                prop_assert_eq!(fields(&r), serde);
            }
        }

        /// Any text: when the scanner takes it, serde_json reads the same record.
        #[test]
        fn whatever_the_scanner_takes_serde_reads_alike(
            tail in "[ -~\\\\\"\u{80}-\u{10ffff}\n\t]{0,120}",
        ) {
            let text = format!("{{\"type\":\"record\",\"seq\":1,\"at_ms\":2,\"actor\":\"a\",\"event\":\"e\",\"subject\":\"s\",\"details_json\":\"{tail}");
            if let Some(r) = scan(&text) {
                prop_assert_eq!(Some(fields(&r)), via_serde(&text));
            }
        }
    }

    #[test]
    fn odd_lines_are_left_to_serde() {
        let good = line(RecordLine {
            seq: 7,
            at_ms: 8,
            actor: "admin".into(),
            event: "batch.created".into(),
            subject: "batch/b".into(),
            details_json: "{\"quota\":5,\"note\":\"a\\\\b\"}".into(),
            prev_hash: "00".repeat(32),
            hash: "11".repeat(32),
        });
        let r = scan(&good).unwrap();
        assert_eq!(fields(&r), via_serde(&good).unwrap());
        assert!(matches!(r.subject, Cow::Borrowed(_)), "fields without escapes are borrowed");
        for odd in [
            good.replacen("\"seq\":7", "\"seq\":07", 1),
            good.replacen("\"seq\":7", "\"seq\":-7", 1),
            good.replacen("\"seq\":7", "\"seq\": 7", 1),
            good.replacen("\"actor\":\"admin\"", "\"actor\":\"ad\\u006din\"", 1),
            good.replacen("}\n", ",\"extra\":1}\n", 1),
            good.replacen("}\n", "} \n", 1),
            good.replacen("\"seq\":7", "\"seq\":99999999999999999999", 1),
        ] {
            assert!(scan(&odd).is_none(), "{odd}");
        }
    }
}
