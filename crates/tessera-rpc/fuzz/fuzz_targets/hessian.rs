//! `cargo +nightly fuzz run hessian` (from crates/tessera-rpc): any Hessian body, in both dialects.
#![no_main]

use tessera_rpc::hessian::{Dialect, Reader};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    for dialect in [Dialect::Final, Dialect::Draft] {
        let mut r = Reader::new(data, dialect);
        while !r.at_end() && r.skip_value().is_ok() {}
        let _ = Reader::new(data, dialect).read_string_map(64);
        let _ = Reader::new(data, dialect).read_object_strings(&["methodName", "targetServiceUniqueName"]);
        let _ = Reader::new(data, dialect).read_string();
    }
});
