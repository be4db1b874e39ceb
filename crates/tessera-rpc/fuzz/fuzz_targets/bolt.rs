//! `cargo +nightly fuzz run bolt` (from crates/tessera-rpc): bytes from a Bolt peer, through everything
//! the RPC connection manager does with them.
#![no_main]

use bytes::BytesMut;
use tessera_rpc::bolt::Bolt;
use tessera_rpc::{Codec, Failure, Limits, Need};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let codec = Bolt;
    let _ = codec.detect(data);
    // A small frame limit now and then, so the oversize paths run too.
    let max_frame = if data.first().is_some_and(|b| b & 1 == 1) {
        64
    } else {
        1 << 20
    };
    let limits = Limits {
        max_frame,
        max_headers: 16,
    };
    let mut buf = BytesMut::from(data);
    while let Ok(Some(mut frame)) = codec.decode(&mut buf, &limits) {
        for body in [false, true] {
            let _ = codec.route_keys(&frame, Need { body }, &limits);
        }
        let _ = codec.error_response(&frame, Failure::NoRoute, "fuzz");
        let _ = codec.heartbeat_reply(&frame);
        codec.set_request_id(&mut frame, 0x0123_4567_89ab_cdef);
        let mut again = frame.raw.clone();
        assert!(
            codec.decode(&mut again, &limits).is_ok_and(|f| f.is_some()),
            "a rewritten id breaks the frame"
        );
    }
});
