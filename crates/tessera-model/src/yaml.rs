//! A YAML document as a tree of nodes that remember where they came from.
//!
//! serde stops at the first error and forgets positions; we want every error in a file, each
//! with its line and column, so the decoder walks this tree instead.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A position in a source file: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Mark {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub col: usize,
}

impl From<Marker> for Mark {
    fn from(m: Marker) -> Self {
        Mark {
            line: m.line(),
            col: m.col() + 1,
        }
    }
}

/// One YAML node with its position.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub(crate) kind: Kind,
    pub(crate) mark: Mark,
}

#[derive(Debug, Clone)]
pub(crate) enum Kind {
    Null,
    /// A scalar, as text; quoted or not, `"10"` and `10` read the same.
    Scalar {
        text: String,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// What the node is, in words, for error messages.
    pub(crate) fn describe(&self) -> &'static str {
        match &self.kind {
            Kind::Null => "null",
            Kind::Scalar { .. } => "a scalar",
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a mapping",
        }
    }

    pub(crate) fn is_null(&self) -> bool {
        matches!(self.kind, Kind::Null)
    }
}

/// A syntax error in the YAML text itself.
#[derive(Debug, Clone)]
pub(crate) struct SyntaxError {
    pub(crate) mark: Mark,
    pub(crate) reason: String,
}

/// Parses the first document of `src` into a node tree. An empty document is `Null`.
pub(crate) fn parse(src: &str) -> Result<Node, SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(src);
    if let Err(e) = parser.load(&mut builder, true) {
        return Err(SyntaxError {
            mark: (*e.marker()).into(),
            reason: e.info().to_string(),
        });
    }
    if let Some(err) = builder.error {
        return Err(err);
    }
    if builder.documents > 1 {
        return Err(SyntaxError {
            mark: builder.second_doc.unwrap_or_default(),
            reason: "the file holds more than one YAML document; a config is one document".into(),
        });
    }
    Ok(builder.root.unwrap_or(Node {
        kind: Kind::Null,
        mark: Mark { line: 1, col: 1 },
    }))
}

enum Open {
    Seq {
        anchor: usize,
        mark: Mark,
        items: Vec<Node>,
    },
    Map {
        anchor: usize,
        mark: Mark,
        entries: Vec<(Node, Node)>,
        pending_key: Option<Node>,
    },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Open>,
    anchors: HashMap<usize, Node>,
    root: Option<Node>,
    documents: usize,
    second_doc: Option<Mark>,
    error: Option<SyntaxError>,
}

impl Builder {
    fn push_value(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => {
                if self.documents <= 1 {
                    self.root = Some(node);
                }
            }
            Some(Open::Seq { items, .. }) => items.push(node),
            Some(Open::Map {
                entries, pending_key, ..
            }) => match pending_key.take() {
                None => {
                    if !matches!(node.kind, Kind::Scalar { .. } | Kind::Null) && self.error.is_none() {
                        self.error = Some(SyntaxError {
                            mark: node.mark,
                            reason: "mapping keys must be plain strings".into(),
                        });
                    }
                    *pending_key = Some(node);
                }
                Some(key) => entries.push((key, node)),
            },
        }
    }

    fn remember(&mut self, anchor: usize, node: &Node) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, marker: Marker) {
        let mark: Mark = marker.into();
        match ev {
            Event::DocumentStart => {
                self.documents += 1;
                if self.documents == 2 {
                    self.second_doc = Some(mark);
                }
            }
            Event::Scalar(text, style, anchor, _tag) => {
                let quoted = !matches!(style, TScalarStyle::Plain);
                let null = !quoted && matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL");
                let node = Node {
                    kind: if null { Kind::Null } else { Kind::Scalar { text } },
                    mark,
                };
                self.remember(anchor, &node);
                self.push_value(node);
            }
            Event::SequenceStart(anchor, _) => self.stack.push(Open::Seq {
                anchor,
                mark,
                items: Vec::new(),
            }),
            Event::MappingStart(anchor, _) => self.stack.push(Open::Map {
                anchor,
                mark,
                entries: Vec::new(),
                pending_key: None,
            }),
            Event::SequenceEnd | Event::MappingEnd => {
                let node = match self.stack.pop() {
                    Some(Open::Seq { anchor, mark, items }) => {
                        let n = Node {
                            kind: Kind::Seq(items),
                            mark,
                        };
                        self.remember(anchor, &n);
                        n
                    }
                    Some(Open::Map {
                        anchor, mark, entries, ..
                    }) => {
                        let n = Node {
                            kind: Kind::Map(entries),
                            mark,
                        };
                        self.remember(anchor, &n);
                        n
                    }
                    None => return,
                };
                self.push_value(node);
            }
            Event::Alias(id) => {
                let node = match self.anchors.get(&id) {
                    Some(n) => Node {
                        kind: n.kind.clone(),
                        mark,
                    },
                    None => {
                        if self.error.is_none() {
                            self.error = Some(SyntaxError {
                                mark,
                                reason: "alias refers to an unknown anchor".into(),
                            });
                        }
                        Node { kind: Kind::Null, mark }
                    }
                };
                self.push_value(node);
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalar(n: &Node) -> &str {
        match &n.kind {
            Kind::Scalar { text, .. } => text,
            other => panic!("not a scalar: {other:?}"),
        }
    }

    #[test]
    fn positions_are_one_based() {
        let n = parse("a: 1\nb:\n  - x\n  - y\n").unwrap();
        let Kind::Map(entries) = &n.kind else {
            panic!("not a map")
        };
        assert_eq!(scalar(&entries[0].0), "a");
        assert_eq!(entries[0].1.mark, Mark { line: 1, col: 4 });
        let Kind::Seq(items) = &entries[1].1.kind else {
            panic!("not a seq")
        };
        assert_eq!(items[1].mark, Mark { line: 4, col: 5 });
        assert_eq!(scalar(&items[1]), "y");
    }

    #[test]
    fn quoting_and_null_are_kept_apart() {
        let n = parse("a: ~\nb: \"null\"\nc:\n").unwrap();
        let Kind::Map(e) = &n.kind else { panic!() };
        assert!(e[0].1.is_null());
        assert!(matches!(&e[1].1.kind, Kind::Scalar { text } if text == "null"));
        assert!(e[2].1.is_null());
    }

    #[test]
    fn aliases_expand_and_unknown_ones_fail() {
        let n = parse("base: &b {x: 1}\nother: *b\n").unwrap();
        let Kind::Map(e) = &n.kind else { panic!() };
        assert!(matches!(&e[1].1.kind, Kind::Map(m) if m.len() == 1));
    }

    #[test]
    fn syntax_errors_have_positions() {
        let err = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.mark.line >= 1, "{err:?}");
        let err = parse("a: 1\n---\nb: 2\n").unwrap_err();
        assert_eq!(err.mark.line, 2);
        assert!(err.reason.contains("more than one"));
    }

    #[test]
    fn empty_document_is_null() {
        assert!(parse("").unwrap().is_null());
        assert!(parse("# only a comment\n").unwrap().is_null());
    }
}
