//! Keeping the prefetch cache stocked: refills (PINs reserved, journaled, then sellable), lease renewals, cached
//! PINs with an ending lease sent back, and the first reconciliation with the PIN server after a start.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::journal::CachedPin;
use super::upstream::UpstreamError;
use super::Gateway;
use crate::logging::limited;
use crate::psp::{Request, Response};

impl Gateway {
    /// Reserves PINs for prefetch products as the cache asks, journals them, then lets them be sold.
    pub(super) async fn refill_loop(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = self.refill_wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            if !self.reconcile().await {
                continue;
            }
            self.release_stale().await;
            // Releases still pending (from a restart) first: a release whose acknowledgement was lost would
            // otherwise free PINs a new refill had reserved again.
            if self.forward.lock().expect("not poisoned").releases > 0 {
                continue;
            }
            let due = {
                // Under the cache lock, like shutdown's barrier: either shutdown sees this refill counted, or this
                // loop sees shutdown begun.
                let mut cache = self.cache.lock().expect("not poisoned");
                if self.stop.is_cancelled() {
                    return;
                }
                let due = cache.due(Instant::now());
                self.refills.fetch_add(due.len() as u64, Ordering::SeqCst);
                self.stats
                    .refills_started
                    .fetch_add(due.len() as u64, Ordering::Relaxed);
                due
            };
            for (product, amount, count) in due {
                let gw = self.clone();
                tokio::spawn(async move {
                    // Whatever happens to the refill (even a panic), it ends here: shutdown waits on the count.
                    struct Done<'a>(&'a Gateway, &'a str, i64, bool);
                    impl Drop for Done<'_> {
                        fn drop(&mut self) {
                            let again = self
                                .0
                                .cache
                                .lock()
                                .is_ok_and(|mut c| c.refilled(self.1, self.2, self.3));
                            self.0.refills.fetch_sub(1, Ordering::SeqCst);
                            if again {
                                self.0.refill_wake.notify_one();
                            }
                        }
                    }
                    let mut done = Done(&gw, &product, amount, false);
                    done.3 = gw.refill(&product, amount, count).await;
                });
            }
        }
    }

    /// Reserves up to `count` PINs and caches them; true when every one asked for was reserved and every chunk
    /// journaled (PINs that then go straight back, at shutdown or named by a pending release, still count).
    async fn refill(&self, product: &str, amount: i64, count: usize) -> bool {
        let request = Request::Reserve {
            product: product.into(),
            amount,
            count,
            lease_secs: self.cfg.lease.as_secs(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        // Not failed over: a reserve cut off may have been done, and asking another server would reserve twice.
        match self.upstream.call_once(request, deadline).await {
            Ok(Response::Reserved { pins, lease_until }) => {
                if pins.is_empty() {
                    return false;
                }
                let full = pins.len() == count;
                let cached: Vec<CachedPin> = pins.into_iter().map(|pin| CachedPin { pin, lease_until }).collect();
                // Journaled before they can be sold, a hundred at a time (no sale waits behind one big write), all
                // queued at once (each hundred is sellable as soon as its sync is done, without waiting for the
                // next to be queued); if the journal fails they stay reserved at the server (the lease report shows
                // them), never sold.
                let queued: Vec<_> = cached
                    .chunks(100)
                    .map(|chunk| (chunk, self.journal.queue_cached(chunk)))
                    .collect();
                let mut all_cached = true;
                for (chunk, written) in queued {
                    if let Err(e) = written.await {
                        limited!(error, "journal failed; reserved PINs not cached", error = %e);
                        all_cached = false;
                        continue;
                    }
                    // Decided under the cache lock that shutdown drains under: a refill landing after the drain goes
                    // straight back. And a PIN named by a release not yet acknowledged may be freed by it (a retry
                    // of a release whose first answer was lost) after this reserve gave it to us: never sold, it
                    // goes back too.
                    let back: Vec<i64> = {
                        let mut cache = self.cache.lock().expect("not poisoned");
                        if self.stop.is_cancelled() {
                            chunk.iter().map(|p| p.pin.pin_id).collect()
                        } else {
                            let (unsafe_, safe): (Vec<CachedPin>, Vec<CachedPin>) = {
                                let f = self.forward.lock().expect("not poisoned");
                                chunk
                                    .iter()
                                    .cloned()
                                    .partition(|p| f.releasing.contains_key(&p.pin.pin_id))
                            };
                            // PINs of a product no longer prefetched (a reload while this refill was out) have no
                            // slot: they go back too.
                            let stray = cache.put(safe);
                            if !unsafe_.is_empty() || !stray.is_empty() {
                                tracing::warn!(
                                    named_by_release = unsafe_.len(),
                                    no_longer_prefetched = stray.len(),
                                    "reserved PINs go back"
                                );
                            }
                            unsafe_.iter().chain(&stray).map(|p| p.pin.pin_id).collect()
                        }
                    };
                    if !back.is_empty() {
                        if let Err(e) = self.release(&back).await {
                            limited!(error, "journal failed; reserved PINs not released", error = %e);
                        }
                    }
                }
                return full && all_cached;
            }
            Ok(other) => limited!(error, "PIN server answered reserve with something else", answer = ?other),
            Err(e) => tracing::debug!(product, amount, error = %e, "refill failed"),
        }
        false
    }

    /// Renews the leases of cached PINs before they end.
    pub(super) async fn renew_loop(self: Arc<Self>) {
        let lease = self.cfg.lease.as_secs() as i64;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(30)) => {}
            }
            let ids = self
                .cache
                .lock()
                .expect("not poisoned")
                .expiring(crate::clock::unix_now() + lease / 2);
            for chunk in ids.chunks(crate::psp::MAX_PIN_IDS) {
                let request = Request::Renew {
                    pin_ids: chunk.to_vec(),
                    lease_secs: lease as u64,
                };
                match self
                    .upstream
                    .call(request, Instant::now() + Duration::from_secs(10))
                    .await
                {
                    Ok(Response::Renewed { count, lease_until }) if count == chunk.len() => {
                        self.cache.lock().expect("not poisoned").renewed(chunk, lease_until);
                    }
                    // Some of these are no longer ours at the server: none is marked renewed, so each is set
                    // aside (released, never sold) when its lease is about to end.
                    Ok(Response::Renewed { count, .. }) => {
                        tracing::error!(
                            asked = chunk.len(),
                            renewed = count,
                            "the server renewed fewer leases than asked"
                        )
                    }
                    _ => {}
                }
            }
        }
    }

    /// The first reconciliation with the server (see `unreconciled`); true once it is done.
    async fn reconcile(&self) -> bool {
        let Some(known) = self.unreconciled.lock().expect("not poisoned").clone() else {
            return true;
        };
        match self
            .upstream
            .call(Request::Held, Instant::now() + Duration::from_secs(10))
            .await
        {
            Ok(Response::Held { pin_ids }) => {
                let strays: Vec<i64> = pin_ids.into_iter().filter(|id| !known.contains(id)).collect();
                if !strays.is_empty() {
                    tracing::warn!(
                        count = strays.len(),
                        "the PIN server holds PINs for this gateway that its journal does not know; releasing them"
                    );
                    if let Err(e) = self.release(&strays).await {
                        limited!(error, "journal failed; unjournaled reservations not released", error = %e);
                        return false;
                    }
                }
                *self.unreconciled.lock().expect("not poisoned") = None;
                true
            }
            Ok(other) => {
                limited!(error, "PIN server answered held with something else", answer = ?other);
                false
            }
            Err(UpstreamError::Server(e)) => {
                // A server without `held`: nothing to reconcile with; the lease report remains the safety net.
                tracing::warn!(error = ?e, "the PIN server cannot list held PINs; reconciliation skipped");
                *self.unreconciled.lock().expect("not poisoned") = None;
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "reconciliation with the PIN server not done yet");
                false
            }
        }
    }

    /// Cached PINs whose lease is about to end were set aside by the cache: they go back, never sold. Called by the
    /// refill loop (no sale waits for it).
    async fn release_stale(&self) {
        let stale = self.cache.lock().expect("not poisoned").take_stale();
        if !stale.is_empty() {
            tracing::warn!(
                count = stale.len(),
                "cached PINs with an ending lease are released, not sold"
            );
            let ids: Vec<i64> = stale.iter().map(|p| p.pin.pin_id).collect();
            if let Err(e) = self.release(&ids).await {
                limited!(error, "journal failed; stale PINs stay journaled as cached", error = %e);
            }
        }
    }
}
