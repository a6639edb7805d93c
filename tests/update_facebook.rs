//! UpdateMessage and DeleteMessage on Messenger: page messages can be neither edited nor
//! unsent, so both answer UNIMPLEMENTED before anything is accepted (GetCapabilities says
//! `update_delete` false), and nothing reaches the fake Graph API.

#[path = "facebook_support/mod.rs"]
mod facebook;

use std::time::Duration;

use tonic::Code;

use channel_gateway::api::pb;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messenger_refuses_updates_and_deletes_before_accepting_them() {
    let h = facebook::start().await;
    let mut client = h.client.clone();
    let psid = "2400000000000001";
    let sent = client
        .send(pb::SendRequest {
            message: Some(facebook::text(psid, "hello")),
            idempotency_key: String::new(),
            wait: pb::WaitMode::Delivered as i32,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sent.receipts.len(), 1);
    let caps = client
        .get_capabilities(pb::GetCapabilitiesRequest {
            channel_id: "facebook".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!caps.capabilities.unwrap().update_delete);
    let before = h.fake.received().len();

    let e = client
        .update_message(pb::UpdateMessageRequest {
            message_id: sent.message_id.clone(),
            message: Some(pb::Message {
                text: "changed".into(),
                ..Default::default()
            }),
            idempotency_key: String::new(),
            wait: pb::WaitMode::Delivered as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    assert!(e.message().contains("update_delete"), "{}", e.message());
    let e = client
        .delete_message(pb::DeleteMessageRequest {
            message_id: sent.message_id.clone(),
            idempotency_key: String::new(),
            wait: pb::WaitMode::Delivered as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    assert!(e.message().contains("update_delete"), "{}", e.message());

    // Nothing was accepted: no change got the next id, and nothing more reached Graph.
    let next = (sent.message_id.parse::<u64>().unwrap() + 1).to_string();
    let e = client
        .get_delivery(pb::GetDeliveryRequest { message_id: next })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(h.fake.received().len(), before);
}
