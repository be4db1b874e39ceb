//! Table tests for route matching, domain priority, rewrites and redirects.

use super::*;
use tessera_model::Config;

fn table(routes_yaml: &str) -> RouteTable {
    let src = format!(
        r#"
listeners:
- name: l
  address: 127.0.0.1:1
  filter_chains:
  - http:
      route_config:
{routes_yaml}
clusters:
- {{ name: a, endpoints: [127.0.0.1:1] }}
- {{ name: b, endpoints: [127.0.0.1:2] }}
"#
    );
    let cfg = Config::from_yaml(&src, "t.yaml").unwrap_or_else(|e| panic!("{e}"));
    crate::testing::first_route_table(&cfg).unwrap()
}

struct Req {
    host: &'static str,
    path: &'static str,
    query: Option<&'static str>,
    method: Method,
    headers: HeaderMap,
}

fn req(host: &'static str, path_and_query: &'static str) -> Req {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    Req {
        host,
        path,
        query,
        method: Method::GET,
        headers: HeaderMap::new(),
    }
}

impl Req {
    fn header(mut self, k: &'static str, v: &'static str) -> Req {
        self.headers.append(k, HeaderValue::from_static(v));
        self
    }
    fn view(&self) -> RequestView<'_> {
        RequestView {
            host: self.host,
            path: self.path,
            query: self.query,
            method: &self.method,
            scheme: "http",
            headers: &self.headers,
        }
    }
}

/// `(vhost name, route name)` chosen for a request, or None.
fn hit(t: &RouteTable, r: &Req) -> Option<(String, String)> {
    t.route(&r.view())
        .map(|(vh, r)| (vh.name.clone(), r.name.as_deref().unwrap_or("?").to_string()))
}

#[test]
fn domains_follow_envoys_priority() {
    let t = table(
        r#"
        virtual_hosts:
        - { name: any, domains: ["*"], routes: [{ name: r, match: { prefix: / }, route: { cluster: a } }] }
        - { name: exact, domains: ["api.example.com"], routes: [{ name: r, match: { prefix: / }, route: { cluster: a } }] }
        - { name: short_suffix, domains: ["*.com"], routes: [{ name: r, match: { prefix: / }, route: { cluster: a } }] }
        - { name: long_suffix, domains: ["*.example.com"], routes: [{ name: r, match: { prefix: / }, route: { cluster: a } }] }
        - { name: prefix, domains: ["api.*"], routes: [{ name: r, match: { prefix: / }, route: { cluster: a } }] }
        "#,
    );
    let cases = [
        ("api.example.com", "exact"),
        ("API.Example.COM", "exact"),
        ("api.example.com:8080", "exact"),
        ("www.example.com", "long_suffix"),
        ("example.com", "short_suffix"),
        ("api.example.org", "prefix"),
        ("other.org", "any"),
        ("[::1]:80", "any"),
    ];
    for (host, want) in cases {
        assert_eq!(hit(&t, &req(host, "/")).map(|x| x.0), Some(want.to_string()), "{host}");
    }
}

#[test]
fn routes_first_match_wins_with_every_matcher_kind() {
    let t = table(
        r#"
        virtual_hosts:
        - name: v
          domains: ["*"]
          routes:
          - { name: exact, match: { path: /exact }, route: { cluster: a } }
          - { name: ci, match: { prefix: /CI/, case_sensitive: false }, route: { cluster: a } }
          - { name: regex, match: { safe_regex: "/users/[0-9]+" }, route: { cluster: a } }
          - { name: hdr_exact, match: { prefix: /h, headers: [{ name: x-env, exact: prod }] }, route: { cluster: a } }
          - { name: hdr_regex, match: { prefix: /h, headers: [{ name: x-env, safe_regex: "st.*" }] }, route: { cluster: a } }
          - { name: hdr_range, match: { prefix: /h, headers: [{ name: x-n, range_match: { start: 10, end: 20 } }] }, route: { cluster: a } }
          - { name: hdr_absent, match: { prefix: /h, headers: [{ name: x-debug, present_match: true, invert_match: true }] }, route: { cluster: a } }
          - { name: query, match: { prefix: /q, query_parameters: [{ name: v, exact: "2" }] }, route: { cluster: a } }
          - { name: query_present, match: { prefix: /q, query_parameters: [{ name: debug }] }, route: { cluster: a } }
          - { name: grpc, match: { prefix: /svc.Greeter/, grpc: {} }, route: { cluster: a } }
          - { name: method, match: { prefix: /m, headers: [{ name: ":method", exact: POST }] }, route: { cluster: a } }
          - { name: fallback, match: { prefix: / }, route: { cluster: b } }
        "#,
    );
    let cases: Vec<(Req, &str)> = vec![
        (req("h", "/exact"), "exact"),
        (req("h", "/exact/more"), "fallback"),
        (req("h", "/ci/x"), "ci"),
        (req("h", "/users/42"), "regex"),
        (req("h", "/users/42/x"), "fallback"),
        (req("h", "/users/abc"), "fallback"),
        (req("h", "/h").header("x-env", "prod"), "hdr_exact"),
        (req("h", "/h").header("x-env", "staging"), "hdr_regex"),
        (req("h", "/h").header("x-n", "15"), "hdr_range"),
        (req("h", "/h").header("x-n", "20").header("x-debug", "1"), "fallback"),
        (req("h", "/h").header("x-n", "20"), "hdr_absent"),
        (req("h", "/q?a=1&v=2"), "query"),
        (req("h", "/q?v=3&debug"), "query_present"),
        (req("h", "/q?v=3"), "fallback"),
        (
            req("h", "/svc.Greeter/Hello").header("content-type", "application/grpc+proto"),
            "grpc",
        ),
        (
            req("h", "/svc.Greeter/Hello").header("content-type", "application/grpcx"),
            "fallback",
        ),
        (
            req("h", "/svc.Greeter/Hello").header("content-type", "application/json"),
            "fallback",
        ),
        (req("h", "/m"), "fallback"),
    ];
    for (r, want) in &cases {
        assert_eq!(
            hit(&t, r).map(|x| x.1),
            Some(want.to_string()),
            "{} {:?}",
            r.path,
            r.headers
        );
    }
    let mut post = req("h", "/m");
    post.method = Method::POST;
    assert_eq!(hit(&t, &post).unwrap().1, "method");
}

#[test]
fn no_virtual_host_or_route_is_none() {
    let t = table(
        r#"
        virtual_hosts:
        - { name: v, domains: ["only.example"], routes: [{ match: { path: /x }, route: { cluster: a } }] }
        "#,
    );
    assert!(hit(&t, &req("other", "/x")).is_none());
    assert!(hit(&t, &req("only.example", "/y")).is_none());
    assert!(hit(&t, &req("only.example", "/x")).is_some());
}

#[test]
fn inverted_string_matcher_does_not_match_an_absent_header() {
    let t = table(
        r#"
        virtual_hosts:
        - name: v
          domains: ["*"]
          routes:
          - { name: not_prod, match: { prefix: /, headers: [{ name: x-env, exact: prod, invert_match: true }] }, route: { cluster: a } }
          - { name: fallback, match: { prefix: / }, route: { cluster: b } }
        "#,
    );
    assert_eq!(hit(&t, &req("h", "/").header("x-env", "dev")).unwrap().1, "not_prod");
    assert_eq!(hit(&t, &req("h", "/").header("x-env", "prod")).unwrap().1, "fallback");
    assert_eq!(hit(&t, &req("h", "/")).unwrap().1, "fallback");
}

#[test]
fn weighted_clusters_split_by_weight() {
    let t = table(
        r#"
        virtual_hosts:
        - name: v
          domains: ["*"]
          routes:
          - match: { prefix: / }
            route: { weighted_clusters: [{ name: a, weight: 80 }, { name: b, weight: 20 }, { name: a, weight: 0 }] }
        "#,
    );
    let Action::Forward(f) = &t.vhosts[0].routes[0].action else {
        panic!()
    };
    let mut a = 0;
    for _ in 0..10_000 {
        if f.target.pick().cluster.name() == "a" {
            a += 1;
        }
    }
    assert!((7_500..8_500).contains(&a), "a got {a} of 10000");
}

#[test]
fn path_rewrites() {
    let t = table(
        r#"
        virtual_hosts:
        - name: v
          domains: ["*"]
          routes:
          - { match: { prefix: /api/v1/ }, route: { cluster: a, prefix_rewrite: /v1/ } }
          - { match: { prefix: /strip }, route: { cluster: a, prefix_rewrite: "" } }
          - { match: { prefix: /re/ }, route: { cluster: a, regex_rewrite: { pattern: { regex: "^/re/([^/]+)/(.*)$" }, substitution: "/\\2/\\1" } } }
          - { match: { path: /exact }, route: { cluster: a, prefix_rewrite: /new } }
        "#,
    );
    let rw = |i: usize, path: &str| {
        let r = &t.vhosts[0].routes[i];
        let Action::Forward(f) = &r.action else { panic!() };
        rewrite_path(f, &r.matcher, path)
    };
    assert_eq!(rw(0, "/api/v1/users").as_deref(), Some("/v1/users"));
    assert_eq!(rw(1, "/strip/x").as_deref(), Some("/x"));
    assert_eq!(rw(2, "/re/a/b/c").as_deref(), Some("/b/c/a"));
    assert_eq!(rw(3, "/exact").as_deref(), Some("/new"));
}

#[test]
fn redirects() {
    let t = table(
        r#"
        virtual_hosts:
        - name: v
          domains: ["*"]
          routes:
          - { match: { prefix: /https }, redirect: { https_redirect: true } }
          - { match: { prefix: /old/ }, redirect: { prefix_rewrite: /new/, response_code: TEMPORARY_REDIRECT } }
          - { match: { prefix: /host }, redirect: { host_redirect: other.example, port_redirect: 8443, strip_query: true } }
          - { match: { prefix: /p }, redirect: { path_redirect: "/fixed?x=1" } }
        "#,
    );
    let loc = |i: usize, host: &str, path: &str, q: Option<&str>| {
        let r = &t.vhosts[0].routes[i];
        let Action::Redirect(rd) = &r.action else { panic!() };
        redirect_location(rd, &r.matcher, "http", host, path, q)
    };
    assert_eq!(
        loc(0, "example.com:8080", "/https/a", Some("q=1")),
        "https://example.com/https/a?q=1"
    );
    assert_eq!(loc(1, "example.com", "/old/page", None), "http://example.com/new/page");
    assert_eq!(
        loc(2, "example.com", "/host", Some("q=1")),
        "http://other.example:8443/host"
    );
    assert_eq!(loc(3, "example.com", "/p", Some("q=1")), "http://example.com/fixed?x=1");
}

#[test]
fn header_mutations_follow_append_actions() {
    let mut h = HeaderMap::new();
    h.insert("x-a", HeaderValue::from_static("1"));
    h.insert("x-b", HeaderValue::from_static("1"));
    h.insert("x-gone", HeaderValue::from_static("1"));
    let add = |n: &'static str, v: &'static str, a| (HeaderName::from_static(n), HeaderValue::from_static(v), a);
    mutate(
        &mut h,
        &[HeaderName::from_static("x-gone")],
        &[
            add("x-a", "2", AppendAction::AppendIfExistsOrAdd),
            add("x-b", "2", AppendAction::AddIfAbsent),
            add("x-c", "2", AppendAction::AddIfAbsent),
            add("x-b", "3", AppendAction::OverwriteIfExistsOrAdd),
            add("x-d", "3", AppendAction::OverwriteIfExists),
        ],
    );
    assert_eq!(h.get_all("x-a").iter().collect::<Vec<_>>(), ["1", "2"]);
    assert_eq!(h.get_all("x-b").iter().collect::<Vec<_>>(), ["3"]);
    assert_eq!(h.get("x-c").unwrap(), "2");
    assert!(h.get("x-d").is_none());
    assert!(h.get("x-gone").is_none());
}

#[test]
fn port_stripping() {
    assert_eq!(strip_port("a.com:80"), Some("a.com"));
    assert_eq!(strip_port("a.com"), None);
    assert_eq!(strip_port("[::1]:80"), Some("[::1]"));
    assert_eq!(strip_port("[::1]"), None);
}
