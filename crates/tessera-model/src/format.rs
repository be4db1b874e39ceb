//! Envoy-style access-log formats: `%START_TIME% %REQ(:METHOD)% %RESPONSE_CODE%` and friends,
//! parsed once at load time into tokens.

use serde::{Serialize, Serializer};

/// Envoy's default access-log line.
pub const DEFAULT_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// The default access-log line of an RPC chain.
pub const RPC_DEFAULT_FORMAT: &str = "[%START_TIME%] \"%PROTOCOL% %RPC_SERVICE% %RPC_METHOD%\" %RPC_STATUS% %RESPONSE_FLAGS% %RPC_REQUEST_ID% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% \"%DOWNSTREAM_REMOTE_ADDRESS%\" \"%UPSTREAM_HOST%\"\n";

/// One piece of a format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// Literal text.
    Literal(String),
    /// A command operator.
    Op(Op),
}

/// A command operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `%START_TIME%`, RFC 3339 UTC with milliseconds.
    StartTime,
    /// `%REQ(NAME?ALT):LEN%`: a request header (pseudo-headers `:method`, `:path`, `:authority`, `:scheme`).
    Req(HeaderRef),
    /// `%RESP(NAME?ALT):LEN%`: a response header.
    Resp(HeaderRef),
    /// `%PROTOCOL%`: HTTP/1.1, HTTP/2, or `-` for TCP.
    Protocol,
    /// `%RESPONSE_CODE%`.
    ResponseCode,
    /// `%RESPONSE_FLAGS%`: Envoy's short flags (UH, UF, NR, UT...).
    ResponseFlags,
    /// `%RESPONSE_CODE_DETAILS%`.
    ResponseCodeDetails,
    /// `%BYTES_RECEIVED%`: body bytes from downstream.
    BytesReceived,
    /// `%BYTES_SENT%`: body bytes to downstream.
    BytesSent,
    /// `%DURATION%`: milliseconds from start to the last byte sent.
    Duration,
    /// `%RESPONSE_DURATION%`: milliseconds from start to the first upstream response byte.
    ResponseDuration,
    /// `%UPSTREAM_HOST%`.
    UpstreamHost,
    /// `%UPSTREAM_CLUSTER%`.
    UpstreamCluster,
    /// `%DOWNSTREAM_REMOTE_ADDRESS%`.
    DownstreamRemoteAddress,
    /// `%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%`.
    DownstreamRemoteAddressWithoutPort,
    /// `%DOWNSTREAM_LOCAL_ADDRESS%`.
    DownstreamLocalAddress,
    /// `%ROUTE_NAME%`.
    RouteName,
    /// `%CONNECTION_ID%`.
    ConnectionId,
    /// `%HOSTNAME%`.
    Hostname,
    /// `%REQUESTED_SERVER_NAME%`: the SNI the client sent.
    RequestedServerName,
    /// `%DOWNSTREAM_TLS_VERSION%`: `TLSv1.2` or `TLSv1.3`.
    DownstreamTlsVersion,
    /// `%DOWNSTREAM_TLS_CIPHER%`: IANA name of the cipher suite.
    DownstreamTlsCipher,
    /// `%DOWNSTREAM_PEER_URI_SAN%`: the client certificate's URI SANs (SPIFFE ID), comma-separated.
    DownstreamPeerUriSan,
    /// `%DOWNSTREAM_PEER_DNS_SAN%`.
    DownstreamPeerDnsSan,
    /// `%DOWNSTREAM_PEER_SUBJECT%`.
    DownstreamPeerSubject,
    /// `%DOWNSTREAM_PEER_ISSUER%`.
    DownstreamPeerIssuer,
    /// `%DOWNSTREAM_PEER_SERIAL%`.
    DownstreamPeerSerial,
    /// `%DOWNSTREAM_PEER_FINGERPRINT_256%`: SHA-256 of the client certificate, hex.
    DownstreamPeerFingerprint256,
    /// `%DOWNSTREAM_LOCAL_URI_SAN%`: our certificate's URI SANs.
    DownstreamLocalUriSan,
    /// `%DOWNSTREAM_LOCAL_SUBJECT%`.
    DownstreamLocalSubject,
    /// `%UPSTREAM_TRANSPORT_FAILURE_REASON%`: why the upstream connection failed (TLS errors included).
    UpstreamTransportFailureReason,
    /// `%RPC_SERVICE%`: the RPC service or interface.
    RpcService,
    /// `%RPC_METHOD%`: the RPC method.
    RpcMethod,
    /// `%RPC_STATUS%`: the response status in the protocol's own numbering.
    RpcStatus,
    /// `%RPC_REQUEST_ID%`: the request id the client sent.
    RpcRequestId,
}

impl Op {
    /// True when the operator's value is a number (emitted unquoted in JSON).
    pub fn is_numeric(&self) -> bool {
        matches!(
            self,
            Op::ResponseCode
                | Op::BytesReceived
                | Op::BytesSent
                | Op::Duration
                | Op::ResponseDuration
                | Op::ConnectionId
                | Op::RpcStatus
                | Op::RpcRequestId
        )
    }
}

/// A header reference with an optional fallback and length limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderRef {
    /// Lower-case header name.
    pub name: String,
    /// Lower-case fallback header name.
    pub alt: Option<String>,
    /// Truncate to this many bytes.
    pub max_len: Option<usize>,
}

/// A parsed access-log format.
#[derive(Debug, Clone)]
pub enum LogFormat {
    /// A text line.
    Text {
        /// As written.
        source: String,
        /// Parsed.
        tokens: Vec<Token>,
    },
    /// One JSON object per line.
    Json {
        /// `(key, source, tokens)` in order.
        fields: Vec<(String, String, Vec<Token>)>,
    },
}

impl LogFormat {
    /// Envoy's default text format.
    pub fn default_text() -> LogFormat {
        LogFormat::text(DEFAULT_FORMAT)
    }

    /// A text format from a built-in source (which parses; a typo shows as an empty line in tests).
    pub fn text(source: &str) -> LogFormat {
        LogFormat::Text {
            source: source.to_string(),
            tokens: parse(source).unwrap_or_default(),
        }
    }

    /// Every header reference in the format, requests first: what must be captured per request.
    pub fn tokens(&self) -> Box<dyn Iterator<Item = &Token> + '_> {
        match self {
            LogFormat::Text { tokens, .. } => Box::new(tokens.iter()),
            LogFormat::Json { fields } => Box::new(fields.iter().flat_map(|(_, _, t)| t.iter())),
        }
    }
}

impl Serialize for LogFormat {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(1))?;
        match self {
            LogFormat::Text { source, .. } => m.serialize_entry("text", source)?,
            LogFormat::Json { fields } => {
                let obj: Vec<(&String, &String)> = fields.iter().map(|(k, v, _)| (k, v)).collect();
                m.serialize_entry("json", &JsonFields(&obj))?
            }
        }
        m.end()
    }
}

struct JsonFields<'a>(&'a [(&'a String, &'a String)]);

impl Serialize for JsonFields<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (*k, *v)))
    }
}

/// Parses a format string. The error names the operator and why it is wrong.
pub fn parse(src: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut lit = String::new();
    let b = src.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            let ch_len = src[i..].chars().next().map_or(1, char::len_utf8);
            lit.push_str(&src[i..i + ch_len]);
            i += ch_len;
            continue;
        }
        if b.get(i + 1) == Some(&b'%') {
            lit.push('%');
            i += 2;
            continue;
        }
        // An operator runs to the next '%' that is outside parentheses.
        let start = i + 1;
        let mut j = start;
        let mut depth = 0usize;
        while j < b.len() {
            match b[j] {
                b'(' => depth += 1,
                b')' => depth = depth.saturating_sub(1),
                b'%' if depth == 0 => break,
                _ => {}
            }
            j += 1;
        }
        if j >= b.len() {
            return Err(format!(
                "unterminated command operator starting at byte {i}: `{}` (write %% for a literal %)",
                &src[i..]
            ));
        }
        if !lit.is_empty() {
            tokens.push(Token::Literal(std::mem::take(&mut lit)));
        }
        tokens.push(Token::Op(parse_op(&src[start..j])?));
        i = j + 1;
    }
    if !lit.is_empty() {
        tokens.push(Token::Literal(lit));
    }
    Ok(tokens)
}

fn parse_op(s: &str) -> Result<Op, String> {
    let (name, args, max_len) = match s.find('(') {
        Some(open) => {
            let close = s
                .rfind(')')
                .filter(|c| *c > open)
                .ok_or_else(|| format!("`%{s}%`: missing `)`"))?;
            let rest = &s[close + 1..];
            let max_len = match rest.strip_prefix(':') {
                Some(n) => Some(
                    n.parse::<usize>()
                        .map_err(|_| format!("`%{s}%`: length after `:` must be a number"))?,
                ),
                None if rest.is_empty() => None,
                None => return Err(format!("`%{s}%`: unexpected text after `)`")),
            };
            (&s[..open], Some(&s[open + 1..close]), max_len)
        }
        None => (s, None, None),
    };
    let header = |args: Option<&str>| -> Result<HeaderRef, String> {
        let a = args
            .filter(|a| !a.is_empty())
            .ok_or_else(|| format!("`%{s}%` needs a header name, e.g. %{name}(USER-AGENT)%"))?;
        let (n, alt) = match a.split_once('?') {
            Some((n, alt)) => (n, Some(alt.to_ascii_lowercase())),
            None => (a, None),
        };
        Ok(HeaderRef {
            name: n.to_ascii_lowercase(),
            alt,
            max_len,
        })
    };
    let op = match name {
        "REQ" => Op::Req(header(args)?),
        "RESP" => Op::Resp(header(args)?),
        _ if args.is_some() => {
            if name == "START_TIME" {
                return Err(format!(
                    "`%{s}%`: custom START_TIME formats are not supported; %START_TIME% prints RFC 3339 UTC"
                ));
            }
            return Err(format!("`%{s}%`: {name} takes no arguments"));
        }
        "START_TIME" => Op::StartTime,
        "PROTOCOL" => Op::Protocol,
        "RESPONSE_CODE" => Op::ResponseCode,
        "RESPONSE_FLAGS" => Op::ResponseFlags,
        "RESPONSE_CODE_DETAILS" => Op::ResponseCodeDetails,
        "BYTES_RECEIVED" => Op::BytesReceived,
        "BYTES_SENT" => Op::BytesSent,
        "DURATION" => Op::Duration,
        "RESPONSE_DURATION" => Op::ResponseDuration,
        "UPSTREAM_HOST" => Op::UpstreamHost,
        "UPSTREAM_CLUSTER" => Op::UpstreamCluster,
        "DOWNSTREAM_REMOTE_ADDRESS" => Op::DownstreamRemoteAddress,
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Op::DownstreamRemoteAddressWithoutPort,
        "DOWNSTREAM_LOCAL_ADDRESS" => Op::DownstreamLocalAddress,
        "ROUTE_NAME" => Op::RouteName,
        "CONNECTION_ID" => Op::ConnectionId,
        "HOSTNAME" => Op::Hostname,
        "REQUESTED_SERVER_NAME" => Op::RequestedServerName,
        "DOWNSTREAM_TLS_VERSION" => Op::DownstreamTlsVersion,
        "DOWNSTREAM_TLS_CIPHER" => Op::DownstreamTlsCipher,
        "DOWNSTREAM_PEER_URI_SAN" => Op::DownstreamPeerUriSan,
        "DOWNSTREAM_PEER_DNS_SAN" => Op::DownstreamPeerDnsSan,
        "DOWNSTREAM_PEER_SUBJECT" => Op::DownstreamPeerSubject,
        "DOWNSTREAM_PEER_ISSUER" => Op::DownstreamPeerIssuer,
        "DOWNSTREAM_PEER_SERIAL" => Op::DownstreamPeerSerial,
        "DOWNSTREAM_PEER_FINGERPRINT_256" => Op::DownstreamPeerFingerprint256,
        "DOWNSTREAM_LOCAL_URI_SAN" => Op::DownstreamLocalUriSan,
        "DOWNSTREAM_LOCAL_SUBJECT" => Op::DownstreamLocalSubject,
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => Op::UpstreamTransportFailureReason,
        "RPC_SERVICE" => Op::RpcService,
        "RPC_METHOD" => Op::RpcMethod,
        "RPC_STATUS" => Op::RpcStatus,
        "RPC_REQUEST_ID" => Op::RpcRequestId,
        other => return Err(format!("unknown command operator `%{other}%`")),
    };
    if max_len.is_some() && !matches!(op, Op::Req(_) | Op::Resp(_)) {
        return Err(format!("`%{s}%`: only REQ and RESP take a length"));
    }
    Ok(op)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_format_parses() {
        let t = parse(DEFAULT_FORMAT).unwrap();
        assert!(t.contains(&Token::Op(Op::StartTime)));
        assert!(t.contains(&Token::Op(Op::Req(HeaderRef {
            name: "x-envoy-original-path".into(),
            alt: Some(":path".into()),
            max_len: None
        }))));
        assert_eq!(t.last(), Some(&Token::Literal("\"\n".into())));
    }

    #[test]
    fn literals_percent_and_lengths() {
        let t = parse("100%% %REQ(User-Agent):10% done").unwrap();
        assert_eq!(
            t,
            vec![
                Token::Literal("100% ".into()),
                Token::Op(Op::Req(HeaderRef {
                    name: "user-agent".into(),
                    alt: None,
                    max_len: Some(10)
                })),
                Token::Literal(" done".into()),
            ]
        );
    }

    #[test]
    fn bad_operators_are_named() {
        for (src, needle) in [
            ("%NOPE%", "unknown command operator `%NOPE%`"),
            ("%REQ()%", "needs a header name"),
            ("%DURATION(x)%", "takes no arguments"),
            ("%START_TIME(%Y)%", "custom START_TIME"),
            ("abc %DURATION", "unterminated"),
            ("%DURATION:3%", "unknown command operator"),
            ("%REQ(a):x%", "must be a number"),
        ] {
            let e = parse(src).unwrap_err();
            assert!(e.contains(needle), "{src}: {e}");
        }
    }
}
