//! The sync facade's engine room: one private runtime on its own threads runs the async core, and
//! sync callers wait on the result (reqwest's `blocking` design). Works from plain sync code and
//! from inside another tokio runtime alike, where `reqwest::blocking` would panic.

use std::future::Future;
use std::sync::OnceLock;

static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

/// The SDK's private runtime (two worker threads named `apipool-sdk`), started on first use and
/// never dropped, so dropping it can never happen inside an async context.
pub(crate) fn runtime() -> &'static tokio::runtime::Runtime {
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("apipool-sdk")
            .enable_all()
            .build()
            .expect("the apipool SDK cannot start its runtime threads (out of threads or memory?)")
    })
}

/// Runs `fut` on the private runtime and blocks the calling thread until it finishes. A panic in
/// `fut` is resumed on the caller.
///
/// Called from inside a tokio runtime it blocks that worker thread for the duration, like any
/// sync call would: prefer the async API there.
pub(crate) fn wait<F>(fut: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handle = runtime().spawn(fut);
    // A plain thread-parking executor: no tokio context is entered, so this never panics.
    match futures::executor::block_on(handle) {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("apipool SDK task was cancelled: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn works_from_sync_code() {
        assert_eq!(wait(async { 1 + 1 }), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn works_inside_a_runtime() {
        let v = wait(async {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            7
        });
        assert_eq!(v, 7);
    }

    #[test]
    fn panics_are_resumed() {
        let r = std::panic::catch_unwind(|| wait(async { panic!("boom") }));
        assert!(r.is_err());
    }
}
