//! Exhaustive checks of the protocol model: the designed protocol keeps every property on both
//! kinds of route; the code as it was, and each deliberately broken variant, is caught.

use std::time::Instant;

use protocol_model::{Protocol, Route, Variant};
use stateright::{Checker, Model};

/// Checks `protocol` to the end and returns the checker.
fn check(protocol: Protocol) -> impl Checker<Protocol> {
    let label = format!("{:?} {:?}", protocol.route, protocol.variant);
    let started = Instant::now();
    let checker = protocol.checker().threads(2).spawn_bfs().join();
    eprintln!(
        "{label}: {} unique states, {} total, in {:?}",
        checker.unique_state_count(),
        checker.state_count(),
        started.elapsed()
    );
    checker
}

#[test]
fn the_arbiter_keeps_every_property_on_stateful_routes() {
    check(Protocol::ci(Route::Stateful, Variant::Arbiter)).assert_properties();
}

/// Results that expire before their requests (a writer's shorter `Nats-TTL`, possible in contract
/// 1's results stream): with the delete marker nats-server leaves in the slot, nothing can write a second terminal record, a read shows
/// "removed" rather than a new status, and every property still holds on both kinds of route.
/// (Without the marker, `ShortResultTtl` below, a second record is written.)
#[test]
fn results_that_expire_early_leave_a_marker_and_every_property_holds() {
    for route in [Route::Stateless, Route::Stateful] {
        let protocol = Protocol {
            early_result_expiry: true,
            ..Protocol::ci(route, Variant::Arbiter)
        };
        check(protocol).assert_properties();
    }
}

/// A delayed start (`Gw-Not-Before`) and a start-by deadline (`Gw-Start-By`) before the result
/// deadline: early deliveries are offered back until due, so no handler runs before then and a
/// cancellation before then means none runs at all; a worker that gets the request at or after
/// its start-by ends it `expired` without running it; every other property holds on both kinds
/// of route (an expiry before the result deadline is one only the start-by allows).
#[test]
fn delayed_operations_with_a_start_by_keep_every_property() {
    for route in [Route::Stateless, Route::Stateful] {
        let protocol = Protocol {
            not_before: 1,
            start_by: 2,
            deadline: 3,
            max_time: 4,
            ..Protocol::ci(route, Variant::Arbiter)
        };
        check(protocol).assert_properties();
    }
}

/// A redrive of an operation that ended (failed, expired, cancelled, or a reply), sent twice
/// through any replica: one second operation, the first one's record unchanged, and on a
/// stateful route at most one state change across the two (a redrive of a committed operation
/// adopts its outbox), with every other property holding. The client does not read (reads were
/// checked above), which keeps the stateful check to about 5 million states (15 s in a release
/// build on two cores).
#[test]
fn a_redrive_is_one_operation_and_never_changes_state_twice() {
    for route in [Route::Stateless, Route::Stateful] {
        let protocol = Protocol {
            redrive: 2,
            reads: 0,
            ..Protocol::ci(route, Variant::Arbiter)
        };
        check(protocol).assert_properties();
    }
}

/// Without the advisory backstop the arbiter keeps every safety property, but an operation can
/// stay pending when more deliveries are lost than the spare one and nobody reads it past its
/// deadline: the backstop is what makes "every accepted operation ends" hold.
#[test]
fn without_the_backstop_safety_holds_and_liveness_does_not() {
    for route in [Route::Stateless, Route::Stateful] {
        let checker = check(Protocol::ci(route, Variant::NoAdvisory));
        for property in Protocol::ci(route, Variant::NoAdvisory).properties() {
            if property.expectation == stateright::Expectation::Always {
                checker.assert_no_discovery(property.name);
            }
        }
        let lossy = Protocol {
            crashes: 3,
            ..Protocol::ci(route, Variant::NoAdvisory)
        };
        counterexample(lossy, "every accepted operation ends");
    }
}

#[test]
fn the_arbiter_keeps_every_property_on_stateless_routes() {
    check(Protocol::ci(Route::Stateless, Variant::Arbiter)).assert_properties();
}

/// The larger configuration: about 9 million states on a stateful route, half a minute in a
/// release build on two cores.
#[test]
#[ignore = "minutes; run with --release -- --ignored"]
fn the_arbiter_keeps_every_property_in_the_large_configuration() {
    for route in [Route::Stateless, Route::Stateful] {
        check(Protocol::large(route, Variant::Arbiter)).assert_properties();
    }
}

/// Checks `protocol` until `property` has a counterexample, and returns it as the actions that
/// lead there (failing when the whole space is explored without one).
fn counterexample(protocol: Protocol, property: &'static str) -> Vec<protocol_model::Action> {
    let label = format!("{:?} {:?}", protocol.route, protocol.variant);
    let checker = protocol
        .checker()
        .threads(2)
        .finish_when(stateright::HasDiscoveries::AnyOf([property].into()))
        .spawn_bfs()
        .join();
    let path = checker
        .discovery(property)
        .unwrap_or_else(|| panic!("{label}: no counterexample for {property:?}"));
    let actions = path.into_actions();
    eprintln!("{label}: {property:?} fails after {actions:?}");
    actions
}

/// A rolling upgrade of the wire contract: while a replica of the previous release runs (it reads
/// and writes the result slot it computes from the operation id), new operations keep that slot,
/// and every property holds on both kinds of route.
#[test]
fn an_upgrade_that_keeps_the_old_slot_keeps_every_property() {
    for route in [Route::Stateless, Route::Stateful] {
        let protocol = Protocol {
            upgrade: true,
            ..Protocol::ci(route, Variant::Arbiter)
        };
        check(protocol).assert_properties();
    }
}

/// Every property of the model can fail: each broken variant breaks the one it is named for.
#[test]
fn every_property_fails_in_a_variant_built_to_break_it() {
    use Route::{Stateful, Stateless};
    use Variant::*;
    for (route, variant, property) in [
        (Stateless, PlainPublish, "one request per key"),
        (
            Stateless,
            ResultsOverwrite,
            "one terminal record per operation",
        ),
        (Stateless, ResultsOverwrite, "a status never goes back"),
        (Stateless, NoGrace, "no expiry before the deadline"),
        (
            Stateful,
            CommitIgnoresMarker,
            "at most one state change per operation",
        ),
        (
            Stateful,
            EmitWithoutMsgId,
            "at most one output per emitted id",
        ),
        (Stateful, EmitBeforeCommit, "no ghost output"),
        (
            Stateless,
            ShortResultTtl,
            "one terminal record per operation",
        ),
        (
            Stateful,
            ShortMarkerTtl,
            "at most one state change per operation",
        ),
    ] {
        counterexample(Protocol::ci(route, variant), property);
    }
    // The route-named slot while the previous release still runs: the old replica reads an empty
    // slot past the deadline and writes its own expiry beside the worker's reply.
    for property in [
        "one terminal record per operation",
        "a status never goes back",
    ] {
        let protocol = Protocol {
            upgrade: true,
            ..Protocol::ci(Stateless, EarlyLayout)
        };
        counterexample(protocol, property);
    }
    // A worker that runs a delayed request when it comes: before it is due, and after a
    // cancellation that came before it was due.
    for property in [
        "no handler runs before the operation is due",
        "an operation cancelled before it is due never runs",
    ] {
        let protocol = Protocol {
            not_before: 1,
            ..Protocol::ci(Stateless, IgnoreNotBefore)
        };
        counterexample(protocol, property);
    }
    let protocol = Protocol {
        start_by: 1,
        ..Protocol::ci(Stateless, IgnoreStartBy)
    };
    counterexample(protocol, "no first attempt starts at or after its start-by");
    // A redrive that runs a committed operation's handler again; one without create-if-absent.
    for (variant, property) in [
        (
            RedriveRunsAgain,
            "at most one state change per operation and its redrive",
        ),
        (RedrivePlainPublish, "one redrive per operation"),
    ] {
        let protocol = Protocol {
            redrive: 2,
            ..Protocol::ci(Stateful, variant)
        };
        counterexample(protocol, property);
    }
    // A plain publish is not refused by a removed result's delete marker either.
    let protocol = Protocol {
        early_result_expiry: true,
        ..Protocol::ci(Stateless, ResultsOverwrite)
    };
    counterexample(protocol, "a removed result stays removed");
    // An operation is left without an outcome only when every delivery is lost, so this one
    // needs as many crashes as deliveries.
    for route in [Stateless, Stateful] {
        let protocol = Protocol {
            crashes: 3,
            ..Protocol::ci(route, NoFinalizer)
        };
        counterexample(protocol, "every accepted operation ends");
    }
}

/// The code before the arbiter: the gateway's cancel or expiry, or a worker's failure, can end a
/// stateful operation whose state change committed (its outcome and its commit were decided in
/// two places), and an operation whose last delivery crashed after the commit can stay pending.
#[test]
fn the_code_as_written_lets_state_and_outcome_disagree() {
    let protocol = Protocol::ci(Route::Stateful, Variant::AsWritten);
    counterexample(protocol.clone(), "state and output agree");
    let protocol = Protocol {
        crashes: 3,
        ..protocol
    };
    counterexample(protocol, "every accepted operation ends");
}
