//! The earliest creation and latest update of the sessions, read from time columns in any of
//! the layouts applications leave: PostgreSQL `timestamptz`, MySQL `TIMESTAMP`, and on SQLite
//! whatever was written (text in several layouts, Unix seconds).

use chrono::NaiveDateTime;
use sqlx::{Row, SqliteConnection, sqlite::SqliteRow};

use crate::store::Engine;

/// PostgreSQL and MySQL: `column` as a plain date-time, for MIN / MAX. `timestamptz` and
/// `TIMESTAMP` do not decode as one; the cast reads them in the session's time zone, which is
/// UTC on our connections.
pub(super) fn server_time(engine: Engine, column: &str) -> String {
    match engine {
        Engine::MySql => format!("CAST({column} AS DATETIME(6))"),
        _ => format!("CAST({column} AS TIMESTAMP)"),
    }
}

/// SQLite: the SELECT-list items of `column`'s two ends as stored — type and text of its
/// MIN and MAX — read by [`SqliteEnds::read`].
pub(super) fn sqlite_ends_sql(column: &str) -> String {
    format!(
        "typeof(MIN({column})), CAST(MIN({column}) AS TEXT), typeof(MAX({column})), CAST(MAX({column}) AS TEXT)"
    )
}

/// A SQLite time column's lowest and highest value as stored: (type, text) each.
pub(super) struct SqliteEnds {
    low: (String, Option<String>),
    high: (String, Option<String>),
}

impl SqliteEnds {
    /// The four items of [`sqlite_ends_sql`], from column `first` of `row` on.
    pub(super) fn read(row: &SqliteRow, first: usize) -> Result<SqliteEnds, sqlx::Error> {
        Ok(SqliteEnds {
            low: (row.try_get(first)?, row.try_get(first + 1)?),
            high: (row.try_get(first + 2)?, row.try_get(first + 3)?),
        })
    }

    /// The lowest and highest time, when both ends are text SQLite sorts like times: then no
    /// number (which sorts below any text) nor blob (above) is in the column, and, as for
    /// the cleanup's `times`, odd text between the ends goes unseen. `None` otherwise.
    fn as_text(&self) -> Option<(Option<NaiveDateTime>, Option<NaiveDateTime>)> {
        let end = |(kind, text): &(String, Option<String>)| match kind.as_str() {
            "null" => Some(None),
            "text" => parse_sqlite_time(text.as_deref()).map(Some),
            _ => None,
        };
        Some((end(&self.low)?, end(&self.high)?))
    }
}

/// The earliest time of `column` (`MIN`, or with `latest` the latest: `MAX`), from its
/// [`SqliteEnds`]. Where those show numbers, blobs or another layout, every value is read as
/// a time instead (Unix seconds or a Julian day by magnitude, an offset converted; one more
/// scan of the table): a value SQLite cannot read as a time is left out.
pub(super) async fn sqlite_end(
    conn: &mut SqliteConnection,
    table: &str,
    column: &str,
    ends: &SqliteEnds,
    latest: bool,
) -> Result<Option<NaiveDateTime>, sqlx::Error> {
    if let Some((low, high)) = ends.as_text() {
        return Ok(if latest { high } else { low });
    }
    let aggregate = if latest { "MAX" } else { "MIN" };
    let sql =
        format!("SELECT {aggregate}(strftime('%Y-%m-%d %H:%M:%f', {column}, 'auto')) FROM {table}");
    let text: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(&mut *conn)
        .await?;
    Ok(parse_sqlite_time(text.as_deref()))
}

/// Reads a SQLite text datetime in the formats applications write.
fn parse_sqlite_time(text: Option<&str>) -> Option<NaiveDateTime> {
    let text = text?.trim().trim_end_matches('Z');
    [
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M",
    ]
    .iter()
    .find_map(|f| NaiveDateTime::parse_from_str(text, f).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_text_datetimes_parse_in_the_common_formats() {
        for text in [
            "2025-08-11 10:00:00.123456",
            "2025-08-11T10:00:00",
            "2025-08-11 10:00:00",
            "2025-08-11T10:00:00Z",
        ] {
            assert!(parse_sqlite_time(Some(text)).is_some(), "{text}");
        }
        assert_eq!(parse_sqlite_time(Some("yesterday")), None);
    }

    #[test]
    fn ends_are_taken_as_written_only_when_both_are_time_text() {
        let ends = |low: (&str, Option<&str>), high: (&str, Option<&str>)| SqliteEnds {
            low: (low.0.into(), low.1.map(Into::into)),
            high: (high.0.into(), high.1.map(Into::into)),
        };
        let text = ("text", Some("2025-08-11 10:00:00"));
        assert!(ends(text, text).as_text().is_some());
        assert_eq!(
            ends(("null", None), ("null", None)).as_text(),
            Some((None, None))
        );
        // A number at the low end: Unix seconds, which sort below every text.
        assert!(
            ends(("integer", Some("1754906400")), text)
                .as_text()
                .is_none()
        );
        // An offset: text, but not in an order SQLite compares correctly.
        assert!(
            ends(text, ("text", Some("2025-08-11T12:00:00+02:00")))
                .as_text()
                .is_none()
        );
    }
}
