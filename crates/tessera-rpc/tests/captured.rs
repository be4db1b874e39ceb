//! The codecs against frames captured from real peers (`/work/shared/reference/rpc-wire.md`
//! §1.1.6 and §1.2): detection, decoding, routing keys, replies the sidecar makes itself, and the
//! framing edge cases (several frames per read, partial frames, bad CRC, oversize lengths).

use std::time::Duration;

use bytes::BytesMut;
use tessera_rpc::bolt::{self, Bolt};
use tessera_rpc::dubbo::{self, Dubbo};
use tessera_rpc::hessian::{Dialect, Reader, Writer};
use tessera_rpc::{Codec, CodecError, Detect, Failure, Frame, Kind, Limits, Need, Protocol};

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// A Hessian compact string (< 32 units) or `0x30` form.
fn s(v: &str) -> Vec<u8> {
    let mut w = Writer::new(Dialect::Final);
    w.string(v);
    w.into_vec()
}

const HELLO: &str = "com.example.HelloService:1.0";

/// The v1 request sofa-rpc-node sent (358 bytes): `service` header only, draft-dialect body.
fn bolt_v1_request() -> Vec<u8> {
    let mut f = hex("01 01 0001 01 00000001 01 00000bb8 002c 002b 000000f9");
    f.extend_from_slice(bolt::SOFA_REQUEST.as_bytes());
    f.extend(hex("00000007"));
    f.extend_from_slice(b"service");
    f.extend(hex("0000001c"));
    f.extend_from_slice(HELLO.as_bytes());
    f.extend(hex("4f bc"));
    f.extend_from_slice(bolt::SOFA_REQUEST.as_bytes());
    f.push(0x95);
    for field in [
        "methodName",
        "methodArgSigs",
        "targetServiceUniqueName",
        "targetAppName",
        "requestProps",
    ] {
        f.extend(s(field));
    }
    f.extend(hex("6f 90"));
    f.extend(s("sayHello"));
    f.extend(hex("56 74 0011"));
    f.extend_from_slice(b"[java.lang.String");
    f.extend(hex("6e 01"));
    f.extend(s("java.lang.String"));
    f.push(0x7a);
    f.extend(s(HELLO));
    f.extend(hex("4e 4d"));
    f.extend(s("service"));
    f.extend(s(HELLO));
    f.push(0x7a);
    f.extend(s("bolt"));
    assert_eq!(f.len(), 358);
    f
}

/// The v1 response to it.
fn bolt_v1_response() -> Vec<u8> {
    let mut f = hex("01 00 0002 01 00000001 01 0000 002e 0000 0000006c");
    f.extend_from_slice(bolt::SOFA_RESPONSE.as_bytes());
    f.extend(hex("4f be"));
    f.extend_from_slice(bolt::SOFA_RESPONSE.as_bytes());
    f.push(0x94);
    for field in ["isError", "errorMsg", "appResponse", "responseProps"] {
        f.extend(s(field));
    }
    f.extend(hex("6f 90 46 4e"));
    f.extend(s("hello bolt"));
    f.push(0x4e);
    f
}

const BOLT_V1_HEARTBEAT: &str = "0101000001000000020100000bb80000000000000000";
const BOLT_V1_ACK: &str = "0100000001000000020100000000000000000000";
const BOLT_V2_HEARTBEAT: &str = "02020100000100000004010100000bb80000000000000000 961ff5bc";
const BOLT_V2_ACK: &str = "02020000000100000004010100000000000000000000 7f894b67";

const DEMO: &str = "org.apache.dubbo.demo.DemoService";

/// The request dubbo-js sent to the Node server; `timeout` is a Hessian int.
fn dubbo_request() -> Vec<u8> {
    let mut body = Vec::new();
    for v in ["2.0.2", DEMO, "0.0.0", "sayHello", "Ljava/lang/String;", "dubbo"] {
        body.extend(s(v));
    }
    body.push(b'H');
    for (k, v) in [("application", "dubbo-js"), ("interface", DEMO), ("path", DEMO)] {
        body.extend(s(k));
        body.extend(s(v));
    }
    body.extend(s("timeout"));
    body.extend(hex("d4 1388"));
    for (k, v) in [("version", "0.0.0"), ("x-tenant", "blue")] {
        body.extend(s(k));
        body.extend(s(v));
    }
    body.push(b'Z');
    let mut f = hex("dabb c2 00 0000000000000001 000000e4");
    assert_eq!(body.len(), 0xe4);
    f.extend(body);
    f
}

const DUBBO_HEARTBEAT: &str = "dabb e2 00 0000000000000063 00000001 4e";
const DUBBO_NODE_HEARTBEAT_REPLY: &str = "dabb 62 00 0000000000000000 00000001 4e";

fn decode_one(codec: &dyn Codec, bytes: &[u8]) -> Frame {
    let mut buf = BytesMut::from(bytes);
    let frame = codec
        .decode(&mut buf, &Limits::default())
        .unwrap()
        .expect("a whole frame");
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
    frame
}

fn with_body() -> Need {
    Need { body: true }
}

#[test]
fn detection() {
    assert_eq!(Bolt.detect(&bolt_v1_request()), Detect::Yes);
    assert_eq!(Bolt.detect(&hex(BOLT_V2_HEARTBEAT)), Detect::Yes);
    assert_eq!(Bolt.detect(&hex(BOLT_V1_ACK)), Detect::Yes);
    for short in [&[][..], &[1], &[1, 1, 0], &[2, 2, 1, 0]] {
        assert_eq!(Bolt.detect(short), Detect::NeedMore, "{short:?}");
    }
    for other in [
        &b"GET / HTTP/1.1"[..],
        &[0x16, 3, 1],
        &[1, 7, 0, 1],
        &[2, 9],
        &[1, 1, 0, 9],
        &dubbo_request(),
    ] {
        assert_eq!(Bolt.detect(other), Detect::No, "{other:?}");
    }

    assert_eq!(Dubbo.detect(&dubbo_request()), Detect::Yes);
    assert_eq!(Dubbo.detect(&[0xda, 0xbb]), Detect::Yes);
    assert_eq!(Dubbo.detect(&[]), Detect::NeedMore);
    assert_eq!(Dubbo.detect(&[0xda]), Detect::NeedMore);
    assert_eq!(Dubbo.detect(&[0xda, 0xbc]), Detect::No);
    assert_eq!(Dubbo.detect(&bolt_v1_request()), Detect::No);

    assert_eq!(tessera_rpc::detect(&bolt_v1_request()).unwrap().name(), "bolt");
    assert_eq!(tessera_rpc::detect(&hex(DUBBO_HEARTBEAT)).unwrap().name(), "dubbo");
    assert_eq!(tessera_rpc::detect(&[]).err(), Some(true));
    assert_eq!(tessera_rpc::detect(&[0xda]).err(), Some(true));
    assert_eq!(tessera_rpc::detect(b"PRI * HTTP/2.0").err(), Some(false));
}

#[test]
fn bolt_request_and_response() {
    let req = decode_one(&Bolt, &bolt_v1_request());
    assert_eq!(
        (req.protocol, req.kind, req.request_id),
        (Protocol::BoltV1, Kind::Request, 1)
    );
    assert_eq!((req.timeout, req.status), (Some(Duration::from_secs(3)), None));
    assert_eq!(req.raw.len(), 358);

    let res = decode_one(&Bolt, &bolt_v1_response());
    assert_eq!(
        (res.kind, res.request_id, res.status, res.timeout),
        (Kind::Response, 1, Some(0), None)
    );
}

#[test]
fn bolt_route_keys_from_header_then_draft_body() {
    let req = decode_one(&Bolt, &bolt_v1_request());
    let limits = Limits::default();
    let keys = Bolt.route_keys(&req, Need::default(), &limits).unwrap();
    assert_eq!(
        (keys.service.as_ref(), keys.version.as_ref(), keys.group.as_ref()),
        (HELLO, "1.0", "")
    );
    assert_eq!(
        keys.method, "",
        "the header has no method and the body was not asked for"
    );
    assert_eq!(keys.headers, [("service".into(), HELLO.into())]);

    let keys = Bolt.route_keys(&req, with_body(), &limits).unwrap();
    assert_eq!(keys.method, "sayHello");
    assert_eq!(keys.service, HELLO);
}

#[test]
fn bolt_route_keys_from_headers_and_final_body() {
    // anthunder's headers: no `service` lookup needed into the body.
    let headers = [
        ("sofa_head_target_service", "com.example.EchoService:2.0:blue"),
        ("sofa_head_method_name", "echo"),
        ("rpc_trace_context.sofaTraceId", "abc"),
    ];
    let body = bolt::sofa_request_body(Dialect::Final, "ignored:1.0", "ignored", &["java.lang.String"]);
    let msg = bolt::Message {
        class: bolt::SOFA_REQUEST.as_bytes(),
        headers: &headers,
        content: &body,
        timeout_ms: 0,
        ..bolt::Message::new(Protocol::BoltV2, Kind::Request, 9)
    };
    let req = decode_one(&Bolt, &msg.encode());
    assert_eq!((req.kind, req.timeout), (Kind::Request, None));
    let keys = Bolt.route_keys(&req, with_body(), &Limits::default()).unwrap();
    assert_eq!(keys.service, "com.example.EchoService:2.0:blue");
    assert_eq!(
        (keys.version.as_ref(), keys.group.as_ref(), keys.method.as_ref()),
        ("2.0", "blue", "echo")
    );
    assert_eq!(keys.header("rpc_trace_context.sofaTraceId"), Some("abc"));

    // No headers at all: both service and method come from a final-dialect body.
    let body = bolt::sofa_request_body(Dialect::Final, HELLO, "sayHello", &["java.lang.String"]);
    let msg = bolt::Message {
        headers: &[],
        content: &body,
        ..msg
    };
    let keys = Bolt
        .route_keys(&decode_one(&Bolt, &msg.encode()), with_body(), &Limits::default())
        .unwrap()
        .into_owned();
    assert_eq!(
        (keys.service.as_ref(), keys.method.as_ref(), keys.version.as_ref()),
        (HELLO, "sayHello", "1.0")
    );

    // Protobuf bodies are not read: the method must be in the header.
    let msg = bolt::Message {
        codec: bolt::PROTOBUF,
        ..msg
    };
    let frame = decode_one(&Bolt, &msg.encode());
    let err = Bolt.route_keys(&frame, with_body(), &Limits::default());
    assert_eq!(
        err.unwrap_err(),
        CodecError::Serialization {
            protocol: "bolt",
            id: 11
        }
    );
}

#[test]
fn bolt_null_header_values_and_header_cap() {
    // sofa-bolt-node writes -1 for a null value.
    let mut header = Vec::new();
    for (k, v) in [
        ("service", Some(HELLO)),
        ("app", None),
        ("sofa_head_method_name", Some("sayHello")),
    ] {
        header.extend((k.len() as i32).to_be_bytes());
        header.extend_from_slice(k.as_bytes());
        match v {
            Some(v) => {
                header.extend((v.len() as i32).to_be_bytes());
                header.extend_from_slice(v.as_bytes());
            }
            None => header.extend((-1i32).to_be_bytes()),
        }
    }
    let mut f = hex("01 01 0001 01 00000005 01 ffffffff 0000");
    f.extend((header.len() as u16).to_be_bytes());
    f.extend(0u32.to_be_bytes());
    f.extend(&header);
    let req = decode_one(&Bolt, &f);
    assert_eq!(req.timeout, None, "a timeout of -1 is none");
    let keys = Bolt.route_keys(&req, Need::default(), &Limits::default()).unwrap();
    assert_eq!((keys.service.as_ref(), keys.method.as_ref()), (HELLO, "sayHello"));
    assert_eq!(keys.headers.len(), 2, "the null value is left out");

    let capped = Limits {
        max_headers: 1,
        ..Limits::default()
    };
    assert_eq!(
        Bolt.route_keys(&req, Need::default(), &capped).unwrap().headers.len(),
        1
    );
}

#[test]
fn bolt_heartbeats_and_acks_match_the_captures() {
    for (hb, ack, id) in [(BOLT_V1_HEARTBEAT, BOLT_V1_ACK, 2), (BOLT_V2_HEARTBEAT, BOLT_V2_ACK, 4)] {
        let frame = decode_one(&Bolt, &hex(hb));
        assert_eq!((frame.kind, frame.request_id), (Kind::Heartbeat, id));
        assert_eq!(
            Bolt.route_keys(&frame, with_body(), &Limits::default()).unwrap(),
            Default::default()
        );
        assert_eq!(Bolt.heartbeat_reply(&frame)[..], hex(ack)[..], "ack for {hb}");
        let ack = decode_one(&Bolt, &hex(ack));
        assert_eq!(
            (ack.kind, ack.request_id, ack.status),
            (Kind::HeartbeatReply, id, Some(0))
        );
    }
    for protocol in [Protocol::BoltV1, Protocol::BoltV2] {
        let hb = decode_one(&Bolt, &Bolt.heartbeat(protocol, 77));
        assert_eq!(
            (hb.protocol, hb.kind, hb.request_id, hb.timeout),
            (protocol, Kind::Heartbeat, 77, None)
        );
    }
    // Ours is the captured v2 heartbeat with no timeout, CRC on.
    let mut want = hex(BOLT_V2_HEARTBEAT);
    want[12..16].copy_from_slice(&(-1i32).to_be_bytes());
    let crc = bolt::crc32(&want[..24]);
    want[24..].copy_from_slice(&crc.to_be_bytes());
    assert_eq!(Bolt.heartbeat(Protocol::BoltV2, 4)[..], want[..]);
}

#[test]
fn bolt_several_frames_in_one_read_and_partial_frames() {
    let mut stream = bolt_v1_request();
    stream.extend(hex(BOLT_V1_HEARTBEAT));
    stream.extend(hex(BOLT_V2_HEARTBEAT));
    let limits = Limits::default();

    let mut buf = BytesMut::from(&stream[..]);
    let kinds: Vec<_> = std::iter::from_fn(|| Bolt.decode(&mut buf, &limits).unwrap())
        .map(|f| f.kind)
        .collect();
    assert_eq!(kinds, [Kind::Request, Kind::Heartbeat, Kind::Heartbeat]);
    assert!(buf.is_empty());

    for cut in 0..358 {
        let mut buf = BytesMut::from(&stream[..cut]);
        assert!(Bolt.decode(&mut buf, &limits).unwrap().is_none(), "cut at {cut}");
        assert_eq!(buf.len(), cut, "nothing consumed at {cut}");
    }
}

#[test]
fn bolt_bad_crc_bad_lengths_and_oversize() {
    let limits = Limits::default();
    let mut bad = hex(BOLT_V2_HEARTBEAT);
    bad[27] ^= 1;
    let err = Bolt.decode(&mut BytesMut::from(&bad[..]), &limits).unwrap_err();
    assert!(matches!(err, CodecError::Malformed { protocol: "bolt", .. }), "{err}");

    // A content length of 2 GiB is refused from the header alone, before any body arrives.
    let mut huge = hex("01 01 0001 01 00000001 01 00000bb8 0000 0000 7fffffff");
    let err = Bolt.decode(&mut BytesMut::from(&huge[..]), &limits).unwrap_err();
    assert!(
        matches!(
            err,
            CodecError::TooLarge {
                what: "bolt frame",
                limit: 0x80_0000,
                ..
            }
        ),
        "{err}"
    );
    huge[18] = 0x80;
    let err = Bolt.decode(&mut BytesMut::from(&huge[..]), &limits).unwrap_err();
    assert!(matches!(err, CodecError::Malformed { .. }), "negative length: {err}");

    let err = Bolt.decode(&mut BytesMut::from(&[3u8, 1][..]), &limits).unwrap_err();
    assert!(matches!(err, CodecError::NotThisProtocol("bolt", _)), "{err}");
    for bad in [
        &hex("01 05")[..],
        &hex("02 03 01"),
        &hex("01 00 0001 01 00000001 01 0000 0000 0000 00000000"),
    ] {
        let err = Bolt.decode(&mut BytesMut::from(bad), &limits).unwrap_err();
        assert!(matches!(err, CodecError::Malformed { .. }), "{bad:02x?}: {err}");
    }
}

#[test]
fn bolt_set_request_id_rewrites_the_crc() {
    let original = hex(BOLT_V2_HEARTBEAT);
    let mut frame = decode_one(&Bolt, &original);
    Bolt.set_request_id(&mut frame, 0x1_0102_0304);
    assert_eq!(frame.request_id, 0x0102_0304, "Bolt ids are 32-bit");
    let again = decode_one(&Bolt, &frame.raw);
    assert_eq!(again.request_id, 0x0102_0304, "the CRC still checks");
    Bolt.set_request_id(&mut frame, 4);
    assert_eq!(frame.raw[..], original[..]);

    let mut frame = decode_one(&Bolt, &bolt_v1_request());
    Bolt.set_request_id(&mut frame, 42);
    assert_eq!(decode_one(&Bolt, &frame.raw).request_id, 42);
}

/// The `detailMessage` of the `RpcServerException` in an error response's content.
fn error_message(frame: &Frame, dialect: Dialect) -> String {
    let class = &frame.raw[frame.raw.len() - content_len(frame) - bolt::RPC_SERVER_EXCEPTION.len()..];
    assert!(class.starts_with(bolt::RPC_SERVER_EXCEPTION.as_bytes()));
    let content = &frame.raw[frame.raw.len() - content_len(frame)..];
    let fields = Reader::new(content, dialect)
        .read_object_strings(&["detailMessage"])
        .unwrap();
    fields[0].clone().unwrap()
}

fn content_len(frame: &Frame) -> usize {
    let at = if frame.protocol == Protocol::BoltV2 { 18 } else { 16 };
    let crc = if frame.protocol == Protocol::BoltV2 && frame.raw[1] == 2 && frame.raw[11] & 1 == 1 {
        4
    } else {
        0
    };
    u32::from_be_bytes(frame.raw[at..at + 4].try_into().unwrap()) as usize + crc
}

#[test]
fn bolt_error_responses_in_the_request_dialect() {
    let req = decode_one(&Bolt, &bolt_v1_request());
    let res = decode_one(
        &Bolt,
        &Bolt.error_response(&req, Failure::NoRoute, "no route to sayHello"),
    );
    assert_eq!(
        (res.protocol, res.kind, res.request_id, res.status),
        (Protocol::BoltV1, Kind::Response, 1, Some(6))
    );
    assert_eq!(error_message(&res, Dialect::Draft), "no route to sayHello");

    // A v2 request with CRC and a final-dialect body gets a v2 reply with a valid CRC, final dialect.
    let body = bolt::sofa_request_body(Dialect::Final, HELLO, "sayHello", &[]);
    let msg = bolt::Message {
        class: bolt::SOFA_REQUEST.as_bytes(),
        content: &body,
        ..bolt::Message::new(Protocol::BoltV2, Kind::Request, 3)
    };
    let req = decode_one(&Bolt, &msg.encode());
    let raw = Bolt.error_response(&req, Failure::Overflow, "busy 😀");
    assert_eq!(&raw[raw.len() - 4..], bolt::crc32(&raw[..raw.len() - 4]).to_be_bytes());
    let res = decode_one(&Bolt, &raw);
    assert_eq!(
        (res.protocol, res.request_id, res.status),
        (Protocol::BoltV2, 3, Some(4))
    );
    let content = &res.raw[res.raw.len() - content_len(&res)..];
    assert_eq!(content[0], b'C');
    let fields = Reader::new(content, Dialect::Final)
        .read_object_strings(&["detailMessage"])
        .unwrap();
    assert_eq!(fields[0].as_deref(), Some("busy 😀"));

    // Protobuf: the message as the content, which sofa-bolt-node turns into the error text.
    let msg = bolt::Message {
        codec: bolt::PROTOBUF,
        ..msg
    };
    let req = decode_one(&Bolt, &msg.encode());
    let raw = Bolt.error_response(&req, Failure::Timeout, "late");
    assert_eq!(&raw[raw.len() - 8..raw.len() - 4], b"late");
    assert_eq!(decode_one(&Bolt, &raw).status, Some(7));
}

#[test]
fn dubbo_request_keys_with_an_int_timeout_attachment() {
    let req = decode_one(&Dubbo, &dubbo_request());
    assert_eq!(
        (req.protocol, req.kind, req.request_id, req.status),
        (Protocol::Dubbo, Kind::Request, 1, None)
    );

    let limits = Limits::default();
    let keys = Dubbo.route_keys(&req, Need::default(), &limits).unwrap();
    assert_eq!(
        (keys.service.as_ref(), keys.version.as_ref(), keys.method.as_ref()),
        (DEMO, "0.0.0", "sayHello")
    );
    assert!(keys.headers.is_empty() && keys.timeout.is_none());

    let keys = Dubbo.route_keys(&req, with_body(), &limits).unwrap();
    assert_eq!(keys.timeout, Some(Duration::from_secs(5)));
    assert_eq!(keys.header("timeout"), Some("5000"));
    assert_eq!(keys.header("x-tenant"), Some("blue"));
    assert_eq!(keys.header("application"), Some("dubbo-js"));
    assert_eq!(keys.headers.len(), 6);
    assert_eq!(keys.group, "");
}

#[test]
fn dubbo_attachments_override_and_cesu8_strings() {
    let mut args = Writer::new(Dialect::Final);
    args.int(2)
        .string("x")
        .string_list("[java.lang.String", &["a", "b"])
        .int(3);
    let args = args.into_vec();
    let req = dubbo::Request {
        id: 7,
        dubbo_version: "2.0.2",
        path: "com.example.Path",
        version: "",
        method: "add😀",
        descriptor: "ILjava/lang/String;[Ljava/lang/String;I",
        args: &args,
        attachments: &[
            ("interface", "com.example.Real"),
            ("group", "g1"),
            ("version", "2.0"),
            ("timeout", "250"),
        ],
        twoway: true,
    };
    let frame = decode_one(&Dubbo, &req.encode());
    let keys = Dubbo.route_keys(&frame, with_body(), &Limits::default()).unwrap();
    assert_eq!(keys.service, "com.example.Real");
    assert_eq!(
        (keys.version.as_ref(), keys.group.as_ref(), keys.method.as_ref()),
        ("2.0", "g1", "add😀")
    );
    assert_eq!(keys.timeout, Some(Duration::from_millis(250)));

    let oneway = decode_one(&Dubbo, &dubbo::Request { twoway: false, ..req }.encode());
    assert_eq!(oneway.kind, Kind::OneWay);

    // A descriptor that claims more arguments than there are values fails cleanly (with one
    // too many the attachments map would be taken for the last argument).
    let bad = dubbo::Request {
        descriptor: "IIIIII",
        ..req
    };
    let err = Dubbo
        .route_keys(&decode_one(&Dubbo, &bad.encode()), with_body(), &Limits::default())
        .unwrap_err();
    assert!(matches!(err, CodecError::Malformed { protocol: "dubbo", .. }), "{err}");
}

#[test]
fn dubbo_heartbeats() {
    let hb = decode_one(&Dubbo, &hex(DUBBO_HEARTBEAT));
    assert_eq!((hb.kind, hb.request_id, hb.status), (Kind::Heartbeat, 0x63, None));
    assert_eq!(
        Dubbo.heartbeat_reply(&hb)[..],
        hex("dabb 22 14 0000000000000063 00000001 4e")[..]
    );
    assert_eq!(Dubbo.heartbeat(Protocol::Dubbo, 0x63)[..], hex(DUBBO_HEARTBEAT)[..]);
    assert_eq!(
        Dubbo.route_keys(&hb, with_body(), &Limits::default()).unwrap(),
        Default::default()
    );

    let node = decode_one(&Dubbo, &hex(DUBBO_NODE_HEARTBEAT_REPLY));
    assert_eq!(
        (node.kind, node.request_id, node.status),
        (Kind::HeartbeatReply, 0, Some(0))
    );
}

#[test]
fn dubbo_errors_framing_and_ids() {
    let limits = Limits::default();
    let req = decode_one(&Dubbo, &dubbo_request());
    for (failure, status) in [
        (Failure::NoRoute, 60),
        (Failure::Timeout, 31),
        (Failure::RateLimited, 100),
    ] {
        let res = decode_one(&Dubbo, &Dubbo.error_response(&req, failure, "nope"));
        assert_eq!(
            (res.kind, res.request_id, res.status),
            (Kind::Response, 1, Some(status))
        );
        assert_eq!(res.raw[2], dubbo::HESSIAN2, "flag: hessian2, no request bit");
        assert_eq!(
            Reader::new(&res.raw[16..], Dialect::Final).read_string().unwrap(),
            "nope"
        );
    }

    let mut frame = decode_one(&Dubbo, &dubbo_request());
    Dubbo.set_request_id(&mut frame, u64::MAX - 1);
    assert_eq!(decode_one(&Dubbo, &frame.raw).request_id, u64::MAX - 1);

    let mut stream = dubbo_request();
    stream.extend(hex(DUBBO_HEARTBEAT));
    for cut in 0..stream.len() {
        let mut buf = BytesMut::from(&stream[..cut]);
        let first = Dubbo.decode(&mut buf, &limits).unwrap();
        assert_eq!(first.is_some(), cut >= 16 + 0xe4, "cut at {cut}");
        if first.is_none() {
            assert_eq!(buf.len(), cut);
        }
    }

    let huge = hex("dabb c2 00 0000000000000001 7fffffff");
    let err = Dubbo.decode(&mut BytesMut::from(&huge[..]), &limits).unwrap_err();
    assert!(
        matches!(
            err,
            CodecError::TooLarge {
                what: "dubbo frame",
                ..
            }
        ),
        "{err}"
    );
    let small = Limits {
        max_frame: 100,
        ..limits
    };
    let err = Dubbo
        .decode(&mut BytesMut::from(&dubbo_request()[..20]), &small)
        .unwrap_err();
    assert!(matches!(err, CodecError::TooLarge { len: 244, .. }), "{err}");
    let err = Dubbo.decode(&mut BytesMut::from(&b"GET /"[..]), &limits).unwrap_err();
    assert!(matches!(err, CodecError::NotThisProtocol("dubbo", _)), "{err}");

    // Only hessian2 bodies are read.
    let mut fastjson = dubbo_request();
    fastjson[2] = 0xc0 | 6;
    let frame = decode_one(&Dubbo, &fastjson);
    let err = Dubbo.route_keys(&frame, Need::default(), &limits).unwrap_err();
    assert_eq!(
        err,
        CodecError::Serialization {
            protocol: "dubbo",
            id: 6
        }
    );
}
