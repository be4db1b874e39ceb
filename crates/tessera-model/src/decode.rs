//! Typed reading of a [`Node`] tree that records every error instead of stopping at the first.
//!
//! Readers return `None` when a value is absent or wrong; in the wrong case they have already
//! recorded an error naming the file, position, field path and reason.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use crate::error::ConfigError;
use crate::yaml::{Kind, Mark, Node};

/// The dotted path of a field, e.g. `listeners[0].filter_chains[1].http.route_config`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Path(String);

impl Path {
    pub(crate) fn root() -> Path {
        Path(String::new())
    }

    pub(crate) fn field(&self, name: &str) -> Path {
        if self.0.is_empty() {
            Path(name.to_string())
        } else {
            Path(format!("{}.{}", self.0, name))
        }
    }

    pub(crate) fn index(&self, i: usize) -> Path {
        Path(format!("{}[{}]", self.0, i))
    }

    pub(crate) fn as_str(&self) -> &str {
        if self.0.is_empty() { "(top level)" } else { &self.0 }
    }
}

/// Collects errors while a file is decoded.
pub(crate) struct Ctx {
    pub(crate) file: String,
    pub(crate) errors: Vec<ConfigError>,
}

impl Ctx {
    pub(crate) fn new(file: impl Into<String>) -> Ctx {
        Ctx {
            file: file.into(),
            errors: Vec::new(),
        }
    }

    pub(crate) fn error(&mut self, mark: Mark, path: &Path, reason: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line: mark.line,
            col: mark.col,
            path: path.as_str().to_string(),
            reason: reason.into(),
        });
    }
}

/// A mapping being read field by field; unread fields are reported as unknown by [`Obj::finish`].
pub(crate) struct Obj<'n> {
    entries: &'n [(Node, Node)],
    used: Vec<bool>,
    known: Vec<&'static str>,
    pub(crate) path: Path,
    pub(crate) mark: Mark,
}

impl<'n> Obj<'n> {
    /// Opens `node` as a mapping; null reads as an empty mapping. Records an error otherwise.
    pub(crate) fn open(ctx: &mut Ctx, node: &'n Node, path: &Path) -> Option<Obj<'n>> {
        const EMPTY: &[(Node, Node)] = &[];
        let entries: &'n [(Node, Node)] = match &node.kind {
            Kind::Map(e) => e,
            Kind::Null => EMPTY,
            _ => {
                ctx.error(
                    node.mark,
                    path,
                    format!("expected a mapping, found {}", node.describe()),
                );
                return None;
            }
        };
        // Duplicate keys are almost always a copy-paste mistake; YAML itself allows them silently.
        for (i, (k, _)) in entries.iter().enumerate() {
            if let Some(name) = key_text(k)
                && entries[..i].iter().any(|(p, _)| key_text(p) == Some(name))
            {
                ctx.error(k.mark, &path.field(name), "duplicate key");
            }
        }
        Some(Obj {
            entries,
            used: vec![false; entries.len()],
            known: Vec::new(),
            path: path.clone(),
            mark: node.mark,
        })
    }

    /// The value of `name`, if present and not null.
    pub(crate) fn get(&mut self, name: &'static str) -> Option<(&'n Node, Path)> {
        self.known.push(name);
        let idx = self.entries.iter().position(|(k, _)| key_text(k) == Some(name))?;
        self.used[idx] = true;
        let node = &self.entries[idx].1;
        if node.is_null() {
            return None;
        }
        Some((node, self.path.field(name)))
    }

    /// True when `name` is present (even as null). Does not mark it read.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.entries.iter().any(|(k, _)| key_text(k) == Some(name))
    }

    /// Like [`Obj::get`], but records "missing required field" when absent.
    pub(crate) fn require(&mut self, ctx: &mut Ctx, name: &'static str) -> Option<(&'n Node, Path)> {
        let v = self.get(name);
        if v.is_none() {
            ctx.error(self.mark, &self.path.field(name), "missing required field");
        }
        v
    }

    pub(crate) fn string(&mut self, ctx: &mut Ctx, name: &'static str) -> Option<String> {
        let (n, p) = self.get(name)?;
        string(ctx, n, &p)
    }

    pub(crate) fn req_string(&mut self, ctx: &mut Ctx, name: &'static str) -> Option<String> {
        let (n, p) = self.require(ctx, name)?;
        string(ctx, n, &p)
    }

    pub(crate) fn bool(&mut self, ctx: &mut Ctx, name: &'static str) -> Option<bool> {
        let (n, p) = self.get(name)?;
        parse_scalar(ctx, n, &p, "a boolean (true or false)", |s| match s {
            "true" | "True" | "TRUE" => Some(true),
            "false" | "False" | "FALSE" => Some(false),
            _ => None,
        })
    }

    pub(crate) fn uint<T: TryFrom<u64>>(&mut self, ctx: &mut Ctx, name: &'static str, min: u64, max: u64) -> Option<T> {
        let (n, p) = self.get(name)?;
        uint(ctx, n, &p, min, max)
    }

    pub(crate) fn duration(&mut self, ctx: &mut Ctx, name: &'static str) -> Option<Duration> {
        let (n, p) = self.get(name)?;
        parse_scalar(
            ctx,
            n,
            &p,
            "a duration such as 250ms, 5s, 1.5s, 2m or 1h",
            parse_duration,
        )
    }

    pub(crate) fn list<T>(
        &mut self,
        ctx: &mut Ctx,
        name: &'static str,
        mut each: impl FnMut(&mut Ctx, &'n Node, &Path) -> Option<T>,
    ) -> Vec<T> {
        let Some((n, p)) = self.get(name) else {
            return Vec::new();
        };
        list(ctx, n, &p, &mut each)
    }

    /// Reports every field that was never asked for, suggesting the nearest known name.
    pub(crate) fn finish(self, ctx: &mut Ctx) {
        for (i, (k, _)) in self.entries.iter().enumerate() {
            if self.used[i] {
                continue;
            }
            let name = key_text(k).unwrap_or("?");
            let mut reason = format!("unknown field `{name}`");
            if let Some(s) = suggest(name, &self.known) {
                reason.push_str(&format!(", did you mean `{s}`?"));
            } else if !self.known.is_empty() {
                let mut known = self.known.clone();
                known.sort_unstable();
                known.dedup();
                reason.push_str(&format!("; expected one of: {}", known.join(", ")));
            }
            ctx.error(k.mark, &self.path.field(name), reason);
        }
    }
}

fn key_text(n: &Node) -> Option<&str> {
    match &n.kind {
        Kind::Scalar { text, .. } => Some(text),
        _ => None,
    }
}

/// The known name closest to `name`, if it is close enough to be a likely typo.
fn suggest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    let mut best: Option<(usize, &str)> = None;
    for k in known {
        let d = edit_distance(name, k);
        if d <= 2.max(name.len() / 4) && best.is_none_or(|(bd, _)| d < bd) {
            best = Some((d, k));
        }
    }
    best.map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

pub(crate) fn scalar<'n>(ctx: &mut Ctx, n: &'n Node, path: &Path, want: &str) -> Option<&'n str> {
    match &n.kind {
        Kind::Scalar { text, .. } => Some(text),
        _ => {
            ctx.error(n.mark, path, format!("expected {want}, found {}", n.describe()));
            None
        }
    }
}

pub(crate) fn string(ctx: &mut Ctx, n: &Node, path: &Path) -> Option<String> {
    scalar(ctx, n, path, "a string").map(str::to_string)
}

pub(crate) fn parse_scalar<T>(
    ctx: &mut Ctx,
    n: &Node,
    path: &Path,
    want: &str,
    f: impl FnOnce(&str) -> Option<T>,
) -> Option<T> {
    let s = scalar(ctx, n, path, want)?;
    let v = f(s);
    if v.is_none() {
        ctx.error(n.mark, path, format!("expected {want}, found `{s}`"));
    }
    v
}

pub(crate) fn uint<T: TryFrom<u64>>(ctx: &mut Ctx, n: &Node, path: &Path, min: u64, max: u64) -> Option<T> {
    let want = format!("an integer from {min} to {max}");
    let v = parse_scalar(ctx, n, path, &want, |s| s.replace('_', "").parse::<u64>().ok())?;
    if v < min || v > max {
        ctx.error(n.mark, path, format!("expected {want}, found {v}"));
        return None;
    }
    T::try_from(v).ok()
}

pub(crate) fn list<'n, T>(
    ctx: &mut Ctx,
    n: &'n Node,
    path: &Path,
    each: &mut impl FnMut(&mut Ctx, &'n Node, &Path) -> Option<T>,
) -> Vec<T> {
    match &n.kind {
        Kind::Seq(items) => items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| each(ctx, item, &path.index(i)))
            .collect(),
        _ => {
            ctx.error(n.mark, path, format!("expected a list, found {}", n.describe()));
            Vec::new()
        }
    }
}

/// Reads a case-insensitive enumeration: `ROUND_ROBIN`, `round_robin` and `Round_Robin` are one.
pub(crate) fn enumeration<T: Copy>(ctx: &mut Ctx, n: &Node, path: &Path, choices: &[(&str, T)]) -> Option<T> {
    let s = scalar(ctx, n, path, "one of the listed names")?;
    let found = choices
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(s))
        .map(|(_, v)| *v);
    if found.is_none() {
        let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
        ctx.error(
            n.mark,
            path,
            format!("unknown value `{s}`; expected one of: {}", names.join(", ")),
        );
    }
    found
}

/// Parses `250ms`, `5s`, `1.5s`, `2m`, `1h`, `100us`; a bare `0` means zero.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().ok()?;
    if !value.is_finite() || value < 0.0 {
        return None;
    }
    let secs = match unit {
        "ns" => value / 1e9,
        "us" | "µs" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(secs).ok()
}

/// Reads `host:port` where host is an IP address (IPv6 in brackets).
pub(crate) fn socket_addr(ctx: &mut Ctx, n: &Node, path: &Path) -> Option<SocketAddr> {
    parse_scalar(
        ctx,
        n,
        path,
        "an IP address and port such as 127.0.0.1:10000 or [::1]:10000",
        |s| SocketAddr::from_str(s).ok(),
    )
}

/// An IP prefix such as `10.0.0.0/8` or `::1/128`; a bare address is a full-length prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network address.
    pub addr: IpAddr,
    /// The prefix length.
    pub len: u8,
}

impl Cidr {
    /// Parses `addr/len` or a bare address.
    pub fn parse(s: &str) -> Option<Cidr> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            Some(l) => l.trim().parse::<u8>().ok().filter(|l| *l <= max)?,
            None => max,
        };
        Some(Cidr { addr, len })
    }

    /// True when `ip` lies in this prefix. IPv4-mapped IPv6 addresses match IPv4 prefixes.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.len)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let cases = [
            ("250ms", Some(Duration::from_millis(250))),
            ("5s", Some(Duration::from_secs(5))),
            ("1.5s", Some(Duration::from_millis(1500))),
            ("2m", Some(Duration::from_secs(120))),
            ("1h", Some(Duration::from_secs(3600))),
            ("100us", Some(Duration::from_micros(100))),
            ("0", Some(Duration::ZERO)),
            ("0s", Some(Duration::ZERO)),
            ("5", None),
            ("s", None),
            ("5 parsecs", None),
            ("-1s", None),
            ("1e400s", None),
        ];
        for (s, want) in cases {
            assert_eq!(parse_duration(s), want, "{s}");
        }
    }

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.9.9.9".parse().unwrap()));
        let all = Cidr::parse("0.0.0.0/0").unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        let one = Cidr::parse("::1").unwrap();
        assert_eq!(one.len, 128);
        assert!(one.contains("::1".parse().unwrap()));
        assert!(!one.contains("127.0.0.1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_none());
        assert!(Cidr::parse("nonsense").is_none());
    }

    #[test]
    fn suggestions() {
        assert_eq!(suggest("adress", &["address", "name"]), Some("address"));
        assert_eq!(suggest("zzzzzz", &["address", "name"]), None);
    }
}
