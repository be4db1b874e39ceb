//! The sidecar under a control plane: the bootstrap's `dynamic_resources` with the node flags,
//! and the ADS client's changes applied to the running proxy.

use std::path::Path;

use tessera_model::{Config, Endpoint};
use tessera_proxy::Server;
use tessera_xds::ads::Apply;
use tessera_xds::bootstrap::{Dynamic, XdsMode};

use crate::{NodeFlags, XdsModeArg};

/// The ADS settings of the bootstrap at `path`, with the command line's node identity applied;
/// `None` for a bootstrap without `dynamic_resources`. The node flags also name the node in `cfg`.
pub(crate) fn dynamic(path: &Path, flags: &NodeFlags, cfg: &mut Config) -> anyhow::Result<Option<Dynamic>> {
    let file = path.display();
    let b = tessera_xds::load::bootstrap_file(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut d = match tessera_xds::bootstrap::dynamic(&b) {
        Ok(Some(d)) => d,
        Ok(None) => {
            if flags.node_id.is_some() || flags.cluster.is_some() || !flags.meta.is_empty() || flags.xds_mode.is_some()
            {
                tracing::warn!(bootstrap = %file, "node flags given but the bootstrap has no dynamic_resources; they only name the node");
            }
            apply_names(flags, cfg);
            return Ok(None);
        }
        Err(errs) => {
            let list: Vec<String> = errs.iter().map(|e| format!("  {e}")).collect();
            anyhow::bail!("{file}: dynamic_resources:\n{}", list.join("\n"));
        }
    };
    if let Some(id) = &flags.node_id {
        d.node.id.clone_from(id);
    }
    if let Some(c) = &flags.cluster {
        d.node.cluster.clone_from(c);
    }
    if let Some(m) = flags.xds_mode {
        d.mode = match m {
            XdsModeArg::Sotw => XdsMode::Sotw,
            XdsModeArg::Delta => XdsMode::Delta,
        };
    }
    for kv in &flags.meta {
        let Some((k, v)) = kv.split_once('=') else {
            anyhow::bail!("--node-meta `{kv}`: expected KEY=VALUE");
        };
        let json = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
        let meta = d.node.metadata.get_or_insert_with(Default::default);
        meta.fields.insert(k.to_string(), to_value(json));
    }
    if d.node.id.is_empty() {
        anyhow::bail!("{file}: node.id: a control plane needs a node id (set node.id or pass --node-id)");
    }
    d.node.user_agent_name = "tessera".into();
    apply_names(flags, cfg);
    Ok(Some(d))
}

fn apply_names(flags: &NodeFlags, cfg: &mut Config) {
    if let Some(id) = &flags.node_id {
        cfg.node.id.clone_from(id);
    }
    if let Some(c) = &flags.cluster {
        cfg.node.cluster.clone_from(c);
    }
}

/// JSON into a protobuf `Value` (node metadata is a `Struct`).
fn to_value(v: serde_json::Value) -> envoy_types::pb::google::protobuf::Value {
    use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(Struct {
            fields: o.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
        }),
    };
    Value { kind: Some(kind) }
}

/// The ADS cluster's TLS, as the ADS client's handshake.
pub(crate) struct Tls(pub(crate) std::sync::Arc<tessera_proxy::ControlPlaneTls>);

impl tessera_xds::ads::Connect for Tls {
    fn wrap(
        &self,
        tcp: tokio::net::TcpStream,
    ) -> std::pin::Pin<Box<dyn Future<Output = std::io::Result<tessera_xds::ads::BoxIo>> + Send + 'static>> {
        let tls = self.0.clone();
        Box::pin(async move {
            let s = tls.connect(tcp).await?;
            Ok(Box::new(s) as tessera_xds::ads::BoxIo)
        })
    }
}

/// Settings for the ADS client: Envoy's defaults, and the TLS of the ADS cluster when it has one
/// (its certificates are loaded from `base`, the bootstrap's static part).
pub(crate) fn settings(d: Dynamic, base: Config) -> anyhow::Result<tessera_xds::ads::Settings> {
    let tls = match &d.tls {
        Some(t) => {
            let c = tessera_proxy::ControlPlaneTls::new(&base, t)
                .map_err(|e| anyhow::anyhow!("cluster `{}` (the ADS server): tls: {e}", d.cluster))?;
            Some(std::sync::Arc::new(Tls(std::sync::Arc::new(c))) as std::sync::Arc<dyn tessera_xds::ads::Connect>)
        }
        None => None,
    };
    let mut s = tessera_xds::ads::Settings::new(d, base);
    s.tls = tls;
    Ok(s)
}

/// Applies what the ADS client accepted to the running proxy.
pub(crate) struct ToProxy<'a>(pub(crate) &'a Server);

impl Apply for ToProxy<'_> {
    async fn config(&self, cfg: Config) -> Result<(), String> {
        let (l, c) = (cfg.listeners.len(), cfg.clusters.len());
        self.0.reload(cfg).await.map_err(|e| e.to_string())?;
        tracing::info!(
            listeners = l,
            clusters = c,
            "configuration from the control plane applied"
        );
        Ok(())
    }

    async fn endpoints(&self, cluster: &str, endpoints: &[Endpoint]) -> Result<(), String> {
        self.0.set_endpoints(cluster, endpoints).await
    }
}
