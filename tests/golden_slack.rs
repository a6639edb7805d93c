//! Golden tests for the Slack renderer with the default `[channels.slack]` config (see
//! `golden_support` for the case format).

#[path = "golden_support/mod.rs"]
mod golden_support;

use channel_gateway::channels::slack::config::SlackConfig;
use channel_gateway::channels::slack::render::{render_proactive, render_send};
use golden_support::Case;

#[test]
fn golden_slack() {
    let config = SlackConfig::default();
    golden_support::run("slack", 40, |_, _, case| {
        Ok(match case {
            Case::Send(m) => render_send(&m, None, &config),
            Case::Proactive(ms, o) => render_proactive(&ms, &o, &config),
        })
    });
}
