//! Looking into and writing to the gateway's streams behind its back: how many messages a stream
//! holds (the tests' "exactly one message" checks), an operation's terminal record as stored, and
//! a request published again as a duplicate producer would.

use crate::nats::Nats;

/// The terminal record of operation `operation_id` of `route` (wire contract 2's slot), read
/// with `client` (one allowed to read it).
pub async fn stored_outcome(
    client: &async_nats::Client,
    route: &str,
    operation_id: &str,
) -> handlers::ResultRecord {
    use handlers::contract::{DEFAULT_OUTCOMES_STREAM, Subjects};
    let slot = Subjects::default().slots(route, operation_id).reply_subject;
    let stored = handlers::jetstream::last_on_subject(client, DEFAULT_OUTCOMES_STREAM, &slot)
        .await
        .expect("direct get")
        .expect("the outcome is stored");
    handlers::ResultRecord::from_stream_message(&stored).expect("a readable record")
}

/// Re-publishes an accepted request of `route` under another key subject: the same operation
/// delivered again, as a producer duplicate (or a re-drive) would be.
pub async fn duplicate_request(nats: &Nats, route: &str, operation_id: &str, copy: &str) {
    rewritten_request(nats, route, operation_id, copy, &[]).await;
}

/// [`duplicate_request`], with these headers set to other values (a request as another release
/// of the gateway would write it).
pub async fn rewritten_request(
    nats: &Nats,
    route: &str,
    operation_id: &str,
    copy: &str,
    rewrite: &[(&str, &str)],
) {
    use handlers::contract::{DEFAULT_REQUESTS_STREAM, Subjects};
    let token =
        gateway::operations::idempotency::key_token_of(operation_id).expect("gateway-made id");
    let original = handlers::jetstream::last_matching(
        &nats.client().await,
        DEFAULT_REQUESTS_STREAM,
        &Subjects::default().request_any_route(token),
    )
    .await
    .expect("direct get")
    .expect("the request is stored");
    let mut headers = async_nats::HeaderMap::new();
    for (name, values) in original.headers.iter() {
        let name: &str = name.as_ref();
        if !name.starts_with("Nats-") && !rewrite.iter().any(|(n, _)| *n == name) {
            for v in values {
                headers.append(name, v.as_str());
            }
        }
    }
    for (name, value) in rewrite {
        headers.insert(*name, *value);
    }
    nats.jetstream()
        .await
        .publish_with_headers(
            Subjects::default().request(route, copy),
            headers,
            original.payload,
        )
        .await
        .expect("publish")
        .await
        .expect("ack");
}

/// Messages currently in a stream.
pub async fn stream_messages(js: &async_nats::jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream)
        .await
        .expect("stream exists")
        .get_info()
        .await
        .expect("stream info")
        .state
        .messages
}
