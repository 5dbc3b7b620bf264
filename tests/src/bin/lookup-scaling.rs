//! Shows that finding an operation's request by wildcard (`gw.req.*.<key-token>`, the batched
//! `multi_last` direct get a status lookup uses) costs the same whatever the stream holds: the
//! server resolves the wildcard in its subject index, it does not scan messages.
//!
//! Fills the requests stream of its own nats-server to 1k, 50k and 200k messages over two routes,
//! and times 2,000 lookups at each size, next to exact-subject lookups.
//!
//! Usage: cargo run --release -p gateway-tests --bin lookup-scaling

use bytes::Bytes;
use gateway_tests::*;
use handlers::contract::{DEFAULT_REQUESTS_STREAM, Subjects};
use handlers::jetstream::{create_if_absent, last_matching, last_on_subject};
use std::time::{Duration, Instant};

#[tokio::main]
async fn main() {
    let TestGateway { nats, gw: _gw } = TestGateway::builder(TEST_ROUTES).start().await;
    let js = nats.jetstream().await;
    let client = nats.client().await;
    let s = Subjects::default();
    let mut total = 0u64;
    for target in [1_000u64, 50_000, 200_000] {
        let mut futs = Vec::new();
        while total < target {
            let token = format!("{:026}", total);
            let mut h = async_nats::HeaderMap::new();
            h.insert("Gw-Operation-Id", token.as_str());
            let route = if total.is_multiple_of(2) {
                "orders"
            } else {
                "jobs"
            };
            futs.push(create_if_absent(
                &js,
                s.request(route, &token),
                h,
                Bytes::from_static(b"{}"),
                Some(Duration::from_secs(3600)),
            ));
            total += 1;
            if futs.len() == 512 {
                futures::future::join_all(futs.drain(..)).await;
            }
        }
        futures::future::join_all(futs.drain(..)).await;
        let probe = format!("{:026}", target / 2);
        let t = Instant::now();
        for _ in 0..2000 {
            assert!(
                last_matching(
                    &client,
                    DEFAULT_REQUESTS_STREAM,
                    &s.request_any_route(&probe)
                )
                .await
                .unwrap()
                .is_some()
            );
        }
        let wild = t.elapsed() / 2000;
        let t = Instant::now();
        for _ in 0..2000 {
            assert!(
                last_on_subject(
                    &client,
                    DEFAULT_REQUESTS_STREAM,
                    &s.request("orders", &probe)
                )
                .await
                .unwrap()
                .is_some()
            );
        }
        let exact = t.elapsed() / 2000;
        println!(
            "{target:>7} messages: wildcard lookup {wild:?}, exact lookup {exact:?}, stream={}",
            stream_messages(&js, DEFAULT_REQUESTS_STREAM).await
        );
    }
}
