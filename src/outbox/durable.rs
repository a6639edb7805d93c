//! When an outbox change is durable: a watermark of committed versions, and the futures that
//! wait on it.
//!
//! Owns the waiting only: the store numbers its changes (versions, in the order they reach its
//! writer) and the writer settles each commit in that order. Knows nothing of frames, files or
//! messages.
//!
//! Every Send waits on one of these before it answers, so making one costs no allocation: it
//! is a version and a shared `Commits`. (It was a oneshot channel behind a boxed, shared
//! future: four allocations per append and more when polled, ~8 of the ~111 allocations of a
//! delivered message.)

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use super::StoreError;

/// Resolves once what it stands for is durable, or with why it never will be.
pub struct Durable(State);

enum State {
    Settled(Result<(), StoreError>),
    Pending {
        commits: Arc<Commits>,
        version: u64,
        /// Names this future's registered waker; 0 while none is.
        token: u64,
    },
}

impl Durable {
    /// Already durable (nothing to write, or a store that keeps nothing).
    pub fn ready() -> Self {
        Durable(State::Settled(Ok(())))
    }

    /// A result known without waiting (a failure found before anything was queued).
    pub fn settled(result: Result<(), StoreError>) -> Self {
        Durable(State::Settled(result))
    }

    /// Durable once the commit holding `version` is.
    pub fn of(commits: &Arc<Commits>, version: u64) -> Self {
        Durable(State::Pending {
            commits: commits.clone(),
            version,
            token: 0,
        })
    }
}

impl Clone for Durable {
    fn clone(&self) -> Self {
        Durable(match &self.0 {
            State::Settled(r) => State::Settled(r.clone()),
            // A clone waits on its own: it must not share (and overwrite) this one's waker.
            State::Pending {
                commits, version, ..
            } => State::Pending {
                commits: commits.clone(),
                version: *version,
                token: 0,
            },
        })
    }
}

impl Future for Durable {
    type Output = Result<(), StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            State::Settled(r) => Poll::Ready(r.clone()),
            State::Pending {
                commits,
                version,
                token,
            } => commits.poll(*version, token, cx),
        }
    }
}

impl Drop for Durable {
    fn drop(&mut self) {
        // Only a future dropped while registered and unsettled has an entry left to remove.
        if let State::Pending {
            commits,
            version,
            token,
        } = &self.0
            && *token != 0
        {
            commits.lock().waiters.remove(&(*version, *token));
        }
    }
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            State::Settled(r) => f.debug_tuple("Durable").field(r).finish(),
            State::Pending { version, .. } => {
                f.debug_struct("Durable").field("version", version).finish()
            }
        }
    }
}

/// How far the writer got. Versions are settled in order: a commit settles every version up to
/// its last one.
#[derive(Default)]
pub struct Commits(Mutex<Marks>);

#[derive(Default)]
struct Marks {
    /// Every version up to this one is durable.
    durable_to: u64,
    /// Every version up to this one has its answer (durable or failed).
    settled_to: u64,
    /// The first failed commit's last version and its error. A failure is final: every later
    /// commit fails too, with `later_failure` (which names the first reason).
    first_failure: Option<(u64, StoreError)>,
    later_failure: Option<StoreError>,
    /// The writer is gone: what it had not settled never will be.
    closed: bool,
    /// Waiting futures by (version, token), so a commit wakes exactly the ones it settled.
    waiters: BTreeMap<(u64, u64), Waker>,
    next_token: u64,
}

impl Marks {
    fn answer(&self, version: u64) -> Option<Result<(), StoreError>> {
        if version <= self.durable_to {
            return Some(Ok(()));
        }
        if version <= self.settled_to {
            return Some(Err(match &self.first_failure {
                Some((last, e)) if version <= *last => e.clone(),
                _ => self.later_failure.clone().unwrap_or(StoreError::Closed),
            }));
        }
        self.closed.then_some(Err(StoreError::Closed))
    }
}

impl Commits {
    fn lock(&self) -> MutexGuard<'_, Marks> {
        // Nothing here can panic halfway through a change; recover rather than poison.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn poll(
        &self,
        version: u64,
        token: &mut u64,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), StoreError>> {
        let mut m = self.lock();
        if let Some(answer) = m.answer(version) {
            if *token != 0 {
                m.waiters.remove(&(version, *token));
                *token = 0;
            }
            return Poll::Ready(answer);
        }
        if *token == 0 {
            m.next_token += 1;
            *token = m.next_token;
        }
        match m.waiters.get_mut(&(version, *token)) {
            Some(w) => w.clone_from(cx.waker()),
            None => {
                m.waiters.insert((version, *token), cx.waker().clone());
            }
        }
        Poll::Pending
    }

    /// The writer's answer for every version up to `up_to`.
    pub fn settle(&self, up_to: u64, result: &Result<(), StoreError>) {
        let woken = {
            let mut m = self.lock();
            if up_to <= m.settled_to {
                return;
            }
            m.settled_to = up_to;
            match result {
                Ok(()) => m.durable_to = up_to,
                Err(e) if m.first_failure.is_none() => m.first_failure = Some((up_to, e.clone())),
                Err(e) => m.later_failure = Some(e.clone()),
            }
            let later = m.waiters.split_off(&(up_to + 1, 0));
            std::mem::replace(&mut m.waiters, later)
        };
        // Woken outside the lock: a woken task may poll at once on the other core.
        for w in woken.into_values() {
            w.wake();
        }
    }

    /// The writer stopped: whatever it had not settled fails as `Closed`.
    pub fn close(&self) {
        let woken = {
            let mut m = self.lock();
            m.closed = true;
            std::mem::take(&mut m.waiters)
        };
        for w in woken.into_values() {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    fn storage(s: &str) -> StoreError {
        StoreError::Storage(s.into())
    }

    #[tokio::test]
    async fn a_commit_wakes_exactly_the_versions_it_settled() {
        let c = Arc::new(Commits::default());
        let one = tokio::spawn(Durable::of(&c, 1));
        let two = tokio::spawn(Durable::of(&c, 2));
        tokio::task::yield_now().await;
        c.settle(1, &Ok(()));
        assert_eq!(one.await.unwrap(), Ok(()));
        tokio::task::yield_now().await;
        assert!(
            !two.is_finished(),
            "version 2 is not in the commit of version 1"
        );
        assert_eq!(c.lock().waiters.len(), 1);
        c.settle(2, &Ok(()));
        assert_eq!(two.await.unwrap(), Ok(()));
        assert!(c.lock().waiters.is_empty());
        // Asked after the fact, it answers at once.
        assert_eq!(Durable::of(&c, 2).now_or_never(), Some(Ok(())));
    }

    #[tokio::test]
    async fn a_failure_answers_its_commit_with_its_reason_and_later_ones_with_theirs() {
        let c = Arc::new(Commits::default());
        c.settle(1, &Ok(()));
        let failed = tokio::spawn(Durable::of(&c, 3));
        tokio::task::yield_now().await;
        c.settle(3, &Err(storage("No space left")));
        c.settle(4, &Err(storage("an earlier write failed; restart")));
        assert_eq!(failed.await.unwrap(), Err(storage("No space left")));
        assert_eq!(Durable::of(&c, 2).await, Err(storage("No space left")));
        assert_eq!(
            Durable::of(&c, 4).await,
            Err(storage("an earlier write failed; restart"))
        );
        assert_eq!(Durable::of(&c, 1).await, Ok(()));
        // Not settled yet: it waits for its own commit rather than borrowing an answer.
        assert_eq!(Durable::of(&c, 5).now_or_never(), None);
    }

    #[tokio::test]
    async fn a_closed_writer_fails_what_it_left_and_dropped_waiters_leave_nothing() {
        let c = Arc::new(Commits::default());
        let mut dropped = Durable::of(&c, 7);
        assert!((&mut dropped).now_or_never().is_none());
        let clone = dropped.clone();
        assert_eq!(
            c.lock().waiters.len(),
            1,
            "a clone registers only when polled"
        );
        drop(dropped);
        assert!(c.lock().waiters.is_empty());
        let waiting = tokio::spawn(clone);
        tokio::task::yield_now().await;
        c.close();
        assert_eq!(waiting.await.unwrap(), Err(StoreError::Closed));
        assert_eq!(Durable::of(&c, 9).await, Err(StoreError::Closed));
        assert_eq!(Durable::settled(Err(storage("x"))).await, Err(storage("x")));
        assert_eq!(Durable::ready().await, Ok(()));
    }
}
