//! `sessionfleet config show|keys`.

use sessionfleet::config::{KEYS, Settings};

use crate::output::Output;

/// Prints the effective configuration with the source of each value, passwords removed.
pub fn show(settings: &Settings, out: &Output) -> anyhow::Result<()> {
    let rows = settings.rows();
    if out.json {
        let doc: Vec<serde_json::Value> = rows
            .iter()
            .map(|(name, value, source)| serde_json::json!({"name": name, "value": value, "source": source}))
            .collect();
        out.print_json(&serde_json::json!({
            "config_file": settings.config_file.as_ref().map(|p| p.display().to_string()),
            "settings": doc,
        }));
        return Ok(());
    }
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    println!("Effective configuration");
    println!("{}", "=".repeat(40));
    if let Some(f) = &settings.config_file {
        println!("config file: {}", f.display());
    }
    for (name, value, source) in rows {
        println!("{name:width$}  {value}  ({source})");
    }
    Ok(())
}

/// Prints every setting with its variable, file key, default and accepted form.
pub fn keys(out: &Output) -> anyhow::Result<()> {
    if out.json {
        let doc: Vec<serde_json::Value> = KEYS
            .iter()
            .map(|k| serde_json::json!({"env": k.env, "file_key": k.file, "default": k.default, "form": k.form, "help": k.help}))
            .collect();
        out.print_json(&serde_json::Value::Array(doc));
        return Ok(());
    }
    for k in KEYS {
        let default = if k.default.is_empty() {
            "(unset)"
        } else {
            k.default
        };
        println!(
            "{} (file: {}, default: {})\n    {}; {}",
            k.env, k.file, default, k.help, k.form
        );
    }
    Ok(())
}
