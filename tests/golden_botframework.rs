//! Golden tests for the Bot Framework renderer (see `golden_support` for the case format).

#[path = "golden_support/mod.rs"]
mod golden_support;

use channel_gateway::channels::botframework::render::{render_proactive, render_send};
use golden_support::Case;

#[test]
fn golden_botframework() {
    golden_support::run("botframework", 20, |_, _, case| {
        Ok(match case {
            Case::Send(m) => render_send(&m),
            Case::Proactive(ms, o) => render_proactive(&ms, &o),
        })
    });
}
