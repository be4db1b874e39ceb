//! OPA: Rego policies evaluated in process with `regorus`, the request's attributes as `input`.
//!
//! `input` is one object in Istio's vocabulary:
//!
//! ```json
//! { "source":      { "ip": "10.0.0.7", "port": 53112, "principal": "spiffe://..." },
//!   "destination": { "service": "shop", "port": 10000 },
//!   "request":     { "host": "shop", "method": "GET", "path": "/a?b=1", "url_path": "/a",
//!                    "scheme": "http", "headers": { "x-user": "ann" } },
//!   "rpc":         { "protocol": "bolt", "service": "...", "method": "...", "version": "...",
//!                    "group": "...", "attachments": { } },
//!   "context":     { "protocol": "http" } }
//! ```
//!
//! Keys the request does not have are absent (Rego sees them as undefined). The query names one
//! rule (`data.tessera.authz.allow`); its value decides: `true` allows; `false` or undefined
//! denies; an object allows when its `allowed` is `true` and may give a `reason`. Anything else,
//! and any evaluation error (a builtin error, the time limit), is an error that the check's
//! `fail_open` answers — deny by default.
//!
//! An engine evaluates one request at a time (`set_input` mutates it), so each check keeps a small
//! pool of engine clones; the clones share the compiled modules (reference-counted), and a
//! request takes one for the length of one evaluation.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use regorus::utils::limits::ExecutionTimerConfig;
use regorus::{Engine, Value};

use crate::{Attr, Attributes, Verdict};

/// The longest an evaluation may run before it fails (and `fail_open` answers).
pub const EVAL_LIMIT: Duration = Duration::from_millis(100);

/// Engines kept for reuse per check; more concurrent evaluations clone the template.
const POOL: usize = 64;

/// Why Rego modules or a query were rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpaError {
    /// A module failed to parse or compile; the message names the line.
    #[error("Rego module `{module}`: {message}")]
    Module {
        /// The module's label (its file name).
        module: String,
        /// regorus's message.
        message: String,
    },
    /// No modules were given.
    #[error("no Rego modules")]
    NoModules,
    /// The query is not a rule reference.
    #[error("query `{query}`: {message}")]
    Query {
        /// The query.
        query: String,
        /// Why.
        message: String,
    },
}

/// What one evaluation decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpaVerdict {
    /// Allow or deny (after `fail_open` for errors).
    pub allowed: bool,
    /// Why: the policy's `reason`, or what went wrong.
    pub reason: Cow<'static, str>,
    /// The evaluation failed and `fail_open` decided.
    pub error: bool,
}

impl OpaVerdict {
    /// The decision as a check's verdict.
    pub fn verdict(&self) -> Verdict {
        Verdict {
            allowed: self.allowed,
            reason: self.reason.clone(),
        }
    }
}

/// Compiled Rego modules and the rule that decides.
pub struct Opa {
    template: Engine,
    query: String,
    fail_open: bool,
    pool: Mutex<Vec<Engine>>,
}

impl std::fmt::Debug for Opa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opa")
            .field("query", &self.query)
            .field("fail_open", &self.fail_open)
            .finish_non_exhaustive()
    }
}

impl Opa {
    /// Compiles `modules` (label, Rego text; Rego v1 syntax, as OPA 1.x) for `query`.
    /// The query is tried once with an empty input, so a misspelt package fails here, not on
    /// the first request.
    pub fn new(modules: &[(String, String)], query: &str, fail_open: bool) -> Result<Self, OpaError> {
        if modules.is_empty() {
            return Err(OpaError::NoModules);
        }
        let mut engine = Engine::new();
        engine.set_execution_timer_config(ExecutionTimerConfig {
            limit: EVAL_LIMIT,
            check_interval: NonZeroU32::MIN.saturating_add(63),
        });
        for (label, text) in modules {
            engine
                .add_policy(label.clone(), text.clone())
                .map_err(|e| OpaError::Module {
                    module: label.clone(),
                    message: e.to_string(),
                })?;
        }
        if !query.starts_with("data.") {
            return Err(OpaError::Query {
                query: query.to_string(),
                message: "not a rule reference; write `data.<package>.<rule>`".into(),
            });
        }
        let packages = engine.get_packages().unwrap_or_default();
        let package_named = packages
            .iter()
            .any(|p| query.strip_prefix(p.as_str()).is_some_and(|rest| rest.starts_with('.')));
        if !package_named {
            return Err(OpaError::Query {
                query: query.to_string(),
                message: format!("names no rule of the packages loaded ({})", packages.join(", ")),
            });
        }
        let mut probe = engine.clone();
        probe.set_input(Value::new_object());
        if let Err(e) = probe.eval_rule(query.to_string()) {
            let message = e.to_string();
            // A rule that only fails on a real input (a builtin error) is not a config error;
            // a missing rule or a compile error is.
            if message.contains("not a valid rule path") || message.contains("rule") && message.contains("not found") {
                return Err(OpaError::Query {
                    query: query.to_string(),
                    message,
                });
            }
        }
        Ok(Opa {
            template: engine,
            query: query.to_string(),
            fail_open,
            pool: Mutex::new(Vec::new()),
        })
    }

    /// The rule that decides.
    pub fn query(&self) -> &str {
        &self.query
    }

    /// Evaluates the query with `attrs` as input.
    pub fn evaluate(&self, attrs: &dyn Attributes) -> OpaVerdict {
        let mut engine = self
            .pool
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_else(|| self.template.clone());
        engine.set_input(input(attrs));
        let result = engine.eval_rule(self.query.clone());
        {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < POOL {
                pool.push(engine);
            }
        }
        match result {
            Ok(v) => self.decide(v),
            Err(e) => self.failed(format!("OPA: evaluating `{}` failed: {e}", self.query)),
        }
    }

    fn decide(&self, v: Value) -> OpaVerdict {
        match v {
            Value::Bool(true) => allow("OPA: allowed"),
            Value::Bool(false) => deny(format!("OPA: denied by `{}`", self.query)),
            Value::Undefined => deny(format!("OPA: `{}` is undefined for this request", self.query)),
            Value::Object(ref o) => {
                let allowed = o.get(&Value::from("allowed"));
                let reason = o.get(&Value::from("reason")).and_then(|r| match r {
                    Value::String(s) => Some(s.to_string()),
                    _ => None,
                });
                match allowed {
                    Some(Value::Bool(true)) => OpaVerdict {
                        allowed: true,
                        reason: reason.map_or(Cow::Borrowed("OPA: allowed"), Cow::Owned),
                        error: false,
                    },
                    Some(Value::Bool(false)) | None | Some(Value::Undefined) => {
                        deny(reason.unwrap_or_else(|| format!("OPA: denied by `{}`", self.query)))
                    }
                    Some(other) => self.failed(format!("OPA: `{}`.allowed is {other}, not a boolean", self.query)),
                }
            }
            other => self.failed(format!("OPA: `{}` is {other}, not a boolean or an object", self.query)),
        }
    }

    fn failed(&self, why: String) -> OpaVerdict {
        OpaVerdict {
            allowed: self.fail_open,
            reason: Cow::Owned(why),
            error: true,
        }
    }
}

fn allow(reason: &'static str) -> OpaVerdict {
    OpaVerdict {
        allowed: true,
        reason: Cow::Borrowed(reason),
        error: false,
    }
}

fn deny(reason: String) -> OpaVerdict {
    OpaVerdict {
        allowed: false,
        reason: Cow::Owned(reason),
        error: false,
    }
}

/// Builds `input` from the attributes.
pub fn input(attrs: &dyn Attributes) -> Value {
    fn put(obj: &mut BTreeMap<Value, Value>, key: &str, v: Option<Value>) {
        if let Some(v) = v {
            obj.insert(Value::from(key), v);
        }
    }
    let text = |a: Attr| attrs.get(&a).map(|v| Value::from(v.as_ref()));
    let number = |a: Attr| {
        attrs
            .get(&a)
            .map(|v| v.parse::<u64>().map_or_else(|_| Value::from(v.as_ref()), Value::from))
    };
    let nonempty = |o: BTreeMap<Value, Value>| (!o.is_empty()).then(|| Value::from(o));

    let mut source = BTreeMap::new();
    put(&mut source, "ip", text(Attr::SourceIp));
    put(&mut source, "port", number(Attr::SourcePort));
    put(&mut source, "principal", text(Attr::SourcePrincipal));
    put(&mut source, "namespace", text(Attr::SourceNamespace));

    let mut destination = BTreeMap::new();
    put(&mut destination, "service", text(Attr::DestinationService));
    put(&mut destination, "port", number(Attr::DestinationPort));
    put(&mut destination, "namespace", text(Attr::DestinationNamespace));

    let mut request = BTreeMap::new();
    put(&mut request, "host", text(Attr::RequestHost));
    put(&mut request, "method", text(Attr::RequestMethod));
    if let Some(path) = attrs.get(&Attr::RequestPath) {
        let url_path = path.split(['?', '#']).next().unwrap_or_default();
        request.insert(Value::from("url_path"), Value::from(url_path));
        request.insert(Value::from("path"), Value::from(path.as_ref()));
    }
    put(&mut request, "scheme", text(Attr::RequestScheme));
    let mut headers = BTreeMap::new();
    attrs.each_header(&mut |k, v| {
        headers.insert(Value::from(k), Value::from(v));
    });
    put(&mut request, "headers", nonempty(headers));

    let mut rpc = BTreeMap::new();
    put(&mut rpc, "protocol", text(Attr::RpcProtocol));
    put(&mut rpc, "service", text(Attr::RpcService));
    put(&mut rpc, "method", text(Attr::RpcMethod));
    put(&mut rpc, "version", text(Attr::RpcVersion));
    put(&mut rpc, "group", text(Attr::RpcGroup));
    let mut attachments = BTreeMap::new();
    attrs.each_attachment(&mut |k, v| {
        attachments.insert(Value::from(k), Value::from(v));
    });
    put(&mut rpc, "attachments", nonempty(attachments));

    let mut context = BTreeMap::new();
    put(&mut context, "protocol", text(Attr::ContextProtocol));

    let mut root = BTreeMap::new();
    put(&mut root, "source", nonempty(source));
    put(&mut root, "destination", nonempty(destination));
    put(&mut root, "request", nonempty(request));
    put(&mut root, "rpc", nonempty(rpc));
    put(&mut root, "context", nonempty(context));
    Value::from(root)
}

/// Shares one compiled policy between the proxy's reload machinery and requests.
pub type SharedOpa = Arc<Opa>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MapAttributes;

    fn module(text: &str) -> Vec<(String, String)> {
        vec![("policy.rego".to_string(), text.to_string())]
    }

    const METHODS: &str = r#"
package tessera.authz

default allow := false

allow if input.request.method == "GET"

allow if input.request.headers["x-role"] == "admin"
"#;

    #[test]
    fn header_and_method_rules() {
        let opa = Opa::new(&module(METHODS), "data.tessera.authz.allow", false).unwrap();
        let get = MapAttributes::new().with(Attr::RequestMethod, "GET");
        let post = MapAttributes::new().with(Attr::RequestMethod, "POST");
        let admin_post = post.clone().with(Attr::RequestHeader("x-role".into()), "admin");
        assert!(opa.evaluate(&get).allowed);
        let v = opa.evaluate(&post);
        assert!(!v.allowed && !v.error, "{v:?}");
        assert_eq!(v.reason, "OPA: denied by `data.tessera.authz.allow`");
        assert!(opa.evaluate(&admin_post).allowed);
    }

    #[test]
    fn paths_ports_and_rpc_fields_reach_the_input() {
        let opa = Opa::new(
            &module(
                r#"
package t
allow if {
    startswith(input.request.url_path, "/public/")
    input.destination.port == 10000
    input.source.ip == "127.0.0.1"
}
allow if {
    input.rpc.service == "com.acme.Orders"
    input.rpc.attachments.tenant == "blue"
}
"#,
            ),
            "data.t.allow",
            false,
        )
        .unwrap();
        let public = MapAttributes::new()
            .with(Attr::RequestPath, "/public/a?x=/private")
            .with(Attr::DestinationPort, "10000")
            .with(Attr::SourceIp, "127.0.0.1");
        assert!(opa.evaluate(&public).allowed);
        let private = public.clone().with(Attr::RequestPath, "/private?x=/public/");
        assert!(!opa.evaluate(&private).allowed, "the query string is not the path");
        let rpc = MapAttributes::new()
            .with(Attr::RpcService, "com.acme.Orders")
            .with(Attr::RpcAttachment("tenant".into()), "blue");
        assert!(opa.evaluate(&rpc).allowed);
        let other = rpc.clone().with(Attr::RpcAttachment("tenant".into()), "red");
        assert!(!opa.evaluate(&other).allowed);
    }

    #[test]
    fn objects_give_reasons_and_odd_values_fail_closed_or_open() {
        let text = r#"
package t
decision := {"allowed": false, "reason": "tenant suspended"} if input.request.headers["x-tenant"] == "bad"
decision := {"allowed": true} if input.request.headers["x-tenant"] == "good"
number := 7
"#;
        let opa = Opa::new(&module(text), "data.t.decision", false).unwrap();
        let bad = MapAttributes::new().with(Attr::RequestHeader("x-tenant".into()), "bad");
        let good = MapAttributes::new().with(Attr::RequestHeader("x-tenant".into()), "good");
        let v = opa.evaluate(&bad);
        assert_eq!((v.allowed, v.reason.as_ref()), (false, "tenant suspended"));
        assert!(opa.evaluate(&good).allowed);
        assert!(!opa.evaluate(&MapAttributes::new()).allowed, "undefined denies");

        let closed = Opa::new(&module(text), "data.t.number", false).unwrap();
        let v = closed.evaluate(&good);
        assert!(!v.allowed && v.error, "{v:?}");
        let open = Opa::new(&module(text), "data.t.number", true).unwrap();
        let v = open.evaluate(&good);
        assert!(v.allowed && v.error, "{v:?}");
    }

    #[test]
    fn builtin_errors_fail_closed_by_default() {
        // `to_number` of a non-number is a runtime error in OPA.
        let text = r#"
package t
allow if to_number(input.request.headers["x-n"]) > 3
"#;
        let closed = Opa::new(&module(text), "data.t.allow", false).unwrap();
        let ok = MapAttributes::new().with(Attr::RequestHeader("x-n".into()), "5");
        assert!(closed.evaluate(&ok).allowed);
        let bad = MapAttributes::new().with(Attr::RequestHeader("x-n".into()), "five");
        let v = closed.evaluate(&bad);
        assert!(!v.allowed, "{v:?}");

        // Two values for one complete rule is an evaluation error in OPA: fail closed, or open.
        let conflict = r#"
package t
allow := true if input.request.headers["x-a"] == "1"
allow := false if input.request.headers["x-b"] == "1"
"#;
        let both = MapAttributes::new()
            .with(Attr::RequestHeader("x-a".into()), "1")
            .with(Attr::RequestHeader("x-b".into()), "1");
        let v = Opa::new(&module(conflict), "data.t.allow", false)
            .unwrap()
            .evaluate(&both);
        assert!(!v.allowed && v.error, "{v:?}");
        let v = Opa::new(&module(conflict), "data.t.allow", true)
            .unwrap()
            .evaluate(&both);
        assert!(v.allowed && v.error, "{v:?}");
    }

    #[test]
    fn bad_modules_and_queries_are_config_errors() {
        let e = Opa::new(&module("package t\nallow if {"), "data.t.allow", false).unwrap_err();
        assert!(
            matches!(e, OpaError::Module { ref module, .. } if module == "policy.rego"),
            "{e}"
        );
        let e = Opa::new(&module(METHODS), "allow", false).unwrap_err();
        assert!(matches!(e, OpaError::Query { .. }), "{e}");
        let e = Opa::new(&module(METHODS), "data.other.allow", false).unwrap_err();
        assert!(e.to_string().contains("tessera.authz"), "{e}");
        assert_eq!(Opa::new(&[], "data.t.allow", false).unwrap_err(), OpaError::NoModules);
    }

    #[test]
    fn concurrent_evaluations_share_the_policy() {
        let opa = Arc::new(Opa::new(&module(METHODS), "data.tessera.authz.allow", false).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let opa = opa.clone();
                std::thread::spawn(move || {
                    let method = if i % 2 == 0 { "GET" } else { "PUT" };
                    let a = MapAttributes::new().with(Attr::RequestMethod, method);
                    (0..200).all(|_| opa.evaluate(&a).allowed == (i % 2 == 0))
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().unwrap());
        }
    }
}
