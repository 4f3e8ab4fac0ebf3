//! The dispatcher's clock: wall time in the daemon; a manual one that a benchmark or a test moves.
//!
//! Delivery is ruled by wall time (backoff, when a delivery is parked, the 24 h retry window), so
//! a day of a receiver's outage would take a day. With `Clock::Manual`, whoever holds the
//! `ManualClock` moves time: `ManualClock::idle` says when every worker is waiting for the clock
//! and until when, so a driver can jump to the next moment anything is due and no retry the day
//! would have made is skipped. Requests, store IO and everything outside delivery stay on real
//! time.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;

/// Where the dispatcher reads the time and waits for it.
#[derive(Clone, Debug, Default)]
pub enum Clock {
    /// The system's wall clock; waits on tokio's timer.
    #[default]
    System,
    Manual(Arc<ManualClock>),
}

impl Clock {
    /// Unix milliseconds.
    pub fn now_ms(&self) -> u64 {
        match self {
            Clock::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            Clock::Manual(clock) => clock.now_ms(),
        }
    }

    /// Waits until `ms` (Unix milliseconds); at once when it has passed.
    pub async fn sleep_until(&self, ms: u64) {
        match self {
            Clock::System => {
                let wait = ms.saturating_sub(self.now_ms());
                if wait > 0 {
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
            }
            Clock::Manual(clock) => clock.sleep_until(ms).await,
        }
    }

    /// Waits for `duration` of this clock's time.
    pub async fn sleep(&self, duration: Duration) {
        let until = self.now_ms().saturating_add(duration.as_millis() as u64);
        self.sleep_until(until).await;
    }
}

/// A clock that moves only when told, and knows who waits on it.
#[derive(Debug)]
pub struct ManualClock {
    now: AtomicU64,
    /// Notified whenever the time moves.
    ticked: Notify,
    /// Each waiting sleeper's deadline, by a number of its own.
    sleepers: Mutex<BTreeMap<u64, u64>>,
    next_sleeper: AtomicU64,
    /// Notified whenever a sleeper starts waiting.
    asleep: Notify,
}

impl ManualClock {
    /// A clock standing at `start_ms` (Unix milliseconds).
    pub fn new(start_ms: u64) -> Arc<ManualClock> {
        Arc::new(ManualClock {
            now: AtomicU64::new(start_ms),
            ticked: Notify::new(),
            sleepers: Mutex::new(BTreeMap::new()),
            next_sleeper: AtomicU64::new(0),
            asleep: Notify::new(),
        })
    }

    pub fn now_ms(&self) -> u64 {
        self.now.load(Ordering::Acquire)
    }

    /// Moves the time to `ms` (never backwards) and wakes whoever it is due for. Those are no
    /// longer counted as sleeping from this moment, so `idle` waits for them to act.
    pub fn set(&self, ms: u64) {
        {
            let mut sleepers = self.sleepers.lock().unwrap_or_else(|p| p.into_inner());
            self.now.fetch_max(ms, Ordering::AcqRel);
            let now = self.now_ms();
            sleepers.retain(|_, deadline| *deadline > now);
        }
        self.ticked.notify_waiters();
    }

    pub fn advance(&self, by: Duration) {
        self.set(self.now_ms().saturating_add(by.as_millis() as u64));
    }

    /// Waits until at least `workers` tasks are waiting for this clock, then returns the earliest
    /// time one of them waits for.
    pub async fn idle(&self, workers: usize) -> Option<u64> {
        loop {
            let asleep = self.asleep.notified();
            {
                let sleepers = self.sleepers.lock().unwrap_or_else(|p| p.into_inner());
                if sleepers.len() >= workers {
                    return sleepers.values().min().copied();
                }
            }
            asleep.await;
        }
    }

    async fn sleep_until(&self, ms: u64) {
        let id = self.next_sleeper.fetch_add(1, Ordering::Relaxed);
        let _registered = Registered { clock: self, id };
        {
            let mut sleepers = self.sleepers.lock().unwrap_or_else(|p| p.into_inner());
            if self.now_ms() >= ms {
                return;
            }
            sleepers.insert(id, ms);
        }
        self.asleep.notify_waiters();
        loop {
            let ticked = self.ticked.notified();
            if self.now_ms() >= ms {
                return;
            }
            ticked.await;
        }
    }
}

/// A sleeper's entry, removed however its wait ends (its deadline, or its future dropped).
struct Registered<'a> {
    clock: &'a ManualClock,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut sleepers = self.clock.sleepers.lock().unwrap_or_else(|p| p.into_inner());
        sleepers.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_clock_wakes_its_sleepers_when_moved_and_counts_them() {
        let clock = ManualClock::new(1_000);
        let sleeper = {
            let clock = Clock::Manual(clock.clone());
            tokio::spawn(async move {
                clock.sleep(Duration::from_secs(60)).await;
                clock.now_ms()
            })
        };
        assert_eq!(clock.idle(1).await, Some(61_000));
        clock.advance(Duration::from_secs(30));
        assert_eq!(clock.idle(1).await, Some(61_000), "not due yet");
        clock.set(61_000);
        assert_eq!(sleeper.await.expect("woken"), 61_000);
        assert_eq!(clock.sleepers.lock().expect("lock").len(), 0);
        clock.set(10);
        assert_eq!(clock.now_ms(), 61_000, "never backwards");
    }
}
