//! Fuzz harness for the control protocol's decoder: one function for the bounded run
//! under `cargo test` (bolero, `control/tests/fuzz.rs`) and long runs with cargo-fuzz
//! (`control/fuzz`). Seeds: a request line of every type ([`SEEDS`]); the input picks one
//! and mutates it, or is the line itself.
//!
//! Invariants: decoding a line never panics; an accepted request, encoded again with its
//! id, decodes to the same request and id (what lbctl sends is what lbd reads).

use crate::proto::{parse_request, RequestEnvelope, VERSION};
use nat::fuzzing::{mutate, Bytes};

/// One line of every request type, as lbctl sends them.
pub const SEEDS: &[&str] = &[
    r#"{"version":1,"id":"lbctl-1-2","type":"service_add","frontend":"10.96.0.10:80/tcp","backends":["10.1.0.11:8080","10.1.0.12:8080@2"]}"#,
    r#"{"version":1,"type":"service_remove","frontend":"10.96.0.10:53/udp"}"#,
    r#"{"version":1,"id":"x","type":"backend_add","frontend":"10.96.0.10:80/tcp","backend":"10.1.0.13:8080@0"}"#,
    r#"{"version":1,"type":"backend_remove","frontend":"10.96.0.10:80/tcp","address":"10.1.0.11","port":8080}"#,
    r#"{"version":1,"type":"service_list"}"#,
    r#"{"version":1,"type":"status"}"#,
    r#"{"version":1,"type":"stats"}"#,
    r#"{"version":1,"type":"ipmasq_list"}"#,
    r#"{"version":1,"type":"ipmasq_check","source":"10.244.1.2","destination":"8.8.8.8"}"#,
    r#"{"version":1,"type":"nat_list","limit":100}"#,
];

pub fn request_line(data: &[u8]) {
    let line = mutate(&mut Bytes::new(data), SEEDS);
    let Ok(p) = parse_request(&line) else {
        return;
    };
    let again = serde_json::to_vec(&RequestEnvelope {
        version: VERSION,
        id: p.id.clone(),
        request: p.request.clone(),
    })
    .expect("an accepted request encodes");
    assert_eq!(
        parse_request(&again).as_ref(),
        Ok(&p),
        "{}",
        String::from_utf8_lossy(&again)
    );
}
