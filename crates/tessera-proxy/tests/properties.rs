//! Property tests of the proxy's pure parts: the ClientHello reader, the router, the balancer.

use http::{HeaderMap, Method};
use proptest::prelude::*;
use tessera_model::Config;
use tessera_proxy::testing::{Picker, Routes, client_hello, inspect};

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// Any bytes: an answer, never a panic.
    #[test]
    fn client_hello_reader_takes_any_bytes(b in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = inspect(&b);
    }

    /// Any corruption of a real hello: an answer, never a panic.
    #[test]
    fn client_hello_reader_takes_corrupt_hellos(sni in "[a-z]{1,20}(\\.[a-z]{1,10}){0,3}", at in any::<prop::sample::Index>(), with in any::<u8>()) {
        let mut b = client_hello(Some(&sni), &["h2"]);
        let i = at.index(b.len());
        b[i] = with;
        let _ = inspect(&b);
        let _ = inspect(&b[..i]);
    }

    /// What a client offers is what the reader finds.
    #[test]
    fn client_hello_round_trips(sni in "[a-z0-9]{1,30}(\\.[a-z0-9-]{1,20}){0,4}", alpn in prop::collection::vec("[a-z0-9/.]{1,12}", 0..4)) {
        let refs: Vec<&str> = alpn.iter().map(String::as_str).collect();
        let got = inspect(&client_hello(Some(&sni), &refs));
        prop_assert_eq!(got, Some((Some(sni), alpn)));
    }

    /// An exact domain always beats any wildcard that also covers the host; any host finds `*`.
    #[test]
    fn exact_domains_win(label in "[a-z]{1,12}", tld in "[a-z]{2,6}", port in proptest::option::of(1u16..65535)) {
        let host = format!("{label}.example.{tld}");
        let yaml = format!(r#"
listeners:
- name: l
  address: 127.0.0.1:0
  filter_chains:
  - http:
      route_config:
        virtual_hosts:
        - {{ name: any, domains: ["*"], routes: [{{ match: {{ prefix: / }}, direct_response: {{ status: 200 }} }}] }}
        - {{ name: suffix, domains: ["*.example.{tld}"], routes: [{{ match: {{ prefix: / }}, direct_response: {{ status: 200 }} }}] }}
        - {{ name: prefix, domains: ["{label}.*"], routes: [{{ match: {{ prefix: / }}, direct_response: {{ status: 200 }} }}] }}
        - {{ name: exact, domains: ["{host}"], routes: [{{ match: {{ prefix: / }}, direct_response: {{ status: 200 }} }}] }}
"#);
        let routes = Routes::new(&Config::from_yaml(&yaml, "p.yaml").unwrap()).unwrap();
        let with_port = match port { Some(p) => format!("{host}:{p}"), None => host.clone() };
        let got = routes.route(&with_port.to_uppercase(), "/", None, &Method::GET, &HeaderMap::new());
        prop_assert_eq!(got.map(|(vh, _)| vh), Some("exact".to_string()));
        let other = routes.route("unrelated.org", "/x", None, &Method::GET, &HeaderMap::new());
        prop_assert_eq!(other.map(|(vh, _)| vh), Some("any".to_string()));
    }

    /// Over one full cycle, weighted round robin gives each host exactly its weight.
    #[test]
    fn round_robin_honours_weights(weights in prop::collection::vec(1u32..=16, 1..12)) {
        let picker = Picker::new(&weights, "round_robin");
        let total: u32 = weights.iter().sum();
        let mut counts = std::collections::HashMap::new();
        for _ in 0..total {
            *counts.entry(picker.pick(None).unwrap()).or_insert(0u32) += 1;
        }
        let mut got: Vec<u32> = counts.values().copied().collect();
        let mut want = weights.clone();
        got.sort_unstable();
        want.sort_unstable();
        prop_assert_eq!(got, want);
    }
}
