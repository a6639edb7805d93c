//! When an outbox change is durable: a watermark of committed versions, and the futures that
//! wait on it.
//!
//! Owns the waiting only: the store numbers its changes (versions, in the order they reach its
//! writer) and the writer settles each commit in that order. Knows nothing of frames, files or
//! messages.
//!
//! Every Send waits on one of these before it answers, so making one costs no allocation: it
//! is a version and a shared `Commits`. (It was a oneshot channel behind a boxed, shared
//! future, several allocations per append and more when polled: removing it took a delivered
//! message on the slow channel with Send from 111 to 97 allocations.)

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
            let stale = commits.lock().waiters.remove(&(*version, *token));
            // Dropped after the lock: dropping a waker runs the executor's code.
            drop(stale);
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

/// How far the writer got. Versions are settled in order: a commit settles every version after
/// the previous commit's, up to its own last one, with its own result.
#[derive(Default)]
pub struct Commits(Mutex<Marks>);

/// Versions refused on their own kept for their waiters (see `Commits::settle_except`).
const MAX_REFUSED: usize = 10_000;

#[derive(Default)]
struct Marks {
    /// Every version up to this one has its answer: durable unless it lies in `failed`.
    settled_to: u64,
    /// The versions of failed commits (first, last, why), oldest first. Few: a failed write
    /// leaves the store broken, and every later commit then fails with one reason, which extends
    /// the last range instead of adding one. A commit refused on its own (one a store rejects
    /// for its content) fails alone: later commits may succeed, and its versions stay failed.
    failed: Vec<(u64, u64, StoreError)>,
    /// The writer is gone: what it had not settled never will be.
    closed: bool,
    /// Waiting futures by (version, token), so a commit wakes exactly the ones it settled.
    waiters: BTreeMap<(u64, u64), Waker>,
    next_token: u64,
}

impl Marks {
    fn answer(&self, version: u64) -> Option<Result<(), StoreError>> {
        if version > self.settled_to {
            return self.closed.then_some(Err(StoreError::Closed));
        }
        for (first, last, e) in self.failed.iter().rev() {
            if version > *last {
                break;
            }
            if version >= *first {
                return Some(Err(e.clone()));
            }
        }
        Some(Ok(()))
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
        // A waker replaced or removed here is dropped after the lock (it runs executor code).
        let stale;
        let poll = if let Some(answer) = m.answer(version) {
            stale = m.waiters.remove(&(version, std::mem::take(token)));
            Poll::Ready(answer)
        } else {
            if *token == 0 {
                m.next_token += 1;
                *token = m.next_token;
            }
            stale = m.waiters.insert((version, *token), cx.waker().clone());
            Poll::Pending
        };
        drop(m);
        drop(stale);
        poll
    }

    /// The writer's answer for every version up to `up_to`.
    pub fn settle(&self, up_to: u64, result: &Result<(), StoreError>) {
        self.settle_with(up_to, |m, first| {
            if let Err(e) = result {
                match m.failed.last_mut() {
                    Some((_, last, same)) if *last + 1 == first && same == e => *last = up_to,
                    _ => m.failed.push((first, up_to, e.clone())),
                }
            }
        });
    }

    /// A successful commit up to `up_to` in which some versions were refused on their own (an
    /// idempotency key another replica took, a fenced write that lost its partition): those
    /// answer their own error, the others are durable. `refused` is in version order, within
    /// the commit. Few, and kept at most `MAX_REFUSED` (oldest forgotten): a waiter is polled
    /// right after its commit.
    pub fn settle_except(&self, up_to: u64, refused: Vec<(u64, u64, StoreError)>) {
        self.settle_with(up_to, |m, first| {
            for (a, b, e) in refused {
                if a >= first && b <= up_to && a <= b {
                    m.failed.push((a, b, e));
                }
            }
            if m.failed.len() > MAX_REFUSED {
                let excess = m.failed.len() - MAX_REFUSED;
                m.failed.drain(..excess);
            }
        });
    }

    /// Moves the watermark to `up_to` (`record` notes the failures among the versions from
    /// `first`) and wakes the waiters it settled.
    fn settle_with(&self, up_to: u64, record: impl FnOnce(&mut Marks, u64)) {
        let woken = {
            let mut m = self.lock();
            if up_to <= m.settled_to {
                return;
            }
            let first = m.settled_to + 1;
            m.settled_to = up_to;
            record(&mut m, first);
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

    /// A wake that never comes fails the test instead of hanging it.
    async fn woken<F: Future>(f: F) -> F::Output {
        tokio::time::timeout(std::time::Duration::from_secs(5), f)
            .await
            .expect("never woken")
    }

    #[tokio::test]
    async fn a_commit_wakes_exactly_the_versions_it_settled() {
        let c = Arc::new(Commits::default());
        let one = tokio::spawn(Durable::of(&c, 1));
        let two = tokio::spawn(Durable::of(&c, 2));
        tokio::task::yield_now().await;
        c.settle(1, &Ok(()));
        assert_eq!(woken(one).await.unwrap(), Ok(()));
        tokio::task::yield_now().await;
        assert!(
            !two.is_finished(),
            "version 2 is not in the commit of version 1"
        );
        assert_eq!(c.lock().waiters.len(), 1);
        c.settle(2, &Ok(()));
        assert_eq!(woken(two).await.unwrap(), Ok(()));
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
        assert_eq!(woken(failed).await.unwrap(), Err(storage("No space left")));
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
    async fn a_commit_that_failed_alone_stays_failed_when_later_ones_succeed() {
        let c = Arc::new(Commits::default());
        let too_large = tokio::spawn(Durable::of(&c, 2));
        tokio::task::yield_now().await;
        c.settle(1, &Ok(()));
        c.settle(2, &Err(storage("one commit too large for a segment")));
        c.settle(4, &Ok(()));
        // Woken by the failure, polled after the success: still the failure.
        assert_eq!(
            woken(too_large).await.unwrap(),
            Err(storage("one commit too large for a segment"))
        );
        assert_eq!(
            Durable::of(&c, 2).await,
            Err(storage("one commit too large for a segment"))
        );
        assert_eq!(Durable::of(&c, 1).await, Ok(()));
        assert_eq!(Durable::of(&c, 3).await, Ok(()));
        assert_eq!(Durable::of(&c, 4).await, Ok(()));
        // A broken store fails every later commit with one reason: one range, not one each.
        for v in 5..100 {
            c.settle(v, &Err(storage("an earlier write failed; restart")));
        }
        assert_eq!(c.lock().failed.len(), 2);
        assert_eq!(
            Durable::of(&c, 50).await,
            Err(storage("an earlier write failed; restart"))
        );
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
        assert_eq!(woken(waiting).await.unwrap(), Err(StoreError::Closed));
        assert_eq!(Durable::of(&c, 9).await, Err(StoreError::Closed));
        assert_eq!(Durable::settled(Err(storage("x"))).await, Err(storage("x")));
        assert_eq!(Durable::ready().await, Ok(()));
    }

    #[tokio::test]
    async fn versions_refused_alone_answer_their_error_and_the_rest_of_the_commit_is_durable() {
        let c = Arc::new(Commits::default());
        let waiting = tokio::spawn(Durable::of(&c, 4));
        tokio::task::yield_now().await;
        // One commit of versions 1..=6: a put of 2..=3 lost its key, 5 was fenced out.
        c.settle_except(
            6,
            vec![
                (2, 3, StoreError::KeyTaken),
                (5, 5, StoreError::Fenced),
                // Outside the commit: ignored.
                (9, 9, StoreError::Fenced),
            ],
        );
        assert_eq!(woken(waiting).await.unwrap(), Ok(()));
        let answers: Vec<_> = (1..=6)
            .map(|v| Durable::of(&c, v).now_or_never().unwrap())
            .collect();
        assert_eq!(
            answers,
            [
                Ok(()),
                Err(StoreError::KeyTaken),
                Err(StoreError::KeyTaken),
                Ok(()),
                Err(StoreError::Fenced),
                Ok(())
            ]
        );
        assert!(
            Durable::of(&c, 9).now_or_never().is_none(),
            "not settled yet"
        );
        // A later failed commit still extends as before, after the refusals.
        c.settle(8, &Err(storage("down")));
        assert_eq!(Durable::of(&c, 7).await, Err(storage("down")));
        assert_eq!(Durable::of(&c, 5).await, Err(StoreError::Fenced));
    }

    #[tokio::test]
    async fn refusals_kept_for_waiters_are_bounded() {
        let c = Arc::new(Commits::default());
        let n = (MAX_REFUSED + 10) as u64;
        for v in 1..=n {
            c.settle_except(v, vec![(v, v, StoreError::Fenced)]);
        }
        assert_eq!(c.lock().failed.len(), MAX_REFUSED);
        assert_eq!(Durable::of(&c, n).await, Err(StoreError::Fenced));
    }
}
