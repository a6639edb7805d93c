//! Golden tests for the Facebook Messenger renderer (see `golden_support` for the case format).
//! An optional `NAME.config.json` holds `[channels.facebook]` keys for that case (defaults
//! otherwise); no rendered URL may carry a query string (tokens are the client's to add).

#[path = "golden_support/mod.rs"]
mod golden_support;

use std::fs;
use std::path::Path;

use channel_gateway::channels::facebook::config::FacebookConfig;
use channel_gateway::channels::facebook::render::{render_proactive, render_send};
use golden_support::{CONFIG_SUFFIX, Case};

fn config_for(dir: &Path, name: &str) -> Result<FacebookConfig, String> {
    let path = dir.join(format!("{name}{CONFIG_SUFFIX}"));
    let config: FacebookConfig = match fs::read_to_string(&path) {
        Ok(s) => serde_json::from_str(&s).map_err(|e| format!("{}: {e}", path.display()))?,
        Err(_) => FacebookConfig::default(),
    };
    config.validate().map_err(|e| e.to_string())?;
    Ok(config)
}

#[test]
fn golden_facebook() {
    golden_support::run("facebook", 20, |dir, name, case| {
        let config = config_for(dir, name)?;
        let rendered = match case {
            Case::Send(m) => render_send(&m, None, &config),
            Case::Proactive(ms, o) => render_proactive(&ms, &o, &config),
        };
        if let Ok(r) = &rendered
            && let Some(q) = r.requests.iter().find(|q| q.url.contains('?'))
        {
            return Err(format!(
                "a request URL has a query (tokens are the client's): {}",
                q.url
            ));
        }
        Ok(rendered)
    });
}
