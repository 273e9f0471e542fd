//! Walking Redis keys by pattern without blocking the server: `SCAN`, never `KEYS`, and
//! names escaped so a pattern built from them matches only those names.

use redis::aio::ConnectionManager;

/// Keys asked for per `SCAN` step (a hint to Redis, not a limit).
pub const SCAN_COUNT: usize = 500;

/// Escapes Redis glob metacharacters so a name matches only itself.
pub fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Every key matching `pattern`, by `SCAN` to the end of the keyspace. A key may come back
/// twice (`SCAN`'s guarantee); callers that care dedupe.
pub async fn scan_all(
    conn: &mut ConnectionManager,
    pattern: &str,
) -> redis::RedisResult<Vec<String>> {
    let mut found = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query_async(conn)
            .await?;
        found.extend(keys);
        if next == 0 {
            return Ok(found);
        }
        cursor = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metacharacters_are_escaped_and_the_rest_kept() {
        assert_eq!(
            glob_escape("a*b?[c]\\d-e_f:{g}"),
            "a\\*b\\?\\[c\\]\\\\d-e_f:{g}"
        );
    }
}
