//! A model of the gateway's protocol for one operation, checked exhaustively by
//! [stateright](https://docs.rs/stateright): every interleaving of a client, two gateway
//! replicas, two workers, the JetStream consumer, the streams and a clock, with crashes at every
//! step, within small bounds.
//!
//! The style is a shared-store model, as in TLA+ specifications of such protocols: each JetStream
//! call (a create-if-absent publish, a direct get, an atomic batch, an ack) is one atomic action,
//! and a process's local work between two calls folds into the next call. JetStream is
//! linearizable per stream here (R1, or the stream leader); what a replicated stream adds (lagging
//! followers) is the fault suite's business, not the model's.
//!
//! [`Variant::Arbiter`] is the protocol the code is to follow: on stateful routes the worker's
//! processed marker (`<prefix>.done.<op>`) is the one place that decides an operation's outcome.
//! The commit (state plus an outbox marker, one atomic batch) and every tombstone (`cancelled`,
//! `expired`, `failed`) are create-if-absent writes there, and the result in `GW_RESULTS` is only
//! ever a projection of the marker that won. Deliveries past the attempt budget only finalize, and
//! the consumer's MAX_DELIVERIES advisory, kept in a stream, is a backstop finalizer.
//! The code implements [`Variant::Arbiter`] (the skew allowance is `GATEWAY_EXPIRY_GRACE`, which
//! must be at least the clocks' skew); [`Variant::NoAdvisory`] shows why the backstop is there,
//! and [`Variant::AsWritten`] is the code as it stood before the arbiter (every decider writes
//! `GW_RESULTS` directly). The checker finds what each lacks. The other variants each break one rule on
//! purpose, so that every property is shown able to fail.
//!
//! A rolling upgrade of the wire contract is in the model too ([`Protocol::upgrade`]): the
//! release before this one computed an operation's result slot from its id alone
//! (`<prefix>.res.<op>`), this one writes the slot into the request (`Gw-Reply-Subject`, now
//! `<prefix>.res.<route>.<op>`) and every writer and reader of this release follows the request.
//! While a replica of the old release runs, new operations must keep the old slot
//! (`GATEWAY_WIRE_CONTRACT=1`); [`Variant::EarlyLayout`] shows the second terminal record the new
//! slot would let the old replica write.
//!
//! Where a result slot lives decides whether its record can go before its request. This
//! release's slots are in a stream that refuses per-message TTLs and roll-ups and keeps every
//! record for at least the longest retention (`GW_OUTCOMES`), so no writer can empty one: that is
//! the default configuration, with no [`Action::ResultExpires`]. The first release's slots are in
//! a stream where a writer's shorter `Nats-TTL` can remove a record early, and nats-server's
//! delete marker then holds the slot ([`Protocol::early_result_expiry`]); without the marker the
//! slot could be filled again ([`Variant::ShortResultTtl`]).
//!
//! Delayed starts are in the model too ([`Protocol::not_before`], [`Protocol::start_by`]): the
//! request is stored and delivered at once, a worker offers an early delivery back until it is
//! due, and one whose first attempt would come at or after its start-by ends it `expired`
//! without running it (a retry continues what started). No handler runs early, no first attempt
//! late, and a cancellation before the start means none runs at all
//! ([`Variant::IgnoreNotBefore`] and [`Variant::IgnoreStartBy`] break those).
//!
//! A redrive is in the model too ([`Protocol::redrive`]): once the operation has ended other than
//! in success (a failure record, a reply with an error status, which the model does not tell from
//! a success, an expiry or a cancellation), the client may redrive it, and the gateway makes a second operation with one create-if-absent
//! write on a key derived from the first one's id (so a repeated redrive, through any replica, is
//! a replay). The first operation's record never changes. A worker given the redrive of a
//! stateful operation reads the first one's processed marker: if it is a commit, the redrive
//! adopts that outbox (a create-if-absent marker of its own holding a copy, no state change) and
//! re-publishes it with the same message ids; otherwise it runs the handler as any operation
//! does. So the state changes at most once across an operation and its redrive
//! ([`Variant::RedriveRunsAgain`] runs the handler regardless; [`Variant::RedrivePlainPublish`]
//! makes a second redrive). The redrive's own cancellation and expiry are those of any
//! operation, checked above, and are left out of its part of the model. The model keeps the
//! original's marker for good; the code keeps it for at least the original's retention, so the
//! gateway refuses a redrive whose deadline could fall after that (a later one could find the
//! marker gone and run again: that is [`Variant::ShortMarkerTtl`]'s fault).
//!
//! A submission is one create-if-absent action, then a read of what holds the key when it is
//! refused. The code may read first when the key is likely a retry's (one this replica answered
//! lately), and write only on a miss: the stored request decides as after a refused write, so the
//! model's action covers both orders.
//!
//! What the model leaves out: more than one operation (so lost updates between operations sharing a
//! state key, and batch submits: a batch's requests are ordinary requests written together by one
//! JetStream atomic batch, whose all-or-nothing is the server's and is tested against it; the same
//! holds for the group commit, `GATEWAY_GROUP_COMMIT`, whose batches are refused whole and then
//! written one request at a time, so that for one operation a committed batch is its
//! create-if-absent write and a refused one wrote nothing), the HTTP layer, stream configuration and retention changes, replicated-stream
//! anomalies, and message sizes.

use std::hash::Hash;

use stateright::{Model, Property};

/// Which kind of route the operation is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    /// The handler's reply is the outcome; side effects are at least once.
    Stateless,
    /// The handler commits state and an outbox once; the outcome must agree with the commit.
    Stateful,
}

/// Which protocol the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// The designed protocol: the processed marker arbitrates every outcome of a stateful
    /// operation; finalize-only deliveries and the advisory backstop end every operation.
    Arbiter,
    /// The code before the arbiter (commit 2143788): the gateway (cancel, expiry) and the worker
    /// (expiry, failure) write the result directly; no finalize-only delivery, no advisory
    /// backstop.
    AsWritten,
    /// The arbiter without the advisory backstop. Every safety property holds; an operation whose
    /// every delivery, spare included, is lost stays pending until a read past its deadline
    /// settles it.
    NoAdvisory,
    /// Broken: a submission is a plain publish, not create-if-absent.
    PlainPublish,
    /// Broken: the results stream keeps the last record of a subject, not the first.
    ResultsOverwrite,
    /// Broken: the commit batch does not expect the marker to be absent.
    CommitIgnoresMarker,
    /// Broken: emitted messages carry no `Nats-Msg-Id`, so the target stream keeps duplicates.
    EmitWithoutMsgId,
    /// Broken: the worker publishes its emits before it commits.
    EmitBeforeCommit,
    /// Broken: no finalize-only deliveries and no advisory backstop.
    NoFinalizer,
    /// Broken: expiry is judged by a replica's clock with no allowance for its skew.
    NoGrace,
    /// Broken: a result can expire before its request (a writer's shorter `Nats-TTL`, a purge)
    /// and leave its slot empty (no delete marker).
    ShortResultTtl,
    /// Broken: the processed marker can expire while its request can still be delivered.
    ShortMarkerTtl,
    /// Broken (with [`Protocol::upgrade`]): this release gives new operations the route-named
    /// result slot while a replica of the previous release still runs, which reads and writes
    /// the slot it computes from the operation id.
    EarlyLayout,
    /// Broken (with [`Protocol::not_before`]): a worker runs a delayed request as soon as it is
    /// delivered, instead of offering it back until it is due.
    IgnoreNotBefore,
    /// Broken (with [`Protocol::start_by`]): a worker runs a request however late it comes.
    IgnoreStartBy,
    /// Broken (with [`Protocol::redrive`]): the redrive of a committed operation runs the handler
    /// again instead of adopting the committed outbox.
    RedriveRunsAgain,
    /// Broken (with [`Protocol::redrive`]): a redrive is a plain publish, not create-if-absent on
    /// the key derived from the operation's id.
    RedrivePlainPublish,
}

/// The bounds of one check.
#[derive(Clone, Debug)]
pub struct Protocol {
    pub route: Route,
    pub variant: Variant,
    /// JetStream's `max_deliver` on the workers' consumer.
    pub max_deliver: u8,
    /// Deliveries that may run the handler; later ones only finalize (Arbiter).
    pub attempt_budget: u8,
    /// Crashes of workers, gateways and the finalizer, together.
    pub crashes: u8,
    /// Submissions the client may send (the first and its retries).
    pub submits: u8,
    /// Status reads the client may send.
    pub reads: u8,
    /// Whether the client may cancel (once).
    pub cancel: bool,
    /// Messages the handler emits.
    pub emits: u8,
    /// The tick at which the operation's deadline passes.
    pub deadline: u8,
    /// The last tick.
    pub max_time: u8,
    /// How many ticks the second gateway's clock runs ahead of the others. The model's deadline
    /// is true time; the code's (`Gw-Deadline`) is written by the accepting gateway's clock, which
    /// moves it by that clock's error. What decides an early expiry is the difference between
    /// the clock that wrote the deadline and the one that reads it, which `skew` stands for: the
    /// documented allowance covers the largest difference between any two clocks.
    pub skew: u8,
    /// Whether a result may expire before its request (a writer's shorter `Nats-TTL`): possible
    /// in contract 1's results stream only (this release's refuses per-message TTLs). There the
    /// design keeps nats-server's delete marker in its slot, which refuses every later
    /// create-if-absent and reads as "removed", not as a status. The model keeps the marker for
    /// good: the code's lives for the longest retention (never shrunk), longer than any request.
    /// (A purge leaves no marker: that is `Variant::ShortResultTtl`.)
    pub early_result_expiry: bool,
    /// A delayed start: the tick before which no handler may run (`Gw-Not-Before`); 0 for none.
    /// The request is stored at once (it is the idempotency record) and delivered at once; a
    /// worker that gets it early naks it with the delay left, so JetStream offers it again when
    /// due (a redelivery after a lost delivery may still come early, and is nak'ed again). The
    /// worker counts attempts less the one early delivery a delayed request has (it cannot tell
    /// more). `deadline` is absolute: the code's is the start plus the route's timeout.
    pub not_before: u8,
    /// A start-by deadline (`Gw-Start-By`): the tick from which no handler may start; 0 for none.
    /// A worker whose first attempt would start then ends it `expired` instead of running it
    /// (where it would start: only a worker knows whether a handler started); a retry after it
    /// continues. Separate from `deadline`.
    pub start_by: u8,
    /// A rolling upgrade: gateway 0 (and the finalizer, the adversarial choice) runs the previous
    /// release, which reads and writes the result slot it computes from the operation id; gateway 1
    /// runs this one, which accepts too, and follows the slot the request names. Workers of either
    /// release write where the request says.
    pub upgrade: bool,
    /// Redrive requests the client may send once the operation has failed (0: none).
    pub redrive: u8,
}

impl Protocol {
    /// The configuration CI checks, for a route and a variant.
    pub fn ci(route: Route, variant: Variant) -> Self {
        Self {
            route,
            variant,
            max_deliver: 3,
            attempt_budget: 2,
            crashes: 2,
            submits: 2,
            reads: 2,
            cancel: true,
            emits: 1,
            deadline: 2,
            max_time: 3,
            skew: 1,
            early_result_expiry: false,
            not_before: 0,
            start_by: 0,
            upgrade: false,
            redrive: 0,
        }
    }

    /// A larger configuration (more crashes than spare deliveries, two emits, three reads), for
    /// `cargo test -p protocol-model --release -- --ignored`.
    pub fn large(route: Route, variant: Variant) -> Self {
        Self {
            max_deliver: 4,
            attempt_budget: 3,
            crashes: 3,
            reads: 3,
            emits: 2,
            max_time: 4,
            ..Self::ci(route, variant)
        }
    }

    /// The grace an expiry decision waits past the deadline: the documented skew allowance.
    fn grace(&self) -> u8 {
        match self.variant {
            Variant::NoGrace => 0,
            _ => self.skew,
        }
    }

    fn arbiter(&self) -> bool {
        !matches!(self.variant, Variant::AsWritten)
    }

    /// Deliveries past the attempt budget only finalize.
    fn finalizes(&self) -> bool {
        !matches!(self.variant, Variant::AsWritten | Variant::NoFinalizer)
    }

    /// The MAX_DELIVERIES advisory is kept in a stream and finalizes what every delivery lost.
    fn backstop(&self) -> bool {
        self.finalizes() && self.variant != Variant::NoAdvisory
    }
}

/// A terminal record in `GW_RESULTS` (and a tombstone's content).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rec {
    Reply,
    Expired,
    Cancelled,
    Failed,
}

/// The processed marker of a stateful operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Marker {
    /// Committed: the state change happened; the reply and the emits are stored with it.
    Outbox,
    /// Decided without running: the record the operation ends with.
    Tomb(Rec),
}

/// The workers' consumer's view of the one request message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Delivery {
    /// Not stored yet.
    Absent,
    /// Stored, waiting for a delivery; `delivered` so far.
    Available {
        delivered: u8,
    },
    /// Held by a worker until acked or AckWait passes.
    InFlight {
        delivered: u8,
    },
    Acked,
    /// `max_deliver` reached without an ack: never delivered again.
    Dead,
}

/// Where a projection of a marker stands: emits published so far, then the record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Projection {
    pub marker: Marker,
    pub emitted: u8,
}

/// A worker's program counter for the delivery it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Worker {
    Idle,
    /// Holds delivery `attempt`; next: read the result slot.
    Got {
        attempt: u8,
    },
    /// The slot was empty; next: read the marker (stateful) or decide.
    SlotEmpty {
        attempt: u8,
    },
    /// Nothing decided yet; the handler ran and loaded its state; next: commit (or publish the
    /// emits first, in the broken variant), or give up with a permanent error.
    Loaded {
        emitted: u8,
    },
    /// Next: claim this tombstone (Arbiter) or write this record (otherwise).
    Deciding(Rec),
    /// Next: the projection's next step.
    Projecting(Projection),
    /// Next: the ack.
    Acking,
}

/// A gateway replica's program counter for the client request it handles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Gateway {
    Idle,
    /// A read found no result past the deadline (or a cancel came); next: claim or write `rec`.
    Deciding(Rec),
    /// Next: the projection's next step, then answer.
    Projecting(Projection),
}

/// The processed marker of a redrive of a stateful operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RedriveMarker {
    /// A copy of the original operation's committed outbox: no state change.
    Adopted,
    /// The redrive's own commit.
    Outbox,
    /// Decided without running.
    Tomb(Rec),
}

/// The program counter of a worker that holds the redrive's request (one worker; a crash sends
/// the request back, and it is delivered again).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RedriveWorker {
    Idle,
    /// Next: read the redrive's result slot (and, stateful, its marker).
    Got,
    /// Stateful, nothing decided: next, read the original operation's marker.
    Checking,
    /// The original committed: next, claim the redrive's marker with a copy of its outbox.
    Adopting,
    /// The handler ran; next: commit (stateful) or reply (stateless), or fail.
    Loaded,
    /// Next: the emits of `marker` published so far, then the record.
    Projecting {
        marker: RedriveMarker,
        emitted: u8,
    },
    Acking,
}

/// The advisory backstop: a durable consumer of MAX_DELIVERIES advisories.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Finalizer {
    Idle,
    Deciding,
    Projecting(Projection),
    Done,
}

/// Everything the model tracks. Counters are bounded and only grow, so the state graph has no
/// cycles (stateright's `eventually` needs that).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    pub time: u8,
    // The client.
    pub submits_left: u8,
    pub accepted: bool,
    pub reads_left: u8,
    pub cancel_sent: bool,
    /// The terminal record the client saw first, and whether a later read contradicted it.
    pub seen: Option<Rec>,
    pub regressed: bool,
    // The streams.
    /// Request messages stored for the key.
    pub requests: u8,
    pub result: Option<Rec>,
    /// The result expired and a delete marker holds its slot.
    pub result_removed: bool,
    /// Records the results stream ever stored for the operation.
    pub result_writes: u8,
    /// The request names the route-named slot (accepted by this release, new layout).
    pub routed: bool,
    /// What a previous-release process wrote at the slot it computes, when that is not the
    /// slot the request names (only in an upgrade).
    pub stray: Option<Rec>,
    pub marker: Option<Marker>,
    /// State changes committed.
    pub commits: u8,
    /// Messages the target stream holds, per emitted id.
    pub downstream: [u8; 2],
    pub early_expiry: bool,
    /// A handler ran (stateless: answered; stateful: loaded its state), and whether one ran
    /// before the operation was due.
    pub ran: bool,
    pub ran_early: bool,
    /// A first attempt started at or after the start-by tick.
    pub ran_late: bool,
    /// A cancellation took the operation before it was due.
    pub cancelled_before_due: bool,
    /// A worker nak'ed an early delivery: JetStream holds it until it is due.
    pub held_until_due: bool,
    // The processes.
    pub delivery: Delivery,
    pub workers: [Worker; 2],
    pub gateways: [Gateway; 2],
    pub advisory: bool,
    pub finalizer: Finalizer,
    pub crashes_left: u8,
    // A redrive ([`Protocol::redrive`]).
    pub redrives_left: u8,
    /// Request messages stored for the redrive's key.
    pub redrive_requests: u8,
    pub redrive_result: Option<Rec>,
    pub redrive_result_writes: u8,
    pub redrive_marker: Option<RedriveMarker>,
    /// State changes the redrive committed.
    pub redrive_commits: u8,
    /// Messages the target stream holds per id the redrive's own commit emits (an adopted outbox
    /// re-publishes the original's ids, counted in `downstream`).
    pub redrive_downstream: [u8; 2],
    pub redrive_acked: bool,
    pub redrive_worker: RedriveWorker,
}

/// One step of one process, or of the world.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Tick,
    /// The client submits through a gateway, which may crash between the ack and the answer.
    Submit {
        crash_before_answer: bool,
        /// The gateway that accepts it (only gateway 0 unless in an upgrade).
        via: usize,
    },
    /// The client reads the status through gateway `g`.
    Read(usize),
    /// The client cancels through gateway `g`.
    Cancel(usize),
    /// A gateway's next step.
    GatewayStep(usize),
    GatewayCrash(usize),
    /// The consumer delivers the request to worker `w`.
    Deliver(usize),
    /// AckWait passes for the delivery in flight (its holder crashed or stalled).
    AckWait,
    /// The result's TTL ends before its request's (broken variant only).
    ResultExpires,
    /// The marker's TTL ends while its request lives (broken variant only).
    MarkerExpires,
    /// A worker's next step; `permanent` chooses the handler's permanent failure where it decides.
    WorkerStep {
        worker: usize,
        permanent: bool,
    },
    WorkerCrash(usize),
    FinalizerStep,
    FinalizerCrash,
    /// The client redrives the failed operation (any replica: one create-if-absent write).
    Redrive,
    /// The redrive's request is delivered to its worker.
    RedriveDeliver,
    /// The redrive's worker's next step; `permanent` as in [`Action::WorkerStep`].
    RedriveStep {
        permanent: bool,
    },
    RedriveCrash,
}

impl Protocol {
    /// The initial state of a client that cancels or not, and reads `reads` times.
    fn initial(&self, cancels: bool, reads: u8) -> State {
        State {
            time: 0,
            submits_left: self.submits,
            accepted: false,
            reads_left: reads,
            cancel_sent: !cancels,
            seen: None,
            regressed: false,
            requests: 0,
            result: None,
            result_removed: false,
            ran: false,
            ran_early: false,
            ran_late: false,
            cancelled_before_due: false,
            held_until_due: false,
            result_writes: 0,
            routed: false,
            stray: None,
            marker: None,
            commits: 0,
            downstream: [0; 2],
            early_expiry: false,
            delivery: Delivery::Absent,
            workers: [Worker::Idle; 2],
            gateways: [Gateway::Idle; 2],
            advisory: false,
            finalizer: Finalizer::Idle,
            crashes_left: self.crashes,
            redrives_left: self.redrive,
            redrive_requests: 0,
            redrive_result: None,
            redrive_result_writes: 0,
            redrive_marker: None,
            redrive_commits: 0,
            redrive_downstream: [0; 2],
            redrive_acked: false,
            redrive_worker: RedriveWorker::Idle,
        }
    }

    /// Whether the operation has ended other than in success, as far as a redrive can tell:
    /// any terminal record (a reply may carry an error status; the model does not tell it from a
    /// success).
    fn redrivable(state: &State) -> bool {
        state.result.is_some()
    }

    /// A create-if-absent write of the redrive's record, first writer wins.
    fn write_redrive_result(state: &mut State, rec: Rec) {
        if state.redrive_result.is_none() {
            state.redrive_result = Some(rec);
            state.redrive_result_writes += 1;
        }
    }

    fn redrive_step(&self, state: &mut State, permanent: bool) -> Option<()> {
        let stateful = self.route == Route::Stateful;
        let project = |marker| RedriveWorker::Projecting { marker, emitted: 0 };
        let next = match state.redrive_worker {
            RedriveWorker::Idle => return None,
            RedriveWorker::Got if state.redrive_result.is_some() => RedriveWorker::Acking,
            RedriveWorker::Got => match state.redrive_marker {
                Some(marker) if stateful => project(marker),
                _ if stateful => RedriveWorker::Checking,
                _ => RedriveWorker::Loaded,
            },
            RedriveWorker::Checking => {
                if state.marker == Some(Marker::Outbox) && self.variant != Variant::RedriveRunsAgain
                {
                    RedriveWorker::Adopting
                } else {
                    RedriveWorker::Loaded
                }
            }
            RedriveWorker::Adopting => {
                let marker = *state.redrive_marker.get_or_insert(RedriveMarker::Adopted);
                project(marker)
            }
            RedriveWorker::Loaded if !stateful => {
                Self::write_redrive_result(state, if permanent { Rec::Failed } else { Rec::Reply });
                RedriveWorker::Acking
            }
            RedriveWorker::Loaded => {
                if state.redrive_marker.is_none() {
                    state.redrive_marker = Some(if permanent {
                        RedriveMarker::Tomb(Rec::Failed)
                    } else {
                        state.redrive_commits += 1;
                        RedriveMarker::Outbox
                    });
                }
                project(state.redrive_marker.expect("set above"))
            }
            RedriveWorker::Projecting { marker, emitted } => match marker {
                RedriveMarker::Adopted | RedriveMarker::Outbox if emitted < self.emits => {
                    let id = usize::from(emitted);
                    // The same ids as the original's: a re-publish is a duplicate.
                    let slot = if marker == RedriveMarker::Adopted {
                        &mut state.downstream[id]
                    } else {
                        &mut state.redrive_downstream[id]
                    };
                    *slot = (*slot).max(1);
                    RedriveWorker::Projecting {
                        marker,
                        emitted: emitted + 1,
                    }
                }
                RedriveMarker::Adopted | RedriveMarker::Outbox => {
                    Self::write_redrive_result(state, Rec::Reply);
                    RedriveWorker::Acking
                }
                RedriveMarker::Tomb(rec) => {
                    Self::write_redrive_result(state, rec);
                    RedriveWorker::Acking
                }
            },
            RedriveWorker::Acking => {
                state.redrive_acked = true;
                RedriveWorker::Idle
            }
        };
        state.redrive_worker = next;
        Some(())
    }

    /// Whether gateway `g` runs the previous release (in an upgrade, gateway 0).
    fn old_gateway(&self, g: usize) -> bool {
        self.upgrade && g == 0
    }

    /// The clock of gateway `g`: the second one runs ahead by `skew`.
    fn gateway_clock(&self, state: &State, g: usize) -> u8 {
        state.time + if g == 1 { self.skew } else { 0 }
    }

    /// Whether a process whose clock reads `now` may decide `expired`.
    fn past_deadline(&self, now: u8) -> bool {
        now >= self.deadline + self.grace()
    }

    /// Whether a process of the previous release (`old`) looks at another slot than the one the
    /// request names: it computes the slot from the id, and the request names the new one.
    fn astray(state: &State, old: bool) -> bool {
        old && state.routed
    }

    /// What a process sees in the result slot it reads.
    fn slot(state: &State, old: bool) -> Option<Rec> {
        if Self::astray(state, old) {
            state.stray
        } else {
            state.result
        }
    }

    /// A create-if-absent write of a terminal record to the results stream (first writer wins),
    /// or a plain one in the broken variant; `old` as in [`Protocol::astray`].
    fn write_result(&self, state: &mut State, rec: Rec, old: bool) {
        if Self::astray(state, old) {
            if state.stray.is_none() {
                state.stray = Some(rec);
                state.result_writes += 1;
            }
            return;
        }
        if state.result_removed && self.variant != Variant::ResultsOverwrite {
            // The delete marker refuses a create-if-absent write (a plain publish ignores it).
            return;
        }
        match state.result {
            None => {
                state.result = Some(rec);
                state.result_writes += 1;
            }
            Some(existing) if existing != rec && self.variant == Variant::ResultsOverwrite => {
                state.result = Some(rec);
                state.result_writes += 1;
            }
            Some(_) => {}
        }
    }

    /// What a decision that takes the operation tells the properties: an expiry before the
    /// deadline, a cancellation before the start.
    fn note_decision(&self, state: &mut State, rec: Rec) {
        let started_late = self.start_by > 0 && state.time >= self.start_by;
        if rec == Rec::Expired && state.time < self.deadline && !started_late {
            state.early_expiry = true;
        }
        if rec == Rec::Cancelled && state.time < self.not_before {
            state.cancelled_before_due = true;
        }
    }

    /// A create-if-absent tombstone on the marker; the marker that holds the slot after it.
    fn claim(&self, state: &mut State, rec: Rec) -> Marker {
        if state.marker.is_none() {
            self.note_decision(state, rec);
            state.marker = Some(Marker::Tomb(rec));
        }
        state.marker.expect("set above")
    }

    /// How a decided outcome becomes visible: on stateful routes under the arbiter, a claim on the
    /// marker and then its projection; otherwise a direct write of the result.
    fn decide(&self, state: &mut State, rec: Rec, old: bool) -> Option<Projection> {
        if self.route == Route::Stateful && self.arbiter() {
            let marker = self.claim(state, rec);
            Some(Projection { marker, emitted: 0 })
        } else {
            if !Self::slot_taken(state, old) {
                self.note_decision(state, rec);
            }
            self.write_result(state, rec, old);
            None
        }
    }

    /// One step of a projection: the next emit, or the record. `None` when it is complete.
    fn project(&self, state: &mut State, p: Projection, old: bool) -> Option<Projection> {
        match p.marker {
            Marker::Outbox if p.emitted < self.emits => {
                self.publish_emit(state, p.emitted);
                Some(Projection {
                    emitted: p.emitted + 1,
                    ..p
                })
            }
            Marker::Outbox => {
                self.write_result(state, Rec::Reply, old);
                None
            }
            Marker::Tomb(rec) => {
                self.write_result(state, rec, old);
                None
            }
        }
    }

    fn publish_emit(&self, state: &mut State, id: u8) {
        let slot = &mut state.downstream[usize::from(id)];
        if *slot == 0 || self.variant == Variant::EmitWithoutMsgId {
            *slot += 1;
        }
    }

    /// Whether every message the handler emits is in the target stream.
    fn all_emitted(&self, state: &State) -> bool {
        state
            .downstream
            .iter()
            .take(usize::from(self.emits))
            .all(|&n| n > 0)
    }

    /// Whether the result slot a process reads holds a record or the delete marker of a removed
    /// one.
    fn slot_taken(state: &State, old: bool) -> bool {
        if Self::astray(state, old) {
            state.stray.is_some()
        } else {
            state.result.is_some() || state.result_removed
        }
    }

    /// What a read shows the client. A removed result reads as such (`410 result-removed`),
    /// which is no status: it neither sets nor contradicts what the client saw.
    fn observe(state: &mut State, rec: Option<Rec>) {
        if state.result_removed {
            return;
        }
        match (state.seen, rec) {
            (None, Some(r)) => state.seen = Some(r),
            (Some(_), None) => state.regressed = true,
            (Some(first), Some(r)) if first != r => state.regressed = true,
            _ => {}
        }
    }

    /// The next program counter of a worker whose delivery found nothing decided: finalize past
    /// the attempt budget, expire past the deadline, else run the handler.
    /// The attempt a delivery is: a delayed request's first delivery is taken to have come
    /// before it was due and run nothing.
    fn attempt_of(&self, delivered: u8) -> u8 {
        delivered - u8::from(self.not_before > 0).min(delivered - 1)
    }

    fn worker_decides(&self, state: &State, delivered: u8) -> Worker {
        let attempt = self.attempt_of(delivered);
        if self.finalizes() && attempt > self.attempt_budget {
            Worker::Deciding(Rec::Failed)
        } else if self.past_deadline(state.time)
            || (self.start_by > 0
                && attempt == 1
                && state.time >= self.start_by
                && self.variant != Variant::IgnoreStartBy)
        {
            Worker::Deciding(Rec::Expired)
        } else {
            Worker::Loaded { emitted: 0 }
        }
    }

    fn worker_step(&self, state: &mut State, w: usize, permanent: bool) -> Option<()> {
        let next = match state.workers[w] {
            Worker::Idle => return None,
            Worker::Got { .. }
                if state.time < self.not_before && self.variant != Variant::IgnoreNotBefore =>
            {
                // Early: offered back when due (a nak with the delay left; it counts a delivery,
                // and the last one allowed ends in the MAX_DELIVERIES advisory).
                if let Delivery::InFlight { delivered } = state.delivery {
                    if delivered < self.max_deliver {
                        state.delivery = Delivery::Available { delivered };
                        state.held_until_due = true;
                    } else {
                        state.delivery = Delivery::Dead;
                        state.advisory = self.backstop();
                    }
                }
                Worker::Idle
            }
            Worker::Got { .. } if Self::slot_taken(state, false) => Worker::Acking,
            Worker::Got { attempt } => Worker::SlotEmpty { attempt },
            Worker::SlotEmpty { attempt } => match (self.route, state.marker) {
                // Roll forward: a decided marker is projected, never decided again.
                (Route::Stateful, Some(marker)) if self.arbiter() => {
                    Worker::Projecting(Projection { marker, emitted: 0 })
                }
                // The old code re-published a committed outbox, and nothing else.
                (Route::Stateful, Some(Marker::Outbox)) => Worker::Projecting(Projection {
                    marker: Marker::Outbox,
                    emitted: 0,
                }),
                _ => self.worker_decides(state, attempt),
            },
            Worker::Loaded { .. } if permanent => Worker::Deciding(Rec::Failed),
            Worker::Loaded { emitted } => match self.route {
                Route::Stateless => {
                    if let Some(p) = self.decide(state, Rec::Reply, false) {
                        Worker::Projecting(p)
                    } else {
                        Worker::Acking
                    }
                }
                Route::Stateful
                    if self.variant == Variant::EmitBeforeCommit && emitted < self.emits =>
                {
                    self.publish_emit(state, emitted);
                    Worker::Loaded {
                        emitted: emitted + 1,
                    }
                }
                Route::Stateful => {
                    let free =
                        state.marker.is_none() || self.variant == Variant::CommitIgnoresMarker;
                    if free {
                        state.commits += 1;
                        state.marker = Some(Marker::Outbox);
                        Worker::Projecting(Projection {
                            marker: Marker::Outbox,
                            emitted: 0,
                        })
                    } else {
                        // The batch was refused: whatever won is projected.
                        let marker = state.marker.expect("checked");
                        Worker::Projecting(Projection { marker, emitted: 0 })
                    }
                }
            },
            Worker::Deciding(rec) => match self.decide(state, rec, false) {
                Some(p) => Worker::Projecting(p),
                None => Worker::Acking,
            },
            Worker::Projecting(p) => match self.project(state, p, false) {
                Some(p) => Worker::Projecting(p),
                None => Worker::Acking,
            },
            Worker::Acking => {
                // A stale holder's ack acks the message too (nats-server acks by sequence).
                if !matches!(state.delivery, Delivery::Dead) {
                    state.delivery = Delivery::Acked;
                }
                Worker::Idle
            }
        };
        if let (Worker::SlotEmpty { attempt }, Worker::Loaded { .. }) = (state.workers[w], next) {
            state.ran = true;
            state.ran_early |= state.time < self.not_before;
            // A retry continues what started in time; only a first attempt can start late.
            let first = self.attempt_of(attempt) == 1;
            state.ran_late |= first && self.start_by > 0 && state.time >= self.start_by;
        }
        state.workers[w] = next;
        Some(())
    }

    fn gateway_step(&self, state: &mut State, g: usize) -> Option<()> {
        let old = self.old_gateway(g);
        let next = match state.gateways[g] {
            Gateway::Idle => return None,
            Gateway::Deciding(rec) => match self.decide(state, rec, old) {
                Some(p) => Gateway::Projecting(p),
                None => {
                    let seen = Self::slot(state, old);
                    Self::observe(state, seen);
                    Gateway::Idle
                }
            },
            Gateway::Projecting(p) => match self.project(state, p, old) {
                Some(p) => Gateway::Projecting(p),
                None => {
                    let seen = Self::slot(state, old);
                    Self::observe(state, seen);
                    Gateway::Idle
                }
            },
        };
        state.gateways[g] = next;
        Some(())
    }

    fn finalizer_step(&self, state: &mut State) -> Option<()> {
        let old = self.upgrade;
        state.finalizer = match state.finalizer {
            Finalizer::Idle if state.advisory => Finalizer::Deciding,
            Finalizer::Deciding if Self::slot_taken(state, old) => Finalizer::Done,
            Finalizer::Deciding => match self.decide(state, Rec::Failed, old) {
                Some(p) => Finalizer::Projecting(p),
                None => Finalizer::Done,
            },
            Finalizer::Projecting(p) => match self.project(state, p, old) {
                Some(p) => Finalizer::Projecting(p),
                None => Finalizer::Done,
            },
            Finalizer::Idle | Finalizer::Done => return None,
        };
        Some(())
    }
}

impl Model for Protocol {
    type State = State;
    type Action = Action;

    /// One initial state per client behaviour: it may or may not cancel, and may or may not read.
    /// A client that does neither leaves the operation to the workers and the finalizer, so the
    /// liveness property cannot lean on a client's read (which settles expiry) or cancel.
    fn init_states(&self) -> Vec<State> {
        let mut states = Vec::new();
        for cancels in [self.cancel, false] {
            for reads in [self.reads, 0] {
                states.push(self.initial(cancels, reads));
            }
        }
        states.dedup();
        states
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        if state.time < self.max_time {
            actions.push(Action::Tick);
        }
        if !state.accepted && state.submits_left > 0 {
            for via in 0..if self.upgrade { 2 } else { 1 } {
                actions.push(Action::Submit {
                    crash_before_answer: false,
                    via,
                });
                if state.crashes_left > 0 {
                    actions.push(Action::Submit {
                        crash_before_answer: true,
                        via,
                    });
                }
            }
        }
        for g in 0..2 {
            if state.gateways[g] == Gateway::Idle {
                if state.accepted && state.reads_left > 0 {
                    actions.push(Action::Read(g));
                }
                if state.accepted && !state.cancel_sent {
                    actions.push(Action::Cancel(g));
                }
            } else {
                actions.push(Action::GatewayStep(g));
                if state.crashes_left > 0 {
                    actions.push(Action::GatewayCrash(g));
                }
            }
        }
        match state.delivery {
            Delivery::Available { delivered }
                if delivered < self.max_deliver
                    && (!state.held_until_due || state.time >= self.not_before) =>
            {
                for w in 0..2 {
                    if state.workers[w] == Worker::Idle {
                        actions.push(Action::Deliver(w));
                    }
                }
            }
            Delivery::InFlight { .. } => actions.push(Action::AckWait),
            _ => {}
        }
        for w in 0..2 {
            if state.workers[w] != Worker::Idle {
                actions.push(Action::WorkerStep {
                    worker: w,
                    permanent: false,
                });
                if matches!(state.workers[w], Worker::Loaded { .. }) {
                    actions.push(Action::WorkerStep {
                        worker: w,
                        permanent: true,
                    });
                }
                if state.crashes_left > 0 {
                    actions.push(Action::WorkerCrash(w));
                }
            }
        }
        // Records of one operation expire together, at the end of its retention, past the
        // model's horizon; the broken variants let one of them go first.
        let early_expiry = self.early_result_expiry || self.variant == Variant::ShortResultTtl;
        if early_expiry && state.result.is_some() {
            actions.push(Action::ResultExpires);
        }
        if self.variant == Variant::ShortMarkerTtl && state.marker.is_some() {
            actions.push(Action::MarkerExpires);
        }
        if Self::redrivable(state) && state.redrives_left > 0 {
            actions.push(Action::Redrive);
        }
        if state.redrive_requests > 0
            && !state.redrive_acked
            && state.redrive_worker == RedriveWorker::Idle
        {
            actions.push(Action::RedriveDeliver);
        }
        if state.redrive_worker != RedriveWorker::Idle {
            actions.push(Action::RedriveStep { permanent: false });
            if state.redrive_worker == RedriveWorker::Loaded {
                actions.push(Action::RedriveStep { permanent: true });
            }
            if state.crashes_left > 0 {
                actions.push(Action::RedriveCrash);
            }
        }
        let finalizer_busy = matches!(
            state.finalizer,
            Finalizer::Deciding | Finalizer::Projecting(_)
        );
        if finalizer_busy || (state.finalizer == Finalizer::Idle && state.advisory) {
            actions.push(Action::FinalizerStep);
            if finalizer_busy && state.crashes_left > 0 {
                actions.push(Action::FinalizerCrash);
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut state = last.clone();
        match action {
            Action::Tick => state.time += 1,
            Action::Submit {
                crash_before_answer,
                via,
            } => {
                state.submits_left -= 1;
                if state.requests == 0 || self.variant == Variant::PlainPublish {
                    if state.requests == 0 {
                        // The accepting replica names the slot: the old release its own, this one
                        // the route-named one only when told the old release is gone.
                        state.routed =
                            !self.old_gateway(via) && self.variant == Variant::EarlyLayout;
                    }
                    state.requests += 1;
                }
                if state.delivery == Delivery::Absent {
                    state.delivery = Delivery::Available { delivered: 0 };
                }
                if crash_before_answer {
                    state.crashes_left -= 1;
                } else {
                    state.accepted = true;
                }
            }
            Action::Read(g) => {
                state.reads_left -= 1;
                let now = self.gateway_clock(&state, g);
                let old = self.old_gateway(g);
                if !Self::slot_taken(&state, old) && self.past_deadline(now) {
                    state.gateways[g] = Gateway::Deciding(Rec::Expired);
                } else {
                    let seen = Self::slot(&state, old);
                    Self::observe(&mut state, seen);
                }
            }
            Action::Cancel(g) => {
                state.cancel_sent = true;
                state.gateways[g] = Gateway::Deciding(Rec::Cancelled);
            }
            Action::GatewayStep(g) => self.gateway_step(&mut state, g)?,
            Action::GatewayCrash(g) => {
                state.crashes_left -= 1;
                state.gateways[g] = Gateway::Idle;
            }
            Action::Deliver(w) => {
                let Delivery::Available { delivered } = state.delivery else {
                    return None;
                };
                state.delivery = Delivery::InFlight {
                    delivered: delivered + 1,
                };
                state.workers[w] = Worker::Got {
                    attempt: delivered + 1,
                };
            }
            Action::AckWait => {
                let Delivery::InFlight { delivered } = state.delivery else {
                    return None;
                };
                if delivered < self.max_deliver {
                    state.delivery = Delivery::Available { delivered };
                } else {
                    state.delivery = Delivery::Dead;
                    // The MAX_DELIVERIES advisory, captured in a stream.
                    state.advisory = self.backstop();
                }
            }
            Action::ResultExpires => {
                state.result = None;
                // Without delete markers (the broken variant) the slot is simply empty again.
                state.result_removed = self.variant != Variant::ShortResultTtl;
            }
            Action::MarkerExpires => state.marker = None,
            Action::WorkerStep { worker, permanent } => {
                self.worker_step(&mut state, worker, permanent)?
            }
            Action::WorkerCrash(w) => {
                state.crashes_left -= 1;
                state.workers[w] = Worker::Idle;
            }
            Action::FinalizerStep => self.finalizer_step(&mut state)?,
            Action::FinalizerCrash => {
                state.crashes_left -= 1;
                // The advisory was not acked: it is delivered again.
                state.finalizer = Finalizer::Idle;
            }
            Action::Redrive => {
                state.redrives_left -= 1;
                if state.redrive_requests == 0 || self.variant == Variant::RedrivePlainPublish {
                    state.redrive_requests += 1;
                }
            }
            Action::RedriveDeliver => state.redrive_worker = RedriveWorker::Got,
            Action::RedriveStep { permanent } => self.redrive_step(&mut state, permanent)?,
            Action::RedriveCrash => {
                state.crashes_left -= 1;
                state.redrive_worker = RedriveWorker::Idle;
            }
        }
        Some(state)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        let mut properties: Vec<Property<Self>> = vec![
            Property::<Self>::always("one request per key", |_, s| s.requests <= 1),
            Property::<Self>::always("one terminal record per operation", |_, s| {
                s.result_writes <= 1
            }),
            Property::<Self>::always("a status never goes back", |_, s| !s.regressed),
            // What makes skipping a read of a removed result sound: nothing fills its slot again.
            Property::<Self>::always("a removed result stays removed", |_, s| {
                !(s.result_removed && s.result.is_some())
            }),
            Property::<Self>::always("no expiry before the deadline", |_, s| !s.early_expiry),
            Property::<Self>::always("no handler runs before the operation is due", |_, s| {
                !s.ran_early
            }),
            Property::<Self>::always(
                "an operation cancelled before it is due never runs",
                |_, s| !(s.cancelled_before_due && s.ran),
            ),
            Property::<Self>::always(
                "no first attempt starts at or after its start-by",
                |_, s| !s.ran_late,
            ),
            // Every maximal path submits at least once (a submission stores the request even when
            // the gateway dies before answering), so "accepted" needs no guard here.
            Property::<Self>::eventually("every accepted operation ends", |m, s| {
                s.requests > 0
                    && Protocol::slot_taken(s, false)
                    && (s.commits == 0 || m.all_emitted(s))
                    && (s.redrive_requests == 0 || s.redrive_result.is_some())
            }),
            Property::<Self>::sometimes("an operation can succeed", |_, s| {
                s.result == Some(Rec::Reply)
            }),
            Property::<Self>::sometimes("an operation can be cancelled", |_, s| {
                s.result == Some(Rec::Cancelled)
            }),
            Property::<Self>::sometimes("an operation can expire", |_, s| {
                s.result == Some(Rec::Expired)
            }),
            Property::<Self>::sometimes("an operation can fail", |_, s| {
                s.result == Some(Rec::Failed)
            }),
        ];
        if self.redrive > 0 {
            properties.extend([
                Property::<Self>::always("one redrive per operation", |_, s| {
                    s.redrive_requests <= 1
                }),
                Property::<Self>::always("one terminal record per redrive", |_, s| {
                    s.redrive_result_writes <= 1
                }),
                Property::<Self>::sometimes("a redrive can succeed", |_, s| {
                    s.redrive_result == Some(Rec::Reply)
                }),
            ]);
        }
        if self.route == Route::Stateful && self.redrive > 0 {
            properties.extend([
                Property::<Self>::always(
                    "at most one state change per operation and its redrive",
                    |_, s| s.commits + s.redrive_commits <= 1,
                ),
                Property::<Self>::always("a redrive's state and output agree", |m, s| {
                    let own = s.redrive_marker == Some(RedriveMarker::Outbox);
                    match s.redrive_result {
                        // Its outbox is the original's commit, or its own.
                        Some(Rec::Reply) if own => {
                            s.redrive_commits == 1
                                && s.redrive_downstream
                                    .iter()
                                    .take(usize::from(m.emits))
                                    .all(|&n| n > 0)
                        }
                        Some(Rec::Reply) => {
                            s.commits == 1 && s.marker == Some(Marker::Outbox) && m.all_emitted(s)
                        }
                        Some(_) => s.redrive_commits == 0,
                        None => true,
                    }
                }),
                Property::<Self>::always("no ghost output of a redrive", |_, s| {
                    s.redrive_commits > 0 || s.redrive_downstream.iter().all(|&n| n == 0)
                }),
            ]);
        }
        if self.route == Route::Stateful {
            properties.extend([
                Property::<Self>::always("at most one state change per operation", |_, s| {
                    s.commits <= 1
                }),
                Property::<Self>::always("at most one output per emitted id", |_, s| {
                    s.downstream.iter().all(|&n| n <= 1)
                }),
                Property::<Self>::always("state and output agree", |m, s| match s.result {
                    Some(Rec::Reply) => s.commits == 1 && m.all_emitted(s),
                    Some(_) => s.commits == 0,
                    None => true,
                }),
                Property::<Self>::always("no ghost output", |_, s| {
                    s.commits > 0 || s.downstream.iter().all(|&n| n == 0)
                }),
            ]);
        }
        properties
    }
}
