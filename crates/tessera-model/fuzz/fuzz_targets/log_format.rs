//! `cargo fuzz run log_format` (from crates/tessera-model): access-log format strings.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = tessera_model::format::parse(s);
    }
});
