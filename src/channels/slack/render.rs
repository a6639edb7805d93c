//! Pure translation of the model into Slack requests. (Placeholder until the channel lands.)

use super::config::SlackConfig;
use crate::channels::{Capabilities, RenderError, Rendered};
use crate::model::{Message, ProactiveOptions};

/// The requests for one message. `proactive` is set for SendProactive (outside a reply).
pub fn render_send(
    _msg: &Message,
    _proactive: Option<&ProactiveOptions>,
    _config: &SlackConfig,
) -> Result<Rendered, RenderError> {
    Err(RenderError::invalid(
        "message.address.channel_id",
        "slack is not implemented yet",
    ))
}

/// Render of a proactive start whose address has no conversation.
pub fn render_proactive(
    messages: &[Message],
    options: &ProactiveOptions,
    config: &SlackConfig,
) -> Result<Rendered, RenderError> {
    let mut out = Rendered::default();
    for m in messages {
        let r = render_send(m, Some(options), config)?;
        out.requests.extend(r.requests);
        out.warnings.extend(r.warnings);
    }
    Ok(out)
}

pub fn capabilities(channel_id: &str) -> Capabilities {
    Capabilities {
        channel_id: channel_id.into(),
        implementation: "slack".into(),
        ..Default::default()
    }
}
