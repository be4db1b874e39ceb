//! Tessera's data-plane runtime: listeners and filter chains, the TCP proxy, the HTTP connection
//! manager, the router, upstream clusters and pools, access logs and the admin API.
//!
//! It turns a validated [`tessera_model::Config`] into running state and keeps it running:
//! N worker threads, each a single-threaded event loop owning its sockets; configuration
//! snapshots swapped atomically; the admin API, DNS and log writing off the workers.
//! It must not parse configuration files (the model does) or handle process signals (the binary does).

mod access_log;
mod admin;
mod body;
mod cluster;
mod flags;
mod http;
mod listener;
mod pool;
mod router;
mod server;
mod stats;
mod tcp;
mod tls_inspect;
mod util;
mod worker;

pub use body::RespBody;
pub use flags::ResponseFlags;
pub use server::{Options, Server, ServerState, StartError};

/// Helpers for tests of this crate and its users. Not part of the proxy's behaviour.
#[doc(hidden)]
pub mod testing {
    /// A TLS ClientHello record offering `sni` and `alpn`, as a client's first bytes.
    pub fn client_hello(sni: Option<&str>, alpn: &[&str]) -> Vec<u8> {
        crate::tls_inspect::build::client_hello(sni, alpn)
    }
}
