//! SQLite stores a time column as whatever the application wrote, and the rules compare it
//! with the cutoff as text (`YYYY-MM-DD HH:MM:SS…`, as the reference application writes
//! it). A column holding numbers (Unix seconds, Julian days) or text with a UTC offset would
//! compare wrongly: every number sorts before every text, so every session would look
//! expired. The cleanup refuses such a table instead of deleting live sessions.

use chrono::NaiveDateTime;

use crate::ops::OpError;
use crate::store::{Db, Engine, Schema};

/// Text layouts that compare correctly with the cutoff: UTC, date first, fields zero-padded.
/// A `T` separator sorts after the space, so such a value is kept a little longer, never
/// deleted early.
const COMPARABLE_LAYOUTS: [&str; 2] = ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"];

/// Refuses a SQLite session table whose time columns the rules would misread. Reads the
/// lowest and highest value of each (off its index where it has one): a number sorts below
/// any text and a blob above, so a column holding any shows it at one end. Other engines
/// type their columns; nothing to check there.
pub async fn check_sqlite_time_columns(db: &Db, schema: &Schema) -> Result<(), OpError> {
    if db.engine() != Engine::Sqlite {
        return Ok(());
    }
    let t = &schema.sessions.table;
    let mut columns = vec![schema.activity_column().to_string()];
    columns.extend(schema.sessions.expires_at.clone());
    for col in columns {
        for order in ["ASC", "DESC"] {
            let sql = db.sql(format!(
                "SELECT typeof({col}), CAST({col} AS TEXT) FROM {t} \
                 WHERE {col} IS NOT NULL ORDER BY {col} {order} LIMIT 1"
            ));
            let row: Option<(String, String)> =
                crate::on_pool!(db, p => sqlx::query_as(sql).fetch_optional(p).await?);
            let Some((kind, value)) = row else { break };
            if kind != "text" || !is_comparable(&value) {
                return Err(OpError::Invalid(format!(
                    "{t}.{col} holds {kind} values such as {value:?}, which the cleanup cannot \
                     compare with its cutoff: SQLite time columns must hold UTC text like \
                     '2025-06-01 12:00:00' (nothing was deleted)"
                )));
            }
        }
    }
    Ok(())
}

/// Whether `value` is a UTC time the rules compare correctly.
fn is_comparable(value: &str) -> bool {
    parse_utc_text(value).is_some()
}

/// `value` as a time, when it is UTC in one of [`COMPARABLE_LAYOUTS`], with at most a `Z` or
/// `+00:00` after it.
pub fn parse_utc_text(value: &str) -> Option<NaiveDateTime> {
    let naive = value
        .strip_suffix('Z')
        .or_else(|| value.strip_suffix("+00:00"))
        .unwrap_or(value);
    COMPARABLE_LAYOUTS
        .iter()
        .find_map(|layout| NaiveDateTime::parse_from_str(naive, layout).ok())
}

#[cfg(test)]
mod tests {
    use super::is_comparable;

    #[test]
    fn utc_text_compares_and_numbers_or_offsets_do_not() {
        for ok in [
            "2025-06-01 12:00:00",
            "2025-06-01 12:00:00.123456",
            "2025-06-01T12:00:00",
            "2025-06-01 12:00:00Z",
            "2025-06-01 12:00:00+00:00",
        ] {
            assert!(is_comparable(ok), "{ok}");
        }
        for bad in [
            "1748779200",
            "2460828.0",
            "2025-06-01 10:00:00-08:00",
            "2025-06-01 12:00:00+02:00",
            "01/06/2025 12:00",
            "2025-6-1 12:00:00",
        ] {
            assert!(!is_comparable(bad), "{bad}");
        }
    }
}
