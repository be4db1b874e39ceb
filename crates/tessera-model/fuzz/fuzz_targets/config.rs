//! `cargo fuzz run config` (from crates/tessera-model): any file handed to `tessera check`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = tessera_model::Config::from_yaml(s, "fuzz.yaml");
    }
});
