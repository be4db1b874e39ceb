//! Property tests: the parsers take any input without panicking, and what they print they read back.

use std::time::Duration;

use proptest::prelude::*;
use tessera_model::{Cidr, Config, format, format_duration, parse_duration};

/// YAML-ish text: fragments of real config mixed with noise, so the decoder gets past the
/// syntax stage and into field handling.
fn yamlish() -> impl Strategy<Value = String> {
    let frag = prop_oneof![
        Just("listeners:\n".to_string()),
        Just("- name: l\n  address: 127.0.0.1:0\n".to_string()),
        Just("  filter_chains:\n  - tcp_proxy: { cluster: c }\n".to_string()),
        Just("  - http: { route_config: { virtual_hosts: [{ name: v, domains: ['*'], routes: [] }] } }\n".to_string()),
        Just("clusters:\n- { name: c, endpoints: [127.0.0.1:1] }\n".to_string()),
        Just("admin: { address: 127.0.0.1:9901 }\n".to_string()),
        Just("drain_time: 5s\n".to_string()),
        "[ -~\n]{0,40}",
    ];
    prop::collection::vec(frag, 0..8).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn config_loader_never_panics(src in yamlish()) {
        match Config::from_yaml(&src, "p.yaml") {
            Ok(_) => {}
            Err(e) => {
                for err in e.errors() {
                    prop_assert!(err.line >= 1, "{err}");
                    prop_assert!(!err.reason.is_empty());
                }
            }
        }
    }

    #[test]
    fn config_loader_takes_arbitrary_bytes(src in "\\PC{0,200}") {
        let _ = Config::from_yaml(&src, "p.yaml");
    }

    #[test]
    fn format_parser_never_panics(src in "[%A-Z_():?a-z0-9 -]{0,60}") {
        let _ = format::parse(&src);
    }

    #[test]
    fn durations_round_trip(ms in 0u64..10_000_000) {
        let d = Duration::from_millis(ms);
        prop_assert_eq!(parse_duration(&format_duration(d)), Some(d));
    }

    #[test]
    fn cidr_contains_its_own_address(a in any::<u32>(), len in 0u8..=32) {
        let ip = std::net::Ipv4Addr::from(a);
        let c = Cidr::parse(&format!("{ip}/{len}")).unwrap();
        prop_assert!(c.contains(ip.into()));
        prop_assert_eq!(Cidr::parse(&c.to_string()), Some(c));
    }
}
