//! `cargo fuzz run client_hello` (from crates/tessera-proxy): the first bytes of any connection
//! go through the ClientHello reader when a listener matches on SNI or ALPN.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = tessera_proxy::testing::inspect(data);
});
