//! Store-and-forward: the confirms, reversals and releases the PIN server must acknowledge, queued (each journaled
//! before it is queued), sent many at once, confirms in batches, and retried with backoff until the server
//! acknowledges them or refuses them for good.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::journal::{self, KeyRecord, Record, SaleRecord};
use super::upstream::{self, UpstreamError};
use super::window::{Entry, KeyParts, Outcome};
use super::Gateway;
use crate::logging::limited;
use crate::psp::{ConfirmOutcome, ErrorCode, Request, Response};
use crate::sale::ResponseCode;
use crate::sale::SaleContent;

/// Work the server must acknowledge, retried until it does (store-and-forward).
#[derive(Clone, Debug)]
pub(super) enum Job {
    Confirm {
        pin_id: i64,
        sale: SaleRecord,
    },
    /// `content`: what the reversal named (the server checks it against the sale).
    Reverse {
        key: KeyRecord,
        content: Option<SaleContent>,
        why: super::journal::Reversing,
    },
    Release {
        pin_ids: Vec<i64>,
    },
}

impl Job {
    /// The sale the job is about.
    fn key(&self) -> Option<&dyn KeyParts> {
        match self {
            Job::Confirm { sale, .. } => Some(sale),
            Job::Reverse { key, .. } => Some(key),
            Job::Release { .. } => None,
        }
    }
}

/// How a store-and-forward step went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sent {
    Acknowledged,
    /// No answer (server down, timeout): retried with backoff.
    Failed,
    /// The server said no for good (a refusal that retrying cannot change): taken out of the queue, counted and
    /// logged once. A refused confirm stays in the journal (the audit shows it; a restart tries it once more).
    Refused,
}

struct Queued {
    job: Job,
    attempts: u32,
}

/// The store-and-forward queue: jobs ready to go, and jobs waiting out their backoff (by time, then arrival).
#[derive(Default)]
pub(super) struct Forward {
    /// Ready reversals and releases.
    ready: VecDeque<Queued>,
    /// Ready confirms: they go in batches (see [`Forward::due`]).
    ready_confirms: VecDeque<Queued>,
    delayed: std::collections::BTreeMap<(Instant, u64), Queued>,
    seq: u64,
    in_flight: usize,
    /// Of `in_flight`, the confirms.
    confirms_in_flight: usize,
    pub(super) confirms: usize,
    pub(super) reversals: usize,
    pub(super) releases: usize,
    /// Ids named by releases not yet acknowledged (queued or in flight), with how many name each.
    pub(super) releasing: HashMap<i64, u32>,
}

impl Forward {
    pub(super) fn is_empty(&self) -> bool {
        self.ready.is_empty() && self.ready_confirms.is_empty() && self.delayed.is_empty() && self.in_flight == 0
    }

    fn push_ready(&mut self, q: Queued) {
        if matches!(q.job, Job::Confirm { .. }) {
            self.ready_confirms.push_back(q);
        } else {
            self.ready.push_back(q);
        }
    }

    /// A job leaves the queue (acknowledged, or refused for good): its counts go down.
    fn leave(&mut self, job: &Job) {
        match job {
            Job::Confirm { .. } => self.confirms -= 1,
            Job::Reverse { .. } => self.reversals -= 1,
            Job::Release { pin_ids } => {
                self.releases -= pin_ids.len();
                for id in pin_ids {
                    if let Some(n) = self.releasing.get_mut(id) {
                        *n -= 1;
                        if *n == 0 {
                            self.releasing.remove(id);
                        }
                    }
                }
            }
        }
    }

    fn later(&mut self, q: Queued, at: Instant) {
        self.seq += 1;
        self.delayed.insert((at, self.seq), q);
    }

    /// Up to `max` jobs due at `now` (reversals and releases, then confirms), and when the next delayed one is
    /// due. Confirms go by whole batches of
    /// `batch`, and a partial batch only when no confirm is in flight: under load they gather while the batches
    /// before them are answered (group commit, as the journal does), and when idle each goes at once. Without this
    /// the loop, woken by every sale and by every answer, sent confirms by ones and twos.
    fn due(&mut self, now: Instant, max: usize, batch: usize) -> Due {
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let q = entry.remove();
            self.push_ready(q);
        }
        let n = max.min(self.ready.len());
        let others: Vec<Queued> = self.ready.drain(..n).collect();
        let room = max - n;
        let c = if self.confirms_in_flight == 0 {
            self.ready_confirms.len().min(room)
        } else {
            self.ready_confirms.len().min(room) / batch * batch
        };
        let confirms: Vec<Queued> = self.ready_confirms.drain(..c).collect();
        self.in_flight += others.len() + c;
        self.confirms_in_flight += c;
        Due {
            others,
            confirms,
            next: self.delayed.keys().next().map(|k| k.0),
        }
    }
}

/// What [`Forward::due`] hands out: jobs to send now, and when the next delayed one is due.
struct Due {
    /// Reversals and releases.
    others: Vec<Queued>,
    /// Confirms, in order (whole batches unless none were in flight).
    confirms: Vec<Queued>,
    next: Option<Instant>,
}

impl Gateway {
    pub(super) fn enqueue(&self, job: Job) {
        if let Some(key) = job.key() {
            // The server cannot answer a repeat of this sale correctly until the job is acknowledged: keep its
            // entry until then. A reversal of a sale never seen here is remembered as such (a late sale: 12).
            self.recent.lock().expect("not poisoned").hold(key, || {
                Entry::new(None, Some(Outcome::Declined(ResponseCode::InvalidTransaction)))
            });
        }
        let mut f = self.forward.lock().expect("not poisoned");
        match &job {
            Job::Confirm { .. } => f.confirms += 1,
            Job::Reverse { .. } => f.reversals += 1,
            Job::Release { pin_ids } => {
                f.releases += pin_ids.len();
                for id in pin_ids {
                    *f.releasing.entry(*id).or_default() += 1;
                }
            }
        }
        f.push_ready(Queued { job, attempts: 0 });
        drop(f);
        self.forward_wake.notify_one();
    }

    /// Journals `releasing` and queues the release, in chunks the server takes.
    pub(super) async fn release(&self, ids: &[i64]) -> Result<(), journal::JournalError> {
        for chunk in ids.chunks(journal::RELEASE_CHUNK) {
            self.journal
                .append(vec![Record::Releasing {
                    pin_ids: chunk.to_vec(),
                }])
                .await?;
            self.enqueue(Job::Release {
                pin_ids: chunk.to_vec(),
            });
        }
        Ok(())
    }

    /// Sends queued confirms, reversals and releases, many at once, retrying each with backoff until the server
    /// acknowledges it. An acknowledgement is journaled lazily: losing it in a crash only repeats an idempotent step.
    pub(super) async fn forward_loop(self: Arc<Self>) {
        // Jobs in flight (a batch of confirms counts each confirm).
        const MAX_IN_FLIGHT: usize = 1024;
        // As many as one confirm_batch may carry.
        const CONFIRM_BATCH: usize = crate::psp::MAX_CONFIRM_BATCH;
        let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<(Queued, Sent)>();
        loop {
            let now = Instant::now();
            let Due { others, confirms, next } = {
                let mut f = self.forward.lock().expect("not poisoned");
                let room = MAX_IN_FLIGHT.saturating_sub(f.in_flight);
                f.due(now, room, CONFIRM_BATCH)
            };
            let mut confirms = confirms.into_iter().peekable();
            while confirms.peek().is_some() {
                let batch: Vec<Queued> = confirms.by_ref().take(CONFIRM_BATCH).collect();
                let gw = self.clone();
                let tx = done_tx.clone();
                tokio::spawn(async move {
                    let sent = gw.send_confirms(&batch).await;
                    for (q, s) in batch.into_iter().zip(sent) {
                        let _ = tx.send((q, s));
                    }
                });
            }
            for q in others {
                let gw = self.clone();
                let tx = done_tx.clone();
                tokio::spawn(async move {
                    let sent = gw.send_job(&q).await;
                    let _ = tx.send((q, sent));
                });
            }
            let next_wake = next
                .unwrap_or(now + Duration::from_secs(1))
                .min(now + Duration::from_secs(1));
            tokio::select! {
                _ = self.halt.cancelled() => return,
                _ = self.forward_wake.notified() => {}
                _ = tokio::time::sleep_until(next_wake) => {}
                Some(first) = done_rx.recv() => {
                    // Every answer already in, before the next dispatch (a batch's answers arrive together).
                    let mut done = vec![first];
                    while let Ok(d) = done_rx.try_recv() {
                        done.push(d);
                    }
                    for (q, sent) in done {
                        self.settle_job(q, sent);
                    }
                }
            }
        }
    }

    /// A store-and-forward job came back from the server: done, or queued again after its backoff.
    fn settle_job(&self, mut q: Queued, sent: Sent) {
        let mut f = self.forward.lock().expect("not poisoned");
        f.in_flight -= 1;
        if matches!(q.job, Job::Confirm { .. }) {
            f.confirms_in_flight -= 1;
        }
        match sent {
            // Done, or refused for good and never retried forever (see `Sent::Refused`): out of the queue.
            Sent::Acknowledged | Sent::Refused => {
                if sent == Sent::Refused {
                    self.stats.forward_refused.fetch_add(1, Ordering::Relaxed);
                }
                f.leave(&q.job);
                drop(f);
                if let Some(key) = q.job.key() {
                    self.recent.lock().expect("not poisoned").unhold(key);
                }
            }
            Sent::Failed => {
                q.attempts += 1;
                let wait = upstream::backoff(Duration::from_millis(200), self.cfg.forward_retry_max, q.attempts);
                f.later(q, Instant::now() + wait);
            }
        }
    }

    /// Sends confirms in one `confirm_batch`; one result each. Acknowledged ones are journaled (lazily).
    async fn send_confirms(&self, batch: &[Queued]) -> Vec<Sent> {
        if batch.len() == 1 {
            return vec![self.send_job(&batch[0]).await];
        }
        let confirms: Vec<crate::psp::ConfirmItem> = batch
            .iter()
            .filter_map(|q| match &q.job {
                Job::Confirm { pin_id, sale } => Some(crate::psp::ConfirmItem {
                    pin_id: *pin_id,
                    terminal: sale.terminal(),
                }),
                _ => None,
            })
            .collect();
        debug_assert_eq!(confirms.len(), batch.len());
        let deadline = Instant::now() + Duration::from_secs(10);
        match self.upstream.call(Request::ConfirmBatch { confirms }, deadline).await {
            Ok(Response::ConfirmedBatch { results }) if results.len() == batch.len() => {
                let mut acks = Vec::new();
                let sent = batch
                    .iter()
                    .zip(results)
                    .map(|(q, r)| match (&q.job, r.outcome) {
                        (Job::Confirm { pin_id, .. }, Some(outcome)) => {
                            self.confirmed(*pin_id, outcome);
                            acks.push(Record::Confirmed { pin_id: *pin_id });
                            Sent::Acknowledged
                        }
                        _ => {
                            self.stats.forward_failures.fetch_add(1, Ordering::Relaxed);
                            let transient = r
                                .error
                                .as_ref()
                                .is_some_and(|e| e.code.is_transient());
                            if transient {
                                Sent::Failed
                            } else {
                                limited!(error, "PIN server refused a confirm; needs an operator", job = ?q.job, error = ?r.error);
                                Sent::Refused
                            }
                        }
                    })
                    .collect();
                self.journal.append_lazy(acks);
                sent
            }
            Ok(other) => {
                limited!(error, "PIN server answered confirm_batch with something else", answer = ?other);
                vec![Sent::Failed; batch.len()]
            }
            Err(e) => {
                self.stats
                    .forward_failures
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                tracing::debug!(error = %e, "confirms not acknowledged yet");
                // A refusal of the whole batch (e.g. an older server without the op) is retried later like a
                // lost one; each confirm is idempotent.
                vec![Sent::Failed; batch.len()]
            }
        }
    }

    /// A confirm was acknowledged with `outcome`.
    fn confirmed(&self, pin_id: i64, outcome: ConfirmOutcome) {
        self.stats.confirms_done.fetch_add(1, Ordering::Relaxed);
        match outcome {
            ConfirmOutcome::Voided => tracing::info!(
                pin_id,
                "a cache sale was reversed before its confirm; the PIN is voided"
            ),
            ConfirmOutcome::ConflictVoided | ConfirmOutcome::Conflict => {
                // The server recorded the conflict (and logged it, once); the audit shows it until resolved.
                self.stats.confirm_conflicts.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    pin_id,
                    outcome = outcome.as_str(),
                    "a cache sale could not be confirmed: its key was sold before (or the PIN is not ours); see pingate pins conflicts"
                );
            }
            ConfirmOutcome::Sold | ConfirmOutcome::AlreadyConfirmed => {}
        }
    }

    /// Sends one job. On acknowledgement, the acknowledgement is journaled (lazily).
    async fn send_job(&self, q: &Queued) -> Sent {
        let deadline = Instant::now() + Duration::from_secs(10);
        let (request, ack) = match &q.job {
            Job::Confirm { pin_id, sale } => (
                Request::Confirm {
                    pin_id: *pin_id,
                    terminal: sale.terminal(),
                },
                Record::Confirmed { pin_id: *pin_id },
            ),
            Job::Reverse { key, content, why } => (
                Request::Reverse {
                    terminal_id: key.terminal_id.clone(),
                    stan: key.stan.clone(),
                    transmission: key.transmission.clone(),
                    content: content.clone(),
                    reason: why.reason,
                    requested_at: why.requested_at,
                },
                Record::Reversed { key: key.clone() },
            ),
            Job::Release { pin_ids } => (
                Request::Release {
                    pin_ids: pin_ids.clone(),
                },
                Record::Released {
                    pin_ids: pin_ids.clone(),
                },
            ),
        };
        match self.upstream.call(request, deadline).await {
            Ok(r) => {
                if let (Job::Confirm { pin_id, .. }, Response::Confirmed { outcome }) = (&q.job, &r) {
                    self.confirmed(*pin_id, *outcome);
                }
                if let (Job::Release { .. }, Response::Released { refused }) = (&q.job, &r) {
                    if !refused.is_empty() {
                        limited!(
                            warn,
                            "the server refused to take back PINs it says we do not hold",
                            ?refused
                        );
                    }
                }
                self.journal.append_lazy(vec![ack]);
                Sent::Acknowledged
            }
            Err(e) => {
                self.stats.forward_failures.fetch_add(1, Ordering::Relaxed);
                // A refusal will not change by retrying, but dropping it could lose money: it stays queued (at
                // the longest backoff) and visible in `gateway stock` until an operator reconciles it.
                let refused = match &e {
                    UpstreamError::Server(w) if !w.code.is_transient() => Some(w.code),
                    _ => None,
                };
                if let Some(code) = refused {
                    if let (Job::Reverse { key, .. }, ErrorCode::ReversalTooLate) = (&q.job, code) {
                        // After the server's window (a gateway clock far from the server's): the sale stands.
                        self.journal.append_lazy(vec![Record::Reversed { key: key.clone() }]);
                    }
                    if let (Job::Reverse { key, .. }, ErrorCode::ReversalMismatch) = (&q.job, code) {
                        // The reversal named another sale than the one under its key: nothing to reverse, ever.
                        self.stats.reversal_mismatches.fetch_add(1, Ordering::Relaxed);
                        self.journal.append_lazy(vec![Record::Reversed { key: key.clone() }]);
                    }
                    limited!(error, "PIN server refused a store-and-forward step for good; not retried", job = ?q.job, error = %e);
                    Sent::Refused
                } else {
                    tracing::debug!(error = %e, attempts = q.attempts, "store-and-forward step not acknowledged yet");
                    Sent::Failed
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn confirm(pin_id: i64) -> Queued {
        let sale = SaleRecord {
            terminal_id: "T".into(),
            merchant_id: "M".into(),
            stan: format!("{pin_id:06}"),
            transmission: "1128120000".into(),
            rrn: "R".into(),
            product: "P".into(),
            amount: 100,
            currency: "978".into(),
        };
        Queued {
            job: Job::Confirm { pin_id, sale },
            attempts: 0,
        }
    }

    #[test]
    fn confirms_go_by_whole_batches_while_others_are_in_flight() {
        let mut f = Forward::default();
        let t = Instant::now();
        let ids = |v: &[Queued]| -> Vec<i64> {
            v.iter()
                .map(|q| match q.job {
                    Job::Confirm { pin_id, .. } => pin_id,
                    _ => -1,
                })
                .collect()
        };
        // Idle: what is there goes at once, however few.
        for i in 0..3 {
            f.push_ready(confirm(i));
        }
        let d = f.due(t, 1024, 4);
        assert!(d.others.is_empty());
        assert_eq!(ids(&d.confirms), vec![0, 1, 2]);
        // Three in flight: the next ones wait for a whole batch, in order; a release does not wait.
        for i in 3..13 {
            f.push_ready(confirm(i));
        }
        f.push_ready(Queued {
            job: Job::Release { pin_ids: vec![99] },
            attempts: 0,
        });
        let d = f.due(t, 1024, 4);
        assert_eq!(ids(&d.others), vec![-1]);
        assert_eq!(ids(&d.confirms), vec![3, 4, 5, 6, 7, 8, 9, 10]);
        // Room for less than a batch: none go.
        let d = f.due(t, 3, 4);
        assert!(d.others.is_empty() && d.confirms.is_empty());
        assert_eq!(f.in_flight, 3 + 9);
        assert_eq!(f.confirms_in_flight, 3 + 8);
        // Once every confirm is answered, the partial batch goes.
        f.confirms_in_flight = 0;
        let d = f.due(t, 1024, 4);
        assert!(d.others.is_empty());
        assert_eq!(ids(&d.confirms), vec![11, 12]);
    }
}
