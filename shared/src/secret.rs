//! Keeping passwords out of output: every URL that reaches a log line, an error or a report
//! goes through [`redact_url`] first.

/// Replaces the password of a URL (`scheme://user:password@host/…`) with `***`, and the
/// value of every `…password=` setting likewise (`?sslpassword=a&password=b` hides both).
/// Other text is returned unchanged.
///
/// A URL that does not parse — typically because its password holds an unescaped `#`, `/`
/// or `?` — still has its password hidden: everything between the user's `:` and the last
/// `@` is replaced (hiding too much is safe; hiding too little is not).
pub fn redact_url(url: &str) -> String {
    let mut out = match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        // Parsed without a password, a password may still be there: all digits up to a `/`,
        // `?` or `#` parses as a port (`app:1234/5678@db`), one starting with `#` ends the
        // authority early. An `@` after the user's `:` says so.
        Ok(_) | Err(_) => match raw_password_span(url) {
            Some(span) => {
                let mut masked = url.to_string();
                masked.replace_range(span, "***");
                masked
            }
            None => url.to_string(),
        },
    };
    mask_secret_parameters(&mut out);
    out
}

/// Where the values of `…password=` settings are: query parameters (`password`, libpq's
/// `sslpassword`, in any case, wherever they stand) and the `key=value` words of a
/// connection string mistakenly given in place of a URL. A value runs to the next `&`, `#`
/// or white space.
fn secret_parameter_spans(url: &str) -> Vec<std::ops::Range<usize>> {
    const KEY_END: &str = "password=";
    let lowered = url.to_ascii_lowercase();
    let mut spans = Vec::new();
    let mut from = 0;
    while let Some(i) = lowered[from..].find(KEY_END) {
        let start = from + i + KEY_END.len();
        let end = url[start..]
            .find(|c: char| c == '&' || c == '#' || c.is_whitespace())
            .map_or(url.len(), |j| start + j);
        if end > start {
            spans.push(start..end);
        }
        from = end.max(start);
    }
    spans
}

/// Replaces the value of every secret query parameter with `***` — each of them, whatever
/// its place (`?sslpassword=a&password=b` hides both).
fn mask_secret_parameters(url: &mut String) {
    // From the end, so the earlier spans stay where they were.
    for span in secret_parameter_spans(url).into_iter().rev() {
        url.replace_range(span, "***");
    }
}

/// Removes the password of `url` from arbitrary text (a driver's error message may quote it).
pub fn redact_text(text: &str, url: &str) -> String {
    let userinfo_password = url::Url::parse(url)
        .ok()
        .and_then(|u| u.password().map(str::to_string))
        .or_else(|| raw_password_span(url).map(|span| url[span].to_string()));
    let parameter_secrets = secret_parameter_spans(url)
        .into_iter()
        .map(|value| url[value].to_string());
    let mut secrets: Vec<String> = Vec::new();
    for raw in userinfo_password.into_iter().chain(parameter_secrets) {
        // A driver may quote the value as written or decoded.
        let decoded = percent_encoding::percent_decode_str(&raw)
            .decode_utf8_lossy()
            .into_owned();
        secrets.extend([raw, decoded]);
    }
    // Longest first, so a secret containing another is hidden whole.
    secrets.retain(|s| !s.is_empty());
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets
        .iter()
        .fold(text.to_string(), |text, secret| text.replace(secret, "***"))
}

/// Where a password is in a URL read as plain text — one that does not parse, or parses with
/// its password taken for a port, path or fragment: after the first `:` of what follows
/// `://`, up to the last `@`. A mistyped URL without `://` (`postgres//u:pw@h`,
/// `postgres:/u:pw@h`, `u:pw@h`) is read from its start, so the span may take in a scheme's
/// rest too. `None` without an `@`, or a `:` before it.
fn raw_password_span(url: &str) -> Option<std::ops::Range<usize>> {
    let start = url.find("://").map_or(0, |i| i + "://".len());
    let at = start + url[start..].rfind('@')?;
    let colon = start + url[start..at].find(':')?;
    (colon + 1 < at).then_some(colon + 1..at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hides_password_in_userinfo() {
        let r = redact_url("postgres://app:s3cr3t@db:5432/app");
        assert!(!r.contains("s3cr3t"), "{r}");
        assert!(r.contains("app:***@db"), "{r}");
    }

    #[test]
    fn hides_password_query_parameter() {
        let r = redact_url("rediss://cache:6380/0?password=hunter2&x=1");
        assert!(!r.contains("hunter2"), "{r}");
    }

    #[test]
    fn leaves_passwordless_urls_alone() {
        assert_eq!(
            redact_url("sqlite://sessionfleet.db"),
            "sqlite://sessionfleet.db"
        );
    }

    #[test]
    fn hides_a_password_that_breaks_url_parsing() {
        for (url, password) in [
            ("postgres://app:pa#ss@db/app", "pa#ss"),
            ("mysql://root:ab/cd@host:3306/db", "ab/cd"),
            ("redis://:q?w@cache:6379/0", "q?w"),
            // These parse, with the password taken for a port, a path or a fragment.
            ("postgres://app:1234/5678@db/app", "1234/5678"),
            ("postgres://app:#x@db/app", "#x"),
        ] {
            let r = redact_url(url);
            assert!(!r.contains(password), "{r}");
            assert!(r.contains(":***@"), "{r}");
            let t = redact_text(&format!("invalid URL {url}"), url);
            assert!(!t.contains(password), "{t}");
        }
    }

    #[test]
    fn hides_a_password_in_a_url_missing_its_slashes_or_scheme() {
        for url in [
            "postgres//app:hunter2@db/app",
            "postgres:/app:hunter2@db/app",
            "app:hunter2@db/app",
            "redis:/:hunter2@cache:6379",
        ] {
            let r = redact_url(url);
            assert!(!r.contains("hunter2"), "{r}");
            assert!(r.contains("***@"), "{r}");
            let t = redact_text(&format!("invalid URL {url}: no scheme"), url);
            assert!(!t.contains("hunter2"), "{t}");
        }
    }

    #[test]
    fn hides_every_secret_query_parameter_wherever_it_stands() {
        let url =
            "postgres://app@db/app?sslpassword=abc&password=hunter2&PASSWORD=x9&sslmode=require";
        let r = redact_url(url);
        for secret in ["abc", "hunter2", "x9"] {
            assert!(!r.contains(&format!("={secret}")), "{r}");
        }
        assert!(r.contains("sslmode=require"), "{r}");
        assert!(
            r.ends_with("?sslpassword=***&password=***&PASSWORD=***&sslmode=require"),
            "{r}"
        );
        let t = redact_text("bad key passphrase abc, then hunter2", url);
        assert_eq!(t, "bad key passphrase ***, then ***");
    }

    #[test]
    fn scrubs_a_percent_encoded_password_in_either_form() {
        let url = "mysql://u:p%40ss@h/db?password=q%26r";
        let t = redact_text("saw p@ss and p%40ss and q&r", url);
        assert_eq!(t, "saw *** and *** and ***");
    }

    #[test]
    fn hides_the_password_of_a_keyword_connection_string() {
        let r = redact_url("host=db user=app password=hunter2 dbname=app");
        assert_eq!(r, "host=db user=app password=*** dbname=app");
    }

    #[test]
    fn scrubs_password_from_error_text() {
        let t = redact_text("auth failed for s3cr3t", "mysql://u:s3cr3t@h/db");
        assert_eq!(t, "auth failed for ***");
    }
}
