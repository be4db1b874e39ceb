//! Just enough Hessian 2 to route RPC calls: read strings, ints and longs, skip any other value,
//! read a string map (Dubbo attachments) and a few string fields of an object (SOFA's
//! `SofaRequest`); write strings, ints, nulls, string lists and maps, and objects for error replies.
//!
//! Two byte-code tables are in use and they disagree on several bytes, so the [`Dialect`] is
//! chosen before parsing:
//! * [`Dialect::Final`], the Hessian 2.0 spec (Dubbo's hessian-lite, hessian.js 2, sofa-hessian-node
//!   "v4"): class definition `C` type n names, instances `O` ref or `0x60+ref`, lists `U V W X
//!   0x70-0x7f`, maps `H`/`M` ending in `Z`, string chunks `R`, long as int `Y`.
//! * [`Dialect::Draft`], the Hessian 2.0 draft of Java Hessian 3.1.3 that SOFA uses by default:
//!   class definition `O` int(len) raw type chars int(n) names, instance `o` ref, lists
//!   `V [t type] [n u8 | l i32] values z` and `v ref len values`, maps `H`/`M [t type]` ending in
//!   `z`, string chunks `s`, long as int `w`, refs `J K R`, doubles `0x67-0x6b`, date `d`.
//!
//! String lengths count UTF-16 code units, not bytes, and Java writes each half of a surrogate
//! pair as its own 3-byte sequence (CESU-8); the reader joins such pairs. Every length is checked
//! against the bytes left before anything is sized by it, and nesting deeper than [`MAX_DEPTH`]
//! is an error rather than a stack overflow.

use std::borrow::Cow;

/// Which Hessian 2 byte-code table a body uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Hessian 2.0 as specified (Dubbo, hessian.js 2, sofa-hessian-node `4.0`).
    Final,
    /// The Hessian 2.0 draft of Java Hessian 3.1.3, SOFA's default.
    Draft,
}

/// How deeply lists, maps and objects may nest before the reader gives up.
pub const MAX_DEPTH: usize = 64;

/// Why a Hessian value could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HessianError {
    /// The input ends inside a value.
    #[error("hessian input ends inside a value at byte {0}")]
    Eof(usize),
    /// A byte that cannot start (or continue) what was expected.
    #[error("hessian byte 0x{byte:02x} at {at} where {expected} was expected")]
    Unexpected {
        /// The byte.
        byte: u8,
        /// Its offset.
        at: usize,
        /// What the reader wanted.
        expected: &'static str,
    },
    /// A string whose bytes are not UTF-8 (or CESU-8).
    #[error("invalid UTF-8 in a hessian string at byte {0}")]
    Utf8(usize),
    /// A negative length or count.
    #[error("negative hessian length {0}")]
    NegativeLength(i32),
    /// An instance of a class that was never defined.
    #[error("hessian object refers to undefined class definition {0}")]
    NoSuchClass(i32),
    /// Lists, maps or objects nested deeper than [`MAX_DEPTH`].
    #[error("hessian values nested deeper than {MAX_DEPTH}")]
    TooDeep,
}

type Result<T> = std::result::Result<T, HessianError>;

/// Where a class definition's field names start, so an instance can be matched to them later.
#[derive(Debug, Clone, Copy)]
struct ClassDef {
    fields: usize,
    names_at: usize,
}

/// A cursor over one Hessian body. Class definitions are remembered across values, as a Hessian
/// stream shares them across its top-level values.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    dialect: Dialect,
    classes: Vec<ClassDef>,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8], dialect: Dialect) -> Reader<'a> {
        Reader {
            buf,
            pos: 0,
            dialect,
            classes: Vec::new(),
        }
    }

    /// The offset of the next byte.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Whether every byte has been read.
    pub fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// The next byte, not consumed.
    pub fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    /// Whether `tag` starts a string in this dialect. The draft table has no `0x30-0x33` form but
    /// leaves those bytes unused, so both dialects take it (and `0x34-0x37` binary).
    pub fn is_string_tag(&self, tag: u8) -> bool {
        matches!(tag, 0x00..=0x1f | 0x30..=0x33 | b'S') || tag == self.string_chunk_tag()
    }

    /// Reads a string.
    pub fn read_string(&mut self) -> Result<String> {
        self.read_str().map(Cow::into_owned)
    }

    /// Reads a string, borrowed from the input when it is one chunk of plain UTF-8 (the usual
    /// case: routing reads service and method names without allocating).
    pub fn read_str(&mut self) -> Result<Cow<'a, str>> {
        let at = self.pos;
        let tag = self.peek().ok_or(HessianError::Eof(at))?;
        let single = match tag {
            0x00..=0x1f => {
                self.pos += 1;
                Some(usize::from(tag))
            }
            0x30..=0x33 => {
                self.pos += 1;
                Some((usize::from(tag - 0x30) << 8) | usize::from(self.byte()?))
            }
            b'S' => {
                self.pos += 1;
                Some(self.u16()?)
            }
            _ => None,
        };
        if let Some(units) = single {
            let bytes = self.utf16_units(units)?;
            return match std::str::from_utf8(bytes) {
                Ok(s) => Ok(Cow::Borrowed(s)),
                Err(_) => decode_cesu8(bytes.to_vec(), at).map(Cow::Owned),
            };
        }
        let mut bytes = Vec::new();
        self.string(Some(&mut bytes))?;
        decode_cesu8(bytes, at).map(Cow::Owned)
    }

    /// Reads a string or a null (`N`).
    pub fn read_nullable_string(&mut self) -> Result<Option<String>> {
        Ok(self.read_nullable_str()?.map(Cow::into_owned))
    }

    /// Reads a string or a null (`N`), borrowed where it can be (see [`Reader::read_str`]).
    pub fn read_nullable_str(&mut self) -> Result<Option<Cow<'a, str>>> {
        if self.peek() == Some(b'N') {
            self.pos += 1;
            return Ok(None);
        }
        self.read_str().map(Some)
    }

    /// Reads an int in any of its forms.
    pub fn read_int(&mut self) -> Result<i32> {
        let at = self.pos;
        let tag = self.byte()?;
        self.int_after(tag)?.ok_or(unexpected(tag, at, "an int"))
    }

    /// Reads a long in any of its forms (an int is accepted too, as Java does).
    pub fn read_long(&mut self) -> Result<i64> {
        let at = self.pos;
        let tag = self.byte()?;
        if let Some(v) = self.long_after(tag)? {
            return Ok(v);
        }
        self.int_after(tag)?.map(i64::from).ok_or(unexpected(tag, at, "a long"))
    }

    /// Skips one value of any type.
    pub fn skip_value(&mut self) -> Result<()> {
        self.skip(0)
    }

    /// Reads a map (`H`, `M` or null) keeping entries whose key is a string and whose value is a
    /// string, an int or a long (numbers in decimal), in wire order. Reading stops after
    /// `max_entries` kept entries, leaving the rest of the map unread.
    pub fn read_string_map(&mut self, max_entries: usize) -> Result<Vec<(String, String)>> {
        Ok(self
            .read_str_map(max_entries)?
            .into_iter()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect())
    }

    /// [`Reader::read_string_map`], borrowing keys and values where it can.
    pub fn read_str_map(&mut self, max_entries: usize) -> Result<Vec<(Cow<'a, str>, Cow<'a, str>)>> {
        let at = self.pos;
        match self.byte()? {
            b'N' => return Ok(Vec::new()),
            b'H' => {}
            b'M' => self.skip_type()?,
            tag => return Err(unexpected(tag, at, "a map")),
        }
        let end = self.end_tag();
        let mut out = Vec::new();
        while out.len() < max_entries {
            if self.peek().ok_or(HessianError::Eof(self.pos))? == end {
                self.pos += 1;
                break;
            }
            let key = if self.peek().is_some_and(|t| self.is_string_tag(t)) {
                Some(self.read_str()?)
            } else {
                self.skip(1)?;
                None
            };
            let value = self.scalar_string()?;
            if let (Some(k), Some(v)) = (key, value) {
                out.push((k, v));
            }
        }
        Ok(out)
    }

    /// Reads one object (with its class definition if it comes first) and returns, for each name
    /// in `wanted`, the value of that field when it is a string. Other fields are skipped.
    pub fn read_object_strings(&mut self, wanted: &[&str]) -> Result<Vec<Option<String>>> {
        Ok(self
            .read_object_strs(wanted)?
            .into_iter()
            .map(|v| v.map(Cow::into_owned))
            .collect())
    }

    /// [`Reader::read_object_strings`], borrowing the values where it can.
    pub fn read_object_strs(&mut self, wanted: &[&str]) -> Result<Vec<Option<Cow<'a, str>>>> {
        let (at, tag) = self.value_tag()?;
        let def = match (self.dialect, tag) {
            (Dialect::Final, b'O') | (Dialect::Draft, b'o') => self.read_int()?,
            (Dialect::Final, 0x60..=0x6f) => i32::from(tag - 0x60),
            _ => return Err(unexpected(tag, at, "an object")),
        };
        let def = self.class(def)?;
        let mut names = Reader::new(self.buf, self.dialect);
        names.pos = def.names_at;
        let mut out = vec![None; wanted.len()];
        for _ in 0..def.fields {
            let name = names.read_str()?;
            let slot = wanted.iter().position(|w| *w == name).and_then(|i| out.get_mut(i));
            match slot {
                Some(slot) if self.peek().is_some_and(|t| self.is_string_tag(t)) => {
                    *slot = Some(self.read_str()?);
                }
                _ => self.skip(1)?,
            }
        }
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8> {
        let b = self.peek().ok_or(HessianError::Eof(self.pos))?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let bytes = end
            .and_then(|e| self.buf.get(self.pos..e))
            .ok_or(HessianError::Eof(self.buf.len()))?;
        self.pos += n;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let bytes = self.take(N)?;
        bytes.try_into().map_err(|_| HessianError::Eof(self.pos))
    }

    fn u16(&mut self) -> Result<usize> {
        Ok(usize::from(u16::from_be_bytes(self.array()?)))
    }

    fn length(&mut self) -> Result<usize> {
        let n = self.read_int()?;
        usize::try_from(n).map_err(|_| HessianError::NegativeLength(n))
    }

    fn string_chunk_tag(&self) -> u8 {
        match self.dialect {
            Dialect::Final => b'R',
            Dialect::Draft => b's',
        }
    }

    fn end_tag(&self) -> u8 {
        match self.dialect {
            Dialect::Final => b'Z',
            Dialect::Draft => b'z',
        }
    }

    /// Reads the chunks of one string, appending their bytes to `out` when given.
    fn string(&mut self, mut out: Option<&mut Vec<u8>>) -> Result<()> {
        loop {
            let at = self.pos;
            let tag = self.byte()?;
            let (units, last) = match tag {
                0x00..=0x1f => (usize::from(tag), true),
                0x30..=0x33 => ((usize::from(tag - 0x30) << 8) | usize::from(self.byte()?), true),
                b'S' => (self.u16()?, true),
                _ if tag == self.string_chunk_tag() => (self.u16()?, false),
                _ => return Err(unexpected(tag, at, "a string")),
            };
            let bytes = self.utf16_units(units)?;
            if let Some(out) = out.as_deref_mut() {
                out.extend_from_slice(bytes);
            }
            if last {
                return Ok(());
            }
        }
    }

    /// Takes the bytes of `units` UTF-16 code units: one unit per 1-, 2- or 3-byte sequence (so
    /// per CESU-8 surrogate half), two per 4-byte sequence.
    fn utf16_units(&mut self, units: usize) -> Result<&'a [u8]> {
        let (start, mut end, mut left) = (self.pos, self.pos, units);
        while left > 0 {
            let b = *self.buf.get(end).ok_or(HessianError::Eof(end))?;
            let (len, n) = match b {
                0x00..=0x7f => (1, 1),
                0xc0..=0xdf => (2, 1),
                0xe0..=0xef => (3, 1),
                0xf0..=0xf7 if left >= 2 => (4, 2),
                _ => return Err(HessianError::Utf8(end)),
            };
            end += len;
            left -= n;
        }
        self.take(end - start)
    }

    fn binary(&mut self) -> Result<()> {
        let chunk = match self.dialect {
            Dialect::Final => b'A',
            Dialect::Draft => b'b',
        };
        loop {
            let at = self.pos;
            let tag = self.byte()?;
            let (len, last) = match tag {
                0x20..=0x2f => (usize::from(tag - 0x20), true),
                0x34..=0x37 => ((usize::from(tag - 0x34) << 8) | usize::from(self.byte()?), true),
                b'B' => (self.u16()?, true),
                _ if tag == chunk => (self.u16()?, false),
                _ => return Err(unexpected(tag, at, "binary data")),
            };
            self.take(len)?;
            if last {
                return Ok(());
            }
        }
    }

    /// A list or map type: final, a string or a type ref (required); draft, `t` u16-length
    /// chars or a `T`/`u` type ref, or nothing (as Hessian 3.1.3's `readType`).
    fn skip_type(&mut self) -> Result<()> {
        match (self.dialect, self.peek()) {
            (Dialect::Final, Some(t)) if self.is_string_tag(t) => self.string(None),
            (Dialect::Final, _) => self.read_int().map(drop),
            (Dialect::Draft, Some(b't')) => {
                self.pos += 1;
                let units = self.u16()?;
                self.utf16_units(units).map(drop)
            }
            (Dialect::Draft, Some(b'T' | b'u')) => {
                self.pos += 1;
                self.read_int().map(drop)
            }
            (Dialect::Draft, _) => Ok(()),
        }
    }

    /// Reads a class definition if `tag` starts one (`C` final, `O` draft).
    fn class_def(&mut self, tag: u8) -> Result<bool> {
        match (self.dialect, tag) {
            (Dialect::Final, b'C') => self.string(None)?,
            (Dialect::Draft, b'O') => {
                let units = self.length()?;
                self.utf16_units(units)?;
            }
            _ => return Ok(false),
        }
        let fields = self.length()?;
        let names_at = self.pos;
        for _ in 0..fields {
            self.string(None)?;
        }
        self.classes.push(ClassDef { fields, names_at });
        Ok(true)
    }

    fn class(&self, def: i32) -> Result<ClassDef> {
        usize::try_from(def)
            .ok()
            .and_then(|i| self.classes.get(i))
            .copied()
            .ok_or(HessianError::NoSuchClass(def))
    }

    /// The tag of the next value, after any class definitions in front of it.
    fn value_tag(&mut self) -> Result<(usize, u8)> {
        loop {
            let at = self.pos;
            let tag = self.byte()?;
            if !self.class_def(tag)? {
                return Ok((at, tag));
            }
        }
    }

    fn int_after(&mut self, tag: u8) -> Result<Option<i32>> {
        let t = i32::from(tag);
        Ok(Some(match tag {
            0x80..=0xbf => t - 0x90,
            0xc0..=0xcf => ((t - 0xc8) << 8) + i32::from(self.byte()?),
            0xd0..=0xd7 => {
                let [b1, b0] = self.array()?;
                ((t - 0xd4) << 16) + (i32::from(b1) << 8) + i32::from(b0)
            }
            b'I' => i32::from_be_bytes(self.array()?),
            _ => return Ok(None),
        }))
    }

    fn long_after(&mut self, tag: u8) -> Result<Option<i64>> {
        let t = i64::from(tag);
        let int32 = match self.dialect {
            Dialect::Final => b'Y',
            Dialect::Draft => b'w',
        };
        Ok(Some(match tag {
            0xd8..=0xef => t - 0xe0,
            0xf0..=0xff => ((t - 0xf8) << 8) + i64::from(self.byte()?),
            0x38..=0x3f => {
                let [b1, b0] = self.array()?;
                ((t - 0x3c) << 16) + (i64::from(b1) << 8) + i64::from(b0)
            }
            b'L' => i64::from_be_bytes(self.array()?),
            _ if tag == int32 => i64::from(i32::from_be_bytes(self.array()?)),
            _ => return Ok(None),
        }))
    }

    /// A string, or an int or long in decimal; anything else is skipped and gives `None`.
    fn scalar_string(&mut self) -> Result<Option<Cow<'a, str>>> {
        let at = self.pos;
        let tag = self.peek().ok_or(HessianError::Eof(at))?;
        if self.is_string_tag(tag) {
            return self.read_str().map(Some);
        }
        self.pos += 1;
        if let Some(v) = self.int_after(tag)? {
            return Ok(Some(Cow::Owned(v.to_string())));
        }
        if let Some(v) = self.long_after(tag)? {
            return Ok(Some(Cow::Owned(v.to_string())));
        }
        self.pos = at;
        self.skip(1).map(|()| None)
    }

    fn skip(&mut self, depth: usize) -> Result<()> {
        if depth > MAX_DEPTH {
            return Err(HessianError::TooDeep);
        }
        let (at, tag) = self.value_tag()?;
        if self.is_string_tag(tag) {
            self.pos = at;
            return self.string(None);
        }
        let fixed = match tag {
            0x80..=0xbf | 0xd8..=0xef | b'N' | b'T' | b'F' => 0,
            0xc0..=0xcf | 0xf0..=0xff => 1,
            0xd0..=0xd7 | 0x38..=0x3f => 2,
            b'I' => 4,
            b'L' | b'D' => 8,
            _ => match self.dialect {
                Dialect::Final => return self.skip_final(tag, at, depth),
                Dialect::Draft => return self.skip_draft(tag, at, depth),
            },
        };
        self.take(fixed).map(drop)
    }

    fn skip_final(&mut self, tag: u8, at: usize, depth: usize) -> Result<()> {
        match tag {
            0x20..=0x2f | 0x34..=0x37 | b'A' | b'B' => {
                self.pos = at;
                self.binary()
            }
            0x5b | 0x5c => Ok(()),
            0x5d => self.take(1).map(drop),
            0x5e => self.take(2).map(drop),
            0x5f | b'Y' | b'K' => self.take(4).map(drop),
            b'J' => self.take(8).map(drop),
            b'Q' => self.read_int().map(drop),
            b'H' => self.skip_entries(depth),
            b'M' => {
                self.skip_type()?;
                self.skip_entries(depth)
            }
            b'U' => {
                self.skip_type()?;
                self.skip_until_end(depth)
            }
            b'W' => self.skip_until_end(depth),
            b'V' => {
                self.skip_type()?;
                let n = self.length()?;
                self.skip_n(n, depth)
            }
            b'X' => {
                let n = self.length()?;
                self.skip_n(n, depth)
            }
            0x70..=0x77 => {
                self.skip_type()?;
                self.skip_n(usize::from(tag - 0x70), depth)
            }
            0x78..=0x7f => self.skip_n(usize::from(tag - 0x78), depth),
            b'O' => {
                let def = self.read_int()?;
                self.skip_instance(def, depth)
            }
            0x60..=0x6f => self.skip_instance(i32::from(tag - 0x60), depth),
            _ => Err(unexpected(tag, at, "a hessian value")),
        }
    }

    fn skip_draft(&mut self, tag: u8, at: usize, depth: usize) -> Result<()> {
        match tag {
            0x20..=0x2f | 0x34..=0x37 | b'B' | b'b' => {
                self.pos = at;
                self.binary()
            }
            0x67 | 0x68 => Ok(()),
            0x69 | b'J' => self.take(1).map(drop),
            0x6a | b'K' => self.take(2).map(drop),
            0x6b | b'w' | b'R' => self.take(4).map(drop),
            b'd' => self.take(8).map(drop),
            b'H' => self.skip_entries(depth),
            b'M' => {
                self.skip_type()?;
                self.skip_entries(depth)
            }
            b'V' => {
                self.skip_type()?;
                let len = match self.peek() {
                    Some(b'n') => {
                        self.pos += 1;
                        Some(usize::from(self.byte()?))
                    }
                    Some(b'l') => {
                        self.pos += 1;
                        let n = i32::from_be_bytes(self.array()?);
                        Some(usize::try_from(n).map_err(|_| HessianError::NegativeLength(n))?)
                    }
                    _ => None,
                };
                match len {
                    Some(n) => {
                        self.skip_n(n, depth)?;
                        self.expect(b'z')
                    }
                    None => self.skip_until_end(depth),
                }
            }
            b'v' => {
                self.read_int()?;
                let n = self.length()?;
                self.skip_n(n, depth)
            }
            b'o' => {
                let def = self.read_int()?;
                self.skip_instance(def, depth)
            }
            _ => Err(unexpected(tag, at, "a hessian value")),
        }
    }

    fn expect(&mut self, want: u8) -> Result<()> {
        let at = self.pos;
        match self.byte()? {
            b if b == want => Ok(()),
            b => Err(unexpected(b, at, "the end of a list")),
        }
    }

    fn skip_n(&mut self, n: usize, depth: usize) -> Result<()> {
        // Each value takes at least one byte, so a huge `n` runs out of input quickly.
        for _ in 0..n {
            self.skip(depth + 1)?;
        }
        Ok(())
    }

    fn skip_until_end(&mut self, depth: usize) -> Result<()> {
        let end = self.end_tag();
        while self.peek().ok_or(HessianError::Eof(self.pos))? != end {
            self.skip(depth + 1)?;
        }
        self.pos += 1;
        Ok(())
    }

    fn skip_entries(&mut self, depth: usize) -> Result<()> {
        let end = self.end_tag();
        while self.peek().ok_or(HessianError::Eof(self.pos))? != end {
            self.skip(depth + 1)?;
            self.skip(depth + 1)?;
        }
        self.pos += 1;
        Ok(())
    }

    fn skip_instance(&mut self, def: i32, depth: usize) -> Result<()> {
        let def = self.class(def)?;
        self.skip_n(def.fields, depth)
    }
}

fn unexpected(byte: u8, at: usize, expected: &'static str) -> HessianError {
    HessianError::Unexpected { byte, at, expected }
}

/// UTF-8 as is; otherwise CESU-8 / Java's modified UTF-8, with surrogate pairs joined and lone
/// surrogates replaced by U+FFFD.
fn decode_cesu8(bytes: Vec<u8>, at: usize) -> Result<String> {
    let bytes = match String::from_utf8(bytes) {
        Ok(s) => return Ok(s),
        Err(e) => e.into_bytes(),
    };
    let mut s = String::with_capacity(bytes.len());
    let mut high: Option<u32> = None;
    let mut rest = bytes.as_slice();
    while !rest.is_empty() {
        let (cp, len) = code_point(rest).ok_or(HessianError::Utf8(at))?;
        rest = rest.get(len..).unwrap_or_default();
        let ch = match (high.take(), cp) {
            (None, 0xd800..=0xdbff) => {
                high = Some(cp);
                continue;
            }
            (Some(h), 0xdc00..=0xdfff) => char::from_u32(0x10000 + ((h - 0xd800) << 10) + (cp - 0xdc00)),
            (Some(_), _) => {
                s.push(char::REPLACEMENT_CHARACTER);
                if (0xd800..=0xdbff).contains(&cp) {
                    high = Some(cp);
                    continue;
                }
                char::from_u32(cp)
            }
            (None, _) => char::from_u32(cp),
        };
        s.push(ch.unwrap_or(char::REPLACEMENT_CHARACTER));
    }
    if high.is_some() {
        s.push(char::REPLACEMENT_CHARACTER);
    }
    Ok(s)
}

/// The code point (or surrogate half) at the start of `b`, and its length in bytes.
fn code_point(b: &[u8]) -> Option<(u32, usize)> {
    let cont = |i: usize| b.get(i).filter(|c| *c & 0xc0 == 0x80).map(|c| u32::from(c & 0x3f));
    let b0 = u32::from(*b.first()?);
    match b0 {
        0x00..=0x7f => Some((b0, 1)),
        0xc0..=0xdf => Some((((b0 & 0x1f) << 6) | cont(1)?, 2)),
        0xe0..=0xef => Some((((b0 & 0x0f) << 12) | (cont(1)? << 6) | cont(2)?, 3)),
        0xf0..=0xf7 => Some((((b0 & 0x07) << 18) | (cont(1)? << 12) | (cont(2)? << 6) | cont(3)?, 4)),
        _ => None,
    }
}

/// Writes Hessian values into a buffer, in either dialect.
#[derive(Debug, Clone)]
pub struct Writer {
    out: Vec<u8>,
    dialect: Dialect,
    classes: i32,
}

/// Java's string chunk size, in UTF-16 units.
const CHUNK: usize = 0x8000;

impl Writer {
    /// An empty writer.
    pub fn new(dialect: Dialect) -> Writer {
        Writer {
            out: Vec::new(),
            dialect,
            classes: 0,
        }
    }

    /// The bytes written.
    pub fn into_vec(self) -> Vec<u8> {
        self.out
    }

    /// Appends bytes that are already Hessian.
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Writer {
        self.out.extend_from_slice(bytes);
        self
    }

    /// Writes a null.
    pub fn null(&mut self) -> &mut Writer {
        self.out.push(b'N');
        self
    }

    /// Writes a boolean.
    pub fn bool(&mut self, v: bool) -> &mut Writer {
        self.out.push(if v { b'T' } else { b'F' });
        self
    }

    /// Writes an int in its most compact form.
    pub fn int(&mut self, v: i32) -> &mut Writer {
        // The truncating casts keep the low bytes, which is what each form stores.
        match v {
            -16..=47 => self.out.push((0x90 + v) as u8),
            -2048..=2047 => self.out.extend_from_slice(&[(0xc8 + (v >> 8)) as u8, v as u8]),
            -262_144..=262_143 => self
                .out
                .extend_from_slice(&[(0xd4 + (v >> 16)) as u8, (v >> 8) as u8, v as u8]),
            _ => {
                self.out.push(b'I');
                self.out.extend_from_slice(&v.to_be_bytes());
            }
        }
        self
    }

    /// Writes a string: compact forms when short, else chunks of at most 32 Ki UTF-16 units
    /// that never split a surrogate pair. Characters outside the BMP are written as CESU-8, as
    /// Java does, so every Hessian reader takes them.
    pub fn string(&mut self, s: &str) -> &mut Writer {
        let mut rest = s;
        loop {
            let (mut bytes, mut units) = (0, 0);
            for c in rest.chars() {
                if units + c.len_utf16() > CHUNK {
                    break;
                }
                units += c.len_utf16();
                bytes += c.len_utf8();
            }
            let (chunk, tail) = rest.split_at(bytes);
            if tail.is_empty() {
                self.final_string_chunk(chunk, units);
                return self;
            }
            let tag = match self.dialect {
                Dialect::Final => b'R',
                Dialect::Draft => b's',
            };
            self.out.push(tag);
            self.out.extend_from_slice(&(units as u16).to_be_bytes());
            self.cesu8(chunk);
            rest = tail;
        }
    }

    /// Writes a typed fixed-length list of strings (e.g. `[java.lang.String` argument types).
    pub fn string_list(&mut self, list_type: &str, items: &[&str]) -> &mut Writer {
        match self.dialect {
            Dialect::Final if items.len() <= 7 => {
                self.out.push(0x70 + items.len() as u8);
                self.string(list_type);
            }
            Dialect::Final => {
                self.out.push(b'V');
                self.string(list_type);
                self.int(items.len() as i32);
            }
            Dialect::Draft => {
                self.out.push(b'V');
                self.draft_type(list_type);
                if let Ok(n) = u8::try_from(items.len()) {
                    self.out.extend_from_slice(&[b'n', n]);
                } else {
                    self.out.push(b'l');
                    self.out.extend_from_slice(&(items.len() as i32).to_be_bytes());
                }
            }
        }
        for item in items {
            self.string(item);
        }
        if self.dialect == Dialect::Draft {
            self.out.push(b'z');
        }
        self
    }

    /// Writes an untyped map of strings (`H … Z` final, `M … z` draft).
    pub fn string_map(&mut self, entries: &[(&str, &str)]) -> &mut Writer {
        let (start, end) = match self.dialect {
            Dialect::Final => (b'H', b'Z'),
            Dialect::Draft => (b'M', b'z'),
        };
        self.out.push(start);
        for (k, v) in entries {
            self.string(k);
            self.string(v);
        }
        self.out.push(end);
        self
    }

    /// Starts an object of class `class`: writes its definition and the instance header. The
    /// caller then writes one value per field, in order.
    pub fn object(&mut self, class: &str, fields: &[&str]) -> &mut Writer {
        match self.dialect {
            Dialect::Final => {
                self.out.push(b'C');
                self.string(class);
            }
            Dialect::Draft => {
                self.out.push(b'O');
                self.int(class.encode_utf16().count() as i32);
                self.cesu8(class);
            }
        }
        self.int(fields.len() as i32);
        for f in fields {
            self.string(f);
        }
        let def = self.classes;
        self.classes += 1;
        match self.dialect {
            Dialect::Final if def < 16 => self.out.push(0x60 + def as u8),
            Dialect::Final => {
                self.out.push(b'O');
                self.int(def);
            }
            Dialect::Draft => {
                self.out.push(b'o');
                self.int(def);
            }
        }
        self
    }

    fn final_string_chunk(&mut self, s: &str, units: usize) {
        match units {
            0..=31 => self.out.push(units as u8),
            32..=1023 if self.dialect == Dialect::Final => {
                self.out.extend_from_slice(&[0x30 + (units >> 8) as u8, units as u8]);
            }
            _ => {
                self.out.push(b'S');
                self.out.extend_from_slice(&(units as u16).to_be_bytes());
            }
        }
        self.cesu8(s);
    }

    fn draft_type(&mut self, t: &str) {
        self.out.push(b't');
        self.out
            .extend_from_slice(&(t.encode_utf16().count() as u16).to_be_bytes());
        self.cesu8(t);
    }

    fn cesu8(&mut self, s: &str) {
        for c in s.chars() {
            if c.len_utf16() == 1 {
                let mut buf = [0; 4];
                self.out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            } else {
                let mut pair = [0; 2];
                for u in c.encode_utf16(&mut pair) {
                    let u = *u;
                    self.out.extend_from_slice(&[
                        0xe0 | (u >> 12) as u8,
                        0x80 | ((u >> 6) & 0x3f) as u8,
                        0x80 | (u & 0x3f) as u8,
                    ]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn final_string(s: &str) -> Vec<u8> {
        let mut w = Writer::new(Dialect::Final);
        w.string(s);
        w.into_vec()
    }

    #[test]
    fn strings_count_utf16_units_and_join_cesu8_pairs() {
        // hessian.js: "中" and "😀" (a surrogate pair written as two 3-byte sequences).
        assert_eq!(
            Reader::new(&hex("01 e4b8ad"), Dialect::Final).read_string().unwrap(),
            "中"
        );
        assert_eq!(
            Reader::new(&hex("02 eda0bd edb880"), Dialect::Final)
                .read_string()
                .unwrap(),
            "😀"
        );
        // Standard UTF-8 for a non-BMP character, counted as two units.
        assert_eq!(
            Reader::new(&hex("02 f09f9880"), Dialect::Draft).read_string().unwrap(),
            "😀"
        );
        // A lone surrogate is replaced, not an error.
        assert_eq!(
            Reader::new(&hex("02 eda0bd 41"), Dialect::Final).read_string().unwrap(),
            "\u{fffd}A"
        );
        // The writer emits CESU-8, as Java does.
        assert_eq!(final_string("😀"), hex("02 eda0bd edb880"));
        assert_eq!(final_string("中"), hex("01 e4b8ad"));
    }

    #[test]
    fn string_forms_round_trip_in_both_dialects() {
        let long = "é".repeat(CHUNK + 5) + "😀" + &"x".repeat(40_000);
        for d in [Dialect::Final, Dialect::Draft] {
            for s in ["", "a", &"b".repeat(31), &"c".repeat(32), &"d".repeat(1024), &long] {
                let mut w = Writer::new(d);
                w.string(s).int(7);
                let bytes = w.into_vec();
                let mut r = Reader::new(&bytes, d);
                assert_eq!(r.read_string().unwrap(), s);
                assert_eq!(r.read_int().unwrap(), 7);
                assert!(r.at_end());
                let mut r = Reader::new(&bytes, d);
                r.skip_value().unwrap();
                assert_eq!(r.read_int().unwrap(), 7);
            }
        }
        assert_eq!(final_string(&"c".repeat(32))[..2], [0x30, 0x20]);
        assert_eq!(final_string(&"d".repeat(1024))[..3], [b'S', 0x04, 0x00]);
    }

    #[test]
    fn chunked_strings_are_joined() {
        let bytes = hex("52 0002 6162 01 63 53 0001 64");
        assert_eq!(Reader::new(&bytes[..7], Dialect::Final).read_string().unwrap(), "abc");
        let draft = hex("73 0002 6162 53 0001 63");
        assert_eq!(Reader::new(&draft, Dialect::Draft).read_string().unwrap(), "abc");
        assert!(Reader::new(&draft, Dialect::Final).read_string().is_err());
    }

    #[test]
    fn ints_and_longs_in_every_form() {
        for v in [
            0,
            -16,
            47,
            -17,
            48,
            -2048,
            2047,
            -2049,
            2048,
            -262_144,
            262_143,
            i32::MIN,
            i32::MAX,
        ] {
            let mut w = Writer::new(Dialect::Final);
            w.int(v);
            assert_eq!(Reader::new(&w.into_vec(), Dialect::Final).read_int().unwrap(), v, "{v}");
        }
        assert_eq!(Reader::new(&hex("d4 1388"), Dialect::Final).read_int().unwrap(), 5000);
        let longs = [
            ("e0", 0),
            ("d8", -8),
            ("ef", 15),
            ("f0 00", -2048),
            ("38 0000", -262_144),
        ];
        for (h, v) in longs {
            assert_eq!(Reader::new(&hex(h), Dialect::Final).read_long().unwrap(), v, "{h}");
        }
        assert_eq!(
            Reader::new(&hex("59 ffffffff"), Dialect::Final).read_long().unwrap(),
            -1
        );
        assert_eq!(
            Reader::new(&hex("77 00000100"), Dialect::Draft).read_long().unwrap(),
            256
        );
        assert_eq!(
            Reader::new(&hex("4c 0000000100000000"), Dialect::Draft)
                .read_long()
                .unwrap(),
            1 << 32
        );
    }

    /// Skips each value of a table (`label: value | value ...` per line) and checks that the
    /// reader lands exactly on the sentinel int written after it.
    fn skips_each(dialect: Dialect, table: &str) {
        for line in table.lines().filter(|l| !l.trim().is_empty()) {
            let (label, values) = line.split_once(':').unwrap();
            for v in values.split('|') {
                let mut bytes = hex(v);
                bytes.push(0x9f); // the int 15
                let mut r = Reader::new(&bytes, dialect);
                r.skip_value().unwrap_or_else(|e| panic!("{label}: {v}: {e}"));
                assert_eq!(r.read_int().unwrap(), 15, "{label}: {v}");
            }
        }
    }

    #[test]
    fn skips_every_final_form() {
        skips_each(
            Dialect::Final,
            "
            null, bool: 4e | 54 | 46
            int: 91 | c8 01 | d4 0001 | 49 00000001
            long: e0 | f8 01 | 3c 0001 | 59 00000001 | 4c 0000000000000001
            double: 5b | 5c | 5d 01 | 5e 0001 | 5f 00000001 | 44 0000000000000000
            date: 4a 0000000000000000 | 4b 00000000
            string: 30 20 6161616161616161616161616161616161616161616161616161616161616161
            binary: 23 616263 | 34 01 00 | 41 0001 00 42 0001 00
            ref: 51 90
            map: 48 01 61 91 5a | 4d 01 74 01 61 91 5a
            list: 55 01 74 91 92 5a | 57 91 5a | 56 01 74 92 91 92 | 58 92 91 92 | 72 01 74 91 92 | 7a 91 92
            object: 43 01 43 92 01 61 01 62 60 91 92 | 43 01 43 92 01 61 01 62 4f 90 91 92
            ",
        );
    }

    #[test]
    fn skips_every_draft_form() {
        skips_each(
            Dialect::Draft,
            "
            null, bool: 4e | 54
            int: 91 | c8 01 | d4 0001 | 49 00000001
            long: e0 | f8 01 | 3c 0001 | 77 00000001 | 4c 0000000000000001
            double: 67 | 68 | 69 01 | 6a 0001 | 6b 00000001
            date: 64 0000000000000000
            ref: 4a 01 | 4b 0001 | 52 00000001
            binary: 23 616263 | 62 0001 00 42 0001 00
            map: 48 01 61 91 7a | 4d 74 0001 74 01 61 91 7a | 4d 01 61 91 7a
            list: 56 74 0001 74 6e 02 91 92 7a | 56 6c 00000001 91 7a | 56 91 92 7a | 76 90 92 91 92
            object: 4f 91 43 92 01 61 01 62 6f 90 91 92
            ",
        );
    }

    #[test]
    fn hostile_input_errors_without_overflowing() {
        let deep = vec![b'W'; 100_000];
        assert_eq!(
            Reader::new(&deep, Dialect::Final).skip_value(),
            Err(HessianError::TooDeep)
        );
        let deep = vec![b'H'; 100_000];
        assert_eq!(
            Reader::new(&deep, Dialect::Draft).skip_value(),
            Err(HessianError::TooDeep)
        );
        // Many definitions in a row are read in a loop, not by recursion.
        let mut defs = hex("43 01 41 90").repeat(50_000);
        defs.push(0x91);
        assert!(Reader::new(&defs, Dialect::Final).skip_value().is_ok());
        // Huge declared lengths and counts run out of input.
        for h in [
            "53 ffff 61",
            "58 49 7fffffff 91",
            "56 01 74 49 7fffffff",
            "41 ffff",
            "34 ff",
        ] {
            assert!(
                matches!(
                    Reader::new(&hex(h), Dialect::Final).skip_value(),
                    Err(HessianError::Eof(_))
                ),
                "{h}"
            );
        }
        assert_eq!(
            Reader::new(&hex("58 8f"), Dialect::Final).skip_value(),
            Err(HessianError::NegativeLength(-1))
        );
        assert_eq!(
            Reader::new(&hex("60"), Dialect::Final).skip_value(),
            Err(HessianError::NoSuchClass(0))
        );
        assert_eq!(
            Reader::new(&hex("6f 95"), Dialect::Draft).skip_value(),
            Err(HessianError::NoSuchClass(5))
        );
        assert!(Reader::new(&hex("02 80 80"), Dialect::Final).read_string().is_err());
        assert!(
            Reader::new(&hex("01 f0 9f 98 80"), Dialect::Final)
                .read_string()
                .is_err()
        );
    }

    #[test]
    fn string_maps_keep_strings_and_numbers() {
        let body = hex("48 01 61 01 62 01 63 d4 1388 01 64 4e 01 65 e5 91 01 66 5a");
        let map = Reader::new(&body, Dialect::Final).read_string_map(10).unwrap();
        let want = [("a", "b"), ("c", "5000"), ("e", "5")];
        assert_eq!(map, want.map(|(k, v)| (k.to_string(), v.to_string())));
        assert_eq!(Reader::new(&body, Dialect::Final).read_string_map(1).unwrap().len(), 1);
        assert!(
            Reader::new(&hex("4e"), Dialect::Final)
                .read_string_map(10)
                .unwrap()
                .is_empty()
        );

        let mut w = Writer::new(Dialect::Draft);
        w.string_map(&[("k", "v")]);
        let map = Reader::new(&w.into_vec(), Dialect::Draft).read_string_map(10).unwrap();
        assert_eq!(map, [("k".to_string(), "v".to_string())]);
    }

    #[test]
    fn object_fields_by_name_in_both_dialects() {
        for d in [Dialect::Final, Dialect::Draft] {
            let mut w = Writer::new(d);
            w.object("x.Req", &["a", "list", "method", "n"]);
            w.int(1).string_list("[java.lang.String", &["s"]).string("hi").null();
            let bytes = w.into_vec();
            let got = Reader::new(&bytes, d)
                .read_object_strings(&["method", "n", "absent"])
                .unwrap();
            assert_eq!(got, [Some("hi".to_string()), None, None]);
            let mut r = Reader::new(&bytes, d);
            r.skip_value().unwrap();
            assert!(r.at_end());
        }
    }
}
