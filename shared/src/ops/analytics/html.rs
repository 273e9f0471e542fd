//! Export: `.json` (pretty JSON) or `.html` (one self-contained page: inline CSS, inline SVG
//! charts, no scripts, no external assets — readable offline and safe to mail around).

use std::fmt::Write;
use std::path::{Path, PathBuf};

use super::report::{HealthReport, TrendsReport};

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The extension names no supported format.
    #[error("cannot export to {}: the file name must end in .json or .html", path.display())]
    UnsupportedFormat {
        /// The file.
        path: PathBuf,
    },
    /// Writing failed.
    #[error("cannot write {}: {reason}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// Serialising failed.
    #[error("cannot encode the report as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Writes the report (and trends, if given) to `path`, the format following the extension.
///
/// JSON holds the health report's keys, plus `trends` when trends are given.
pub fn export(
    report: &HealthReport,
    trends: Option<&TrendsReport>,
    path: &Path,
) -> Result<(), ExportError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let body = match ext.as_deref() {
        Some("json") => {
            let mut v = serde_json::to_value(report)?;
            if let (Some(t), Some(obj)) = (trends, v.as_object_mut()) {
                obj.insert("trends".into(), serde_json::to_value(t)?);
            }
            serde_json::to_string_pretty(&v)? + "\n"
        }
        Some("html" | "htm") => render_html(report, trends),
        _ => {
            return Err(ExportError::UnsupportedFormat {
                path: path.to_path_buf(),
            });
        }
    };
    std::fs::write(path, body).map_err(|e| ExportError::Write {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

const CSS: &str = "body{font-family:system-ui,sans-serif;margin:2rem;color:#222;max-width:70rem}\
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ccc}\
.good{color:#1a7f37}.warning{color:#9a6700}.critical{color:#cf222e}\
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.2rem .6rem;text-align:right}\
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}\
svg{background:#fafafa;border:1px solid #eee}.legend span{display:inline-block;width:.8rem;height:.8rem;margin:0 .3rem 0 1rem}";

const COLOURS: [&str; 3] = ["#4c72b0", "#dd8452", "#55a868"];

/// Renders the page.
pub fn render_html(r: &HealthReport, trends: Option<&TrendsReport>) -> String {
    let mut o = String::new();
    let status = r.health_status.overall_health.name();
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Session Health Report</title><style>{CSS}</style></head><body>\n"
    );
    let _ = writeln!(
        o,
        "<h1>Session Health Report</h1><p>Generated {} UTC</p>",
        esc(&r.timestamp.format("%Y-%m-%d %H:%M:%S").to_string())
    );
    let _ = writeln!(
        o,
        "<p>Overall Health: <strong class=\"{status}\">{status}</strong></p>"
    );
    list(&mut o, "Issues", &r.health_status.issues);
    list(&mut o, "Recommendations", &r.recommendations);
    if !r.alerts.is_empty() {
        let _ = writeln!(
            o,
            "<h2>Alerts</h2><table><tr><th>name</th><th>severity</th><th>value</th><th>threshold</th><th>message</th></tr>"
        );
        for a in &r.alerts {
            let sev = if a.severity == super::Severity::Critical {
                "critical"
            } else {
                "warning"
            };
            let _ = writeln!(
                o,
                "<tr><td>{}</td><td class=\"{sev}\">{sev}</td><td>{:.2}</td><td>{}</td><td style=\"text-align:left\">{}</td></tr>",
                esc(&a.name),
                a.value,
                a.threshold,
                esc(&a.message)
            );
        }
        o.push_str("</table>\n");
    }

    let c = &r.statistics.session_counts;
    let rate = &r.statistics.creation_rate;
    let _ = writeln!(o, "<h2>Statistics</h2>");
    table(
        &mut o,
        &[
            ("Total sessions", c.total_sessions.to_string()),
            ("Active sessions", c.active_sessions.to_string()),
            ("Unique users", c.unique_users.to_string()),
            (
                "Active users",
                r.detailed_analytics.active_users.to_string(),
            ),
            (
                "Multi-session users",
                r.detailed_analytics.multi_session_users.to_string(),
            ),
            (
                "Created per minute (5 min)",
                format!("{:.2}", rate.per_minute_last_5_minutes),
            ),
            (
                "Created per minute (1 h)",
                format!("{:.2}", rate.per_minute_last_hour),
            ),
            (
                "Security score",
                r.security_analysis.security_score.to_string(),
            ),
            ("Schema", r.statistics.schema.version.clone()),
        ],
    );

    let a = &r.detailed_analytics.age_distribution;
    let _ = writeln!(o, "<h2>Age distribution (last activity, cumulative)</h2>");
    let labels = ["last hour", "last 24 h", "last week", "last month"].map(String::from);
    bar_chart(
        &mut o,
        "Sessions by last activity",
        &labels,
        &[(
            "sessions",
            vec![a.last_hour, a.last_24h, a.last_week, a.last_month],
        )],
    );
    if let Some(dist) = &r.detailed_analytics.platform_distribution {
        let _ = writeln!(o, "<h2>Platform distribution</h2>");
        let rows: Vec<(&str, String)> = dist
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_string()))
            .collect();
        table(&mut o, &rows);
    }

    if let Some(t) = trends {
        let _ = writeln!(o, "<h2>Trends ({} days, UTC)</h2>", t.period_days);
        let labels: Vec<String> = t.days.iter().map(|d| d.date.clone()).collect();
        let mut series = vec![
            ("created", t.days.iter().map(|d| d.created).collect()),
            ("expired", t.days.iter().map(|d| d.expired).collect()),
        ];
        if t.total_cleanup_deleted.is_some() {
            series.push((
                "cleaned up",
                t.days
                    .iter()
                    .map(|d| d.cleanup_deleted.unwrap_or(0))
                    .collect(),
            ));
        }
        bar_chart(&mut o, "Sessions per day", &labels, &series);
        let _ = writeln!(
            o,
            "<p>Total created: {} &middot; average {:.1}/day &middot; expired: {}</p>",
            t.total_sessions_created, t.average_daily_sessions, t.total_sessions_expired
        );
    }

    let p = &r.performance_metrics;
    let _ = writeln!(
        o,
        "<h2>Report queries</h2><table><tr><th>query</th><th>ms</th><th>rows</th></tr>"
    );
    for q in &p.queries {
        let _ = writeln!(
            o,
            "<tr><td>{}</td><td>{:.1}</td><td>{}</td></tr>",
            esc(&q.name),
            q.millis,
            q.rows
        );
    }
    o.push_str("</table>\n</body></html>\n");
    o
}

fn list(o: &mut String, title: &str, items: &[String]) {
    if items.is_empty() {
        return;
    }
    let _ = writeln!(o, "<h2>{}</h2><ul>", esc(title));
    for i in items {
        let _ = writeln!(o, "<li>{}</li>", esc(i));
    }
    o.push_str("</ul>\n");
}

fn table(o: &mut String, rows: &[(&str, String)]) {
    o.push_str("<table>\n");
    for (k, v) in rows {
        let _ = writeln!(o, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(v));
    }
    o.push_str("</table>\n");
}

/// A grouped bar chart as inline SVG, followed by the same numbers as a table (so the data
/// survives copy-paste and screen readers).
fn bar_chart(o: &mut String, title: &str, labels: &[String], series: &[(&str, Vec<u64>)]) {
    let (left, top, plot_h) = (50.0, 10.0, 200.0);
    let group_w = (720.0 / labels.len().max(1) as f64).clamp(6.0, 80.0);
    let bar_w = (group_w * 0.8 / series.len().max(1) as f64).max(1.0);
    let width = left + group_w * labels.len() as f64 + 10.0;
    let max = series
        .iter()
        .flat_map(|s| s.1.iter())
        .copied()
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let show_every = (labels.len() / 12).max(1);
    let _ = writeln!(
        o,
        "<svg role=\"img\" aria-label=\"{t}\" width=\"{width:.0}\" height=\"{h:.0}\" viewBox=\"0 0 {width:.0} {h:.0}\"><title>{t}</title>",
        t = esc(title),
        h = top + plot_h + 40.0
    );
    let _ = writeln!(
        o,
        "<line x1=\"{left}\" y1=\"{y}\" x2=\"{width:.0}\" y2=\"{y}\" stroke=\"#999\"/>",
        y = top + plot_h
    );
    let _ = writeln!(
        o,
        "<text x=\"{x}\" y=\"{y}\" font-size=\"10\" text-anchor=\"end\">{max:.0}</text>",
        x = left - 4.0,
        y = top + 8.0
    );
    let _ = writeln!(
        o,
        "<text x=\"{x}\" y=\"{y}\" font-size=\"10\" text-anchor=\"end\">0</text>",
        x = left - 4.0,
        y = top + plot_h
    );
    for (i, label) in labels.iter().enumerate() {
        let gx = left + group_w * i as f64 + group_w * 0.1;
        for (j, (name, values)) in series.iter().enumerate() {
            let v = values.get(i).copied().unwrap_or(0);
            let h = v as f64 / max * plot_h;
            let _ = writeln!(
                o,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bar_w:.1}\" height=\"{h:.1}\" fill=\"{c}\" data-label=\"{l}\" data-series=\"{n}\" data-value=\"{v}\"><title>{l} {n}: {v}</title></rect>",
                x = gx + bar_w * j as f64,
                y = top + plot_h - h,
                c = COLOURS[j % COLOURS.len()],
                l = esc(label),
                n = esc(name)
            );
        }
        if i % show_every == 0 {
            let _ = writeln!(
                o,
                "<text x=\"{x:.1}\" y=\"{y}\" font-size=\"10\">{l}</text>",
                x = gx,
                y = top + plot_h + 14.0,
                l = esc(label)
            );
        }
    }
    o.push_str("</svg>\n<div class=\"legend\">");
    for (j, (name, _)) in series.iter().enumerate() {
        let _ = write!(
            o,
            "<span style=\"background:{}\"></span>{}",
            COLOURS[j % COLOURS.len()],
            esc(name)
        );
    }
    o.push_str("</div>\n<table><tr><th></th>");
    for (name, _) in series {
        let _ = write!(o, "<th>{}</th>", esc(name));
    }
    o.push_str("</tr>\n");
    for (i, label) in labels.iter().enumerate() {
        let _ = write!(o, "<tr><td>{}</td>", esc(label));
        for (_, values) in series {
            let _ = write!(o, "<td>{}</td>", values.get(i).copied().unwrap_or(0));
        }
        o.push_str("</tr>\n");
    }
    o.push_str("</table>\n");
}

/// HTML-escapes text and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(ch),
        }
    }
    out
}
