//! RBAC as Istio compiles an AuthorizationPolicy, through the crate's public API.

use tessera_policy::rbac::ACCESS_DENIED;
use tessera_policy::{
    Action, Attr, CidrRange, HeaderMatcher, MapAttributes, Permission, Policy, Principal, Rbac, RbacEngine, RbacFilter,
    StringMatcher,
};

/// ```yaml
/// kind: AuthorizationPolicy
/// metadata: { name: info, namespace: default }
/// spec:
///   action: ALLOW
///   rules:
///   - from: [{ source: { principals: ["cluster.local/ns/default/sa/sleep"] } }]
///     to: [{ operation: { methods: ["GET"], paths: ["/info*"] } }]
/// ```
/// Istio: one policy per rule; `to` fields are ANDed, values inside a field ORed.
fn allow_sleep_get_info() -> RbacEngine {
    RbacEngine::new(Rbac {
        action: Action::Allow,
        policies: vec![(
            "ns[default]-policy[info]-rule[0]".into(),
            Policy {
                permissions: vec![Permission::AndRules(vec![
                    Permission::OrRules(vec![Permission::Method("GET".into())]),
                    Permission::OrRules(vec![Permission::UrlPath(StringMatcher::istio("/info*"))]),
                ])],
                principals: vec![Principal::AndIds(vec![Principal::OrIds(vec![Principal::istio(
                    "cluster.local/ns/default/sa/sleep",
                )])])],
            },
        )],
    })
    .expect("valid rules")
}

/// ```yaml
/// kind: AuthorizationPolicy
/// metadata: { name: blocked, namespace: default }
/// spec:
///   action: DENY
///   rules:
///   - when: [{ key: request.headers[x-user], values: ["blocked"] }]
/// ```
/// No `from`/`to`: Istio puts `any` in their place.
fn deny_blocked_user() -> RbacEngine {
    RbacEngine::new(Rbac {
        action: Action::Deny,
        policies: vec![(
            "ns[default]-policy[blocked]-rule[0]".into(),
            Policy {
                permissions: vec![Permission::AndRules(vec![Permission::OrRules(vec![
                    Permission::Header(HeaderMatcher::new("x-user", StringMatcher::istio("blocked"))),
                ])])],
                principals: vec![Principal::AndIds(vec![Principal::Any])],
            },
        )],
    })
    .expect("valid rules")
}

fn request(principal: Option<&str>, method: &str, path: &str, user: Option<&str>) -> MapAttributes {
    let mut attrs = MapAttributes::new()
        .with(Attr::RequestMethod, method)
        .with(Attr::RequestPath, path)
        .with(Attr::SourceIp, "10.0.0.7");
    if let Some(p) = principal {
        attrs.insert(Attr::SourcePrincipal, p);
    }
    if let Some(u) = user {
        attrs.insert(Attr::RequestHeader("x-user".into()), u);
    }
    attrs
}

#[test]
fn istio_allow_and_deny_policies() {
    let sleep = Some("spiffe://cluster.local/ns/default/sa/sleep");
    let other = Some("spiffe://cluster.local/ns/default/sa/other");
    // Envoy runs the DENY engine first, then the ALLOW one; both must allow.
    let (deny, allow) = (deny_blocked_user(), allow_sleep_get_info());
    // (principal, method, path, x-user, allowed, reason of the denial)
    type Row<'a> = (Option<&'a str>, &'a str, &'a str, Option<&'a str>, bool, &'a str);
    let table: &[Row<'_>] = &[
        (sleep, "GET", "/info", None, true, ""),
        (sleep, "GET", "/info/v2?verbose=1", Some("ann"), true, ""),
        (sleep, "GET", "/information", None, true, ""),
        (
            sleep,
            "POST",
            "/info",
            None,
            false,
            "RBAC: access denied, no policy matched",
        ),
        (
            sleep,
            "GET",
            "/admin?next=/info",
            None,
            false,
            "RBAC: access denied, no policy matched",
        ),
        (
            other,
            "GET",
            "/info",
            None,
            false,
            "RBAC: access denied, no policy matched",
        ),
        (
            None,
            "GET",
            "/info",
            None,
            false,
            "RBAC: access denied, no policy matched",
        ),
        (
            sleep,
            "GET",
            "/info",
            Some("blocked"),
            false,
            "RBAC: access denied, matched policy `ns[default]-policy[blocked]-rule[0]`",
        ),
    ];
    for &(principal, method, path, user, allowed, reason) in table {
        let attrs = request(principal, method, path, user);
        let denied = deny.evaluate(&attrs);
        let decision = if denied.allowed { allow.evaluate(&attrs) } else { denied };
        assert_eq!(decision.allowed, allowed, "{attrs:?}: {}", decision.reason);
        if !allowed {
            assert_eq!(decision.reason, reason, "{attrs:?}");
            assert!(decision.reason.starts_with(ACCESS_DENIED));
        }
    }
}

#[test]
fn istio_ip_blocks_and_shadow_dry_run() {
    // `from: [{ source: { ipBlocks: ["10.0.0.0/8", "2001:db8::/32"] } }]`, as a dry run
    // (`istio.io/dry-run: "true"` compiles the policy to shadow rules).
    let ip_blocks = |blocks: &[&str]| {
        Principal::OrIds(
            blocks
                .iter()
                .map(|b| Principal::SourceIp(CidrRange::parse(b).unwrap()))
                .collect(),
        )
    };
    let filter = RbacFilter {
        rules: None,
        shadow_rules: Some(
            RbacEngine::new(Rbac {
                action: Action::Allow,
                policies: vec![(
                    "internal".into(),
                    Policy {
                        permissions: vec![Permission::Any],
                        principals: vec![ip_blocks(&["10.0.0.0/8", "2001:db8::/32"])],
                    },
                )],
            })
            .unwrap(),
        ),
    };
    for (ip, shadow) in [
        ("10.200.1.1", "shadow_allowed"),
        ("192.0.2.1", "shadow_denied"),
        ("2001:db8::5", "shadow_allowed"),
        ("2001:db9::5", "shadow_denied"),
        ("::ffff:10.0.0.1", "shadow_allowed"),
    ] {
        let out = filter.check(&MapAttributes::new().with(Attr::SourceIp, ip));
        assert!(out.allowed(), "{ip}");
        assert_eq!(out.shadow.unwrap().shadow_counter(), shadow, "{ip}");
    }
}
