//! The codecs against the frames the peer tests captured (`tests/fixtures/*.hex`, see its
//! README): every frame decodes exactly, requests give the keys the peers sent, our heartbeat
//! acks equal the Node server's, and the Hessian reader gets through real response bodies.

use std::path::Path;
use std::time::Duration;

use bytes::BytesMut;
use tessera_rpc::bolt::Bolt;
use tessera_rpc::dubbo::Dubbo;
use tessera_rpc::hessian::{Dialect, Reader};
use tessera_rpc::{Codec, Detect, Frame, Kind, Limits, Need, RouteKeys};

/// The frames of one fixture file, in order.
fn frames(name: &str) -> Vec<Vec<u8>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            (0..l.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&l[i..i + 2], 16).unwrap())
                .collect()
        })
        .collect()
}

fn codec_for(name: &str) -> &'static dyn Codec {
    if name.starts_with("bolt") { &Bolt } else { &Dubbo }
}

fn decode(codec: &dyn Codec, bytes: &[u8]) -> Frame {
    let mut buf = BytesMut::from(bytes);
    let frame = codec
        .decode(&mut buf, &Limits::default())
        .unwrap()
        .expect("a whole frame");
    assert!(buf.is_empty(), "{} bytes after the frame", buf.len());
    frame
}

fn keys(codec: &dyn Codec, bytes: &[u8]) -> RouteKeys<'static> {
    codec
        .route_keys(&decode(codec, bytes), Need { body: true }, &Limits::default())
        .unwrap()
        .into_owned()
}

/// The `detailMessage` of the `RpcServerException` at the end of a Bolt response.
fn exception_message(frame: &[u8]) -> String {
    let content_len = u32::from_be_bytes(frame[16..20].try_into().unwrap()) as usize;
    let content = &frame[frame.len() - content_len..];
    let dialect = if content[0] == b'C' {
        Dialect::Final
    } else {
        Dialect::Draft
    };
    let mut fields = Reader::new(content, dialect)
        .read_object_strings(&["detailMessage"])
        .unwrap();
    fields.remove(0).unwrap()
}

#[test]
fn every_frame_decodes_alone_and_in_one_stream() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut files = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if !name.ends_with(".hex") {
            continue;
        }
        files += 1;
        let codec = codec_for(&name);
        let frames = frames(&name);
        assert!(!frames.is_empty(), "{name}");
        for bytes in &frames {
            assert_eq!(codec.detect(bytes), Detect::Yes, "{name}");
            let mut frame = decode(codec, bytes);
            if matches!(frame.kind, Kind::Request | Kind::OneWay) {
                let keys = codec
                    .route_keys(&frame, Need { body: true }, &Limits::default())
                    .unwrap();
                assert!(!keys.service.is_empty() && !keys.method.is_empty(), "{name}: {keys:?}");
            }
            let id = frame.request_id;
            codec.set_request_id(&mut frame, 0xabcd);
            assert_eq!(decode(codec, &frame.raw).request_id, 0xabcd, "{name}");
            codec.set_request_id(&mut frame, id);
            assert_eq!(&frame.raw[..], &bytes[..], "{name}");
        }
        let mut stream = BytesMut::from(&frames.concat()[..]);
        let mut n = 0;
        while codec.decode(&mut stream, &Limits::default()).unwrap().is_some() {
            n += 1;
        }
        assert_eq!((n, stream.len()), (frames.len(), 0), "{name}");
    }
    assert!(files >= 20, "only {files} fixture files");
}

#[test]
fn bolt_methods_come_from_draft_and_final_bodies() {
    let want = [
        ("com.example.EchoService:1.0", "echo"),
        ("com.example.EchoService:1.0", "add"),
        ("com.example.HelloService:1.0", "sayHello"),
    ];
    for (bytes, (service, method)) in frames("bolt_v1_request.hex").iter().zip(want) {
        let k = keys(&Bolt, bytes);
        assert_eq!(
            (k.service.as_ref(), k.method.as_ref(), k.version.as_ref()),
            (service, method, "1.0")
        );
        let frame = decode(&Bolt, bytes);
        let header_only = Bolt.route_keys(&frame, Need::default(), &Limits::default());
        assert_eq!(header_only.unwrap().method, "", "sofa-rpc-node sends no method header");
    }
    for name in [
        "bolt_hessian4_request.hex",
        "bolt_v2_crc_request.hex",
        "bolt_v2_request.hex",
    ] {
        let k = keys(&Bolt, &frames(name)[0]);
        assert_eq!(
            (k.service.as_ref(), k.method.as_ref()),
            ("com.example.EchoService:1.0", "echo"),
            "{name}"
        );
    }
}

#[test]
fn bolt_heartbeat_acks_match_the_node_server() {
    for (hb, ack) in [
        ("bolt_v1_heartbeat.hex", "bolt_v1_heartbeat_ack.hex"),
        ("bolt_v2_crc_heartbeat.hex", "bolt_v2_crc_heartbeat_ack.hex"),
        ("bolt_v2_heartbeat.hex", "bolt_v2_heartbeat_ack.hex"),
    ] {
        let hb = decode(&Bolt, &frames(hb)[0]);
        assert_eq!(hb.kind, Kind::Heartbeat);
        assert_eq!(Bolt.heartbeat_reply(&hb)[..], frames(ack)[0][..], "{ack}");
    }
}

#[test]
fn bolt_error_bodies_from_the_node_server_are_readable() {
    // Real RpcServerExceptions carry a Node stack trace (a typed list of objects), draft and final.
    let mut read = Vec::new();
    for name in [
        "bolt_v1_error_response.hex",
        "bolt_hessian4_response.hex",
        "bolt_error_response_minimal.hex",
    ] {
        for bytes in frames(name) {
            let frame = decode(&Bolt, &bytes);
            let has_content = bytes[16..20] != [0, 0, 0, 0];
            if frame.kind == Kind::Response && frame.status != Some(0) && has_content {
                read.push((frame.status, exception_message(&bytes)));
            }
        }
    }
    let nope = "Error: not found service: com.example.Nope:1.0".to_string();
    let method = "Error: Can not find method: com.example.EchoService:1.0#nope()".to_string();
    let ours = "Error: tessera: no route".to_string();
    let want = [
        (Some(2), nope.clone()),
        (Some(2), nope),
        (Some(2), method),
        (Some(6), ours.clone()),
        (Some(6), ours),
    ];
    assert_eq!(read.len(), want.len(), "{read:?}");
    for w in want {
        assert!(read.contains(&w), "{w:?} not in {read:?}");
    }
}

#[test]
fn dubbo_keys_attachments_and_heartbeats() {
    let [sayhello, echo] = &frames("dubbo_request.hex")[..] else {
        panic!("two requests")
    };
    let k = keys(&Dubbo, sayhello);
    assert_eq!(
        (k.service.as_ref(), k.version.as_ref()),
        ("org.apache.dubbo.demo.DemoService", "1.0.0")
    );
    assert_eq!(
        (k.method.as_ref(), k.timeout),
        ("sayHello", Some(Duration::from_secs(3)))
    );
    let k = keys(&Dubbo, echo);
    assert_eq!(
        (k.service.as_ref(), k.version.as_ref(), k.method.as_ref()),
        ("org.apache.dubbo.demo.EchoService", "0.0.0", "echo")
    );

    let k = keys(&Dubbo, &frames("dubbo_request_group_version_attachments.hex")[0]);
    assert_eq!((k.version.as_ref(), k.group.as_ref()), ("2.0.0", "g1"));
    assert_eq!(
        (k.header("x-tenant"), k.header("trace-id")),
        (Some("blue"), Some("abc123"))
    );
    assert_eq!(k.timeout, Some(Duration::from_secs(3)));

    for (bytes, id) in frames("dubbo_heartbeat.hex").iter().zip([99u8, 100]) {
        let hb = decode(&Dubbo, bytes);
        assert_eq!((hb.kind, hb.request_id), (Kind::Heartbeat, u64::from(id)));
        let mut java = vec![0xda, 0xbb, 0x22, 20, 0, 0, 0, 0, 0, 0, 0, id, 0, 0, 0, 1, b'N'];
        assert_eq!(Dubbo.heartbeat_reply(&hb)[..], java[..]);
        java[2] = 0x62; // the Node server's replies: twoway|event, status 0, id 0
        java[3] = 0;
        java[11] = 0;
        assert_eq!(
            decode(&Dubbo, &frames("dubbo_heartbeat_reply.hex")[0]).kind,
            Kind::HeartbeatReply
        );
        assert_eq!(frames("dubbo_heartbeat_reply.hex")[0], java);
    }
}

#[test]
fn dubbo_response_bodies_are_readable() {
    let error = frames("dubbo_error_response.hex").pop().unwrap();
    assert_eq!(decode(&Dubbo, &error).status, Some(60));
    let message = Reader::new(&error[16..], Dialect::Final).read_string().unwrap();
    assert!(message.starts_with("SERVICE_NOT_FOUND#Service not found"), "{message}");

    for bytes in frames("dubbo_response.hex") {
        assert_eq!(decode(&Dubbo, &bytes).status, Some(20));
        let mut r = Reader::new(&bytes[16..], Dialect::Final);
        let flag = r.read_int().unwrap();
        r.skip_value().unwrap();
        if flag == 4 {
            assert_eq!(
                r.read_string_map(8).unwrap(),
                [("dubbo".to_string(), "2.0.2".to_string())]
            );
        }
        assert!(r.at_end());
    }
}
