//! The etcd client (src/etcd/client.rs) against a real etcd 3.4 (the Debian `etcd-server`
//! binary, one member on free loopback ports with a temporary data directory): unary calls fail
//! over from a dead endpoint, transactions, leases, a watch, a compacted revision, and bounded
//! calls when nothing answers.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tessera_pilot::etcd::client::{Client, EtcdError, Event, TxnOp};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Etcd {
    child: Child,
    dir: PathBuf,
    client: u16,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn etcd() -> Etcd {
    let bin = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| PathBuf::from(d).join("etcd"))
        .find(|p| p.is_file())
        .expect("`etcd` is not installed; run scripts/test, or apt-get install -y etcd-server");
    let (client, peer) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("tessera-etcd-client-{}-{client}", std::process::id()));
    let c = format!("http://127.0.0.1:{client}");
    let p = format!("http://127.0.0.1:{peer}");
    let child = Command::new(bin)
        .args(["--name", "t", "--data-dir"])
        .arg(&dir)
        .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
        .args(["--listen-peer-urls", &p, "--initial-advertise-peer-urls", &p])
        .args(["--initial-cluster", &format!("t={p}"), "--log-level", "warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn etcd");
    let e = Etcd { child, dir, client };
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], client))).is_err() {
        assert!(Instant::now() < deadline, "etcd did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    e
}

#[tokio::test]
async fn the_etcd_client_against_a_real_etcd() {
    let e = etcd();
    // A dead endpoint first: every call fails over to the live one.
    let dead = format!("127.0.0.1:{}", free_port());
    let c = Client::new(
        vec![dead, format!("127.0.0.1:{}", e.client)],
        Duration::from_millis(500),
        Duration::from_secs(5),
    );
    // The member may still be electing itself: the first calls are retried until it serves.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (rev, prev) = loop {
        match c.put(b"/t/services/a", b"{}", 0).await {
            Ok(r) => break r,
            Err(err) => assert!(Instant::now() < deadline, "{err}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(rev > 0 && prev.is_none());
    let (_, prev) = c.put(b"/t/services/a", b"{\"x\":1}", 0).await.unwrap();
    assert_eq!(prev.map(|p| p.value), Some(b"{}".to_vec()));
    assert_eq!(
        c.get(b"/t/services/a").await.unwrap().map(|kv| kv.value),
        Some(b"{\"x\":1}".to_vec())
    );
    assert_eq!(c.get(b"/t/none").await.unwrap(), None);

    // Transactions: the compare on the service key decides.
    let r = c
        .txn_if_exists(
            b"/t/services/missing",
            &[TxnOp::Put {
                key: b"/t/instances/missing/i".to_vec(),
                value: b"1".to_vec(),
                lease: 0,
            }],
        )
        .await
        .unwrap();
    assert!(!r.succeeded);
    let lease = c.lease_grant(30).await.unwrap();
    let r = c
        .txn_if_exists(
            b"/t/services/a",
            &[TxnOp::Put {
                key: b"/t/instances/a/i".to_vec(),
                value: b"1".to_vec(),
                lease,
            }],
        )
        .await
        .unwrap();
    assert!(r.succeeded);
    let range = c.range_prefix(b"/t/").await.unwrap();
    let keys: Vec<&[u8]> = range.kvs.iter().map(|kv| kv.key.as_slice()).collect();
    assert_eq!(keys, [b"/t/instances/a/i".as_slice(), b"/t/services/a".as_slice()]);
    assert_eq!(range.kvs[0].lease, lease);

    // A watch from the range's revision on sees what follows, in order.
    let mut w = c.watch_prefix(b"/t/", range.revision + 1).await.unwrap();
    assert!(c.lease_keepalive(lease).await.unwrap() > 0);
    c.lease_revoke(lease).await.unwrap();
    c.lease_revoke(lease)
        .await
        .expect("revoking a lease already gone is no error");
    assert_eq!(c.lease_keepalive(lease).await.unwrap(), 0, "a revoked lease has no TTL");
    let (_, gone) = c.delete(b"/t/services/", true).await.unwrap();
    assert_eq!(gone.len(), 1);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let b = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap()
            .unwrap();
        seen.extend(b.events);
    }
    assert_eq!(
        seen,
        [
            Event::Delete(b"/t/instances/a/i".to_vec()),
            Event::Delete(b"/t/services/a".to_vec())
        ]
    );

    // A watch from a compacted revision says so.
    let (rev, _) = c.put(b"/t/x", b"1", 0).await.unwrap();
    let url = format!("http://127.0.0.1:{}/v3/kv/compaction", e.client);
    let body = format!("{{\"revision\": \"{rev}\"}}");
    let v = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-sS", "-X", "POST", &url, "-d", &body])
            .output()
    })
    .await
    .unwrap()
    .expect("curl");
    assert!(v.status.success());
    // etcd confirms the watch, then cancels it with the oldest revision it still has.
    let mut w = c.watch_prefix(b"/t/", 2).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), w.next()).await.unwrap() {
        Err(EtcdError::Compacted(r)) => assert_eq!(r, rev),
        Err(other) => panic!("expected Compacted, got {other}"),
        Ok(b) => panic!("expected Compacted, got {b:?}"),
    }
}

#[tokio::test]
async fn every_etcd_call_is_bounded_when_nothing_answers() {
    // A listener that accepts and never answers, and a port nobody listens on.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let c = Client::new(
        vec![silent_addr.to_string(), format!("127.0.0.1:{}", free_port())],
        Duration::from_millis(300),
        Duration::from_millis(500),
    );
    let started = Instant::now();
    let err = c.range_prefix(b"/t/").await.unwrap_err();
    assert!(matches!(err, EtcdError::AllFailed(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("request_timeout") && text.contains("cannot connect"),
        "{text}"
    );
    assert!(c.watch_prefix(b"/t/", 1).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    drop(silent);
}
