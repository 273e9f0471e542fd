//! Keeping passwords out of output: every URL that reaches a log line, an error or a report
//! goes through [`redact_url`] first.

/// Replaces the password of a URL (`scheme://user:password@host/…`) with `***`, and any
/// `password=` query parameter likewise. Text that is not a URL is returned unchanged.
pub fn redact_url(url: &str) -> String {
    let mut out = match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        _ => url.to_string(),
    };
    if let Some(start) = out.find("password=") {
        let value_start = start + "password=".len();
        let end = out[value_start..]
            .find('&')
            .map_or(out.len(), |i| value_start + i);
        out.replace_range(value_start..end, "***");
    }
    out
}

/// Removes the password of `url` from arbitrary text (a driver's error message may quote it).
pub fn redact_text(text: &str, url: &str) -> String {
    match url::Url::parse(url)
        .ok()
        .and_then(|u| u.password().map(str::to_string))
    {
        Some(pw) if !pw.is_empty() => text.replace(&pw, "***"),
        _ => text.to_string(),
    }
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
    fn scrubs_password_from_error_text() {
        let t = redact_text("auth failed for s3cr3t", "mysql://u:s3cr3t@h/db");
        assert_eq!(t, "auth failed for ***");
    }
}
