//! Golden tests for the Telegram renderer with the default `[channels.telegram]` config (see
//! `golden_support` for the case format). Every expected text is also checked to be Telegram
//! HTML whose tags balance and whose visible text fits the limit, so a reviewed file cannot
//! hold a part Telegram would refuse.

#[path = "golden_support/mod.rs"]
mod golden_support;

use channel_gateway::channels::telegram::config::TelegramConfig;
use channel_gateway::channels::telegram::render::{render_proactive, render_send, texts_fit};
use golden_support::Case;

#[test]
fn golden_telegram() {
    let config = TelegramConfig::default();
    golden_support::run("telegram", 50, |_, _, case| {
        let r = match case {
            Case::Send(m) => render_send(&m, None, &config),
            Case::Proactive(ms, o) => render_proactive(&ms, &o, &config),
        };
        if let Ok(r) = &r {
            texts_fit(r, false)?;
        }
        Ok(r)
    });
}
