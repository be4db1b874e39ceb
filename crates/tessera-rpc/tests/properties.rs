//! Property tests: frames survive any split into reads, routing keys survive encoding, and no
//! input (random or a mutated valid frame) makes a codec or the Hessian reader panic.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use tessera_rpc::bolt::{self, Bolt};
use tessera_rpc::dubbo::{self, Dubbo};
use tessera_rpc::hessian::{Dialect, Reader, Writer};
use tessera_rpc::{Codec, Failure, Frame, Kind, Limits, Need, Protocol};

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Request),
        Just(Kind::OneWay),
        Just(Kind::Response),
        Just(Kind::Heartbeat),
        Just(Kind::HeartbeatReply),
    ]
}

fn dialect() -> impl Strategy<Value = Dialect> {
    prop_oneof![Just(Dialect::Final), Just(Dialect::Draft)]
}

/// Text with ASCII, accented, CJK and non-BMP characters.
fn text() -> impl Strategy<Value = String> {
    "[a-z.:é中😀]{0,12}"
}

/// An encoded Bolt frame and what decoding it must give back.
fn bolt_frame() -> impl Strategy<Value = (Bytes, Kind, u64)> {
    let proto = prop_oneof![Just(Protocol::BoltV1), Just(Protocol::BoltV2)];
    let parts = (any::<u32>(), 1u8..=2, 0u8..=3, any::<i32>(), any::<u16>());
    let body = (
        prop::collection::vec(any::<u8>(), 0..40),
        prop::collection::vec((text(), text()), 0..4),
        prop::collection::vec(any::<u8>(), 0..120),
    );
    (proto, kind(), parts, body).prop_map(|(protocol, kind, (id, version, switch, timeout_ms, status), body)| {
        let (class, headers, content) = body;
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let msg = bolt::Message {
            version,
            switch,
            timeout_ms,
            status,
            class: &class,
            headers: &headers,
            content: &content,
            ..bolt::Message::new(protocol, kind, id)
        };
        (msg.encode(), kind, u64::from(id))
    })
}

/// An encoded Dubbo frame and what decoding it must give back.
fn dubbo_frame() -> impl Strategy<Value = (Bytes, Kind, u64)> {
    let request =
        (any::<u64>(), text(), text(), text(), any::<bool>()).prop_map(|(id, path, version, method, twoway)| {
            let attachments = [("path", path.as_str()), ("k", method.as_str())];
            let req = dubbo::Request {
                id,
                dubbo_version: "2.0.2",
                path: &path,
                version: &version,
                method: &method,
                descriptor: "",
                args: &[],
                attachments: &attachments,
                twoway,
            };
            (req.encode(), if twoway { Kind::Request } else { Kind::OneWay }, id)
        });
    let response = (any::<u64>(), any::<u8>(), prop::collection::vec(any::<u8>(), 0..100))
        .prop_map(|(id, status, body)| (dubbo::encode_response(id, status, &body), Kind::Response, id));
    let heartbeat = any::<u64>().prop_map(|id| (Dubbo.heartbeat(Protocol::Dubbo, id), Kind::Heartbeat, id));
    prop_oneof![request, response, heartbeat]
}

/// Feeds `stream` to `codec` in pieces cut at `cuts`, decoding whatever is whole after each piece.
fn decode_in_pieces(codec: &dyn Codec, stream: &[u8], cuts: &[usize]) -> Vec<Frame> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    cuts.push(stream.len());
    cuts.sort_unstable();
    let (mut buf, mut frames, mut from) = (BytesMut::new(), Vec::new(), 0);
    for cut in cuts {
        buf.extend_from_slice(&stream[from..cut]);
        from = cut;
        while let Some(frame) = codec.decode(&mut buf, &Limits::default()).unwrap() {
            frames.push(frame);
        }
    }
    assert!(buf.is_empty(), "{} bytes left", buf.len());
    frames
}

/// Everything a caller may do with bytes from the network; only panics matter here.
fn exercise(codec: &dyn Codec, bytes: &[u8], max_frame: usize) {
    let _ = codec.detect(bytes);
    let limits = Limits {
        max_frame,
        max_headers: 8,
    };
    let mut buf = BytesMut::from(bytes);
    while let Ok(Some(mut frame)) = codec.decode(&mut buf, &limits) {
        for body in [false, true] {
            let _ = codec.route_keys(&frame, Need { body }, &limits);
        }
        let _ = codec.error_response(&frame, Failure::Denied, "no");
        let _ = codec.heartbeat_reply(&frame);
        codec.set_request_id(&mut frame, 0xdead_beef_cafe);
        let _ = codec.route_keys(&frame, Need { body: true }, &limits);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn bolt_frames_survive_any_split(
        frames in prop::collection::vec(bolt_frame(), 1..6),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let stream: Vec<u8> = frames.iter().flat_map(|(b, _, _)| b.iter().copied()).collect();
        let got = decode_in_pieces(&Bolt, &stream, &cuts);
        prop_assert_eq!(got.len(), frames.len());
        for (frame, (bytes, kind, id)) in got.iter().zip(&frames) {
            prop_assert_eq!(&frame.raw[..], &bytes[..]);
            prop_assert_eq!((frame.kind, frame.request_id), (*kind, *id));
        }
    }

    #[test]
    fn dubbo_frames_survive_any_split(
        frames in prop::collection::vec(dubbo_frame(), 1..6),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let stream: Vec<u8> = frames.iter().flat_map(|(b, _, _)| b.iter().copied()).collect();
        let got = decode_in_pieces(&Dubbo, &stream, &cuts);
        prop_assert_eq!(got.len(), frames.len());
        for (frame, (bytes, kind, id)) in got.iter().zip(&frames) {
            prop_assert_eq!(&frame.raw[..], &bytes[..]);
            prop_assert_eq!((frame.kind, frame.request_id), (*kind, *id));
        }
    }

    #[test]
    fn set_request_id_round_trips(frame in bolt_frame(), id in any::<u32>()) {
        let mut f = Bolt.decode(&mut BytesMut::from(&frame.0[..]), &Limits::default()).unwrap().unwrap();
        Bolt.set_request_id(&mut f, u64::from(id));
        let again = Bolt.decode(&mut f.raw.clone(), &Limits::default()).unwrap().unwrap();
        prop_assert_eq!(again.request_id, u64::from(id));
        Bolt.set_request_id(&mut f, frame.2);
        prop_assert_eq!(&f.raw[..], &frame.0[..]);
    }

    #[test]
    fn dubbo_keys_round_trip(service in text(), version in text(), method in text(), group in text(), ms in 1u32..100_000) {
        let mut args = Writer::new(Dialect::Final);
        args.string(&method).int(ms as i32);
        let timeout = ms.to_string();
        let req = dubbo::Request {
            id: 1,
            dubbo_version: "2.0.2",
            path: &service,
            version: &version,
            method: &method,
            descriptor: "Ljava/lang/String;I",
            args: &args.into_vec(),
            attachments: &[("group", &group), ("timeout", &timeout)],
            twoway: true,
        };
        let frame = Dubbo.decode(&mut BytesMut::from(&req.encode()[..]), &Limits::default()).unwrap().unwrap();
        let keys = Dubbo.route_keys(&frame, Need { body: true }, &Limits::default()).unwrap();
        prop_assert_eq!(
            (keys.service.into_owned(), keys.version.into_owned(), keys.method.into_owned(), keys.group.into_owned()),
            (service, version, method, group)
        );
        prop_assert_eq!(keys.timeout, Some(std::time::Duration::from_millis(u64::from(ms))));
    }

    #[test]
    fn hessian_strings_round_trip(s in "\\PC{0,40}", d in dialect()) {
        let mut w = Writer::new(d);
        w.string(&s).null();
        let bytes = w.into_vec();
        let mut r = Reader::new(&bytes, d);
        prop_assert_eq!(r.read_string().unwrap(), s);
        prop_assert_eq!(r.read_nullable_string().unwrap(), None);
        prop_assert!(r.at_end());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300), max in 16usize..400) {
        exercise(&Bolt, &bytes, max);
        exercise(&Dubbo, &bytes, max);
        for d in [Dialect::Final, Dialect::Draft] {
            let _ = Reader::new(&bytes, d).skip_value();
            let _ = Reader::new(&bytes, d).read_string_map(4);
            let _ = Reader::new(&bytes, d).read_object_strings(&["methodName"]);
        }
    }

    #[test]
    fn mutated_frames_never_panic(
        bolt in bolt_frame(),
        dubbo in dubbo_frame(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6),
    ) {
        for (frame, codec) in [(&bolt.0, &Bolt as &dyn Codec), (&dubbo.0, &Dubbo)] {
            let mut bytes = frame.to_vec();
            for (at, b) in &edits {
                let at = at % bytes.len();
                bytes[at] = *b;
            }
            exercise(codec, &bytes, 1 << 20);
            // Also the hostile tail: a valid header followed by a mutated Hessian body.
            let body_at = if codec.name() == "dubbo" { 16 } else { 20 };
            for d in [Dialect::Final, Dialect::Draft] {
                let _ = Reader::new(&bytes[body_at.min(bytes.len())..], d).skip_value();
            }
        }
    }
}
