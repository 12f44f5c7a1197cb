//! Single-flight reconstruction jobs: each missing reconstruction id is computed by one job at
//! a time. A request whose ids are already being computed waits on those jobs; the ids no job
//! has yet are computed together, in one materialization pass, by a new job that runs as its
//! own task (so a client that disconnects does not cancel work others wait for). Jobs leave
//! the in-flight table only after their rows are committed, under the table's lock, so a
//! request sees every id either in flight or stored.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt, Shared};

use super::error::ApiError;
use crate::app::DataDir;
use crate::reconstruction::{materialize_targets, Plan};

/// Failures are remembered this long, for clients polling a status URL.
const FAILURE_MEMORY: Duration = Duration::from_secs(600);

/// How a job ended.
pub(super) type JobResult = Result<(), ApiError>;
/// A job any number of requests can wait on.
pub(super) type Job = Shared<BoxFuture<'static, JobResult>>;

/// In-flight and recently failed reconstruction jobs.
#[derive(Default)]
pub(super) struct Jobs {
    /// Reconstruction id → the job computing it. Its lock also orders "look up stored rows,
    /// then start a job" against jobs finishing.
    pub(super) in_flight: tokio::sync::Mutex<HashMap<String, Job>>,
    failed: std::sync::Mutex<HashMap<String, (Instant, ApiError)>>,
    passes: AtomicU64,
}

impl Jobs {
    /// Materialization passes started so far.
    pub(super) fn passes(&self) -> u64 {
        self.passes.load(Ordering::Relaxed)
    }

    /// Why reconstruction `id` failed, if it did in the last ten minutes.
    pub(super) fn failure(&self, id: &str) -> Option<ApiError> {
        let mut failed = self.failed.lock().expect("failure table");
        failed.retain(|_, (at, _)| at.elapsed() < FAILURE_MEMORY);
        failed.get(id).map(|(_, e)| e.clone())
    }

    /// Starts one materialization pass for targets `which` of `plan` as its own task. The
    /// caller registers the returned job under the targets' ids while it holds
    /// `in_flight`'s lock; the job removes them when it ends.
    pub(super) fn start(
        self: &Arc<Self>,
        data: &DataDir,
        verify: bool,
        plan: Arc<Plan>,
        which: Vec<usize>,
    ) -> Job {
        let (jobs, data) = (self.clone(), data.clone());
        let handle = tokio::spawn(async move {
            jobs.passes.fetch_add(1, Ordering::Relaxed);
            let result = materialize_targets(&data, &plan, &which, verify, Arc::new(|_| {}))
                .await
                .map(|_| ())
                .map_err(ApiError::from);
            let mut in_flight = jobs.in_flight.lock().await;
            for &t in &which {
                let id = &plan.targets[t].id;
                in_flight.remove(id);
                if let Err(e) = &result {
                    jobs.failed
                        .lock()
                        .expect("failure table")
                        .insert(id.clone(), (Instant::now(), e.clone()));
                }
            }
            result
        });
        async move {
            handle
                .await
                .unwrap_or_else(|e| Err(ApiError::internal(format!("reconstruction task: {e}"))))
        }
        .boxed()
        .shared()
    }
}
