//! A strict reader over the JSON form of a YAML document: every mapping names its known fields,
//! and anything else is a problem naming the field.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::Problem;

/// Problems found in one document, each prefixed with the document.
pub(crate) struct Cx {
    pub(crate) file: String,
    pub(crate) doc: String,
    pub(crate) problems: Vec<Problem>,
}

impl Cx {
    pub(crate) fn new(file: &str, doc: String) -> Cx {
        Cx {
            file: file.to_string(),
            doc,
            problems: Vec::new(),
        }
    }

    pub(crate) fn add(&mut self, at: &str, reason: impl Into<String>) {
        self.problems.push(Problem {
            file: self.file.clone(),
            path: if at.is_empty() {
                self.doc.clone()
            } else {
                format!("{} {at}", self.doc)
            },
            reason: reason.into(),
        });
    }
}

/// `at.k`, or `k` at the top.
pub(crate) fn join(at: &str, k: &str) -> String {
    if at.is_empty() {
        k.to_string()
    } else {
        format!("{at}.{k}")
    }
}

fn what(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// A mapping whose fields were checked against a list.
#[derive(Clone, Copy)]
pub(crate) struct O<'v> {
    m: &'v Map<String, Value>,
}

impl<'v> O<'v> {
    /// The field, if present and not null.
    pub(crate) fn get(&self, k: &str) -> Option<&'v Value> {
        self.m.get(k).filter(|v| !v.is_null())
    }

    /// True when the field is present (and not null).
    pub(crate) fn has(&self, k: &str) -> bool {
        self.get(k).is_some()
    }

    /// Reports the field, if present, as something Pilot cannot honour.
    pub(crate) fn refuse(&self, cx: &mut Cx, at: &str, k: &str, reason: &str) {
        if self.has(k) {
            cx.add(&join(at, k), reason);
        }
    }
}

/// `v` as a mapping whose keys are all in `known`.
pub(crate) fn obj<'v>(cx: &mut Cx, v: &'v Value, at: &str, known: &[&str]) -> Option<O<'v>> {
    let Value::Object(m) = v else {
        cx.add(at, format!("expected a mapping, not {}", what(v)));
        return None;
    };
    for k in m.keys() {
        if !known.contains(&k.as_str()) {
            cx.add(
                &join(at, k),
                format!("unknown field `{k}` (known here: {})", known.join(", ")),
            );
        }
    }
    Some(O { m })
}

/// The field `k` of `o` read as a mapping with `known` fields.
pub(crate) fn sub<'v>(cx: &mut Cx, o: O<'v>, at: &str, k: &str, known: &[&str]) -> Option<O<'v>> {
    o.get(k).and_then(|v| obj(cx, v, &join(at, k), known))
}

pub(crate) fn string(cx: &mut Cx, o: O<'_>, at: &str, k: &str) -> Option<String> {
    match o.get(k)? {
        Value::String(s) => Some(s.clone()),
        v => {
            cx.add(&join(at, k), format!("expected a string, not {}", what(v)));
            None
        }
    }
}

pub(crate) fn boolean(cx: &mut Cx, o: O<'_>, at: &str, k: &str) -> Option<bool> {
    match o.get(k)? {
        Value::Bool(b) => Some(*b),
        v => {
            cx.add(&join(at, k), format!("expected true or false, not {}", what(v)));
            None
        }
    }
}

/// An integer within `lo..=hi`.
pub(crate) fn int(cx: &mut Cx, o: O<'_>, at: &str, k: &str, lo: u64, hi: u64) -> Option<u64> {
    let v = o.get(k)?;
    match v.as_u64() {
        Some(n) if (lo..=hi).contains(&n) => Some(n),
        _ => {
            cx.add(&join(at, k), format!("expected an integer from {lo} to {hi}, not {v}"));
            None
        }
    }
}

/// A port number (1 to 65535).
pub(crate) fn port(cx: &mut Cx, o: O<'_>, at: &str, k: &str) -> Option<u16> {
    int(cx, o, at, k, 1, 65535).and_then(|n| u16::try_from(n).ok())
}

pub(crate) fn u32_(cx: &mut Cx, o: O<'_>, at: &str, k: &str) -> Option<u32> {
    int(cx, o, at, k, 0, u64::from(u32::MAX)).and_then(|n| u32::try_from(n).ok())
}

/// `{ value: <0..100> }`, Istio's Percent.
pub(crate) fn percent(cx: &mut Cx, o: O<'_>, at: &str, k: &str) -> Option<f64> {
    let here = join(at, k);
    let p = sub(cx, o, at, k, &["value"])?;
    let v = match p.get("value") {
        None => 0.0,
        Some(x) => match x.as_f64() {
            Some(v) => v,
            None => {
                cx.add(&join(&here, "value"), format!("expected a number, not {}", what(x)));
                return None;
            }
        },
    };
    if !(0.0..=100.0).contains(&v) {
        cx.add(&join(&here, "value"), format!("{v} is not a percentage from 0 to 100"));
        return None;
    }
    Some(v)
}

/// One of `allowed`.
pub(crate) fn one_of(cx: &mut Cx, o: O<'_>, at: &str, k: &str, allowed: &[&str]) -> Option<String> {
    let s = string(cx, o, at, k)?;
    if allowed.contains(&s.as_str()) {
        Some(s)
    } else {
        cx.add(&join(at, k), format!("`{s}` is not one of {}", allowed.join(", ")));
        None
    }
}

/// The items of a list field, each with its path.
pub(crate) fn list<'v>(cx: &mut Cx, o: O<'v>, at: &str, k: &str) -> Vec<(String, &'v Value)> {
    match o.get(k) {
        None => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("{}[{i}]", join(at, k)), v))
            .collect(),
        Some(v) => {
            cx.add(&join(at, k), format!("expected a list, not {}", what(v)));
            Vec::new()
        }
    }
}

/// A list of strings.
pub(crate) fn strings(cx: &mut Cx, o: O<'_>, at: &str, k: &str) -> Vec<String> {
    list(cx, o, at, k)
        .into_iter()
        .filter_map(|(here, v)| match v {
            Value::String(s) => Some(s.clone()),
            v => {
                cx.add(&here, format!("expected a string, not {}", what(v)));
                None
            }
        })
        .collect()
}

/// A mapping of strings to strings (labels).
pub(crate) fn string_map(cx: &mut Cx, o: O<'_>, at: &str, k: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    match o.get(k) {
        None => {}
        Some(Value::Object(m)) => {
            for (key, v) in m {
                match v {
                    Value::String(s) => {
                        out.insert(key.clone(), s.clone());
                    }
                    v => cx.add(
                        &format!("{}.{key}", join(at, k)),
                        format!("expected a string, not {}", what(v)),
                    ),
                }
            }
        }
        Some(v) => cx.add(&join(at, k), format!("expected a mapping, not {}", what(v))),
    }
    out
}

/// A duration as Istio writes them (`7s`, `0.5s`, `100ms`, `1m`, `1h30m`).
pub(crate) fn duration(cx: &mut Cx, o: O<'_>, at: &str, k: &str) -> Option<Duration> {
    let s = string(cx, o, at, k)?;
    let d = parse_duration(&s);
    if d.is_none() {
        cx.add(
            &join(at, k),
            format!("`{s}` is not a duration such as 100ms, 1.5s, 1m or 1h"),
        );
    }
    d
}

/// Go-style durations: one or more `<number><unit>` with units ns, us, ms, s, m, h.
pub(crate) fn parse_duration(s: &str) -> Option<Duration> {
    if s.is_empty() {
        return None;
    }
    let mut rest = s;
    let mut total = 0f64;
    while !rest.is_empty() {
        let n_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let n: f64 = rest[..n_end].parse().ok()?;
        rest = &rest[n_end..];
        let u_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..u_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += n * scale;
        rest = &rest[u_end..];
    }
    (total.is_finite() && total < 1e12).then(|| Duration::from_secs_f64(total))
}

/// Splits a multi-document YAML text on its `---` lines; documents holding only comments or
/// blank lines are left out. Each document keeps the line it starts on.
pub(crate) fn documents(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut start = 1;
    let flush = |cur: &mut String, start: usize, out: &mut Vec<(usize, String)>| {
        let meaningful = cur.lines().any(|l| {
            let t = l.trim();
            !t.is_empty() && !t.starts_with('#')
        });
        if meaningful {
            out.push((start, std::mem::take(cur)));
        } else {
            cur.clear();
        }
    };
    for (i, line) in text.lines().enumerate() {
        let is_sep = line == "---"
            || line.starts_with("--- ")
            || line.starts_with("---\t")
            || line.trim_end() == "---"
            || line.trim_end() == "...";
        if is_sep {
            flush(&mut cur, start, &mut out);
            start = i + 2;
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
    }
    flush(&mut cur, start, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_as_istio_writes_them() {
        assert_eq!(parse_duration("7s"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("0.5s"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("100ms"), Some(Duration::from_millis(100)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("7"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("1d"), None);
    }

    #[test]
    fn documents_split_on_separator_lines() {
        let d = documents("# licence\n\n---\na: 1\n---\n# nothing\n---\nb: 2\n---\n");
        assert_eq!(d, [(4, "a: 1\n".to_string()), (8, "b: 2\n".to_string())]);
        assert_eq!(documents("a: 1\n"), [(1, "a: 1\n".to_string())]);
    }
}
