//! Mixer's listchecker: one attribute's value against a list of strings, regular expressions or
//! IP/CIDR ranges, as an allow list (whitelist) or a deny list (blacklist).
//!
//! Reloading: a [`ListChecker`] is immutable and holds its compiled [`Entries`] behind an `Arc`.
//! When a list file changes, the proxy compiles new entries off the request path and swaps in
//! [`ListChecker::with_entries`] wherever it keeps its checkers (an `ArcSwap`'d snapshot or cell);
//! checks already running finish on the old entries. Nothing here locks.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use regex::{RegexSet, RegexSetBuilder};

use crate::Verdict;
use crate::attr::{Attr, Attributes};

/// What the entries of a list are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ListKind {
    /// Exact strings.
    Strings,
    /// Regular expressions, each matching the whole value.
    Regex,
    /// IP addresses and CIDR ranges, IPv4 and IPv6.
    IpAddresses,
}

/// Why list entries were rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListError {
    /// A regex entry does not compile.
    #[error("list entry `{entry}` is not a valid regular expression: {message}")]
    Regex {
        /// The entry as written.
        entry: String,
        /// What the regex parser said.
        message: String,
    },
    /// The regexes compile one by one but not together (usually the size limit).
    #[error("the list's regular expressions do not compile together: {0}")]
    RegexSet(String),
    /// An IP entry is neither an address nor a CIDR range.
    #[error("list entry `{0}` is not an IP address or CIDR range (write e.g. 10.1.2.3, 10.0.0.0/8, 2001:db8::/32)")]
    Ip(String),
    /// A CIDR prefix is longer than the address.
    #[error("list entry `{entry}`: the prefix length is at most {max} for this address family")]
    Prefix {
        /// The entry as written.
        entry: String,
        /// 32 or 128.
        max: u8,
    },
}

/// The entries of one list, compiled for matching.
#[derive(Debug, Clone)]
pub struct Entries {
    matcher: Matcher,
    len: usize,
}

#[derive(Debug, Clone)]
enum Matcher {
    Strings {
        set: HashSet<Box<str>>,
        case_insensitive: bool,
    },
    Regex(RegexSet),
    Ips(IpRanges),
}

impl Entries {
    /// Compiles `entries` of `kind`. `case_insensitive` folds ASCII case for strings and regexes
    /// (IP addresses are compared as numbers, so it does not apply).
    pub fn compile<I, S>(kind: ListKind, entries: I, case_insensitive: bool) -> Result<Self, ListError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        match kind {
            ListKind::Strings => Ok(Self::strings(entries, case_insensitive)),
            ListKind::Regex => Self::regexes(entries, case_insensitive),
            ListKind::IpAddresses => Self::ips(entries),
        }
    }

    /// A list of exact strings.
    pub fn strings<I, S>(entries: I, case_insensitive: bool) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let set: HashSet<Box<str>> = entries
            .into_iter()
            .map(|e| {
                if case_insensitive {
                    e.as_ref().to_ascii_lowercase().into()
                } else {
                    e.as_ref().into()
                }
            })
            .collect();
        Entries {
            len: set.len(),
            matcher: Matcher::Strings { set, case_insensitive },
        }
    }

    /// A list of regular expressions (Rust `regex` syntax), each anchored to the whole value.
    pub fn regexes<I, S>(entries: I, case_insensitive: bool) -> Result<Self, ListError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let raw: Vec<String> = entries.into_iter().map(|e| e.as_ref().to_owned()).collect();
        let anchored = raw.iter().map(|e| format!("^(?:{e})$"));
        let set = RegexSetBuilder::new(anchored)
            .case_insensitive(case_insensitive)
            .build()
            .map_err(|err| {
                // The set's error does not say which pattern failed; find it, so the message names it.
                for entry in &raw {
                    if let Err(e) = RegexSetBuilder::new([entry]).build() {
                        return ListError::Regex {
                            entry: entry.clone(),
                            message: e.to_string(),
                        };
                    }
                }
                ListError::RegexSet(err.to_string())
            })?;
        Ok(Entries {
            len: raw.len(),
            matcher: Matcher::Regex(set),
        })
    }

    /// A list of IP addresses and CIDR ranges. Host bits after the prefix are ignored
    /// (`10.1.2.3/8` is `10.0.0.0/8`), as Envoy's `CidrRange` does.
    pub fn ips<I, S>(entries: I) -> Result<Self, ListError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut ranges = IpRanges::default();
        let mut len = 0;
        for entry in entries {
            ranges.add(entry.as_ref())?;
            len += 1;
        }
        ranges.normalize();
        Ok(Entries {
            len,
            matcher: Matcher::Ips(ranges),
        })
    }

    /// What the entries are.
    pub fn kind(&self) -> ListKind {
        match self.matcher {
            Matcher::Strings { .. } => ListKind::Strings,
            Matcher::Regex(_) => ListKind::Regex,
            Matcher::Ips(_) => ListKind::IpAddresses,
        }
    }

    /// How many entries the list has (distinct ones, for strings).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the list has no entries.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when `value` matches an entry. For IP lists, a value that is not an IP address
    /// matches nothing; an IPv4-mapped IPv6 address (`::ffff:10.1.2.3`, what a dual-stack socket
    /// reports) also matches IPv4 ranges.
    pub fn contains(&self, value: &str) -> bool {
        match &self.matcher {
            Matcher::Strings { set, case_insensitive } => {
                // Lower-case only when the value has upper-case letters: the common case allocates nothing.
                if *case_insensitive && value.bytes().any(|b| b.is_ascii_uppercase()) {
                    set.contains(value.to_ascii_lowercase().as_str())
                } else {
                    set.contains(value)
                }
            }
            Matcher::Regex(set) => set.is_match(value),
            Matcher::Ips(ranges) => value.parse().is_ok_and(|ip| ranges.contains(ip)),
        }
    }
}

/// Merged, sorted, disjoint inclusive ranges per family, searched by bisection.
#[derive(Debug, Clone, Default)]
struct IpRanges {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl IpRanges {
    fn add(&mut self, entry: &str) -> Result<(), ListError> {
        let (addr, prefix) = match entry.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (entry, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| ListError::Ip(entry.to_owned()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            // Digits only: `u8::from_str` would also take a leading `+`.
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().ok().filter(|&p| p <= max).ok_or(ListError::Prefix {
                    entry: entry.to_owned(),
                    max,
                })?
            }
            Some(_) => return Err(ListError::Ip(entry.to_owned())),
        };
        match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                let start = u32::from(a) & mask;
                self.v4.push((start, start | !mask));
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                let start = u128::from(a) & mask;
                self.v6.push((start, start | !mask));
            }
        }
        Ok(())
    }

    fn normalize(&mut self) {
        merge(&mut self.v4);
        merge(&mut self.v6);
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => within(&self.v4, u32::from(a)),
            IpAddr::V6(a) => {
                within(&self.v6, u128::from(a)) || a.to_ipv4_mapped().is_some_and(|a| within(&self.v4, u32::from(a)))
            }
        }
    }
}

/// Sorts inclusive ranges and merges overlapping and adjacent ones.
fn merge<T: Copy + Ord + Successor>(ranges: &mut Vec<(T, T)>) {
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for &(start, end) in ranges.iter() {
        match out.last_mut() {
            Some(last) if last.1.successor().is_none_or(|next| start <= next) => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    *ranges = out;
}

/// True when `x` is inside one of the sorted, disjoint inclusive `ranges`.
fn within<T: Copy + Ord>(ranges: &[(T, T)], x: T) -> bool {
    let after = ranges.partition_point(|&(start, _)| start <= x);
    after > 0 && ranges[after - 1].1 >= x
}

trait Successor: Sized {
    fn successor(self) -> Option<Self>;
}

impl Successor for u32 {
    fn successor(self) -> Option<Self> {
        self.checked_add(1)
    }
}

impl Successor for u128 {
    fn successor(self) -> Option<Self> {
        self.checked_add(1)
    }
}

/// Reads a list file: one entry per line, surrounding whitespace trimmed, blank lines and lines
/// starting with `#` skipped. A `#` after an entry is part of it (regexes may hold one).
pub fn parse_entries(text: &str) -> impl Iterator<Item = &str> + '_ {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
}

/// One list check: an attribute, a list, and whether a match allows or denies.
#[derive(Debug, Clone)]
pub struct ListChecker {
    name: Arc<str>,
    attribute: Attr,
    blacklist: bool,
    entries: Arc<Entries>,
}

impl ListChecker {
    /// A check of `attribute` against `entries`: a deny list when `blacklist`, else an allow list.
    pub fn new(name: impl Into<Arc<str>>, attribute: Attr, blacklist: bool, entries: Arc<Entries>) -> Self {
        ListChecker {
            name: name.into(),
            attribute,
            blacklist,
            entries,
        }
    }

    /// The same check over other entries (a reloaded list file); `self` is untouched.
    pub fn with_entries(&self, entries: Arc<Entries>) -> Self {
        ListChecker {
            entries,
            ..self.clone()
        }
    }

    /// The list's name, as reasons print it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The attribute checked.
    pub fn attribute(&self) -> &Attr {
        &self.attribute
    }

    /// True for a deny list.
    pub fn is_blacklist(&self) -> bool {
        self.blacklist
    }

    /// The entries in use.
    pub fn entries(&self) -> &Arc<Entries> {
        &self.entries
    }

    /// Allows or denies the request. A missing attribute is denied by an allow list and allowed
    /// by a deny list. Allow verdicts carry a static reason (nothing is allocated on the pass
    /// path); deny verdicts name the attribute, its value and the list.
    pub fn check(&self, attrs: &dyn Attributes) -> Verdict {
        let Some(value) = attrs.get(&self.attribute) else {
            return if self.blacklist {
                Verdict::allow("attribute absent, not in deny list")
            } else {
                Verdict::deny(format!(
                    "{} is absent and list `{}` allows only listed values",
                    self.attribute, self.name
                ))
            };
        };
        let matched = self.entries.contains(&value);
        match (self.blacklist, matched) {
            (false, true) => Verdict::allow("in allow list"),
            (true, false) => Verdict::allow("not in deny list"),
            (true, true) => Verdict::deny(format!(
                "{} {} is in deny list `{}`",
                self.attribute,
                Shown(&value),
                self.name
            )),
            (false, false) if self.entries.kind() == ListKind::IpAddresses && value.parse::<IpAddr>().is_err() => {
                Verdict::deny(format!(
                    "{} {} is not an IP address, so not in list `{}`",
                    self.attribute,
                    Shown(&value),
                    self.name
                ))
            }
            (false, false) => Verdict::deny(format!(
                "{} {} is not in list `{}`",
                self.attribute,
                Shown(&value),
                self.name
            )),
        }
    }
}

/// A request value as reasons print it: control characters escaped (reasons reach logs), long
/// values cut, an empty value shown as `""`.
struct Shown<'a>(&'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MAX_CHARS: usize = 96;
        if self.0.is_empty() {
            return f.write_str("\"\"");
        }
        for c in self.0.chars().take(MAX_CHARS) {
            write!(f, "{}", c.escape_debug())?;
        }
        if self.0.chars().nth(MAX_CHARS).is_some() {
            f.write_str("...")?;
        }
        Ok(())
    }
}

impl Verdict {
    /// An allow verdict.
    pub fn allow(reason: &'static str) -> Self {
        Verdict {
            allowed: true,
            reason: Cow::Borrowed(reason),
        }
    }

    /// A deny verdict.
    pub fn deny(reason: impl Into<Cow<'static, str>>) -> Self {
        Verdict {
            allowed: false,
            reason: reason.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attr::MapAttributes;

    fn list(kind: ListKind, entries: &[&str], ci: bool, blacklist: bool, attr: &str) -> ListChecker {
        let entries = Entries::compile(kind, entries, ci).unwrap();
        ListChecker::new("office", attr.parse().unwrap(), blacklist, Arc::new(entries))
    }

    #[test]
    fn string_lists() {
        use ListKind::Strings;
        // (entries, case-insensitive, value, matches)
        let table: &[(&[&str], bool, &str, bool)] = &[
            (&["ann", "bob"], false, "ann", true),
            (&["ann", "bob"], false, "Ann", false),
            (&["ann", "bob"], false, "an", false),
            (&["ann", "bob"], false, "", false),
            (&["Ann", "bob"], true, "ANN", true),
            (&["Ann", "bob"], true, "ann", true),
            (&["Ann", "bob"], true, "BoB", true),
            (&["straße"], true, "STRAßE", true),
            (&[""], false, "", true),
            (&[], false, "ann", false),
        ];
        for &(entries, ci, value, want) in table {
            let e = Entries::compile(Strings, entries, ci).unwrap();
            assert_eq!(e.contains(value), want, "{entries:?} ci={ci} {value:?}");
        }
    }

    #[test]
    fn regex_lists_match_the_whole_value() {
        use ListKind::Regex;
        let table: &[(&[&str], bool, &str, bool)] = &[
            (&["ann|bob"], false, "bob", true),
            (&["ann|bob"], false, "bobby", false),
            (&["ann|bob"], false, "xann", false),
            (&["/api/v[0-9]+/.*"], false, "/api/v2/users", true),
            (&["/api/v[0-9]+/.*"], false, "/x/api/v2/users", false),
            (&["admin-.*", "root"], false, "root", true),
            (&["admin-.*", "root"], false, "ADMIN-1", false),
            (&["admin-.*", "root"], true, "ADMIN-1", true),
            (&["a#b"], false, "a#b", true),
            (&[], false, "", false),
        ];
        for &(entries, ci, value, want) in table {
            let e = Entries::compile(Regex, entries, ci).unwrap();
            assert_eq!(e.contains(value), want, "{entries:?} ci={ci} {value:?}");
        }
    }

    #[test]
    fn ip_lists() {
        let table: &[(&[&str], &str, bool)] = &[
            (&["10.0.0.0/8"], "10.1.2.3", true),
            (&["10.0.0.0/8"], "11.0.0.0", false),
            (&["10.0.0.0/8"], "9.255.255.255", false),
            (&["10.0.0.0/8"], "10.255.255.255", true),
            (&["10.1.2.3"], "10.1.2.3", true),
            (&["10.1.2.3"], "10.1.2.4", false),
            (&["10.1.2.3/8"], "10.200.0.1", true),
            (&["0.0.0.0/0"], "203.0.113.9", true),
            (&["0.0.0.0/0"], "::1", false),
            (&["192.168.1.0/24", "192.168.2.0/24"], "192.168.2.77", true),
            (&["192.168.1.0/24", "192.168.2.0/24"], "192.168.3.1", false),
            (&["192.168.0.0/16", "192.168.1.0/24"], "192.168.200.1", true),
            (&["255.255.255.255"], "255.255.255.255", true),
            (&["10.0.0.0/8"], "::ffff:10.1.2.3", true),
            (&["10.0.0.0/8"], "not-an-ip", false),
            (&["10.0.0.0/8"], "10.1.2.3:80", false),
            (&["2001:db8::/32"], "2001:db8:1::1", true),
            (&["2001:db8::/32"], "2001:DB8::1", true),
            (&["2001:db8::/32"], "2001:db9::1", false),
            (&["::1"], "::1", true),
            (&["::1"], "127.0.0.1", false),
            (&["::/0"], "fe80::1", true),
            (
                &["ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"],
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                true,
            ),
            (&["fd00::/8", "10.0.0.0/8"], "fd12::3", true),
            (&["fd00::/8", "10.0.0.0/8"], "10.9.9.9", true),
        ];
        for &(entries, value, want) in table {
            let e = Entries::ips(entries).unwrap();
            assert_eq!(e.contains(value), want, "{entries:?} {value:?}");
        }
    }

    #[test]
    fn bad_ip_entries_are_named() {
        let table: &[(&str, ListError)] = &[
            ("10.0.0", ListError::Ip("10.0.0".into())),
            ("10.0.0.0/", ListError::Ip("10.0.0.0/".into())),
            ("10.0.0.0/+8", ListError::Ip("10.0.0.0/+8".into())),
            ("10.0.0.0/8/8", ListError::Ip("10.0.0.0/8/8".into())),
            ("office", ListError::Ip("office".into())),
            (
                "10.0.0.0/33",
                ListError::Prefix {
                    entry: "10.0.0.0/33".into(),
                    max: 32,
                },
            ),
            (
                "10.0.0.0/999",
                ListError::Prefix {
                    entry: "10.0.0.0/999".into(),
                    max: 32,
                },
            ),
            (
                "::/129",
                ListError::Prefix {
                    entry: "::/129".into(),
                    max: 128,
                },
            ),
        ];
        for (entry, want) in table {
            assert_eq!(Entries::ips([entry]).unwrap_err(), *want, "{entry}");
        }
        let msg = Entries::ips(["10.0.0.0/33"]).unwrap_err().to_string();
        assert_eq!(
            msg,
            "list entry `10.0.0.0/33`: the prefix length is at most 32 for this address family"
        );
    }

    #[test]
    fn bad_regex_entries_are_named() {
        let err = Entries::regexes(["ok", "bad(", "fine"], false).unwrap_err();
        assert!(
            matches!(&err, ListError::Regex { entry, .. } if entry == "bad("),
            "{err}"
        );
        assert!(
            err.to_string()
                .starts_with("list entry `bad(` is not a valid regular expression"),
            "{err}"
        );
    }

    #[test]
    fn allow_and_deny_lists_with_present_and_missing_attributes() {
        use ListKind::*;
        let ann = MapAttributes::new().with(Attr::RequestHeader("x-user".into()), "ann");
        let eve = MapAttributes::new().with(Attr::RequestHeader("x-user".into()), "eve");
        let nobody = MapAttributes::new();
        let users = "request.headers[x-user]";
        // (blacklist, attributes, allowed, reason)
        let table: &[(bool, &MapAttributes, bool, &str)] = &[
            (false, &ann, true, "in allow list"),
            (
                false,
                &eve,
                false,
                "request.headers[x-user] eve is not in list `office`",
            ),
            (
                false,
                &nobody,
                false,
                "request.headers[x-user] is absent and list `office` allows only listed values",
            ),
            (
                true,
                &ann,
                false,
                "request.headers[x-user] ann is in deny list `office`",
            ),
            (true, &eve, true, "not in deny list"),
            (true, &nobody, true, "attribute absent, not in deny list"),
        ];
        for &(blacklist, attrs, allowed, reason) in table {
            let v = list(Strings, &["ann"], false, blacklist, users).check(attrs);
            assert_eq!(
                v,
                Verdict {
                    allowed,
                    reason: reason.to_owned().into()
                },
                "blacklist={blacklist} {attrs:?}"
            );
        }
    }

    #[test]
    fn ip_reasons() {
        let office = list(ListKind::IpAddresses, &["10.0.0.0/8"], false, false, "source.ip");
        let outside = MapAttributes::new().with(Attr::SourceIp, "192.0.2.1");
        assert_eq!(
            office.check(&outside).reason,
            "source.ip 192.0.2.1 is not in list `office`"
        );
        let garbage = MapAttributes::new().with(Attr::SourceIp, "fe80::1%eth0");
        assert_eq!(
            office.check(&garbage).reason,
            "source.ip fe80::1%eth0 is not an IP address, so not in list `office`"
        );
        let inside = MapAttributes::new().with(Attr::SourceIp, "10.1.2.3");
        assert!(office.check(&inside).allowed);
    }

    #[test]
    fn reasons_escape_and_cut_request_values() {
        let deny = list(ListKind::Regex, &["(?s).*"], false, true, "request.path");
        let evil = MapAttributes::new().with(Attr::RequestPath, "/a\nforged log line");
        assert_eq!(
            deny.check(&evil).reason,
            "request.path /a\\nforged log line is in deny list `office`"
        );
        let long = MapAttributes::new().with(Attr::RequestPath, "x".repeat(500));
        let reason = deny.check(&long).reason;
        assert!(reason.len() < 150 && reason.contains("x..."), "{reason}");
        let empty = MapAttributes::new().with(Attr::RequestPath, "");
        assert_eq!(deny.check(&empty).reason, "request.path \"\" is in deny list `office`");
    }

    #[test]
    fn reloaded_entries_replace_old_ones_without_touching_the_old_checker() {
        let old = list(ListKind::Strings, &["ann"], false, false, "request.headers[x-user]");
        let bob = MapAttributes::new().with(Attr::RequestHeader("x-user".into()), "bob");
        assert!(!old.check(&bob).allowed);
        let text = "# users allowed in\n\n  bob  \nann\n# carol left\n";
        let new = old.with_entries(Arc::new(
            Entries::compile(ListKind::Strings, parse_entries(text), false).unwrap(),
        ));
        assert!(new.check(&bob).allowed);
        assert!(!old.check(&bob).allowed);
        assert_eq!(new.entries().len(), 2);
        assert_eq!(new.name(), "office");
    }

    #[test]
    fn parse_entries_skips_comments_and_blanks() {
        let text = "# header\n10.0.0.0/8\n\n   \n  192.168.0.1  \r\n#x\n  # indented comment\nfd00::/8 # kept\n";
        let got: Vec<&str> = parse_entries(text).collect();
        assert_eq!(got, ["10.0.0.0/8", "192.168.0.1", "fd00::/8 # kept"]);
    }
}
