//! The recent past of one version under analysis, for trailing windows ending at any closed second.
//!
//! The last seconds are kept one bucket each, older ones in 10-second blocks, so that a ten-minute
//! window merges about seventy aggregates rather than six hundred, and memory per version stays
//! near seventy aggregates whatever the traffic.

use std::collections::VecDeque;

use crate::observation::EventTime;
use crate::window::Aggregate;

const SECOND: EventTime = 1_000_000_000;
const BLOCK: EventTime = 10 * SECOND;

#[derive(Clone, Debug, Default)]
pub struct History {
    /// Closed 1-second buckets of the last `BLOCK`, by start.
    seconds: VecDeque<(EventTime, Aggregate)>,
    /// The block the latest buckets belong to, being filled.
    block: Option<(EventTime, Aggregate)>,
    /// Completed blocks, oldest first.
    blocks: VecDeque<(EventTime, Aggregate)>,
    /// How far back blocks are kept.
    keep: EventTime,
}

impl History {
    pub fn new(keep_s: u64) -> Self {
        History {
            keep: keep_s.saturating_mul(SECOND).max(BLOCK),
            ..History::default()
        }
    }

    /// Adds the closed bucket that starts at `start`. Buckets come in time order.
    pub fn push(&mut self, start: EventTime, bucket: &Aggregate) {
        self.seconds.push_back((start, bucket.clone()));
        while self
            .seconds
            .front()
            .is_some_and(|(s, _)| s.saturating_add(BLOCK) <= start)
        {
            self.seconds.pop_front();
        }
        let block_start = start - start % BLOCK;
        match &mut self.block {
            Some((b, agg)) if *b == block_start => agg.merge(bucket),
            _ => {
                if let Some(done) = self.block.take() {
                    self.blocks.push_back(done);
                }
                self.block = Some((block_start, bucket.clone()));
            }
        }
        let horizon = block_start.saturating_sub(self.keep);
        while self.blocks.front().is_some_and(|(b, _)| *b < horizon) {
            self.blocks.pop_front();
        }
    }

    /// What the version did in each trailing window `[now - h, now)`, for each `h` in seconds
    /// (ascending order is not required). Windows longer than a block are block-aligned at their
    /// start, so they may be up to one block shorter than asked.
    pub fn trailing(&self, now: EventTime, horizons_s: &[u64]) -> Vec<Aggregate> {
        let mut order: Vec<usize> = (0..horizons_s.len()).collect();
        order.sort_by_key(|&i| horizons_s[i]);
        let mut out = vec![Aggregate::default(); horizons_s.len()];
        // Short windows from single seconds.
        let mut acc = Aggregate::default();
        let mut secs = self.seconds.iter().rev().peekable();
        let mut blocks = self.blocks.iter().rev().peekable();
        let mut took_block = false;
        for i in order {
            let h = horizons_s[i].saturating_mul(SECOND);
            let from = now.saturating_sub(h);
            if h <= BLOCK && !took_block {
                while let Some((s, agg)) = secs.peek() {
                    if *s < from {
                        break;
                    }
                    acc.merge(agg);
                    secs.next();
                }
                out[i] = acc.clone();
                continue;
            }
            if !took_block {
                // Longer windows: the block being filled, then whole blocks.
                acc = self.block.as_ref().map(|(_, a)| a.clone()).unwrap_or_default();
                took_block = true;
            }
            while let Some((b, agg)) = blocks.peek() {
                if *b < from {
                    break;
                }
                acc.merge(agg);
                blocks.next();
            }
            out[i] = acc.clone();
        }
        out
    }

    /// The pieces `trailing(now, [h])` merges: single seconds for windows up to a block, else
    /// the block being filled and whole blocks; each with its start.
    pub fn parts(&self, now: EventTime, horizon_s: u64) -> Vec<(EventTime, &Aggregate)> {
        let h = horizon_s.saturating_mul(SECOND);
        let from = now.saturating_sub(h);
        if h <= BLOCK {
            return self
                .seconds
                .iter()
                .filter(|(s, _)| *s >= from)
                .map(|(s, a)| (*s, a))
                .collect();
        }
        self.blocks
            .iter()
            .filter(|(b, _)| *b >= from)
            .chain(self.block.as_ref())
            .map(|(s, a)| (*s, a))
            .collect()
    }

    /// The 10-second blocks held, oldest first, the one being filled last.
    pub fn blocks(&self) -> impl Iterator<Item = (EventTime, &Aggregate)> {
        self.blocks
            .iter()
            .chain(self.block.as_ref())
            .map(|(start, agg)| (*start, agg))
    }

    /// Bytes held, roughly, for memory accounting.
    pub fn len(&self) -> usize {
        self.seconds.len() + self.blocks.len() + usize::from(self.block.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(requests: u64) -> Aggregate {
        let mut a = Aggregate::default();
        for _ in 0..requests {
            a.all.add(1_000_000, false);
        }
        a
    }

    #[test]
    fn trailing_windows_count_what_they_cover() {
        let mut h = History::new(120);
        // One request per second from 0 to 299 s.
        for s in 0..300u64 {
            h.push(s * SECOND, &bucket(1));
        }
        let now = 300 * SECOND;
        let w = h.trailing(now, &[60, 5, 10, 1000]);
        assert_eq!(w[1].all.requests, 5);
        assert_eq!(w[2].all.requests, 10);
        assert_eq!(w[0].all.requests, 60);
        // Only `keep` (120 s) and the block in progress are kept.
        assert!(
            w[3].all.requests >= 120 && w[3].all.requests <= 130,
            "{}",
            w[3].all.requests
        );
        assert!(h.len() <= 10 + 14, "{}", h.len());
    }

    #[test]
    fn parts_merge_into_the_trailing_window() {
        let mut h = History::new(120);
        for s in 0..95u64 {
            h.push(s * SECOND, &bucket(1 + s % 3));
        }
        let now = 95 * SECOND;
        for horizon in [5, 10, 60] {
            let mut merged = Aggregate::default();
            for (_, part) in h.parts(now, horizon) {
                merged.merge(part);
            }
            assert_eq!(
                merged.all.requests,
                h.trailing(now, &[horizon])[0].all.requests,
                "{horizon}"
            );
        }
    }

    #[test]
    fn gaps_in_traffic_are_just_absent() {
        let mut h = History::new(60);
        h.push(0, &bucket(3));
        h.push(25 * SECOND, &bucket(4));
        let w = h.trailing(30 * SECOND, &[10, 30]);
        assert_eq!(w[0].all.requests, 4);
        assert_eq!(w[1].all.requests, 7);
    }
}
