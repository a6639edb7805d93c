//! Updates and deletes of a message sent before, planned against what it became on the
//! channel: one message may have become several native messages (split text, button overflow,
//! an album), each with its receipt.
//!
//! Owns the reconciliation every channel shares: render the new message as a send would, then
//! edit the native messages that remain, delete the extra ones, and send the new ones after
//! them; and what the message's receipts are once (part of) a plan was carried out. Knows no
//! channel's JSON: each channel says how a send becomes an edit of one native message, and how
//! one native message is deleted (`Editor`).

use super::{NativeReceipt, NativeRequest, RenderError, Rendered};
use crate::model::Warning;

/// What one request of a plan does to the target's native messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Edits the target's native message at this index of its receipts.
    Edit(usize),
    /// Deletes it.
    Delete(usize),
    /// Sends a new native message (it goes after the ones that remain).
    Send,
}

/// The native requests of an update or delete, in order, each with its step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    pub rendered: Rendered,
    pub steps: Vec<Step>,
}

/// How one channel turns a send into an edit of one native message, and deletes one.
pub trait Editor {
    /// The request that makes the native message of `receipt` show what `send` would send.
    /// `Ok(None)`: this kind of native message cannot be edited into that (a photo into text);
    /// the plan then deletes it and sends the new one in its place, with a warning.
    fn edit(
        &self,
        send: &NativeRequest,
        receipt: &NativeReceipt,
    ) -> Result<Option<NativeRequest>, RenderError>;

    /// The request that deletes the native message of `receipt`.
    fn delete(&self, receipt: &NativeReceipt) -> Result<NativeRequest, RenderError>;
}

/// Most native messages one plan touches: a message renders to a few dozen requests at most,
/// and receipts come from the gateway's own store.
pub const MAX_STEPS: usize = 256;

/// The plan that makes the native messages of `receipts` show `sends` (a send's rendering of
/// the new message): edits of the first ones, deletes of the extra ones, sends of the new ones.
pub fn reconcile(
    sends: Rendered,
    receipts: &[NativeReceipt],
    editor: &dyn Editor,
) -> Result<Plan, RenderError> {
    if sends.requests.is_empty() {
        // A typing indicator or an event shows nothing: as an update it would delete the
        // message, which is DeleteMessage's to do.
        return Err(RenderError::invalid(
            "message",
            "the update shows nothing on this channel (a typing indicator or an event): \
             to remove the message, use DeleteMessage",
        ));
    }
    if receipts.len() > MAX_STEPS || sends.requests.len() > MAX_STEPS {
        return Err(RenderError::invalid(
            "message",
            format!("an update touches at most {MAX_STEPS} native messages"),
        ));
    }
    let mut plan = Plan {
        rendered: Rendered {
            requests: Vec::new(),
            warnings: sends.warnings,
        },
        steps: Vec::new(),
    };
    let mut replaced = 0usize;
    let mut later: Vec<NativeRequest> = Vec::new();
    let mut sends = sends.requests.into_iter();
    for (i, receipt) in receipts.iter().enumerate() {
        let Some(send) = sends.next() else {
            plan.rendered.requests.push(editor.delete(receipt)?);
            plan.steps.push(Step::Delete(i));
            continue;
        };
        match editor.edit(&send, receipt)? {
            Some(edit) => {
                plan.rendered.requests.push(edit);
                plan.steps.push(Step::Edit(i));
            }
            None => {
                plan.rendered.requests.push(editor.delete(receipt)?);
                plan.steps.push(Step::Delete(i));
                later.push(send);
                replaced += 1;
            }
        }
    }
    let removed = receipts
        .len()
        .saturating_sub(
            plan.steps
                .iter()
                .filter(|s| matches!(s, Step::Edit(_)))
                .count(),
        )
        .saturating_sub(replaced);
    let added: Vec<NativeRequest> = later.into_iter().chain(sends).collect();
    let new = added.len().saturating_sub(replaced);
    for send in added {
        plan.rendered.requests.push(send);
        plan.steps.push(Step::Send);
    }
    let n = receipts.len();
    if removed > 0 {
        plan.rendered.warnings.push(Warning::new(
            "update_deletes",
            "message",
            format!(
                "the update renders to fewer native messages than the {n} sent: the last \
                 {removed} are deleted"
            ),
        ));
    }
    if new > 0 {
        plan.rendered.warnings.push(Warning::new(
            "update_sends",
            "message",
            format!(
                "the update renders to more native messages than the {n} sent: {new} more are \
                 sent after them"
            ),
        ));
    }
    if replaced > 0 {
        plan.rendered.warnings.push(Warning::new(
            "update_replaces",
            "message",
            format!(
                "{replaced} native message(s) cannot be edited into what the update renders to \
                 (an album, or an activity that is not a message): each is deleted, and the new \
                 one sent after the others"
            ),
        ));
    }
    plan.rendered.cap_warnings();
    Ok(plan)
}

/// The plan that deletes every native message of `receipts`.
pub fn delete_all(receipts: &[NativeReceipt], editor: &dyn Editor) -> Result<Plan, RenderError> {
    if receipts.len() > MAX_STEPS {
        return Err(RenderError::invalid(
            "message_id",
            format!("a delete touches at most {MAX_STEPS} native messages"),
        ));
    }
    let mut plan = Plan::default();
    for (i, r) in receipts.iter().enumerate() {
        plan.rendered.requests.push(editor.delete(r)?);
        plan.steps.push(Step::Delete(i));
    }
    Ok(plan)
}

/// The target's receipts once the first `done.len()` steps of `steps` succeeded (`done` are
/// their receipts, in order): edited ones keep their place (with the id the channel gave back,
/// if any), deleted ones go, new ones come after; what was not carried out stays as it was.
pub fn receipts_after(
    before: &[NativeReceipt],
    steps: &[Step],
    done: &[NativeReceipt],
) -> Vec<NativeReceipt> {
    let mut kept: Vec<Option<NativeReceipt>> = before.iter().cloned().map(Some).collect();
    let mut added = Vec::new();
    for (k, step) in steps.iter().enumerate() {
        let Some(result) = done.get(k) else { break };
        match *step {
            Step::Edit(i) => {
                if let Some(Some(r)) = kept.get_mut(i)
                    && !result.native_id.is_empty()
                {
                    *r = result.clone();
                }
            }
            Step::Delete(i) => {
                if let Some(slot) = kept.get_mut(i) {
                    *slot = None;
                }
            }
            Step::Send => added.push(result.clone()),
        }
    }
    kept.into_iter().flatten().chain(added).collect()
}

/// The receipts a Render of an update shows it against: `n` native messages with placeholder
/// ids, so a user sees the request sequence before any was sent.
pub fn placeholders(n: usize, conversation_id: &str) -> Vec<NativeReceipt> {
    (1..=n.min(MAX_STEPS))
        .map(|i| NativeReceipt {
            native_id: format!("{{native_id_{i}}}"),
            conversation_id: conversation_id.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channels::{Body, HttpMethod};

    struct Fake;

    fn req(url: &str) -> NativeRequest {
        NativeRequest {
            method: HttpMethod::Post,
            url: url.into(),
            body: Body::default(),
            credential: String::new(),
            rate: Default::default(),
        }
    }

    impl Editor for Fake {
        fn edit(
            &self,
            send: &NativeRequest,
            receipt: &NativeReceipt,
        ) -> Result<Option<NativeRequest>, RenderError> {
            if send.url == "photo" {
                return Ok(None);
            }
            Ok(Some(req(&format!(
                "edit {} -> {}",
                receipt.native_id, send.url
            ))))
        }
        fn delete(&self, receipt: &NativeReceipt) -> Result<NativeRequest, RenderError> {
            Ok(req(&format!("delete {}", receipt.native_id)))
        }
    }

    fn sends(urls: &[&str]) -> Rendered {
        Rendered {
            requests: urls.iter().map(|u| req(u)).collect(),
            warnings: vec![],
        }
    }

    fn receipts(ids: &[&str]) -> Vec<NativeReceipt> {
        ids.iter()
            .map(|id| NativeReceipt {
                native_id: id.to_string(),
                conversation_id: "c".into(),
            })
            .collect()
    }

    fn urls(p: &Plan) -> Vec<String> {
        p.rendered.requests.iter().map(|r| r.url.clone()).collect()
    }

    #[test]
    fn three_into_one_edits_the_first_and_deletes_the_rest() {
        let p = reconcile(sends(&["a"]), &receipts(&["1", "2", "3"]), &Fake).unwrap();
        assert_eq!(urls(&p), ["edit 1 -> a", "delete 2", "delete 3"]);
        assert_eq!(p.steps, [Step::Edit(0), Step::Delete(1), Step::Delete(2)]);
        assert_eq!(p.rendered.warnings[0].code, "update_deletes");
    }

    #[test]
    fn three_into_five_edits_all_three_then_sends_two() {
        let p = reconcile(
            sends(&["a", "b", "c", "d", "e"]),
            &receipts(&["1", "2", "3"]),
            &Fake,
        )
        .unwrap();
        assert_eq!(
            urls(&p),
            ["edit 1 -> a", "edit 2 -> b", "edit 3 -> c", "d", "e"]
        );
        assert_eq!(p.rendered.warnings[0].code, "update_sends");
    }

    #[test]
    fn what_cannot_be_edited_is_deleted_and_sent_after_the_rest() {
        let p = reconcile(sends(&["photo", "b"]), &receipts(&["1", "2"]), &Fake).unwrap();
        assert_eq!(urls(&p), ["delete 1", "edit 2 -> b", "photo"]);
        assert_eq!(p.steps, [Step::Delete(0), Step::Edit(1), Step::Send]);
        let codes: Vec<&str> = p
            .rendered
            .warnings
            .iter()
            .map(|w| w.code.as_str())
            .collect();
        assert_eq!(codes, ["update_replaces"]);
    }

    #[test]
    fn receipts_follow_what_was_carried_out() {
        let before = receipts(&["1", "2", "3"]);
        let steps = [Step::Edit(0), Step::Delete(1), Step::Delete(2), Step::Send];
        // All done: 1 stays, 2 and 3 go, the new one comes after.
        let all = receipts(&["1", "", "", "9"]);
        let ids = |r: Vec<NativeReceipt>| r.into_iter().map(|r| r.native_id).collect::<Vec<_>>();
        assert_eq!(ids(receipts_after(&before, &steps, &all)), ["1", "9"]);
        // Stopped after the first delete: 3 is still there, nothing new.
        assert_eq!(ids(receipts_after(&before, &steps, &all[..2])), ["1", "3"]);
        // Nothing done: as before.
        assert_eq!(ids(receipts_after(&before, &steps, &[])), ["1", "2", "3"]);
    }

    #[test]
    fn a_delete_removes_every_native_message_in_order() {
        let p = delete_all(&receipts(&["1", "2"]), &Fake).unwrap();
        assert_eq!(urls(&p), ["delete 1", "delete 2"]);
    }
}
