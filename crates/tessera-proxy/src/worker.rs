//! Worker threads: each runs a single-threaded tokio runtime that owns its listener sockets and
//! every connection it accepts, so the request path never crosses threads or takes a lock.

use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::sync::mpsc;

use crate::listener::{ListenerRt, accept_loop};
use crate::server::Shared;

pub(crate) enum Cmd {
    /// Start accepting on this socket (one of the listener's SO_REUSEPORT group).
    Listen(Arc<ListenerRt>, std::net::TcpListener),
    /// Stop the runtime; whatever still runs is dropped.
    Exit,
}

pub(crate) struct Worker {
    pub(crate) tx: mpsc::UnboundedSender<Cmd>,
    pub(crate) thread: Option<JoinHandle<()>>,
}

pub(crate) fn spawn(id: usize, shared: Arc<Shared>) -> std::io::Result<Worker> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Cmd>();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let thread = std::thread::Builder::new()
        .name(format!("tessera-worker-{id}"))
        .spawn(move || {
            rt.block_on(async move {
                while let Some(cmd) = rx.recv().await {
                    match cmd {
                        Cmd::Listen(l, sock) => {
                            tokio::spawn(accept_loop(l, sock, shared.clone()));
                        }
                        Cmd::Exit => break,
                    }
                }
            });
            // Dropping the runtime cancels every task left on this worker.
            drop(rt);
        })?;
    Ok(Worker {
        tx,
        thread: Some(thread),
    })
}
