//! HPACK (RFC 7541), as much as a gRPC server needs: a decoder for request header blocks
//! (static and dynamic tables, Huffman strings, size updates) and an encoder for the few
//! response headers, as literals that touch no table.

use bytes::Bytes;

/// What can be wrong with a header block; each is a connection error (COMPRESSION_ERROR).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HpackError {
    /// The block ends inside a representation.
    #[error("header block truncated")]
    Truncated,
    /// An integer too large to be real.
    #[error("header block integer overflows")]
    Overflow,
    /// An index past the static and dynamic tables (or 0).
    #[error("header index {0} is not in the table")]
    BadIndex(usize),
    /// A Huffman string with a bad code, padding or the EOS symbol.
    #[error("bad Huffman string")]
    Huffman,
    /// A dynamic table size update over the limit, or after a header field.
    #[error("bad dynamic table size update ({0})")]
    TableSize(usize),
    /// The decoded list is over the limit.
    #[error("header list over {0} bytes")]
    TooLarge(usize),
}

/// RFC 7541 Appendix A.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// The Huffman code's lengths in bits, by symbol (0-255, then EOS): RFC 7541 Appendix B's
/// `len` column. The code is canonical (shorter codes first, equal lengths in symbol order),
/// so the codes themselves follow from the lengths.
const HUFFMAN_LEN: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28,
    28, 28, 28, 6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12,
    10, 13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, 15, 5, 6,
    5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, 20, 22, 20, 20, 22, 22,
    22, 23, 22, 23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, 22, 21, 20,
    22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28,
    27, 27, 27, 20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28,
    27, 27, 27, 27, 27, 26, 30,
];
const EOS: u16 = 256;
const MAX_CODE_LEN: usize = 30;

/// The canonical code as decoding tables: how many codes each length has, and the symbols in
/// code order.
struct Canonical {
    count: [u16; MAX_CODE_LEN + 1],
    symbols: [u16; 257],
}

const fn canonical() -> Canonical {
    let mut count = [0u16; MAX_CODE_LEN + 1];
    let mut s = 0;
    while s < 257 {
        count[HUFFMAN_LEN[s] as usize] += 1;
        s += 1;
    }
    let mut symbols = [0u16; 257];
    let mut at = 0;
    let mut len = 1;
    while len <= MAX_CODE_LEN {
        let mut s = 0;
        while s < 257 {
            if HUFFMAN_LEN[s] as usize == len {
                symbols[at] = s as u16;
                at += 1;
            }
            s += 1;
        }
        len += 1;
    }
    Canonical { count, symbols }
}

static CODE: Canonical = canonical();

/// Decodes a Huffman-coded string (RFC 7541 5.2): padding is at most 7 bits, all ones, and
/// EOS never appears.
pub(crate) fn huffman_decode(src: &[u8], out: &mut Vec<u8>) -> Result<(), HpackError> {
    // The code being read, its length, and the first code and symbol index of that length.
    let (mut code, mut len, mut first, mut index) = (0u32, 0usize, 0u32, 0usize);
    // Whether every bit of the code so far is 1 (a valid padding, if the input ends here).
    let mut ones = true;
    for &byte in src {
        for shift in (0..8).rev() {
            let bit = u32::from((byte >> shift) & 1);
            code |= bit;
            ones &= bit == 1;
            len += 1;
            let count = u32::from(CODE.count[len]);
            if code.wrapping_sub(first) < count {
                let sym = CODE.symbols[index + (code - first) as usize];
                if sym == EOS {
                    return Err(HpackError::Huffman);
                }
                out.push(sym as u8);
                (code, len, first, index, ones) = (0, 0, 0, 0, true);
                continue;
            }
            if len >= MAX_CODE_LEN {
                return Err(HpackError::Huffman);
            }
            index += count as usize;
            first = (first + count) << 1;
            code <<= 1;
        }
    }
    if len > 7 || !ones {
        return Err(HpackError::Huffman);
    }
    Ok(())
}

/// A decoder: one per connection, as the dynamic table is the connection's.
pub(crate) struct Decoder {
    /// Newest first.
    table: std::collections::VecDeque<(Bytes, Bytes)>,
    size: usize,
    max: usize,
    /// The limit a size update may raise `max` to (our SETTINGS_HEADER_TABLE_SIZE).
    limit: usize,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new(4096)
    }
}

fn entry_size(name: &[u8], value: &[u8]) -> usize {
    name.len() + value.len() + 32
}

/// Reads an integer with an `n`-bit prefix (RFC 7541 5.1) from `src[*at..]`.
fn integer(src: &[u8], at: &mut usize, n: u8) -> Result<usize, HpackError> {
    let first = *src.get(*at).ok_or(HpackError::Truncated)?;
    *at += 1;
    let mask = (1u16 << n) as usize - 1;
    let mut v = usize::from(first) & mask;
    if v < mask {
        return Ok(v);
    }
    let mut shift = 0u32;
    loop {
        let b = *src.get(*at).ok_or(HpackError::Truncated)?;
        *at += 1;
        if shift > 21 {
            return Err(HpackError::Overflow);
        }
        v += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
}

impl Decoder {
    /// A decoder whose dynamic table holds at most `limit` bytes.
    pub(crate) fn new(limit: usize) -> Self {
        Decoder {
            table: std::collections::VecDeque::new(),
            size: 0,
            max: limit,
            limit,
        }
    }

    fn get(&self, index: usize) -> Result<(Bytes, Bytes), HpackError> {
        match index {
            0 => Err(HpackError::BadIndex(0)),
            1..=61 => {
                let (n, v) = STATIC[index - 1];
                Ok((Bytes::from_static(n.as_bytes()), Bytes::from_static(v.as_bytes())))
            }
            _ => self.table.get(index - 62).cloned().ok_or(HpackError::BadIndex(index)),
        }
    }

    fn evict_to(&mut self, max: usize) {
        while self.size > max {
            match self.table.pop_back() {
                Some((n, v)) => self.size -= entry_size(&n, &v),
                None => break,
            }
        }
    }

    fn insert(&mut self, name: Bytes, value: Bytes) {
        let size = entry_size(&name, &value);
        // An entry larger than the table empties it and is not added (RFC 7541 4.4).
        self.evict_to(self.max.saturating_sub(size));
        if size <= self.max {
            self.size += size;
            self.table.push_front((name, value));
        }
    }

    fn string(src: &[u8], at: &mut usize) -> Result<Bytes, HpackError> {
        let huffman = src.get(*at).ok_or(HpackError::Truncated)? & 0x80 != 0;
        let len = integer(src, at, 7)?;
        let end = at
            .checked_add(len)
            .filter(|e| *e <= src.len())
            .ok_or(HpackError::Truncated)?;
        let raw = &src[*at..end];
        *at = end;
        if huffman {
            let mut out = Vec::with_capacity(len + len / 2);
            huffman_decode(raw, &mut out)?;
            Ok(Bytes::from(out))
        } else {
            Ok(Bytes::copy_from_slice(raw))
        }
    }

    /// Decodes a whole header block, calling `field` with each name and value; fails past
    /// `max_list` bytes of decoded headers (each counted as RFC 7540 6.5.2 does: + 32).
    pub(crate) fn decode(
        &mut self,
        src: &[u8],
        max_list: usize,
        mut field: impl FnMut(Bytes, Bytes),
    ) -> Result<(), HpackError> {
        let mut at = 0;
        let mut list = 0usize;
        let mut fields = false;
        while at < src.len() {
            let b = src[at];
            let (name, value) = if b & 0x80 != 0 {
                let i = integer(src, &mut at, 7)?;
                self.get(i)?
            } else if b & 0xe0 == 0x20 {
                let size = integer(src, &mut at, 5)?;
                if size > self.limit || fields {
                    return Err(HpackError::TableSize(size));
                }
                self.max = size;
                self.evict_to(size);
                continue;
            } else {
                // Literal: with incremental indexing (01), without (0000) or never indexed (0001).
                let (indexing, prefix) = if b & 0x40 != 0 { (true, 6) } else { (false, 4) };
                let i = integer(src, &mut at, prefix)?;
                let name = if i == 0 {
                    Self::string(src, &mut at)?
                } else {
                    self.get(i)?.0
                };
                let value = Self::string(src, &mut at)?;
                if indexing {
                    self.insert(name.clone(), value.clone());
                }
                (name, value)
            };
            fields = true;
            list += entry_size(&name, &value);
            if list > max_list {
                return Err(HpackError::TooLarge(max_list));
            }
            field(name, value);
        }
        Ok(())
    }
}

/// Appends `v` with an `n`-bit prefix whose other bits are `flags`.
fn put_integer(out: &mut Vec<u8>, flags: u8, n: u8, mut v: usize) {
    let mask = (1usize << n) - 1;
    if v < mask {
        out.push(flags | v as u8);
        return;
    }
    out.push(flags | mask as u8);
    v -= mask;
    while v >= 0x80 {
        out.push((v & 0x7f) as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends a header as a literal without indexing: the peer's table is never touched, so the
/// encoder keeps no state. `name_index` is a static-table name (0: the name is written out).
pub(crate) fn encode_literal(out: &mut Vec<u8>, name_index: usize, name: &str, value: &[u8]) {
    put_integer(out, 0x00, 4, name_index);
    if name_index == 0 {
        put_integer(out, 0x00, 7, name.len());
        out.extend_from_slice(name.as_bytes());
    }
    put_integer(out, 0x00, 7, value.len());
    out.extend_from_slice(value);
}

/// `:status: 200`, static index 8.
pub(crate) const STATUS_200: u8 = 0x88;
/// `content-type`'s static index.
pub(crate) const CONTENT_TYPE: usize = 31;

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(d: &mut Decoder, block: &[u8]) -> Result<Vec<(String, String)>, HpackError> {
        let mut v = Vec::new();
        d.decode(block, 16 * 1024, |n, val| {
            v.push((
                String::from_utf8_lossy(&n).into_owned(),
                String::from_utf8_lossy(&val).into_owned(),
            ))
        })?;
        Ok(v)
    }

    #[test]
    fn the_canonical_code_matches_rfc_7541_appendix_b() {
        // Reconstructed codes against a few rows of the RFC's table: (symbol, code, length).
        let mut order: Vec<usize> = (0..257).collect();
        order.sort_by_key(|&s| (HUFFMAN_LEN[s], s));
        let mut codes = [0u32; 257];
        let (mut code, mut prev) = (0u32, HUFFMAN_LEN[order[0]]);
        for (i, &s) in order.iter().enumerate() {
            if i > 0 {
                code = (code + 1) << (HUFFMAN_LEN[s] - prev);
                prev = HUFFMAN_LEN[s];
            }
            codes[s] = code;
        }
        assert_eq!((codes[0], HUFFMAN_LEN[0]), (0x1ff8, 13));
        assert_eq!((codes[b'0' as usize], HUFFMAN_LEN[b'0' as usize]), (0x0, 5));
        assert_eq!((codes[b'a' as usize], HUFFMAN_LEN[b'a' as usize]), (0x3, 5));
        assert_eq!((codes[b' ' as usize], HUFFMAN_LEN[b' ' as usize]), (0x14, 6));
        assert_eq!((codes[9], HUFFMAN_LEN[9]), (0xffffea, 24));
        assert_eq!((codes[256], HUFFMAN_LEN[256]), (0x3fffffff, 30));
    }

    #[test]
    fn rfc_7541_examples_decode() {
        // C.4.1: a request with Huffman strings, one literal indexed into the table.
        let block = [
            0x82, 0x86, 0x84, 0x41, 0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
        ];
        let mut d = Decoder::default();
        let got = decode_all(&mut d, &block).unwrap();
        let want = [
            (":method", "GET"),
            (":scheme", "http"),
            (":path", "/"),
            (":authority", "www.example.com"),
        ];
        assert_eq!(got, want.map(|(a, b)| (a.to_string(), b.to_string())));
        // C.4.2: the next request refers to that entry (index 62).
        let block = [0x82, 0x86, 0x84, 0xbe, 0x58, 0x86, 0xa8, 0xeb, 0x10, 0x64, 0x9c, 0xbf];
        let got = decode_all(&mut d, &block).unwrap();
        assert_eq!(got[3], (":authority".to_string(), "www.example.com".to_string()));
        assert_eq!(got[4], ("cache-control".to_string(), "no-cache".to_string()));
    }

    #[test]
    fn bad_blocks_are_errors_not_panics() {
        let mut d = Decoder::default();
        assert_eq!(decode_all(&mut d, &[0x80]), Err(HpackError::BadIndex(0)));
        assert_eq!(decode_all(&mut d, &[0xff, 0x80]), Err(HpackError::Truncated));
        assert_eq!(decode_all(&mut d, &[0xbe]), Err(HpackError::BadIndex(62)));
        assert_eq!(
            decode_all(&mut d, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]),
            Err(HpackError::Overflow)
        );
        // A string longer than the block.
        assert_eq!(decode_all(&mut d, &[0x40, 0x05, b'a']), Err(HpackError::Truncated));
        // Huffman: EOS coded (30 ones), and padding of zeros.
        assert_eq!(
            decode_all(&mut d, &[0x04, 0x84, 0xff, 0xff, 0xff, 0xff]),
            Err(HpackError::Huffman)
        );
        assert_eq!(decode_all(&mut d, &[0x04, 0x81, 0x00]), Err(HpackError::Huffman));
        // A size update over the limit, or after a field.
        assert_eq!(
            decode_all(&mut d, &[0x3f, 0xe2, 0x1f]),
            Err(HpackError::TableSize(4097))
        );
        assert_eq!(decode_all(&mut d, &[0x82, 0x20]), Err(HpackError::TableSize(0)));
        // Over the list limit.
        let mut big = vec![0x40, 0x01, b'x', 0x7f, 0x49];
        big.extend(std::iter::repeat_n(b'v', 200));
        let mut v = Vec::new();
        assert_eq!(d.decode(&big, 100, |n, _| v.push(n)), Err(HpackError::TooLarge(100)));
        // Random bytes never panic.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let len = (x % 40) as usize;
            let block: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = decode_all(&mut Decoder::new(256), &block);
        }
    }

    #[test]
    fn the_table_evicts_the_oldest_and_resizes() {
        let mut d = Decoder::new(100);
        // Two 42-byte entries fit, a third evicts the first.
        for v in ["a", "b", "c"] {
            let block = [0x40, 0x04, b'n', b'a', b'm', b'e', 0x01, v.as_bytes()[0]];
            decode_all(&mut d, &block).unwrap();
        }
        assert_eq!(decode_all(&mut d, &[0xbe]).unwrap()[0].1, "c");
        assert_eq!(decode_all(&mut d, &[0xbf]).unwrap()[0].1, "b");
        assert_eq!(decode_all(&mut d, &[0xc0]), Err(HpackError::BadIndex(64)));
        // A size update to 0 empties it.
        assert!(decode_all(&mut d, &[0x20]).unwrap().is_empty());
        assert_eq!(decode_all(&mut d, &[0xbe]), Err(HpackError::BadIndex(62)));
    }

    #[test]
    fn literals_encode_as_the_decoder_reads_them() {
        let mut out = vec![STATUS_200];
        encode_literal(&mut out, CONTENT_TYPE, "", b"application/grpc");
        encode_literal(&mut out, 0, "grpc-message", &[b'x'; 300]);
        let got = decode_all(&mut Decoder::default(), &out).unwrap();
        assert_eq!(got[0], (":status".into(), "200".into()));
        assert_eq!(got[1], ("content-type".into(), "application/grpc".into()));
        assert_eq!(got[2], ("grpc-message".into(), "x".repeat(300)));
    }
}
