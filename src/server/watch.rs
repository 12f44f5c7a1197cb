//! One watcher for every sweep event stream.
//!
//! Sweeps change in the index, written by whichever process runs the workers, so an event
//! stream has to look. Instead of each client polling, one task per server polls, once per
//! [`ServerConfig::sweep_event_poll`](super::ServerConfig::sweep_event_poll), the
//! fingerprint ([`crate::db::Db::sweep_fingerprint`]) of each sweep that at least one client
//! follows, and wakes that sweep's followers only when it changed. An idle stream costs a
//! parked task and no queries; 500 clients on one sweep cost one query per poll.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::app::DataDir;

/// The followers of each sweep (see the module docs).
#[derive(Default)]
pub(super) struct SweepWatcher {
    followed: Mutex<HashMap<i64, watch::Sender<Option<String>>>>,
    started: std::sync::atomic::AtomicBool,
}

impl SweepWatcher {
    /// A receiver that changes whenever sweep `id` does. Starts the polling task on first
    /// use (it ends when `stop` is cancelled).
    pub(super) fn follow(
        self: &Arc<Self>,
        id: i64,
        data: &DataDir,
        poll: Duration,
        stop: &tokio_util::sync::CancellationToken,
    ) -> watch::Receiver<Option<String>> {
        use std::sync::atomic::Ordering;
        if !self.started.swap(true, Ordering::AcqRel) {
            tokio::spawn(self.clone().poll(data.clone(), poll, stop.clone()));
        }
        let mut followed = self.followed.lock().expect("sweep watcher");
        match followed.get(&id) {
            Some(sender) => sender.subscribe(),
            None => {
                let (sender, receiver) = watch::channel(None);
                followed.insert(id, sender);
                receiver
            }
        }
    }

    async fn poll(
        self: Arc<Self>,
        data: DataDir,
        every: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) {
        loop {
            // Forget sweeps no client follows any more; look at the others.
            let ids: Vec<i64> = {
                let mut followed = self.followed.lock().expect("sweep watcher");
                followed.retain(|_, sender| sender.receiver_count() > 0);
                followed.keys().copied().collect()
            };
            for id in ids {
                let fingerprint = match data.db.sweep_fingerprint(id).await {
                    Ok(f) => f,
                    Err(e) => {
                        tracing::warn!(sweep = id, error = %e, "watching a sweep");
                        continue;
                    }
                };
                let followed = self.followed.lock().expect("sweep watcher");
                if let Some(sender) = followed.get(&id) {
                    sender.send_if_modified(|seen| {
                        let changed = seen.as_ref() != fingerprint.as_ref();
                        if changed {
                            seen.clone_from(&fingerprint);
                        }
                        changed
                    });
                }
            }
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = stop.cancelled() => return,
            }
        }
    }
}
