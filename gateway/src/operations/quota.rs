//! Per-tenant quotas: operations pending and bytes stored. Off unless a limit is set.
//!
//! Every replica must agree on what a tenant holds, with no extra write per request. So each
//! derives it from the streams themselves, the record of truth: a [`Ledger`] fed by two
//! headers-only ordered consumers that read the requests and results streams from their start
//! (requests say tenant, deadline and retention; `Nats-Msg-Size` says the body's size). An
//! operation is *pending* from its request until its result, or until its deadline plus the skew
//! allowance (it is expired then, whether or not a reader has settled it yet); its request and
//! result bodies count as *stored* until the request's retention ends (a result leaves after its
//! request, never before: under contract 2 at the results stream's `max_age`, the longest
//! retention, which for a route with a shorter one is later than the ledger says; under contract
//! 1 with the request's retention as its `Nats-TTL`). A replica also reserves what it is about to write, so that a burst
//! through one replica is counted at once; a burst through several at the same moment can pass a
//! quota by what the others accept within the consumers' lag (milliseconds).
//!
//! The ledger is rebuilt from the streams after every reconnect (what happened meanwhile was
//! not seen); the previous one answers until the new one has caught up. Readiness waits for the
//! first. Memory: one entry per live operation, for as long as its retention: about 1 KiB of
//! resident memory each, measured (20,000 live operations added 20 MB to a debug build, and 1.4 s
//! to its start).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use futures::StreamExt;
use handlers::contract::{RequestHead, Subjects, header, header_str};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::store::{ConsumeError, Store};
use crate::lifecycle::sleep_or_stop;

/// What one tenant may hold; 0 means no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limit {
    /// Operations pending at once.
    pub max_pending: u64,
    /// Bytes of request and result bodies stored.
    pub max_bytes: u64,
}

impl Limit {
    fn is_off(&self) -> bool {
        self.max_pending == 0 && self.max_bytes == 0
    }
}

/// The limits of every tenant: a default, and the tenants' own (`[auth.tenant.<name>]`).
#[derive(Debug, Clone, Default)]
pub struct QuotaLimits {
    pub default: Limit,
    pub tenants: HashMap<String, Limit>,
}

impl QuotaLimits {
    fn of(&self, tenant: &str) -> Limit {
        self.tenants.get(tenant).copied().unwrap_or(self.default)
    }

    fn any(&self) -> bool {
        !self.default.is_off() || self.tenants.values().any(|l| !l.is_off())
    }
}

/// Which quota a submission would pass, with its numbers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaExceeded {
    #[error("the tenant has {used} operations pending, its quota")]
    Pending { used: u64 },
    #[error(
        "the tenant stores {used} bytes of requests and results; {more} more would pass its quota of {limit}"
    )]
    Bytes { used: u64, more: u64, limit: u64 },
}

/// What a tenant holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Usage {
    pending: u64,
    bytes: u64,
}

#[derive(Debug)]
struct Entry {
    tenant: Arc<str>,
    /// The one subject whose record is this operation's outcome (its request's
    /// `Gw-Reply-Subject`): a record anywhere else counts for nothing.
    reply_subject: Box<str>,
    bytes: u64,
    pending: bool,
    /// Reserved by this replica, its request not seen in the stream yet.
    reserved: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    /// The deadline (plus grace) passed: no longer pending.
    PendingEnds(String),
    /// The request's retention ended: gone, with its result.
    Gone(String),
    /// A reservation whose request never showed up (the write failed unseen).
    Unconfirmed(String),
}

/// What a tenant holds, derived from the streams. Pure: time is passed in.
#[derive(Debug, Default)]
pub struct Ledger {
    ops: HashMap<String, Entry>,
    tenants: HashMap<Arc<str>, Usage>,
    due: BinaryHeap<Reverse<(i128, Due)>>,
    /// Result sizes seen before their requests (the two consumers run apart), by subject.
    early_results: HashMap<String, (u64, i128)>,
    /// Caught up with the streams: early results that found no request for a while are
    /// dropped (while catching up, a request can come long after its result).
    live: bool,
}

/// The header nats-server adds to a headers-only delivery: the body's size in bytes.
const MSG_SIZE: &str = "Nats-Msg-Size";

/// How long a reservation waits for its request to be seen.
const RESERVATION_TTL: Duration = Duration::from_secs(30);

fn nanos(t: OffsetDateTime) -> i128 {
    t.unix_timestamp_nanos()
}

impl Ledger {
    fn usage(&mut self, tenant: &str) -> &mut Usage {
        if !self.tenants.contains_key(tenant) {
            self.tenants.insert(tenant.into(), Usage::default());
        }
        self.tenants.get_mut(tenant).expect("inserted above")
    }

    fn schedule(&mut self, at: OffsetDateTime, due: Due) {
        self.due.push(Reverse((nanos(at), due)));
    }

    /// Applies every transition due by `now`.
    pub fn advance(&mut self, now: OffsetDateTime) {
        while let Some(Reverse((at, _))) = self.due.peek() {
            if *at > nanos(now) {
                break;
            }
            let Reverse((_, due)) = self.due.pop().expect("peeked");
            match due {
                Due::PendingEnds(op) => self.end_pending(&op),
                Due::Gone(op) => self.remove(&op, false),
                Due::Unconfirmed(op) => self.remove(&op, true),
            }
        }
        if self.live {
            let horizon = nanos(now - RESERVATION_TTL);
            self.early_results.retain(|_, (_, seen)| *seen > horizon);
        }
    }

    fn end_pending(&mut self, op: &str) {
        if let Some(entry) = self.ops.get_mut(op)
            && entry.pending
        {
            entry.pending = false;
            let tenant = entry.tenant.clone();
            let usage = self.usage(&tenant);
            usage.pending = usage.pending.saturating_sub(1);
        }
    }

    fn remove(&mut self, op: &str, only_reserved: bool) {
        if self
            .ops
            .get(op)
            .is_some_and(|e| !only_reserved || e.reserved)
        {
            let entry = self.ops.remove(op).expect("checked");
            let usage = self.usage(&entry.tenant);
            usage.bytes = usage.bytes.saturating_sub(entry.bytes);
            usage.pending = usage.pending.saturating_sub(u64::from(entry.pending));
        }
    }

    /// Whether `tenant` may add an operation of `bytes` under `limit`.
    pub fn check(&mut self, tenant: &str, bytes: u64, limit: Limit) -> Result<(), QuotaExceeded> {
        let usage = *self.usage(tenant);
        if limit.max_pending > 0 && usage.pending >= limit.max_pending {
            return Err(QuotaExceeded::Pending {
                used: usage.pending,
            });
        }
        if limit.max_bytes > 0 && usage.bytes.saturating_add(bytes) > limit.max_bytes {
            return Err(QuotaExceeded::Bytes {
                used: usage.bytes,
                more: bytes,
                limit: limit.max_bytes,
            });
        }
        Ok(())
    }

    /// Counts an operation this replica is about to write, before the stream shows it.
    pub fn reserve(
        &mut self,
        op: &str,
        reply_subject: &str,
        tenant: &str,
        bytes: u64,
        now: OffsetDateTime,
    ) {
        let entry = Entry {
            tenant: tenant.into(),
            reply_subject: reply_subject.into(),
            bytes,
            pending: true,
            reserved: true,
        };
        self.add(op, entry);
        self.schedule(now + RESERVATION_TTL, Due::Unconfirmed(op.to_owned()));
    }

    /// Takes over `old`'s reservations that this ledger has not seen the requests of.
    fn adopt_reservations(&mut self, old: &Ledger, now: OffsetDateTime) {
        for (op, entry) in old.ops.iter().filter(|(_, e)| e.reserved) {
            if !self.ops.contains_key(op) {
                self.reserve(op, &entry.reply_subject, &entry.tenant, entry.bytes, now);
            }
        }
        self.live = true;
    }

    /// Counts `entry` for its tenant and keeps it under `op`.
    fn add(&mut self, op: &str, entry: Entry) {
        let usage = self.usage(&entry.tenant);
        usage.bytes = usage.bytes.saturating_add(entry.bytes);
        usage.pending = usage.pending.saturating_add(u64::from(entry.pending));
        self.ops.insert(op.to_owned(), entry);
    }

    /// Drops a reservation whose write did not happen (the key named an existing operation).
    pub fn release(&mut self, op: &str) {
        self.remove(op, true);
    }

    /// A request in the stream: pending until `ends` (unless a result comes on
    /// `reply_subject`), stored until `gone`.
    #[allow(clippy::too_many_arguments)]
    pub fn request(
        &mut self,
        op: &str,
        reply_subject: &str,
        tenant: &str,
        bytes: u64,
        ends: OffsetDateTime,
        gone: OffsetDateTime,
        now: OffsetDateTime,
    ) {
        if gone <= now {
            return;
        }
        // A reservation of this replica becomes the stream's record.
        self.remove(op, true);
        if self.ops.contains_key(op) {
            return;
        }
        let (result_bytes, ended) = match self.early_results.remove(reply_subject) {
            Some((size, _)) => (size, true),
            None => (0, false),
        };
        let pending = !ended && ends > now;
        let entry = Entry {
            tenant: tenant.into(),
            reply_subject: reply_subject.into(),
            bytes: bytes.saturating_add(result_bytes),
            pending,
            reserved: false,
        };
        self.add(op, entry);
        if pending {
            self.schedule(ends, Due::PendingEnds(op.to_owned()));
        }
        self.schedule(gone, Due::Gone(op.to_owned()));
    }

    /// A terminal record on `subject`: when that is the slot its request names, the operation is
    /// no longer pending and the record's body counts. (A record elsewhere, under another route's
    /// subject, say, is nobody's outcome and counts for nothing.)
    pub fn result(&mut self, subject: &str, bytes: u64, now: OffsetDateTime) {
        match self.ops.get_mut(Subjects::operation_of(subject)) {
            Some(entry) if !entry.reserved => {
                if &*entry.reply_subject != subject {
                    return;
                }
                entry.bytes = entry.bytes.saturating_add(bytes);
                let was_pending = std::mem::replace(&mut entry.pending, false);
                let tenant = entry.tenant.clone();
                let usage = self.usage(&tenant);
                usage.bytes = usage.bytes.saturating_add(bytes);
                usage.pending = usage.pending.saturating_sub(u64::from(was_pending));
            }
            _ => {
                self.early_results
                    .insert(subject.to_owned(), (bytes, nanos(now)));
            }
        }
    }
}

/// The quotas of one gateway process: limits, the ledger that answers, and the one being
/// rebuilt after a reconnect.
pub struct Quotas {
    limits: QuotaLimits,
    ledger: Mutex<Ledger>,
    /// The ledger has caught up with the streams at least once.
    ready: AtomicBool,
}

impl Quotas {
    /// `None` when no quota is set: nothing is followed, nothing is checked.
    pub fn new(limits: QuotaLimits) -> Option<Arc<Self>> {
        limits.any().then(|| {
            Arc::new(Self {
                limits,
                ledger: Mutex::new(Ledger::default()),
                ready: AtomicBool::new(false),
            })
        })
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Reserves room for operation `op` (its result on `reply_subject`) of `tenant` with a body
    /// of `bytes`, or says which quota it would pass.
    pub fn admit(
        &self,
        op: &str,
        reply_subject: &str,
        tenant: &str,
        bytes: u64,
    ) -> Result<(), QuotaExceeded> {
        let limit = self.limits.of(tenant);
        if limit.is_off() {
            return Ok(());
        }
        let now = OffsetDateTime::now_utc();
        let mut ledger = self.ledger();
        ledger.advance(now);
        ledger.check(tenant, bytes, limit)?;
        ledger.reserve(op, reply_subject, tenant, bytes, now);
        Ok(())
    }

    /// Gives back what [`Quotas::admit`] reserved for a write that did not happen.
    pub fn release(&self, op: &str) {
        self.ledger().release(op);
    }

    /// The ledger that answers. Every change to it is whole under the lock (its arithmetic
    /// cannot panic), so one left by a panicking thread is still sound: taken back, not
    /// poisoned for good.
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Follows both streams until `stop`, rebuilding the ledger from their start after every
    /// (re)connect and every consumer failure.
    pub async fn follow(self: Arc<Self>, store: Arc<Store>, stop: CancellationToken) {
        let mut connections = store.connections();
        while !stop.is_cancelled() {
            connections.mark_unchanged();
            tokio::select! {
                error = self.rebuild(&store) => {
                    tracing::debug!(%error, "Quota ledger interrupted; rebuilding it.");
                }
                _ = connections.changed() => {
                    tracing::debug!("Reconnected to NATS; rebuilding the quota ledger.");
                    continue;
                }
                () = stop.cancelled() => return,
            }
            sleep_or_stop(&stop, Duration::from_millis(500)).await;
        }
    }

    /// Reads both streams from their start into a new ledger; once both have caught up it
    /// replaces the one that answers (keeping that one's reservations), and the same consumers
    /// keep it current. Returns only when a consumer fails.
    async fn rebuild(&self, store: &Store) -> ConsumeError {
        let grace = store.expiry_grace();
        let max_size = store.max_payload() as u64;
        let follow = |stream: &str, subjects: String| {
            let js = store.jetstream().clone();
            let stream = stream.to_owned();
            async move {
                let consumer = js
                    .get_stream(&stream)
                    .await?
                    .create_consumer(OrderedConfig {
                        filter_subject: subjects,
                        deliver_policy: DeliverPolicy::All,
                        headers_only: true,
                        ..Default::default()
                    })
                    .await?;
                let empty = consumer.cached_info().num_pending == 0;
                let messages = consumer
                    .messages()
                    .await
                    .map_err(|e| ConsumeError::Messages(e.into()))?;
                Ok::<_, ConsumeError>((messages, empty))
            }
        };
        let [(results, results_subjects), (outcomes, outcomes_subjects)] = store.result_streams();
        let opened = tokio::try_join!(
            follow(store.requests_stream(), store.subjects().all_requests()),
            follow(results, results_subjects),
            follow(outcomes, outcomes_subjects),
        );
        // Requests, then the two streams of result slots (contract 1's and 2's).
        let ((requests, requests_done), (results, results_done), (outcomes, outcomes_done)) =
            match opened {
                Ok(opened) => opened,
                Err(error) => return error,
            };
        let mut done = [requests_done, results_done, outcomes_done];
        let mut streams = [requests, results, outcomes];
        let mut building = Some(Ledger::default());
        loop {
            if done.iter().all(|d| *d)
                && let Some(mut fresh) = building.take()
            {
                let mut ledger = self.ledger();
                fresh.adopt_reservations(&ledger, OffsetDateTime::now_utc());
                *ledger = fresh;
                self.ready.store(true, Ordering::Release);
                tracing::debug!("Quota ledger caught up with the streams.");
            }
            let [requests, results, outcomes] = &mut streams;
            let (message, from) = tokio::select! {
                message = requests.next() => (message, 0),
                message = results.next() => (message, 1),
                message = outcomes.next() => (message, 2),
            };
            let is_request = from == 0;
            let message = match message {
                Some(Ok(message)) => message,
                Some(Err(error)) => return ConsumeError::Messages(error.into()),
                None => return ConsumeError::Messages("the consumer ended".into()),
            };
            let seen = Seen::of(&message, max_size);
            let now = OffsetDateTime::now_utc();
            let mut guard;
            let ledger = match &mut building {
                Some(fresh) => fresh,
                None => {
                    guard = self.ledger();
                    &mut *guard
                }
            };
            ledger.advance(now);
            if is_request {
                seen.apply_request(ledger, grace, now);
            } else {
                seen.apply_result(ledger, now);
            }
            if seen.last {
                done[from] = true;
            }
        }
    }
}

/// A message as the ledger reads it.
struct Seen<'a> {
    subject: &'a str,
    headers: Option<&'a async_nats::HeaderMap>,
    /// Body bytes: the `Nats-Msg-Size` nats-server adds to a headers-only delivery (its last
    /// value: a publisher may have set its own), at most the largest message the server takes;
    /// plus the size of a body the message names in the Object Store (`Gw-Body-Size`).
    size: u64,
    published: OffsetDateTime,
    /// Nothing newer was in the stream when it was delivered: caught up.
    last: bool,
}

impl<'a> Seen<'a> {
    fn of(message: &'a async_nats::jetstream::Message, max_size: u64) -> Self {
        let info = message.info().ok();
        let headers = message.headers.as_ref();
        let size = headers
            .and_then(|h| h.get_all(MSG_SIZE).last())
            .and_then(|v| v.as_str().parse::<u64>().ok())
            .unwrap_or(0);
        let claimed = headers
            .and_then(|h| handlers::contract::header_str(h, handlers::contract::header::BODY_SIZE))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        Self {
            subject: message.subject.as_str(),
            headers,
            size: size.min(max_size).saturating_add(claimed),
            published: info
                .as_ref()
                .map(|i| i.published)
                .unwrap_or(OffsetDateTime::now_utc()),
            last: info.is_some_and(|i| i.pending == 0),
        }
    }

    fn apply_request(&self, ledger: &mut Ledger, grace: Duration, now: OffsetDateTime) {
        let Some(Ok(head)) = self.headers.map(RequestHead::from_headers) else {
            return;
        };
        let Some(tenant) = head.tenant.as_deref() else {
            return;
        };
        let retention = Duration::from_secs(head.retention_secs.unwrap_or(0));
        ledger.request(
            &head.operation_id,
            &head.reply_subject,
            tenant,
            self.size,
            head.deadline + grace,
            self.published + retention,
            now,
        );
    }

    fn apply_result(&self, ledger: &mut Ledger, now: OffsetDateTime) {
        // nats-server's delete marker where a result expired: nothing stored.
        if self
            .headers
            .is_some_and(|h| header_str(h, header::MARKER_REASON).is_some())
        {
            return;
        }
        ledger.result(self.subject, self.size, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Limit = Limit {
        max_pending: 2,
        max_bytes: 100,
    };

    fn slot(op: &str) -> String {
        format!("gw.res.orders.{op}")
    }

    fn at(secs: i64) -> OffsetDateTime {
        OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(secs)
    }

    #[test]
    fn pending_ends_with_a_result_or_the_deadline_and_bytes_with_the_retention() {
        let mut ledger = Ledger::default();
        ledger.request("a", &slot("a"), "acme", 30, at(10), at(100), at(0));
        ledger.request("b", &slot("b"), "acme", 30, at(20), at(100), at(0));
        assert_eq!(
            ledger.check("acme", 1, LIMIT),
            Err(QuotaExceeded::Pending { used: 2 })
        );
        // Another tenant holds nothing.
        assert_eq!(ledger.check("globex", 1, LIMIT), Ok(()));
        // A result ends `a`; its body counts from then on.
        ledger.result(&slot("a"), 20, at(1));
        assert_eq!(ledger.check("acme", 1, LIMIT), Ok(()));
        assert_eq!(
            ledger.check("acme", 30, LIMIT),
            Err(QuotaExceeded::Bytes {
                used: 80,
                more: 30,
                limit: 100
            })
        );
        // `b`'s deadline passes: expired, no longer pending, still stored.
        ledger.advance(at(20));
        assert_eq!(
            *ledger.usage("acme"),
            Usage {
                pending: 0,
                bytes: 80
            }
        );
        // Retention ends: nothing left.
        ledger.advance(at(100));
        assert_eq!(*ledger.usage("acme"), Usage::default());
        assert!(ledger.ops.is_empty());
    }

    #[test]
    fn reservations_count_at_once_and_become_the_streams_record() {
        let mut ledger = Ledger::default();
        ledger.reserve("a", &slot("a"), "acme", 10, at(0));
        ledger.reserve("b", &slot("b"), "acme", 10, at(0));
        assert!(ledger.check("acme", 1, LIMIT).is_err());
        // Seen in the stream: counted once, not twice.
        ledger.request("a", &slot("a"), "acme", 10, at(100), at(200), at(1));
        assert_eq!(
            *ledger.usage("acme"),
            Usage {
                pending: 2,
                bytes: 20
            }
        );
        // A write that did not happen gives its room back; a seen one keeps it.
        ledger.release("b");
        ledger.release("a");
        assert_eq!(
            *ledger.usage("acme"),
            Usage {
                pending: 1,
                bytes: 10
            }
        );
        // A reservation never seen (the write's outcome unknown) lapses.
        ledger.reserve("c", &slot("c"), "acme", 10, at(1));
        ledger.advance(at(1) + RESERVATION_TTL);
        assert_eq!(
            *ledger.usage("acme"),
            Usage {
                pending: 1,
                bytes: 10
            }
        );
    }

    #[test]
    fn a_result_seen_before_its_request_ends_it() {
        let mut ledger = Ledger::default();
        ledger.result(&slot("a"), 5, at(0));
        ledger.request("a", &slot("a"), "acme", 10, at(10), at(100), at(1));
        assert_eq!(
            *ledger.usage("acme"),
            Usage {
                pending: 0,
                bytes: 15
            }
        );
        // Requests past their retention or deadline when read count as they are now.
        ledger.request("old", &slot("old"), "acme", 10, at(1), at(2), at(5));
        ledger.request("late", &slot("late"), "acme", 10, at(3), at(50), at(5));
        assert_eq!(
            *ledger.usage("acme"),
            Usage {
                pending: 0,
                bytes: 25
            }
        );
    }

    /// A record outside the slot its request names (another route's subject) is nobody's
    /// outcome: it ends nothing and counts nothing. Sizes cannot overflow the counts.
    #[test]
    fn only_the_named_slot_counts_and_counts_saturate() {
        let mut ledger = Ledger::default();
        ledger.request("a", &slot("a"), "acme", 10, at(10), at(100), at(0));
        ledger.result("gw.res.intruder.a", 1_000, at(1));
        assert_eq!(
            *ledger.usage("acme"),
            Usage {
                pending: 1,
                bytes: 10
            }
        );
        ledger.result(&slot("a"), u64::MAX, at(1));
        assert_eq!(
            *ledger.usage("acme"),
            Usage {
                pending: 0,
                bytes: u64::MAX
            }
        );
        assert!(ledger.check("acme", 1, LIMIT).is_err());
        ledger.advance(at(100));
        assert_eq!(*ledger.usage("acme"), Usage::default());
        // A stray record seen before the request is not taken for its result either.
        ledger.result("gw.res.intruder.b", 5, at(1));
        ledger.request("b", &slot("b"), "acme", 10, at(200), at(300), at(101));
        assert_eq!(
            *ledger.usage("acme"),
            Usage {
                pending: 1,
                bytes: 10
            }
        );
    }

    #[test]
    fn a_tenants_own_limit_replaces_the_default() {
        let limits = QuotaLimits {
            default: LIMIT,
            tenants: [("acme".to_owned(), Limit::default())].into(),
        };
        assert!(limits.any());
        assert!(limits.of("acme").is_off());
        assert_eq!(limits.of("globex"), LIMIT);
        assert!(!QuotaLimits::default().any());
    }
}
