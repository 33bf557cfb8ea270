//! The node's answer slots, and choking: when every slot is taken and a
//! request waits for one, the slowest answer that has run a while gives
//! its slot up.
//!
//! A `Get` or `GetBlobs` answer holds a slot (a reading thread and a few
//! MiB) while it is sent. The send stall timeout frees a slot whose peer
//! reads nothing, but a peer that reads a trickle is not stalled: a few
//! dozen identities reading slowly could hold every slot for as long as
//! their answers last, and honest peers would wait behind them. So, as
//! BitTorrent seeders choke the peers they upload to slowest when others
//! wait, a waiting request here stops ("chokes") the answer with the
//! lowest average rate among those that have run [`NodeConfig::choke_after`]
//! or longer, at most one per [`CHOKE_EVERY`]. The choked answer's stream
//! is reset with [`shoal_transport::RESET_BUSY`]: its peer keeps the groups
//! it verified and may ask again, waiting its turn like any other request.
//! With no request waiting, nothing is choked, however slow.
//!
//! The average rate is over the answer's whole run, so an answer that
//! bursts and then trickles is judged by both; the slots are node-wide, as
//! the upload they share is.
//!
//! [`NodeConfig::choke_after`]: crate::NodeConfig::choke_after

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, SemaphorePermit, TryAcquireError};
use tokio::time::Instant;

use crate::node::lock;

/// How often a waiting request may choke an answer (node-wide).
pub(crate) const CHOKE_EVERY: Duration = Duration::from_secs(1);

/// The answer slots of a node.
pub(crate) struct Answers {
    slots: Semaphore,
    /// An answer runs at least this long before it may be choked.
    choke_after: Duration,
    state: Mutex<State>,
    /// Answers choked so far.
    choked: AtomicU64,
}

#[derive(Default)]
struct State {
    next_id: u64,
    running: HashMap<u64, Running>,
    last_choke: Option<Instant>,
}

struct Running {
    started: Instant,
    sent: Arc<AtomicU64>,
    choke: Arc<Notify>,
    choked: bool,
}

impl Running {
    /// Bytes per second since it started.
    fn rate(&self, now: Instant) -> f64 {
        let secs = now.duration_since(self.started).as_secs_f64().max(1e-3);
        self.sent.load(Ordering::Relaxed) as f64 / secs
    }
}

/// One slot, held while an answer is sent; the slot is given back when
/// it is dropped.
pub(crate) struct Answer<'a> {
    owner: &'a Answers,
    id: u64,
    sent: Arc<AtomicU64>,
    choke: Arc<Notify>,
    _permit: SemaphorePermit<'a>,
}

impl Answers {
    pub(crate) fn new(slots: usize, choke_after: Duration) -> Self {
        Answers {
            slots: Semaphore::new(slots),
            choke_after,
            state: Mutex::new(State::default()),
            choked: AtomicU64::new(0),
        }
    }

    /// Answers choked so far.
    pub(crate) fn choked(&self) -> u64 {
        self.choked.load(Ordering::Relaxed)
    }

    /// Waits for a slot; while it waits, chokes the slowest answer that
    /// may be choked, once per [`CHOKE_EVERY`]. `None` once the slots are
    /// closed.
    pub(crate) async fn acquire(&self) -> Option<Answer<'_>> {
        let permit = match self.slots.try_acquire() {
            Ok(p) => p,
            Err(TryAcquireError::Closed) => return None,
            Err(TryAcquireError::NoPermits) => {
                // The semaphore is fair: the slot a choked answer frees
                // goes to the request that waited longest.
                let wait = self.slots.acquire();
                tokio::pin!(wait);
                loop {
                    let at = self.next_check(Instant::now());
                    tokio::select! {
                        p = &mut wait => break p.ok()?,
                        () = tokio::time::sleep_until(at) => self.choke_slowest(Instant::now()),
                    }
                }
            }
        };
        let sent = Arc::new(AtomicU64::new(0));
        let choke = Arc::new(Notify::new());
        let mut st = lock(&self.state);
        st.next_id += 1;
        let id = st.next_id;
        st.running.insert(
            id,
            Running {
                started: Instant::now(),
                sent: sent.clone(),
                choke: choke.clone(),
                choked: false,
            },
        );
        Some(Answer {
            owner: self,
            id,
            sent,
            choke,
            _permit: permit,
        })
    }

    /// When a waiting request next tries to choke: once the earliest answer
    /// not choked yet has run `choke_after`, not before [`CHOKE_EVERY`]
    /// after the last choke, and at most [`CHOKE_EVERY`] from `now`.
    ///
    /// A fixed tick from the waiter's arrival would miss answers shorter
    /// than the tick: requests arrive as answers end, just after the next
    /// one starts, so every tick would fall in a young answer (a test
    /// with short answers saw no choke at all under load).
    fn next_check(&self, now: Instant) -> Instant {
        let st = lock(&self.state);
        let mut at = st
            .running
            .values()
            .filter(|r| !r.choked)
            .map(|r| r.started + self.choke_after)
            .min()
            .unwrap_or(now + CHOKE_EVERY)
            .max(now);
        if let Some(last) = st.last_choke {
            at = at.max(last + CHOKE_EVERY);
        }
        at.min(now + CHOKE_EVERY)
    }

    /// Chokes the answer with the lowest average rate among those that
    /// have run `choke_after`, unless one was choked less than
    /// [`CHOKE_EVERY`] ago (many waiters choke no faster than one).
    fn choke_slowest(&self, now: Instant) {
        let mut st = lock(&self.state);
        // A little under the period: the waiters' timers and this check
        // need not line up to the microsecond.
        if st
            .last_choke
            .is_some_and(|t| now.duration_since(t) < CHOKE_EVERY.mul_f64(0.9))
        {
            return;
        }
        let choke_after = self.choke_after;
        let victim = st
            .running
            .values_mut()
            .filter(|r| !r.choked && now.duration_since(r.started) >= choke_after)
            .min_by(|a, b| a.rate(now).total_cmp(&b.rate(now)));
        if let Some(r) = victim {
            r.choked = true;
            // Stored if the answer is not waiting on it right now.
            r.choke.notify_one();
            st.last_choke = Some(now);
            self.choked.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[cfg(test)]
    fn running(&self) -> usize {
        lock(&self.state).running.len()
    }
}

impl Answer<'_> {
    /// Where the answer's stream counts the bytes it sends
    /// ([`shoal_transport::SendStream::count_into`]).
    pub(crate) fn counter(&self) -> Arc<AtomicU64> {
        self.sent.clone()
    }

    /// Completes once the answer is choked.
    pub(crate) async fn choked(&self) {
        self.choke.notified().await;
    }
}

impl Drop for Answer<'_> {
    fn drop(&mut self) {
        lock(&self.owner.state).running.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_waiting_request_chokes_the_slowest_answer_that_ran_long_enough() {
        let answers = Answers::new(2, Duration::from_secs(5));
        let fast = answers.acquire().await.unwrap();
        let slow = answers.acquire().await.unwrap();
        fast.counter().store(10 << 20, Ordering::Relaxed);
        slow.counter().store(1 << 10, Ordering::Relaxed);
        let waiter = async {
            let a = answers.acquire().await;
            a.is_some()
        };
        tokio::pin!(waiter);
        // Neither has run `choke_after` yet: nothing is choked.
        tokio::select! {
            _ = &mut waiter => panic!("a slot came free with none choked"),
            () = tokio::time::sleep(Duration::from_secs(4)) => {}
        }
        // Past it, the slow one is choked, once; the fast one runs on.
        tokio::select! {
            _ = &mut waiter => panic!("a slot came free with none given back"),
            () = slow.choked() => {}
            () = tokio::time::sleep(Duration::from_secs(3)) => panic!("the slow answer was not choked"),
        }
        // The waiter goes on asking, but one choke a second is all: the
        // fast one is not choked with it.
        tokio::select! {
            _ = &mut waiter => panic!("a slot came free with none given back"),
            () = fast.choked() => panic!("the fast answer was choked as well, at once"),
            () = tokio::time::sleep(Duration::from_millis(800)) => {}
        }
        assert_eq!(answers.choked(), 1);
        // The choked answer ends: its slot goes to the waiter.
        drop(slow);
        assert!(waiter.await);
        assert_eq!(
            answers.running(),
            1,
            "the waiter's answer replaced the slow one's"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_arrives_just_after_an_answer_started_chokes_it_once_it_may() {
        let answers = Answers::new(1, Duration::from_millis(100));
        let only = answers.acquire().await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let waiter = answers.acquire();
        tokio::pin!(waiter);
        let started = Instant::now();
        tokio::select! {
            _ = &mut waiter => panic!("a slot came free with none given back"),
            () = only.choked() => {}
            () = tokio::time::sleep(Duration::from_millis(500)) => {
                panic!("the answer was not choked once it had run choke_after")
            }
        }
        // Choked when it had run 100 ms, not at the waiter's next second.
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(85) && waited <= Duration::from_millis(100),
            "choked after {waited:?}"
        );
        drop(only);
        assert!(waiter.await.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_request_waiting_nothing_is_choked() {
        let answers = Answers::new(1, Duration::from_secs(1));
        let only = answers.acquire().await.unwrap();
        tokio::select! {
            () = only.choked() => panic!("choked with nobody waiting"),
            () = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
    }
}
