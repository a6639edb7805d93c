//! What the UpdateMessage and DeleteMessage tests of every channel call: the two RPCs, the new
//! message without an address, a message's receipts now, and warnings' codes. Each channel's
//! test file brings its own harness and fake.
#![allow(dead_code)]

use channel_gateway::api::pb::{self, channel_gateway_client::ChannelGatewayClient};

pub type Client = ChannelGatewayClient<tonic::transport::Channel>;

pub async fn update(
    client: &Client,
    id: &str,
    message: pb::Message,
    wait: pb::WaitMode,
    key: &str,
) -> Result<pb::UpdateMessageResponse, tonic::Status> {
    client
        .clone()
        .update_message(pb::UpdateMessageRequest {
            message_id: id.into(),
            message: Some(message),
            idempotency_key: key.into(),
            wait: wait as i32,
        })
        .await
        .map(|r| r.into_inner())
}

pub async fn delete(
    client: &Client,
    id: &str,
    wait: pb::WaitMode,
) -> Result<pb::DeleteMessageResponse, tonic::Status> {
    client
        .clone()
        .delete_message(pb::DeleteMessageRequest {
            message_id: id.into(),
            idempotency_key: String::new(),
            wait: wait as i32,
        })
        .await
        .map(|r| r.into_inner())
}

/// The new message, without an address: the sent one's is used.
pub fn new_text(text: &str) -> pb::Message {
    pb::Message {
        text: text.into(),
        ..Default::default()
    }
}

/// The native ids a message has now (GetDelivery's receipts).
pub async fn receipts_of(client: &Client, id: &str) -> Vec<String> {
    client
        .clone()
        .get_delivery(pb::GetDeliveryRequest {
            message_id: id.into(),
        })
        .await
        .expect("GetDelivery")
        .into_inner()
        .delivery
        .expect("a delivery")
        .receipts
        .into_iter()
        .map(|r| r.native_id)
        .collect()
}

pub fn codes(w: &[pb::Warning]) -> Vec<&str> {
    w.iter().map(|w| w.code.as_str()).collect()
}
