//! Statistics: database size, session and user counts, pool figures and the table analysis.

use chrono::{NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};

use super::OpError;
use super::analyze::{TableAnalysis, analyze};
use crate::store::{Db, Engine};

/// The connection pool of this process (the original reported SQLAlchemy's pool).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolFigures {
    /// Engine name (`sqlite`, `postgres`, `mysql`), as the health report's pool figures.
    #[serde(default)]
    pub engine: String,
    /// Connections open now.
    pub size: u32,
    /// Of which idle (available).
    pub idle: u32,
    /// Upper bound of the pool.
    pub max_connections: u32,
}

/// Result of [`statistics`], with the original's field names.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DbStatistics {
    /// When the figures were taken (UTC).
    pub timestamp: NaiveDateTime,
    /// Size of the whole database, in bytes.
    pub database_size_bytes: i64,
    /// The same in MiB, rounded to two decimals.
    pub database_size_mb: f64,
    /// Pool figures.
    pub connection_pool: PoolFigures,
    /// The analysis of the session tables.
    pub table_analysis: TableAnalysis,
}

impl DbStatistics {
    /// The original's text layout.
    pub fn render_text(&self) -> String {
        let mut out = String::from("Database Statistics\n");
        out.push_str(&"=".repeat(25));
        out.push('\n');
        out.push_str(&format!("Database Size: {:.2} MB\n", self.database_size_mb));
        // The session table is the one table with a unique-users figure.
        if let Some(sessions) = self
            .table_analysis
            .tables
            .values()
            .find(|t| t.unique_users.is_some())
        {
            out.push_str(&format!("Session Records: {}\n", sessions.row_count));
            out.push_str(&format!(
                "Unique Users: {}\n",
                sessions.unique_users.unwrap_or(0)
            ));
        }
        out.push_str(&format!("Pool Size: {}\n", self.connection_pool.size));
        out.push_str(&format!(
            "Available Connections: {}\n",
            self.connection_pool.idle
        ));
        out
    }
}

/// Database size, pool figures and the table analysis. Read-only.
pub async fn statistics(db: &Db) -> Result<DbStatistics, OpError> {
    // The whole database: SQLite's file pages, PostgreSQL's database directory, the sum of
    // MySQL's tables in the current schema.
    let size_sql = match db.engine() {
        Engine::Sqlite => {
            "SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()"
        }
        Engine::Postgres => "SELECT pg_database_size(current_database())",
        Engine::MySql => {
            "SELECT CAST(COALESCE(SUM(data_length + index_length), 0) AS SIGNED) \
             FROM information_schema.tables WHERE table_schema = DATABASE()"
        }
    };
    let database_size_bytes = db.scalar_i64(size_sql).await?;
    let connection_pool = crate::on_pool!(db, p => PoolFigures {
        engine: db.engine().name().to_string(),
        size: p.size(),
        idle: u32::try_from(p.num_idle()).unwrap_or(u32::MAX),
        max_connections: p.options().get_max_connections(),
    });
    let table_analysis = analyze(db).await?;
    Ok(DbStatistics {
        timestamp: Utc::now().naive_utc(),
        database_size_bytes,
        database_size_mb: (database_size_bytes as f64 / (1024.0 * 1024.0) * 100.0).round() / 100.0,
        connection_pool,
        table_analysis,
    })
}
