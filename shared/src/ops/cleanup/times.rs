//! SQLite stores a time column as whatever the application wrote, and the rules compare it
//! with the cutoff as text (what its index answers). A number sorts before any text and a UTC
//! offset or an unpadded layout misorders, so such a value could match while live. This module
//! looks at each time column's two ends: where it finds such values, the run re-checks every
//! comparison with `julianday` (`rules::TimeCompare`), which never matches a value it cannot
//! read (Unix seconds) and reads an offset correctly, and the report names the column. Odd
//! text between two well-formed ends is not seen, and is compared as written.

use chrono::NaiveDateTime;

use crate::ops::OpError;
use crate::store::{Db, Engine, Schema};

/// Text layouts that compare correctly with the cutoff as text: UTC, date first, fields
/// zero-padded. A `T` separator sorts after the space, so such a value is at worst kept a
/// little longer, never deleted early.
const COMPARABLE_LAYOUTS: [&str; 2] = ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"];

/// A SQLite time column seen holding a value other than UTC text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OddTimeColumn {
    /// `table.column`.
    pub column: String,
    /// SQLite's type of the value (`integer`, `real`, `text`, `blob`).
    pub kind: String,
    /// The value, as text.
    pub example: String,
}

impl OddTimeColumn {
    /// "`table.column` holds integer values such as "1700000000", not UTC text like …".
    pub fn describe(&self) -> String {
        format!(
            "{} holds {} values such as {:?}, not UTC text like '2025-06-01 12:00:00'",
            self.column, self.kind, self.example
        )
    }
}

/// One note per time column of a SQLite session table holding values other than UTC text.
pub async fn unreadable_sqlite_times(db: &Db, schema: &Schema) -> Result<Vec<String>, OpError> {
    Ok(odd_sqlite_time_columns(db, schema)
        .await?
        .iter()
        .map(|odd| {
            format!(
                "{}: this run deleted a session only when SQLite read its time as past the \
                 cutoff, so sessions with times it cannot read (Unix seconds, other layouts) \
                 are never cleaned",
                odd.describe()
            )
        })
        .collect())
}

/// The time columns (activity, and expiry where there is one) of a SQLite session table
/// holding values other than UTC text. Reads the lowest and highest value of each (off its
/// index where it has one): a number sorts below any text and a blob above, so a column
/// holding any shows it at one end; odd text in between goes unnoticed here. Other engines
/// type their columns: nothing to look at there.
pub async fn odd_sqlite_time_columns(
    db: &Db,
    schema: &Schema,
) -> Result<Vec<OddTimeColumn>, OpError> {
    if db.engine() != Engine::Sqlite {
        return Ok(Vec::new());
    }
    let t = &schema.sessions.table;
    let mut columns = vec![schema.activity_column().to_string()];
    columns.extend(schema.sessions.expires_at.clone());
    let mut odd = Vec::new();
    for col in columns {
        for order in ["ASC", "DESC"] {
            let sql = db.sql(format!(
                "SELECT typeof({col}), CAST({col} AS TEXT) FROM {t} \
                 WHERE {col} IS NOT NULL ORDER BY {col} {order} LIMIT 1"
            ));
            let row: Option<(String, String)> =
                crate::on_pool!(db, p => sqlx::query_as(sql).fetch_optional(p).await?);
            let Some((kind, value)) = row else { break };
            if kind != "text" || parse_utc_text(&value).is_none() {
                odd.push(OddTimeColumn {
                    column: format!("{t}.{col}"),
                    kind,
                    example: value,
                });
                break;
            }
        }
    }
    Ok(odd)
}

/// `value` as a time, when it is UTC in one of [`COMPARABLE_LAYOUTS`], with at most a `Z` or
/// `+00:00` after it.
fn parse_utc_text(value: &str) -> Option<NaiveDateTime> {
    let naive = value
        .strip_suffix('Z')
        .or_else(|| value.strip_suffix("+00:00"))
        .unwrap_or(value);
    let t = COMPARABLE_LAYOUTS
        .iter()
        .find_map(|layout| NaiveDateTime::parse_from_str(naive, layout).ok())?;
    // Zero-padded, as text order needs: the parser also takes "2025-6-1 9:00:00".
    let padded = naive.get(..10) == Some(t.format("%Y-%m-%d").to_string().as_str())
        && naive.get(11..19) == Some(t.format("%H:%M:%S").to_string().as_str());
    padded.then_some(t)
}

#[cfg(test)]
mod tests {
    use super::parse_utc_text;

    #[test]
    fn utc_text_is_recognised_and_numbers_or_offsets_are_not() {
        for ok in [
            "2025-06-01 12:00:00",
            "2025-06-01 12:00:00.123456",
            "2025-06-01T12:00:00",
            "2025-06-01 12:00:00Z",
            "2025-06-01 12:00:00+00:00",
        ] {
            assert!(parse_utc_text(ok).is_some(), "{ok}");
        }
        for odd in [
            "1748779200",
            "2460828.0",
            "2025-06-01 10:00:00-08:00",
            "2025-06-01 12:00:00+02:00",
            "01/06/2025 12:00",
            "2025-6-1 12:00:00",
            "2025-06-01 9:00:00",
        ] {
            assert!(parse_utc_text(odd).is_none(), "{odd}");
        }
    }
}
