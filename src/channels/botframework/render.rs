//! Pure translation of the model into Bot Framework Connector v3 requests.
//! (Placeholder signatures; the real renderer lands from the bf-render branch.)

use crate::channels::{Capabilities, NativeRequest, RenderError, Rendered};
use crate::model::{Address, Message, ProactiveOptions, Warning};

pub fn activity(_msg: &Message) -> Result<(serde_json::Value, Vec<Warning>), RenderError> {
    Err(RenderError::invalid("message", "renderer not built yet"))
}
pub fn render_send(_msg: &Message) -> Result<Rendered, RenderError> {
    Err(RenderError::invalid("message", "renderer not built yet"))
}
pub fn render_create_conversation(
    _address: &Address,
    _options: &ProactiveOptions,
) -> Result<NativeRequest, RenderError> {
    Err(RenderError::invalid("message", "renderer not built yet"))
}
pub fn render_proactive(
    _messages: &[Message],
    _options: &ProactiveOptions,
) -> Result<Rendered, RenderError> {
    Err(RenderError::invalid("message", "renderer not built yet"))
}
pub fn capabilities(channel_id: &str) -> Capabilities {
    Capabilities {
        channel_id: channel_id.into(),
        ..Default::default()
    }
}
