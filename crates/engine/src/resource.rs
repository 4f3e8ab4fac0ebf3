//! What one export request brought, resource by resource: the engine's unit of input
//! (`Batch`), built by the receivers from the observation types.

use std::sync::Arc;

use crate::observation::{
    CallObservation, EventTime, ExceptionObservation, Identity, LogObservation, MetricPoint,
    RequestObservation,
};
use crate::summary::{Observed, Summary};

/// Everything one resource contributed to one export request.
#[derive(Clone, Debug, PartialEq)]
pub struct ResourceObservations {
    pub identity: Identity,
    /// The producing instance (`service.instance.id`), which keeps its own metric streams.
    pub instance: Option<Arc<str>>,
    /// Spans accepted from this resource, whatever their kind.
    pub spans: u64,
    pub requests: Vec<RequestObservation>,
    pub calls: Vec<CallObservation>,
    pub exceptions: Vec<ExceptionObservation>,
    pub metric_points: Vec<MetricPoint>,
    pub logs: Vec<LogObservation>,
    /// The requests, calls, exceptions and logs summed per bucket where they were read
    /// (`summarize`), in place of the four vectors, which are then empty.
    pub summary: Option<Box<Summary>>,
    /// Earliest and latest event time of anything accepted from this resource, internal spans
    /// included; `None` when nothing was.
    pub seen: Option<(EventTime, EventTime)>,
}

impl ResourceObservations {
    pub fn new(identity: Identity) -> Self {
        ResourceObservations {
            identity,
            instance: None,
            spans: 0,
            requests: Vec::new(),
            calls: Vec::new(),
            exceptions: Vec::new(),
            metric_points: Vec::new(),
            logs: Vec::new(),
            summary: None,
            seen: None,
        }
    }

    /// Sums the requests, calls, exceptions and logs per bucket of `bucket_ns` (`Summary`) and
    /// lets go of them, where that pays; returns whether it did. Metric points stay as they are:
    /// the catalog's streams make their samples.
    pub fn summarize(&mut self, bucket_ns: EventTime) -> bool {
        if self.summary.is_some() {
            return false;
        }
        let Some(summary) = Summary::of(&self.observed(), bucket_ns) else {
            return false;
        };
        self.summary = Some(Box::new(summary));
        self.requests = Vec::new();
        self.calls = Vec::new();
        self.exceptions = Vec::new();
        self.logs = Vec::new();
        true
    }

    /// Its requests, calls, exceptions and logs, as a summary takes them.
    pub fn observed(&self) -> Observed<'_> {
        Observed {
            requests: &self.requests,
            calls: &self.calls,
            exceptions: &self.exceptions,
            logs: &self.logs,
        }
    }

    /// Drops every observation dated after `limit`, returning how many went, and narrows `seen`
    /// to what is left.
    pub fn drop_after(&mut self, limit: EventTime) -> u64 {
        let before = self.len();
        let mut seen: Option<(EventTime, EventTime)> = None;
        let mut keep = |time: EventTime| {
            let ok = time <= limit;
            if ok {
                seen = Some(seen.map_or((time, time), |(lo, hi)| (lo.min(time), hi.max(time))));
            }
            ok
        };
        self.requests.retain(|r| keep(r.time));
        self.calls.retain(|c| keep(c.time));
        self.exceptions.retain(|e| keep(e.time));
        self.metric_points.retain(|p| keep(p.time));
        self.logs.retain(|l| keep(l.time));
        if let Some(summary) = &mut self.summary {
            summary.drop_after(limit);
            if let Some((lo, hi)) = summary.span() {
                keep(lo);
                keep(hi);
            }
        }
        let dropped = (before - self.len()) as u64;
        // Spans that are neither requests nor calls (internal ones) count in `spans` and `seen`
        // only; what is left of `seen` is what the kept observations span, or the old earliest
        // time when only such spans remain (those were all before the limit, or nothing moved).
        self.seen = seen.or_else(|| self.seen.filter(|(_, hi)| *hi <= limit));
        dropped
    }

    /// Observations of every kind (spans that are neither requests nor calls aside).
    pub fn len(&self) -> usize {
        self.requests.len()
            + self.calls.len()
            + self.exceptions.len()
            + self.metric_points.len()
            + self.logs.len()
            + self.summary.as_ref().map_or(0, |s| s.len() as usize)
    }

    /// Log records, summed or not.
    pub fn log_count(&self) -> u64 {
        match &self.summary {
            Some(s) => s.counts.logs,
            None => self.logs.len() as u64,
        }
    }

    /// Whether it holds no observation.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Widens the resource's event-time range to include `time`.
    pub fn saw(&mut self, time: EventTime) {
        self.seen = Some(match self.seen {
            None => (time, time),
            Some((lo, hi)) => (lo.min(time), hi.max(time)),
        });
    }
}

/// The observations of one export request, ready for the engine.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    pub resources: Vec<ResourceObservations>,
    /// The receiver's wall clock when the request arrived (0: unknown, as in a replay from
    /// history). The engine reads no clock; this bounds how far ahead of real time data may be.
    pub received: EventTime,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observation::{DownstreamSource, TraceId};
    use crate::summary::observation_bytes;
    use crate::summary::tests::request;

    const S: EventTime = 1_000_000_000;
    const T0: EventTime = 1_767_571_200 * S;

    fn call(downstream: &Arc<str>, time: EventTime) -> CallObservation {
        CallObservation {
            downstream: downstream.clone(),
            source: DownstreamSource::PeerService,
            time,
            duration_ns: 1_000_000,
            error: false,
            trace_id: TraceId([1; 16]),
            cohort: None,
        }
    }

    /// What an SDK's batch span processor sends of one service: 32 requests over two seconds,
    /// four routes, each request with a database call.
    fn sdk_batch() -> ResourceObservations {
        let routes: Vec<Arc<str>> = (0..4).map(|i| Arc::from(format!("GET /route/{i}"))).collect();
        let db: Arc<str> = Arc::from("postgres");
        let mut r = ResourceObservations::new(Identity::new("prod", "shop", "1.0"));
        for i in 0..32u64 {
            let time = T0 + i * S / 16;
            r.saw(time);
            r.requests.push(request(&routes[i as usize % 4], time, 1, None));
            r.calls.push(call(&db, time));
        }
        r
    }

    /// A resource is summed where its summary holds less than its observations: an SDK's batch
    /// is; a lone request is not, nor a resource of a distinct name or second for nearly every
    /// observation (what hostile input would send to make summaries big), which go as they came.
    #[test]
    fn a_resource_is_summed_only_where_that_holds_less() {
        let mut batch = sdk_batch();
        let bytes = observation_bytes(&batch.observed());
        assert!(batch.summarize(S));
        let summary = batch.summary.as_ref().expect("summed");
        assert!(summary.bytes() < bytes, "{} >= {bytes}", summary.bytes());
        assert!(batch.requests.is_empty() && batch.calls.is_empty());
        assert_eq!(summary.len(), 64);
        assert_eq!(batch.len(), 64);
        assert_eq!(summary.buckets.len(), 2);
        assert_eq!(summary.counts.requests, 32);
        assert_eq!(summary.counts.calls, 32);
        let routes: Vec<(&str, u64)> = summary.operations.iter().map(|t| (&*t.name, t.count)).collect();
        assert_eq!(
            routes,
            [
                ("GET /route/0", 8),
                ("GET /route/1", 8),
                ("GET /route/2", 8),
                ("GET /route/3", 8)
            ]
        );
        assert!(!batch.summarize(S), "summed once");

        let op: Arc<str> = Arc::from("GET /");
        let mut lone = ResourceObservations::new(Identity::new("prod", "shop", "1.0"));
        lone.requests.push(request(&op, T0, 1, None));
        assert!(!lone.summarize(S));
        assert_eq!(lone.requests.len(), 1);

        let mut names = ResourceObservations::new(Identity::new("prod", "shop", "1.0"));
        for i in 0..500 {
            names
                .requests
                .push(request(&Arc::from(format!("GET /{i}")), T0, 1, None));
        }
        assert!(!names.summarize(S));
        let mut seconds = ResourceObservations::new(Identity::new("prod", "shop", "1.0"));
        for i in 0..500 {
            seconds.requests.push(request(&op, T0 + i * S, 1, None));
        }
        assert!(!seconds.summarize(S));
        assert!(!sdk_batch().summarize(0), "no bucket width, no summary");
    }

    /// Dropping what may be dated past a limit drops the buckets that may hold it, the one
    /// holding the limit whole, and counts and tallies only what is left.
    #[test]
    fn dropping_past_a_limit_recounts_what_is_left() {
        let mut batch = sdk_batch();
        let extra: Arc<str> = Arc::from("GET /late");
        batch.requests.push(request(&extra, T0 + 2 * S + S / 2, 1, None));
        batch.saw(T0 + 2 * S + S / 2);
        let mut summary = Summary::within(&batch.observed(), S, usize::MAX).expect("summed");
        assert_eq!(summary.buckets.len(), 3);
        assert_eq!(
            summary.drop_after(T0 + 2 * S + S / 2),
            1,
            "the bucket holding the limit goes whole"
        );
        assert_eq!(summary.len(), 64);
        assert_eq!(summary.counts.requests, 32);
        assert!(summary.operations.iter().all(|t| &*t.name != "GET /late"));
        assert_eq!(summary.latest.latest, Some(T0 + S));
        assert_eq!(summary.drop_after(T0 + S - 1), 32);
        assert_eq!((summary.counts.requests, summary.counts.calls), (16, 16));
        assert_eq!(summary.span(), Some((T0, T0)));
        assert_eq!(summary.drop_after(T0 + S - 1), 0);

        // Through the resource: what is left is what `seen` and `len` say.
        let mut batch = sdk_batch();
        assert!(batch.summarize(S));
        assert_eq!(batch.drop_after(T0 + S - 1), 32);
        assert_eq!(batch.len(), 32);
        assert_eq!(batch.seen, Some((T0, T0)));
    }
}
