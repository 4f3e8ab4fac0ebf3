//! Disk IO off the async runtime: sled reads, writes and fsyncs run on tokio's blocking pool,
//! so a slow disk never stalls the workers that serve connections.

/// Runs `io` on the blocking pool and waits for it. Errs only when `io` panicked or the runtime is
/// shutting down.
pub async fn blocking<R: Send + 'static>(io: impl FnOnce() -> R + Send + 'static) -> Result<R, IoTaskError> {
    tokio::task::spawn_blocking(io)
        .await
        .map_err(|e| IoTaskError(e.to_string()))
}

/// `blocking` for IO that can fail: either failure, as text for a log line or a record.
pub async fn try_blocking<R: Send + 'static, E: std::fmt::Display>(
    io: impl FnOnce() -> Result<R, E> + Send + 'static,
) -> Result<R, String> {
    let done = blocking(move || io().map_err(|e| e.to_string())).await;
    done.map_err(|e| e.to_string()).and_then(|r| r)
}

/// A blocking IO task that did not finish.
#[derive(Debug, thiserror::Error)]
#[error("a disk operation did not finish: {0}")]
pub struct IoTaskError(String);
