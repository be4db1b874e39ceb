//! VirtualServices into the routes of the outbound HTTP virtual hosts, after checking what they
//! refer to: destination hosts, ports and subsets.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::config::route::v3::Route;

use super::parse::{Action, Dest, Lb, VirtualService};
use super::{Config, host_matches};
use crate::Problem;

/// A host Pilot generates clusters for, with its ports (number, HTTP or not).
pub(crate) struct Host {
    pub(crate) host: String,
    pub(crate) ports: Vec<(u16, bool)>,
}

fn find<'a>(hosts: &'a [Host], name: &str) -> Option<&'a Host> {
    hosts.iter().find(|h| h.host == name).or_else(|| {
        hosts
            .iter()
            .filter(|h| h.host.contains('*') && host_matches(&h.host, name))
            .max_by_key(|h| h.host.len())
    })
}

/// Checks a destination's host, explicit port and subset.
fn check(istio: &Config, hosts: &[Host], vs: &VirtualService, d: &Dest, errs: &mut Vec<Problem>) -> bool {
    let Some(h) = find(hosts, &d.host) else {
        errs.push(vs.meta.problem(
            &format!("{}.host", d.at),
            format!(
                "`{}` is not a known service (from a registry or a ServiceEntry)",
                d.host
            ),
        ));
        return false;
    };
    let mut ok = true;
    if let Some(p) = d.port
        && !h.ports.iter().any(|(n, _)| *n == p)
    {
        let list: Vec<String> = h.ports.iter().map(|(n, _)| n.to_string()).collect();
        errs.push(vs.meta.problem(
            &format!("{}.port.number", d.at),
            format!("{p} is not a port of `{}` (its ports: {})", h.host, list.join(", ")),
        ));
        ok = false;
    }
    if let Some(s) = &d.subset {
        match istio.rule_for(&h.host) {
            None => {
                errs.push(vs.meta.problem(
                    &format!("{}.subset", d.at),
                    format!(
                        "subset `{s}` of `{}` does not exist: no DestinationRule defines subsets for this host",
                        h.host
                    ),
                ));
                ok = false;
            }
            Some(dr) if !dr.subsets.iter().any(|x| &x.name == s) => {
                let names: Vec<&str> = dr.subsets.iter().map(|x| x.name.as_str()).collect();
                errs.push(vs.meta.problem(
                    &format!("{}.subset", d.at),
                    format!(
                        "subset `{s}` of `{}` does not exist: DestinationRule {}/{} defines {}",
                        h.host,
                        dr.meta.namespace,
                        dr.meta.name,
                        if names.is_empty() {
                            "none".to_string()
                        } else {
                            names.join(", ")
                        }
                    ),
                ));
                ok = false;
            }
            Some(_) => {}
        }
    }
    ok
}

/// The cluster a checked destination goes to from virtual host port `port`.
fn cluster(hosts: &[Host], d: &Dest, port: u16) -> Result<(String, u16, String), String> {
    let h = find(hosts, &d.host).ok_or_else(|| format!("`{}` is not a known service", d.host))?;
    let p = match (d.port, h.ports.as_slice()) {
        (Some(p), _) => p,
        (None, [(only, _)]) => *only,
        (None, all) if all.iter().any(|(n, _)| *n == port) => port,
        (None, _) => {
            return Err(format!(
                "`{}` has several ports and none is {port}; give destination.port.number",
                h.host
            ));
        }
    };
    let name = match &d.subset {
        None => crate::translate::cluster_name(p, &h.host),
        Some(s) => crate::translate::subset_cluster_name(p, s, &h.host),
    };
    Ok((name, p, h.host.clone()))
}

/// Routes by `(host, port)` for every virtual host a VirtualService routes; problems for what
/// the VirtualServices refer to that does not exist.
pub(crate) fn virtual_hosts(
    istio: &Config,
    hosts: &[Host],
    problems: &mut Vec<Problem>,
) -> BTreeMap<(String, u16), Vec<Route>> {
    let mut out = BTreeMap::new();
    let mut claimed: BTreeMap<String, String> = BTreeMap::new();
    for vs in istio.virtual_services() {
        let mut errs = Vec::new();
        if vs.hosts.is_empty() {
            errs.push(vs.meta.problem(
                "spec.hosts",
                "no hosts: it routes nothing (a delegate VirtualService, and delegation is not supported)",
            ));
        }
        for r in &vs.http {
            if let Action::Route(ds) = &r.action {
                for (d, _) in ds {
                    check(istio, hosts, vs, d, &mut errs);
                }
            }
            for (d, _) in &r.mirrors {
                check(istio, hosts, vs, d, &mut errs);
            }
        }
        let mut mine: Vec<&Host> = Vec::new();
        for (i, h) in vs.hosts.iter().enumerate() {
            let matched: Vec<&Host> = hosts.iter().filter(|t| host_matches(h, &t.host)).collect();
            if matched.is_empty() {
                problems.push(vs.meta.problem(
                    &format!("spec.hosts[{i}]"),
                    format!("`{h}` is not a known service (from a registry or a ServiceEntry); no routes are generated for it"),
                ));
            }
            for t in matched {
                if let Some(by) = claimed.get(&t.host) {
                    problems.push(vs.meta.problem(
                        &format!("spec.hosts[{i}]"),
                        format!(
                            "`{}` is already routed by VirtualService {by}; this one's routes for it are ignored",
                            t.host
                        ),
                    ));
                } else if !mine.iter().any(|m| m.host == t.host) {
                    mine.push(t);
                }
            }
        }
        let mut built = Vec::new();
        if errs.is_empty() {
            for t in &mine {
                for (port, _) in t.ports.iter().filter(|(_, http)| *http) {
                    let mut routes = Vec::new();
                    for r in &vs.http {
                        let matches: Vec<Option<&super::Match>> = if r.matches.is_empty() {
                            vec![None]
                        } else {
                            r.matches
                                .iter()
                                .filter(|m| m.port.is_none_or(|p| p == *port))
                                .map(Some)
                                .collect()
                        };
                        if matches.is_empty() {
                            continue;
                        }
                        let mut clusters = Vec::new();
                        let mut hash = None;
                        if let Action::Route(ds) = &r.action {
                            for (d, w) in ds {
                                match cluster(hosts, d, *port) {
                                    Ok((name, p, host)) => {
                                        if ds.len() == 1
                                            && let Some(Lb::Hash { key, .. }) =
                                                super::xds::effective(istio.rule_for(&host), d.subset.as_deref(), p).lb
                                        {
                                            hash = Some(key);
                                        }
                                        clusters.push((name, *w));
                                    }
                                    Err(e) => errs.push(vs.meta.problem(&d.at, e)),
                                }
                            }
                        }
                        let mut mirrors = Vec::new();
                        for (d, pct) in &r.mirrors {
                            match cluster(hosts, d, *port) {
                                Ok((name, _, _)) => mirrors.push((name, *pct)),
                                Err(e) => errs.push(vs.meta.problem(&d.at, e)),
                            }
                        }
                        for m in matches {
                            routes.push(super::xds::route(r, m, &clusters, &mirrors, hash.as_ref()));
                        }
                    }
                    // A port none of the routes applies to keeps its default route, as in Istio.
                    if !routes.is_empty() {
                        built.push(((t.host.clone(), *port), routes));
                    }
                }
            }
        }
        if errs.is_empty() {
            for t in mine {
                claimed.insert(t.host.clone(), format!("{}/{}", vs.meta.namespace, vs.meta.name));
            }
            out.extend(built);
        } else {
            problems.extend(errs);
        }
    }
    out
}
