//! Golden tests for the Bot Framework renderer (see `golden_support` for the case format).
//!
//! A case named `update_N_...` renders its message as an update of a message sent as `N`
//! activities, and `delete_N_...` the deletion of such a message (sent to the case's address),
//! both against `update::placeholders` receipts: the request sequence a Render shows before
//! any was sent.

#[path = "golden_support/mod.rs"]
mod golden_support;

use channel_gateway::channels::botframework::render::{
    render_delete, render_proactive, render_send, render_update,
};
use channel_gateway::channels::update::placeholders;
use golden_support::Case;

/// The `N` of a case named `{prefix}_N_...`.
fn sent_as(name: &str, prefix: &str) -> Option<usize> {
    name.strip_prefix(prefix)?
        .strip_prefix('_')?
        .split('_')
        .next()?
        .parse()
        .ok()
}

#[test]
fn golden_botframework() {
    golden_support::run("botframework", 20, |_, name, case| {
        Ok(match case {
            Case::Send(m) => {
                let conv = m.address.conversation_id().unwrap_or_default().to_string();
                if let Some(n) = sent_as(name, "update") {
                    render_update(&m, &placeholders(n, &conv)).map(|p| p.rendered)
                } else if let Some(n) = sent_as(name, "delete") {
                    render_delete(&m.address, &placeholders(n, &conv)).map(|p| p.rendered)
                } else {
                    render_send(&m)
                }
            }
            Case::Proactive(ms, o) => render_proactive(&ms, &o),
        })
    });
}
