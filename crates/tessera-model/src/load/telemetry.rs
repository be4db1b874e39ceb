//! `telemetry:`.

use std::time::Duration;

use crate::decode::{Ctx, Obj, Path, enumeration, socket_addr};
use crate::telemetry::*;
use crate::yaml::Node;

/// `telemetry: { reporter, workload, queue, flush_interval, prometheus, statsd, access_log }`.
pub(super) fn telemetry(ctx: &mut Ctx, n: &Node, p: &Path) -> Option<Telemetry> {
    let mut o = Obj::open(ctx, n, p)?;
    let reporter = o
        .get("reporter")
        .and_then(|(n, p)| {
            enumeration(
                ctx,
                n,
                &p,
                &[
                    ("destination", ReporterSide::Destination),
                    ("source", ReporterSide::Source),
                ],
            )
        })
        .unwrap_or(ReporterSide::Destination);
    let workload = o
        .get("workload")
        .and_then(|(n, p)| {
            let mut w = Obj::open(ctx, n, &p)?;
            let out = Workload {
                name: w.string(ctx, "name"),
                namespace: w.string(ctx, "namespace"),
                app: w.string(ctx, "app"),
                version: w.string(ctx, "version"),
                cluster: w.string(ctx, "cluster"),
            };
            w.finish(ctx);
            Some(out)
        })
        .unwrap_or_default();
    let queue = o.uint(ctx, "queue", 16, 1_000_000).unwrap_or(4096);
    let flush_interval = o.duration(ctx, "flush_interval").unwrap_or(Duration::from_secs(1));
    let prometheus = o.bool(ctx, "prometheus").unwrap_or(true);
    let statsd = o.get("statsd").and_then(|(n, p)| {
        let mut s = Obj::open(ctx, n, &p)?;
        let address = s.require(ctx, "address").and_then(|(n, p)| socket_addr(ctx, n, &p));
        let prefix = s.string(ctx, "prefix").unwrap_or_else(|| "istio".into());
        let dogstatsd = s.bool(ctx, "dogstatsd").unwrap_or(true);
        s.finish(ctx);
        Some(Statsd {
            address: address?,
            prefix,
            dogstatsd,
        })
    });
    let access_log = o.get("access_log").and_then(|(n, p)| {
        let mut a = Obj::open(ctx, n, &p)?;
        let path = a.string(ctx, "path").map(|f| super::tls::resolve(ctx, &f));
        let format = a.string(ctx, "format").filter(|f| f != "json");
        let max_bytes = a.uint(ctx, "max_bytes", 1024, u64::MAX);
        let max_files = a.uint(ctx, "max_files", 0, 1000).unwrap_or(5);
        a.finish(ctx);
        if max_bytes.is_some() && path.is_none() {
            ctx.error(
                n.mark,
                &p.field("max_bytes"),
                "rotation needs a `path` (stdout is not rotated)",
            );
        }
        Some(ReportLog {
            path,
            format,
            max_bytes,
            max_files,
        })
    });
    let tracing = o.get("tracing").and_then(|(n, p)| {
        let mut t = Obj::open(ctx, n, &p)?;
        let otlp = t.require(ctx, "otlp").and_then(|(n, p)| socket_addr(ctx, n, &p));
        let path = t.string(ctx, "path").unwrap_or_else(|| "/v1/traces".into());
        let service_name = t
            .string(ctx, "service_name")
            .or_else(|| workload.name.clone())
            .unwrap_or_else(|| "tessera".into());
        let sampling = t.get("sampling").and_then(|(n, p)| {
            crate::decode::parse_scalar(ctx, n, &p, "a percentage from 0 to 100", |s| {
                s.parse::<f64>().ok().filter(|v| (0.0..=100.0).contains(v))
            })
        });
        t.finish(ctx);
        if !path.starts_with('/') {
            ctx.error(n.mark, &p.field("path"), "the path starts with `/`");
        }
        Some(Tracing {
            otlp: otlp?,
            path,
            service_name,
            sampling: sampling.unwrap_or(100.0),
        })
    });
    if flush_interval.is_zero() {
        ctx.error(n.mark, &p.field("flush_interval"), "must be longer than zero");
    }
    o.finish(ctx);
    Some(Telemetry {
        reporter,
        workload,
        queue,
        flush_interval,
        prometheus,
        statsd,
        access_log,
        tracing,
    })
}
