//! A small, strict reader for `.npy` headers and a writer for 1-D f64 arrays.
//!
//! Written here rather than taken from a crate because the command line needs exactly three
//! things no general-purpose crate gives in one piece: the byte offset of the data (to stream
//! row blocks from disk without loading the array), precise messages for everything it
//! refuses (integers, complex, big-endian, Fortran order), and no extra dependency.
//! The format (NEP 1) is tiny: magic `\x93NUMPY`, version, header length, then a Python dict
//! literal `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }` padded with spaces.

use std::io::{self, Read, Write};

/// The `.npy` magic string.
pub const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// Element types the command line reads from `.npy` files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NpyDtype {
    /// `<f2`, IEEE half precision.
    F16,
    /// `<f4`.
    F32,
    /// `<f8`.
    F64,
}

/// What the header says, already checked: a supported dtype, C order, 1-D or more.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NpyHeader {
    /// Element type (little-endian).
    pub dtype: NpyDtype,
    /// 1 or 2 dimensions.
    pub shape: Vec<usize>,
    /// Byte offset of the first element in the file.
    pub data_offset: u64,
}

/// Reads and checks the header from the start of `r`. Errors are messages for the user
/// (without the file name).
pub fn read_header(r: &mut impl Read) -> Result<NpyHeader, String> {
    let mut fixed = [0u8; 10];
    r.read_exact(&mut fixed)
        .map_err(|_| "not a valid .npy file: too short for a header".to_string())?;
    if &fixed[..6] != MAGIC {
        return Err("not a .npy file (bad magic)".into());
    }
    let major = fixed[6];
    let (len, prefix) = match major {
        1 => (u16::from_le_bytes([fixed[8], fixed[9]]) as usize, 10usize),
        2 | 3 => {
            let mut more = [0u8; 2];
            r.read_exact(&mut more)
                .map_err(|_| "not a valid .npy file: truncated header".to_string())?;
            let len = u32::from_le_bytes([fixed[8], fixed[9], more[0], more[1]]) as usize;
            (len, 12usize)
        }
        v => return Err(format!("unsupported .npy format version {v}")),
    };
    if len > 1 << 20 {
        return Err(format!("not a valid .npy file: header of {len} bytes"));
    }
    let mut text = vec![0u8; len];
    r.read_exact(&mut text)
        .map_err(|_| "not a valid .npy file: truncated header".to_string())?;
    // Version 1 and 2 headers are latin-1, version 3 UTF-8; ours are ASCII either way.
    let text = String::from_utf8_lossy(&text);
    let mut header = parse_header_text(&text)?;
    header.data_offset = (prefix + len) as u64;
    Ok(header)
}

/// Parses and checks the dict literal of a header.
pub fn parse_header_text(text: &str) -> Result<NpyHeader, String> {
    let value = Parser::new(text).parse_all()?;
    let PyValue::Dict(entries) = value else {
        return Err("not a valid .npy file: header is not a dict".into());
    };
    // numpy writes exactly these three keys and refuses a header with others. A key given
    // twice is refused too: numpy's parser keeps the last copy, so taking either one silently
    // could read another shape or order than numpy does.
    for (i, (key, _)) in entries.iter().enumerate() {
        if !["descr", "fortran_order", "shape"].contains(&key.as_str()) {
            return Err(format!(
                "not a valid .npy file: header has the key '{key}' (numpy writes only 'descr', \
                 'fortran_order' and 'shape')"
            ));
        }
        if entries[..i].iter().any(|(k, _)| k == key) {
            return Err(format!("not a valid .npy file: header gives '{key}' twice"));
        }
    }
    let get = |key: &str| {
        entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
            .ok_or_else(|| format!("not a valid .npy file: header has no '{key}'"))
    };
    let dtype = match get("descr")? {
        PyValue::Str(descr) => parse_descr(descr)?,
        PyValue::List(_) | PyValue::Tuple(_) => {
            return Err("structured (record) dtypes are not supported; \
                        klgpu reads float16, float32 and float64 arrays"
                .into());
        }
        _ => return Err("not a valid .npy file: 'descr' is not a string".into()),
    };
    let fortran = match get("fortran_order")? {
        PyValue::Bool(b) => *b,
        _ => return Err("not a valid .npy file: 'fortran_order' is not a bool".into()),
    };
    let shape = match get("shape")? {
        PyValue::Tuple(items) | PyValue::List(items) => items
            .iter()
            .map(|v| match v {
                PyValue::Int(n) => usize::try_from(*n)
                    .map_err(|_| format!("dimension {n} is too large for this machine")),
                _ => Err("not a valid .npy file: 'shape' holds a non-integer".to_string()),
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => return Err("not a valid .npy file: 'shape' is not a tuple".into()),
    };
    if shape.is_empty() {
        return Err("a 0-D array (a scalar) is not a distribution; need 1-D or more".into());
    }
    // A 1-D array has the same bytes in either order; only 2-D and up Fortran order differs.
    if fortran && shape.len() >= 2 {
        return Err("Fortran-order (column-major) arrays are not supported; \
                    save a C-order copy (numpy.ascontiguousarray)"
            .into());
    }
    if shape.contains(&0) {
        return Err(format!(
            "the array is empty (shape {shape:?}): a distribution needs at least one element"
        ));
    }
    Ok(NpyHeader {
        dtype,
        shape,
        data_offset: 0,
    })
}

/// Interprets a numpy type string such as `<f4`.
fn parse_descr(descr: &str) -> Result<NpyDtype, String> {
    let bytes = descr.as_bytes();
    // A type string without a byte-order mark (`f4`, which numpy also reads) is native.
    let (order, rest) = match bytes.first() {
        Some(b'<' | b'>' | b'|' | b'=') => (bytes[0], &descr[1..]),
        _ => (b'=', descr),
    };
    let unsupported = || format!("unsupported dtype '{descr}'");
    let kind = *rest.as_bytes().first().ok_or_else(unsupported)?;
    let digits = rest.get(1..).unwrap_or("");
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(unsupported());
    }
    // Too many digits for a usize is a size no dtype has: report it as the bytes it says.
    let size: usize = digits.parse().unwrap_or(usize::MAX);
    let what = match kind {
        b'f' => None,
        b'i' | b'u' => Some("integer"),
        b'c' => Some("complex"),
        b'b' | b'?' => Some("boolean"),
        _ => Some("non-float"),
    };
    if let Some(what) = what {
        return Err(format!(
            "{what} dtype '{descr}' is not supported; klgpu reads float16, float32 and float64 \
             (convert with arr.astype('float32'))"
        ));
    }
    match order {
        b'<' | b'|' => {}
        b'=' if cfg!(target_endian = "little") => {}
        b'>' | b'=' if size > 1 => {
            return Err(format!(
                "big-endian dtype '{descr}' is not supported; convert with \
                 arr.astype('<f{size}')"
            ));
        }
        _ => return Err(format!("unsupported dtype '{descr}'")),
    }
    match size {
        2 => Ok(NpyDtype::F16),
        4 => Ok(NpyDtype::F32),
        8 => Ok(NpyDtype::F64),
        _ => Err(format!(
            "float dtype '{descr}' ({digits} bytes per element) is not supported; klgpu reads \
             float16, float32 and float64"
        )),
    }
}

/// Writes a 1-D little-endian f64 array in `.npy` format (version 1.0).
pub fn write_f64_1d(w: &mut impl Write, values: &[f64]) -> io::Result<()> {
    let dict = format!(
        "{{'descr': '<f8', 'fortran_order': False, 'shape': ({},), }}",
        values.len()
    );
    // Magic (6) + version (2) + length (2) + dict + padding + '\n', a multiple of 64.
    let unpadded = 10 + dict.len() + 1;
    let total = unpadded.div_ceil(64) * 64;
    let mut header = dict.into_bytes();
    header.resize(total - 10 - 1, b' ');
    header.push(b'\n');
    w.write_all(MAGIC)?;
    w.write_all(&[1, 0])?;
    w.write_all(&(header.len() as u16).to_le_bytes())?;
    w.write_all(&header)?;
    let mut buf = Vec::with_capacity(8 * values.len().min(1 << 16));
    for chunk in values.chunks(1 << 16) {
        buf.clear();
        for v in chunk {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        w.write_all(&buf)?;
    }
    Ok(())
}

/// The subset of Python literals that appear in `.npy` headers.
#[derive(Clone, Debug, PartialEq)]
enum PyValue {
    Str(String),
    Int(u64),
    Bool(bool),
    None,
    Tuple(Vec<PyValue>),
    List(Vec<PyValue>),
    Dict(Vec<(String, PyValue)>),
}

/// A recursive-descent parser for those literals.
struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Self {
        Parser {
            s: text.as_bytes(),
            i: 0,
        }
    }

    fn err(&self, what: &str) -> String {
        format!(
            "not a valid .npy file: cannot parse header ({what} at byte {})",
            self.i
        )
    }

    fn skip_ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.s.get(self.i).copied()
    }

    fn expect(&mut self, c: u8) -> Result<(), String> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(self.err(&format!("expected '{}'", c as char)))
        }
    }

    fn parse_all(mut self) -> Result<PyValue, String> {
        let v = self.value(0)?;
        if self.peek().is_some() {
            return Err(self.err("trailing characters"));
        }
        Ok(v)
    }

    fn value(&mut self, depth: usize) -> Result<PyValue, String> {
        if depth > 16 {
            return Err(self.err("nesting too deep"));
        }
        match self.peek() {
            Some(b'{') => {
                self.i += 1;
                let mut entries = Vec::new();
                loop {
                    if self.peek() == Some(b'}') {
                        self.i += 1;
                        return Ok(PyValue::Dict(entries));
                    }
                    let PyValue::Str(key) = self.value(depth + 1)? else {
                        return Err(self.err("dict key is not a string"));
                    };
                    self.expect(b':')?;
                    let v = self.value(depth + 1)?;
                    entries.push((key, v));
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {}
                        _ => return Err(self.err("expected ',' or '}'")),
                    }
                }
            }
            Some(open @ (b'(' | b'[')) => {
                let close = if open == b'(' { b')' } else { b']' };
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    if self.peek() == Some(close) {
                        self.i += 1;
                        return Ok(if open == b'(' {
                            PyValue::Tuple(items)
                        } else {
                            PyValue::List(items)
                        });
                    }
                    items.push(self.value(depth + 1)?);
                    match self.peek() {
                        Some(b',') => self.i += 1,
                        Some(c) if c == close => {}
                        _ => return Err(self.err("expected ',' or a closing bracket")),
                    }
                }
            }
            Some(q @ (b'\'' | b'"')) => {
                self.i += 1;
                let mut out = Vec::new();
                while let Some(&c) = self.s.get(self.i) {
                    self.i += 1;
                    if c == q {
                        return Ok(PyValue::Str(String::from_utf8_lossy(&out).into_owned()));
                    }
                    if c == b'\\' {
                        let Some(&e) = self.s.get(self.i) else { break };
                        self.i += 1;
                        out.push(e);
                    } else {
                        out.push(c);
                    }
                }
                Err(self.err("unterminated string"))
            }
            Some(c) if c.is_ascii_digit() => {
                let start = self.i;
                while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
                    self.i += 1;
                }
                let digits = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
                let n = digits
                    .parse::<u64>()
                    .map_err(|_| self.err("integer too large"))?;
                // Python 2 wrote long integers with an L suffix.
                if matches!(self.s.get(self.i), Some(b'L' | b'l')) {
                    self.i += 1;
                }
                Ok(PyValue::Int(n))
            }
            Some(_) => {
                for (word, v) in [
                    ("True", PyValue::Bool(true)),
                    ("False", PyValue::Bool(false)),
                    ("None", PyValue::None),
                ] {
                    if self.s[self.i..].starts_with(word.as_bytes()) {
                        self.i += word.len();
                        return Ok(v);
                    }
                }
                Err(self.err("unexpected character"))
            }
            None => Err(self.err("unexpected end")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_bytes(dict: &str) -> Vec<u8> {
        let mut h = dict.as_bytes().to_vec();
        h.push(b'\n');
        let mut out = MAGIC.to_vec();
        out.extend([1, 0]);
        out.extend((h.len() as u16).to_le_bytes());
        out.extend(h);
        out
    }

    #[test]
    fn parses_what_numpy_writes() {
        let bytes = header_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }");
        let h = read_header(&mut &bytes[..]).unwrap();
        assert_eq!(h.dtype, NpyDtype::F32);
        assert_eq!(h.shape, vec![3, 4]);
        assert_eq!(h.data_offset, bytes.len() as u64);
        let h = parse_header_text("{'descr':'<f8','fortran_order':False,'shape':(7,)}").unwrap();
        assert_eq!((h.dtype, h.shape), (NpyDtype::F64, vec![7]));
        let h =
            parse_header_text("{\"shape\": [2, 5L], \"fortran_order\": False, \"descr\": \"<f2\"}")
                .unwrap();
        assert_eq!((h.dtype, h.shape), (NpyDtype::F16, vec![2, 5]));
    }

    #[test]
    fn refuses_with_reasons() {
        let cases = [
            (
                "{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }",
                "integer",
            ),
            (
                "{'descr': '<u1', 'fortran_order': False, 'shape': (3,), }",
                "integer",
            ),
            (
                "{'descr': '<c8', 'fortran_order': False, 'shape': (3,), }",
                "complex",
            ),
            (
                "{'descr': '>f4', 'fortran_order': False, 'shape': (3,), }",
                "big-endian",
            ),
            (
                "{'descr': '<f4', 'fortran_order': True, 'shape': (3, 2), }",
                "Fortran",
            ),
            (
                "{'descr': '<f4', 'fortran_order': True, 'shape': (3, 2, 2), }",
                "Fortran",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (), }",
                "0-D",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 3), }",
                "empty",
            ),
            (
                "{'descr': '<f16', 'fortran_order': False, 'shape': (3,), }",
                "16 bytes per element",
            ),
            (
                "{'descr': '<f2305843009213693953', 'fortran_order': False, 'shape': (3,), }",
                "2305843009213693953 bytes per element",
            ),
            (
                "{'descr': '<f99999999999999999999999', 'fortran_order': False, 'shape': (3,)}",
                "not supported",
            ),
            (
                "{'descr': '<f+4', 'fortran_order': False, 'shape': (3,), }",
                "unsupported",
            ),
            (
                "{'descr': '<f', 'fortran_order': False, 'shape': (3,), }",
                "unsupported",
            ),
            // numpy's parser keeps the last of two copies: either copy could be the wrong one.
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'fortran_order': True}",
                "'fortran_order' twice",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'shape': (4,)}",
                "'shape' twice",
            ),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), 'order': 'C'}",
                "the key 'order'",
            ),
            (
                "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (3,), }",
                "structured",
            ),
            ("{'descr': '<f4', 'shape': (3,), }", "fortran_order"),
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (3,",
                "cannot parse",
            ),
            (
                "{'descr': '<é', 'fortran_order': False, 'shape': (3,), }",
                "unsupported",
            ),
        ];
        for (text, needle) in cases {
            let err = parse_header_text(text).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
        // A type string without a byte-order mark is native, as numpy reads it.
        let h = parse_header_text("{'descr': 'f4', 'fortran_order': False, 'shape': (3,)}");
        assert_eq!(h.map(|h| h.dtype), Ok(NpyDtype::F32));
        // 1-D Fortran order is the same bytes as C order.
        assert!(
            parse_header_text("{'descr': '<f4', 'fortran_order': True, 'shape': (3,), }").is_ok()
        );
        assert!(
            read_header(&mut &b"PK\x03\x04 not npy"[..])
                .unwrap_err()
                .contains("magic")
        );
    }

    #[test]
    fn writes_a_readable_f64_vector() {
        let values = [1.5, f64::INFINITY, -0.25];
        let mut out = Vec::new();
        write_f64_1d(&mut out, &values).unwrap();
        let h = read_header(&mut &out[..]).unwrap();
        assert_eq!(h.data_offset % 64, 0);
        assert_eq!((h.dtype, h.shape.clone()), (NpyDtype::F64, vec![3]));
        let data: Vec<f64> = out[h.data_offset as usize..]
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(data, values);
    }
}
