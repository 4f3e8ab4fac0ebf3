//! Items in an encoded export request, counted on the wire without reading them: the data points
//! of a metric, taken from a request's item limit before the metric is read (`ItemBudget`), and
//! the whole request's items, to say how many a request refused for the limit held.

use super::wire::{Fields, Value, WireError};

/// The fields of a metric that hold its data points (gauge, sum, histogram, exponential
/// histogram, summary), each a message whose field 1 repeats the points.
const METRIC_DATA_FIELDS: [u32; 5] = [5, 7, 9, 10, 11];

/// Spans in an `ExportTraceServiceRequest`: resource_spans(1) / scope_spans(2) / spans(2).
pub fn spans(buf: &[u8]) -> Result<u64, WireError> {
    nested(buf, &[1, 2], |scope| count(scope, 2))
}

/// Log records in an `ExportLogsServiceRequest`: resource_logs(1) / scope_logs(2) /
/// log_records(2).
pub fn log_records(buf: &[u8]) -> Result<u64, WireError> {
    nested(buf, &[1, 2], |scope| count(scope, 2))
}

/// Data points in an `ExportMetricsServiceRequest`: resource_metrics(1) / scope_metrics(2) /
/// metrics(2) / one of the data fields / data_points(1).
pub fn data_points(buf: &[u8]) -> Result<u64, WireError> {
    nested(buf, &[1, 2, 2], points_of_metric)
}

/// Data points in a `Metric`, in every one of its data fields.
pub fn points_of_metric(metric: &[u8]) -> Result<u64, WireError> {
    let mut points = 0;
    for field in Fields::new(metric) {
        if let (number, Value::Bytes(data)) = field?
            && METRIC_DATA_FIELDS.contains(&number)
        {
            points += count(data, 1)?;
        }
    }
    Ok(points)
}

/// How many times `field` occurs in `message`.
fn count(message: &[u8], field: u32) -> Result<u64, WireError> {
    let mut n = 0;
    for f in Fields::new(message) {
        n += u64::from(f?.0 == field);
    }
    Ok(n)
}

/// Sums `leaf` over the messages reached by following `path` (a field number per level; every
/// occurrence of it is followed) from `message`.
fn nested(
    message: &[u8],
    path: &[u32],
    leaf: impl Fn(&[u8]) -> Result<u64, WireError> + Copy,
) -> Result<u64, WireError> {
    let Some((&first, rest)) = path.split_first() else {
        return leaf(message);
    };
    let mut total = 0u64;
    for field in Fields::new(message) {
        let (number, value) = field?;
        if number == first {
            total = total.saturating_add(nested(value.bytes(number)?, rest, leaf)?);
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::{self, EPOCH_NS};
    use prost::Message;

    #[test]
    fn counts_match_what_prost_decodes() {
        let traces = testdata::app_traffic(EPOCH_NS, 1, 0.01).0.remove(0);
        let want: usize = traces
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        assert_eq!(spans(&traces.encode_to_vec()), Ok(want as u64));

        let metrics = testdata::metrics_request("prod", "shop", "1", 7, EPOCH_NS, 5);
        let want: usize = metrics
            .resource_metrics
            .iter()
            .flat_map(|r| &r.scope_metrics)
            .flat_map(|s| &s.metrics)
            .map(|m| {
                use opentelemetry_proto::tonic::metrics::v1::metric::Data;
                match &m.data {
                    Some(Data::Gauge(g)) => g.data_points.len(),
                    Some(Data::Sum(s)) => s.data_points.len(),
                    Some(Data::Histogram(h)) => h.data_points.len(),
                    Some(Data::ExponentialHistogram(h)) => h.data_points.len(),
                    Some(Data::Summary(s)) => s.data_points.len(),
                    None => 0,
                }
            })
            .sum();
        assert!(want > 7);
        assert_eq!(data_points(&metrics.encode_to_vec()), Ok(want as u64));

        let logs = testdata::logs_request("prod", "shop", "1", &[9, 17, 9, 13, 21], EPOCH_NS);
        assert_eq!(log_records(&logs.encode_to_vec()), Ok(5));
    }

    #[test]
    fn a_truncated_request_is_an_error() {
        let traces = testdata::app_traffic(EPOCH_NS, 1, 0.01)
            .0
            .remove(0)
            .encode_to_vec();
        assert!(spans(&traces[..traces.len() - 3]).is_err());
    }
}
