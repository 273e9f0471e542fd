//! Small dialect helpers shared by every operation.

use std::borrow::Cow;

use chrono::NaiveDateTime;

/// Rewrites `?` placeholders into PostgreSQL's `$1, $2, …` when `numbered` is set.
///
/// Lets one SQL text serve all three engines where only the placeholder style differs.
/// Question marks inside single-quoted literals and double-quoted identifiers are left alone;
/// a quote of the other kind inside either does not end it (a referencing table named
/// `"o'brien"`, read from the catalog, once turned every later `?` into a literal `?`).
pub fn placeholders(sql: &str, numbered: bool) -> Cow<'_, str> {
    if !numbered || !sql.contains('?') {
        return Cow::Borrowed(sql);
    }
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    // The quote character of the literal or identifier being read, if any. A doubled quote
    // (the escape in both) closes and reopens it, which comes to the same.
    let mut quoted: Option<char> = None;
    for ch in sql.chars() {
        match (quoted, ch) {
            (None, '\'' | '"') => quoted = Some(ch),
            (Some(q), _) if ch == q => quoted = None,
            (None, '?') => {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
                continue;
            }
            _ => {}
        }
        out.push(ch);
    }
    Cow::Owned(out)
}

/// Formats a UTC timestamp the way the reference application stores it in SQLite
/// (`YYYY-MM-DD HH:MM:SS.ffffff`), so text comparisons order correctly.
pub fn sqlite_datetime(t: NaiveDateTime) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.6f").to_string()
}

/// MySQL/MariaDB administration statements (`ANALYZE`, `OPTIMIZE`, `CHECK TABLE`) report
/// failures as result rows, not as errors: the `Msg_text` of rows whose `Msg_type` is `error`
/// (columns: Table, Op, Msg_type, Msg_text).
pub fn mysql_row_errors(rows: &[Vec<Option<String>>]) -> Vec<String> {
    rows.iter()
        .filter(|r| {
            r.get(2)
                .and_then(|t| t.as_deref())
                .is_some_and(|t| t.eq_ignore_ascii_case("error"))
        })
        .map(|r| {
            r.get(3)
                .cloned()
                .flatten()
                .unwrap_or_else(|| "unknown error".into())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_quoted_identifiers_alone_whatever_they_hold() {
        assert_eq!(
            placeholders(
                r#"SELECT 1 FROM "o'brien" r WHERE r."who?" = ? AND id > ?"#,
                true
            ),
            r#"SELECT 1 FROM "o'brien" r WHERE r."who?" = $1 AND id > $2"#
        );
        assert_eq!(
            placeholders(r#"x = 'it''s "?"' AND "a""b" = ?"#, true),
            r#"x = 'it''s "?"' AND "a""b" = $1"#
        );
    }

    #[test]
    fn numbers_placeholders_for_postgres_only() {
        assert_eq!(placeholders("a = ? AND b = ?", true), "a = $1 AND b = $2");
        assert_eq!(placeholders("a = ? AND b = ?", false), "a = ? AND b = ?");
    }

    #[test]
    fn leaves_question_marks_in_literals() {
        assert_eq!(
            placeholders("x = '?' AND y = ?", true),
            "x = '?' AND y = $1"
        );
    }
}
