//! Reading an operation back from JetStream, settling its expiry, waiting for it to change, and
//! cancelling it.
//!
//! "No terminal record, deadline passed" is not a status (see [`super::model`]): the first reader
//! to see it writes the `expired` marker (first writer wins, see
//! `handlers::jetstream::publish_result`) and reports whatever record won. So a status, once
//! terminal, never changes, on any replica: a late reply after the marker is refused by the
//! results stream; a reply that beat the marker is what everyone sees.

use std::time::Duration;

use handlers::contract::{ResultRecord, header, header_str};
use time::OffsetDateTime;
use tokio::time::Instant;

use super::idempotency::{key_token, key_token_of, redrive_key};
use super::model::{DeliveryState, Operation, Status, decode_state};
use super::store::{Early, Store, StoreError};
use super::watch::{RECHECK, Watch};

/// Finds an operation by id for a tenant, settling expiry on the way. `None` for ids that do not
/// exist, no longer exist (retention), or belong to another tenant.
///
/// Costs three direct gets, issued together: the request, and the result and progress on any
/// route (more for an operation accepted under wire contract 1, whose slots the wildcard reads
/// cannot find, and on a replicated stream a leader read for each miss). A reader that finds the deadline passed with no result
/// also writes the `expired` marker (and reads the slot back from the leader if it lost the race).
pub async fn lookup(
    store: &Store,
    tenant: &str,
    operation_id: &str,
) -> Result<Option<Operation>, StoreError> {
    if key_token_of(operation_id).is_none() {
        // Not an id this gateway makes: no read is spent on it.
        return Ok(None);
    }
    let (request, early_result, early_progress) = tokio::join!(
        request_of(store, operation_id),
        store.result_any_route(operation_id),
        store.progress_any_route(operation_id)
    );
    let Some(mut operation) = request?.filter(|op| op.tenant() == tenant) else {
        return Ok(None);
    };
    operation.result = store.result(&operation, early_result?).await?;
    settle(store, &mut operation).await?;
    if operation.status().is_redrivable() {
        // Its redrive, if any: the request on the key derived from this id.
        let token = key_token(tenant, operation.route(), &redrive_key(operation_id));
        if let Some(message) = store.request_on_route(operation.route(), &token).await? {
            operation.redriven_by =
                header_str(&message.headers, header::OPERATION_ID).map(str::to_owned);
        }
    }
    if operation.result.is_none() {
        operation.progress = store.progress(&operation, early_progress?).await?;
    }
    if let Some(url) = operation.callback_url() {
        // Before the first attempt there is no stored state: the webhook is pending.
        operation.callback = Some(
            store
                .callback_state(operation_id)
                .await?
                .and_then(|bytes| decode_state(&bytes))
                .unwrap_or_else(|| DeliveryState {
                    url: url.to_owned(),
                    state: "pending".to_owned(),
                    attempts: 0,
                    last_status: None,
                    last_error: None,
                }),
        );
    }
    Ok(Some(operation))
}

/// The operation `operation_id` as its request message says (no result, no tenant check):
/// one direct get by the key token the id carries (and a leader read when that finds another
/// operation's request). `None` when there is no such request, its retention has ended (a
/// lagging replica may still hold it), or the key's request now belongs to another operation (the
/// key was reused after retention).
pub(super) async fn request_of(
    store: &Store,
    operation_id: &str,
) -> Result<Option<Operation>, StoreError> {
    let Some(key_token) = key_token_of(operation_id) else {
        return Ok(None);
    };
    let Some(request) = store.request_by_key_token(key_token).await? else {
        return Ok(None);
    };
    let operation = Operation::from_request(&request)?;
    if operation.id() == operation_id {
        // A lagging replica can answer with a request whose retention has ended: gone for
        // everyone, as on the leader.
        return Ok((!store.retention_ended(&operation)).then_some(operation));
    }
    // Another operation holds the key now, or a stale replica answered with an older one: only
    // the stream leader can tell which (the leader read is paid only after a key was reused).
    let Some(request) = store.request_by_key_token_from_leader(key_token).await? else {
        return Ok(None);
    };
    let operation = Operation::from_request(&request)?;
    Ok((operation.id() == operation_id && !store.retention_ended(&operation)).then_some(operation))
}

/// [`request_of`], with a miss asked again of the stream leader whatever the stream's replicas:
/// for callers about to give an operation up for gone for good. (Reads confirm misses with the
/// leader only on replicated streams, where a follower can lag; that is the supported set-up: no
/// mirror serves the gateway's streams' direct gets.)
pub(super) async fn confirmed_request_of(
    store: &Store,
    operation_id: &str,
) -> Result<Option<Operation>, StoreError> {
    if let Some(operation) = request_of(store, operation_id).await? {
        return Ok(Some(operation));
    }
    let Some(key_token) = key_token_of(operation_id) else {
        return Ok(None);
    };
    let Some(request) = store.request_by_key_token_from_leader(key_token).await? else {
        return Ok(None);
    };
    let operation = Operation::from_request(&request)?;
    Ok((operation.id() == operation_id && !store.retention_ended(&operation)).then_some(operation))
}

/// What a waiter waits for.
#[derive(Debug, Clone, Copy)]
pub enum WakeOn {
    /// The operation's end.
    Terminal,
    /// The end, or a progress report newer than this sequence (`None`: newer than what the first
    /// read finds).
    TerminalOrProgressAfter(Option<u64>),
}

/// Reads an operation, and if it is still pending, waits until it is terminal (or, per `wake_on`,
/// has new progress) or `until` passes, woken by the process's [`Watch`] and re-reading at least
/// every [`RECHECK`]. What it returns was read from JetStream last, so it is as true as any lookup.
pub async fn lookup_when_changed(
    store: &Store,
    watch: &Watch,
    tenant: &str,
    operation_id: &str,
    until: Instant,
    wake_on: WakeOn,
) -> Result<Option<Operation>, StoreError> {
    let registration = watch.register(operation_id);
    let mut progress_after = match wake_on {
        WakeOn::Terminal => None,
        WakeOn::TerminalOrProgressAfter(seen) => Some(seen),
    };
    loop {
        let notified = registration.notify().notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // Boxed, so that a parked waiter keeps only the small wait state, not the lookup's.
        let Some(operation) = Box::pin(lookup(store, tenant, operation_id)).await? else {
            return Ok(None);
        };
        let now = Instant::now();
        let progress = operation.progress.as_ref().map(|p| p.seq);
        let new_progress = match progress_after {
            Some(Some(seen)) => progress.is_some_and(|p| p > seen),
            Some(None) => {
                // The first read sets what "new" means.
                progress_after = Some(Some(progress.unwrap_or(0)));
                false
            }
            None => false,
        };
        let done = operation.status().is_terminal() || new_progress;
        if done || now >= until || watch.lifecycle().is_draining() {
            return Ok(Some(operation));
        }
        // Wake at the deadline (plus the skew allowance) too: that is when the operation turns
        // `expired`.
        let to_deadline = (store.expires_at(&operation) - OffsetDateTime::now_utc())
            .try_into()
            .unwrap_or(Duration::ZERO);
        let next = until
            .min(now + RECHECK)
            .min(now + to_deadline + Duration::from_millis(10));
        // Parked with what it was read from: its payload and headers are slices of the NATS
        // client's read buffer, which would stay allocated as long as any waiter holds one.
        drop(operation);
        tokio::select! {
            () = notified => {}
            () = watch.lifecycle().draining() => {}
            () = tokio::time::sleep_until(next) => {}
        }
    }
}

/// Attaches the current result to an operation whose request was just read, settling expiry.
pub(super) async fn attach_result(
    store: &Store,
    operation: &mut Operation,
) -> Result<(), StoreError> {
    operation.result = store.result(operation, Early::NotRead).await?;
    settle(store, operation).await
}

/// Past its deadline with no terminal record, an operation is made `expired` for good; if a reply
/// or another replica's marker won the slot a moment earlier, that one is reported instead.
async fn settle(store: &Store, operation: &mut Operation) -> Result<(), StoreError> {
    if operation.result.is_some() || OffsetDateTime::now_utc() <= store.expires_at(operation) {
        return Ok(());
    }
    let marker = ResultRecord::expired(operation.id(), operation.deadline());
    let winner = store.record_marker(operation, marker).await?;
    operation.result = Some(winner);
    Ok(())
}

/// What a cancellation found.
#[derive(Debug)]
pub enum Cancellation {
    /// The operation is cancelled (by this request or an earlier one).
    Recorded(Operation),
    /// A result (or expiry) won first; the operation as it ended.
    TooLate(Operation),
}

/// Cancels an operation that has no terminal record yet. The `cancelled` marker competes for the
/// same result slot as a worker's reply, first writer wins, so exactly one of them is the outcome
/// and every replica reports the same one.
pub async fn cancel(
    store: &Store,
    tenant: &str,
    operation_id: &str,
) -> Result<Option<Cancellation>, StoreError> {
    let Some(mut operation) = lookup(store, tenant, operation_id).await? else {
        return Ok(None);
    };
    if operation.result.is_none() {
        let marker = ResultRecord::cancelled(operation_id);
        let winner = store.record_marker(&operation, marker).await?;
        operation.result = Some(winner);
    }
    Ok(Some(if operation.status() == Status::Cancelled {
        Cancellation::Recorded(operation)
    } else {
        Cancellation::TooLate(operation)
    }))
}
