//! Input files: `.npy` arrays and named safetensors tensors, opened lazily so that inputs
//! larger than memory can be streamed. Opening reads and checks only the header; elements are
//! read later in ranges ([`Source::read_f32`]), converted to f32 on the way.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use crate::error::CliError;
use crate::npy;

/// Element types that can be read (all converted to f32; f64 is rounded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE binary32.
    F32,
    /// IEEE binary64, rounded to f32 when read.
    F64,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F16 | Dtype::BF16 => 2,
            Dtype::F32 => 4,
            Dtype::F64 => 8,
        }
    }
}

/// A block's elements as read: f32, or 16-bit values kept as stored (their bits), which the
/// GPU reads at 2 bytes per element and widens itself.
#[derive(Debug)]
pub enum Values {
    /// f32 (also f64 inputs, rounded, and 16-bit ones widened on the host).
    F32(Vec<f32>),
    /// f16 or bf16 bits, little-endian order taken care of.
    Half(Vec<u16>, klgpu::Dtype),
}

impl Values {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::Half(v, _) => v.len(),
        }
    }
}

/// Which safetensors tensor to take from a file.
#[derive(Clone, Debug, Default)]
pub struct TensorChoice {
    /// The tensor's name, if one was given.
    pub name: Option<String>,
    /// Which option gave it (`--tensor` or `--tensor-q`), for messages; `None` when the name
    /// was only inherited (Q falls back to `--tensor`) and so does not apply to `.npy` files.
    pub flag: Option<&'static str>,
}

/// An opened input: where its elements are, their type and its shape.
#[derive(Debug)]
pub struct Source {
    /// How the input is named in messages: the path as given, plus `[tensor]` for safetensors.
    pub label: String,
    file: File,
    data_offset: u64,
    dtype: Dtype,
    /// 1 or 2 dimensions, none zero.
    pub shape: Vec<usize>,
    /// Reused buffer for raw bytes.
    scratch: Vec<u8>,
    /// The nonzero f64 elements of the last `read_f32` that f32 rounds to ±0, in order: their
    /// index in the read and the file's value (`stream::Reader::mark_underflows` decides).
    pub underflows: Vec<Beyond>,
    /// The file's length and modification time when it was opened: a read that finds them
    /// changed fails, so that a file rewritten while klgpu reads it (blocks, and long rows
    /// twice) is not taken as a mix of two versions.
    stamp: Stamp,
}

impl Source {
    /// Whether `other` reads the same bytes as this source: the same file (opened as `path`
    /// and `other_path`), at the same offset.
    pub fn same_data(&self, other: &Source, path: &Path, other_path: &Path) -> bool {
        self.data_offset == other.data_offset && crate::output::same_file(path, other_path)
    }

    /// The file's [`Stamp`] when it was opened.
    pub fn stamp(&self) -> Stamp {
        self.stamp
    }
}

/// A file's length and modification time: a file that changed between two reads has another.
pub type Stamp = (u64, Option<std::time::SystemTime>);

fn stamp(meta: &std::fs::Metadata) -> Stamp {
    (meta.len(), meta.modified().ok())
}

/// Bytes converted per read call: bounds the scratch buffer whatever the block size.
const READ_CHUNK: usize = 4 << 20;

/// Most bytes of a safetensors JSON header (the safetensors crate's own limit).
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

impl Source {
    /// Opens `path` as `.npy` (recognised by its magic) or else as safetensors, and checks its
    /// header. Every error names the file and is "bad input" (exit code 2).
    pub fn open(path: &Path, tensor: &TensorChoice) -> Result<Source, CliError> {
        let shown = path.display().to_string();
        let fail = |msg: String| CliError::input(format!("{shown}: {msg}"));
        if path.as_os_str() == "-" {
            return Err(fail(
                "klgpu does not read standard input: it reads its inputs by position, block by \
                 block and long rows twice, so save the data to a file first"
                    .into(),
            ));
        }
        if path.is_dir() {
            return Err(fail("is a directory, not a file".into()));
        }
        // Checked before opening: opening a FIFO blocks until something writes to it.
        let not_regular = || {
            // A pipe (`<(zcat p.npy.gz)`) would fail later with "Illegal seek".
            fail(
                "is not a regular file (a pipe or a device): klgpu reads its inputs by position, \
                 block by block and long rows twice, so save the data to a file first"
                    .into(),
            )
        };
        if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
            return Err(not_regular());
        }
        let mut file = File::open(path).map_err(|e| fail(format!("cannot open: {e}")))?;
        let meta = file
            .metadata()
            .map_err(|e| fail(format!("cannot read: {e}")))?;
        if !meta.is_file() {
            return Err(not_regular());
        }
        let file_len = meta.len();
        let mut magic = [0u8; 6];
        let n = read_up_to(&mut file, &mut magic).map_err(|e| fail(format!("cannot read: {e}")))?;
        file.seek(SeekFrom::Start(0))
            .map_err(|e| fail(format!("cannot read: {e}")))?;
        let (label, dtype, shape, data_offset) = if n == 6 && &magic == npy::MAGIC {
            if let (Some(_), Some(flag)) = (&tensor.name, tensor.flag) {
                return Err(fail(format!(
                    "{flag} applies to safetensors files, and this is a .npy file"
                )));
            }
            let header = npy::read_header(&mut file).map_err(fail)?;
            let dtype = match header.dtype {
                npy::NpyDtype::F16 => Dtype::F16,
                npy::NpyDtype::F32 => Dtype::F32,
                npy::NpyDtype::F64 => Dtype::F64,
            };
            (shown.clone(), dtype, header.shape, header.data_offset)
        } else {
            let inherited = tensor.name.is_some() && tensor.flag.is_none();
            let (name, dtype, shape, offset) =
                open_safetensors(&mut file, file_len, tensor.name.as_deref())
                    .map_err(|e| match e.starts_with("no tensor named") && inherited {
                        true => {
                            format!("{e} (Q takes --tensor's name unless --tensor-q names its own)")
                        }
                        false => e,
                    })
                    .map_err(fail)?;
            (format!("{shown}[{name}]"), dtype, shape, offset)
        };
        let elems = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| fail(format!("shape {shape:?} is too large")))?;
        let need = (elems as u64)
            .checked_mul(dtype.size() as u64)
            .and_then(|b| b.checked_add(data_offset))
            .ok_or_else(|| fail(format!("shape {shape:?} is too large")))?;
        if file_len < need {
            return Err(fail(format!(
                "file is truncated: shape {shape:?} needs {need} bytes, the file has {file_len}"
            )));
        }
        Ok(Source {
            label,
            file,
            data_offset,
            dtype,
            shape,
            scratch: Vec::new(),
            underflows: Vec::new(),
            stamp: stamp(&meta),
        })
    }

    /// The library's type for this input's elements, if it is one the GPU reads as stored
    /// (f16 and bf16; f32 is read as f32 anyway).
    pub fn half_dtype(&self) -> Option<klgpu::Dtype> {
        match self.dtype {
            Dtype::F16 => Some(klgpu::Dtype::F16),
            Dtype::BF16 => Some(klgpu::Dtype::BF16),
            Dtype::F32 | Dtype::F64 => None,
        }
    }

    /// Reads 16-bit elements `start .. start + count` into `out` (replacing its contents) as
    /// they are stored, for an input whose [`Source::half_dtype`] is `Some`.
    pub fn read_half(
        &mut self,
        start: usize,
        count: usize,
        out: &mut Vec<u16>,
    ) -> Result<(), CliError> {
        out.clear();
        out.resize(count, 0);
        let offset = self.data_offset + (start as u64) * 2;
        let fail = |e| read_failed(&self.label, e, start);
        self.file.seek(SeekFrom::Start(offset)).map_err(fail)?;
        self.file
            .read_exact(bytemuck::cast_slice_mut(&mut out[..]))
            .map_err(fail)?;
        // The file is little-endian; on a big-endian host the bits are swapped into place.
        if cfg!(target_endian = "big") {
            out.iter_mut().for_each(|b| *b = u16::from_le(*b));
        }
        self.unchanged(start)
    }

    /// Ok if the file still has the length and modification time it had when opened.
    fn unchanged(&self, start: usize) -> Result<(), CliError> {
        let now = self
            .file
            .metadata()
            .map_err(|e| read_failed(&self.label, e, start))?;
        if stamp(&now) != self.stamp {
            return Err(CliError::input(format!(
                "{}: the file changed while klgpu read it (noticed reading the elements from \
                 index {start} on): its values would mix two versions; run again once it is \
                 written",
                self.label
            )));
        }
        Ok(())
    }

    /// Reads elements `start .. start + count` into `out` (replacing its contents) as f32.
    /// An f64 beyond f32's range is read as NaN, which every input kind rejects, and the
    /// first such element comes back as `(index in out, value)`: so it is flagged in its
    /// place in element order, like any invalid value, and named as the file holds it
    /// ([`crate::error::Origin`]). (Failing the read instead named it ahead of invalid values
    /// earlier in the same block, so the error depended on the block size.)
    pub fn read_f32(
        &mut self,
        start: usize,
        count: usize,
        out: &mut Vec<f32>,
    ) -> Result<Option<Beyond>, CliError> {
        out.clear();
        out.reserve_exact(count);
        self.underflows.clear();
        let size = self.dtype.size();
        let offset = self.data_offset + (start as u64) * (size as u64);
        let fail = |e| read_failed(&self.label, e, start);
        self.file.seek(SeekFrom::Start(offset)).map_err(fail)?;
        let per_chunk = (READ_CHUNK / size).max(1);
        let mut left = count;
        let mut first_beyond = None;
        while left > 0 {
            let n = left.min(per_chunk);
            self.scratch.resize(n * size, 0);
            self.file.read_exact(&mut self.scratch).map_err(fail)?;
            let done = count - left;
            let beyond = convert(self.dtype, &self.scratch, out, &mut self.underflows);
            first_beyond = first_beyond.or(beyond.map(|(i, value)| (done + i, value)));
            left -= n;
        }
        self.unchanged(start)?;
        Ok(first_beyond)
    }
}

/// The first element of a read whose f64 value is beyond f32's range: its index in the read
/// and the value in the file.
pub type Beyond = (usize, f64);

/// The error of a failed read of elements from `start` on. The header was checked against the
/// file's length at open, so a file that ends early has changed since.
fn read_failed(label: &str, e: std::io::Error, start: usize) -> CliError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        CliError::input(format!(
            "{label}: the file ends before the elements from index {start} on, which its header \
             promised when klgpu opened it: was it changed while klgpu read it?"
        ))
    } else {
        CliError::input(format!("{label}: read failed at element {start}: {e}"))
    }
}

/// Elements per batch of `convert_halves`.
const HALF_BATCH: usize = 1024;

/// Appends the little-endian elements in `raw` to `out` as f32. An f64 that is finite but
/// would round to ±∞ (reported as "infinite", a value the file does not hold) is appended as
/// NaN instead; the first one's position in `raw` and value come back. Nonzero f64 values
/// below f32's smallest subnormal become ±0, as in any f32 conversion, and are listed in
/// `underflows` by their index in `out`.
fn convert(
    dtype: Dtype,
    raw: &[u8],
    out: &mut Vec<f32>,
    underflows: &mut Vec<Beyond>,
) -> Option<Beyond> {
    let mut first_beyond = None;
    match dtype {
        Dtype::F32 => out.extend(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        Dtype::F64 => {
            for (i, c) in raw.chunks_exact(8).enumerate() {
                let v = f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
                let x = v as f32;
                if x.is_infinite() && v.is_finite() {
                    first_beyond = first_beyond.or(Some((i, v)));
                    out.push(f32::NAN);
                } else if x == 0.0 && v != 0.0 {
                    underflows.push((out.len(), v));
                    out.push(x);
                } else {
                    out.push(x);
                }
            }
        }
        Dtype::F16 => convert_halves(raw, out, |bits, dst| {
            bits.reinterpret_cast::<half::f16>()
                .convert_to_f32_slice(dst)
        }),
        Dtype::BF16 => convert_halves(raw, out, |bits, dst| {
            bits.reinterpret_cast::<half::bf16>()
                .convert_to_f32_slice(dst)
        }),
    }
    first_beyond
}

/// Appends little-endian f16 or bf16 elements as f32 by half's slice conversion (`to_f32`),
/// which uses the CPU's own instructions (x86's F16C, found at run time) eight at a time.
/// Element by element, half looks for them on every call: f16 files read 4.1× slower
/// (0.64 against 2.6 G elements/s from the page cache), the bottleneck in front of a fast GPU.
/// The bits pass through an aligned buffer in the host's byte order.
fn convert_halves(raw: &[u8], out: &mut Vec<f32>, to_f32: impl Fn(&[u16], &mut [f32])) {
    let mut bits = [0u16; HALF_BATCH];
    for batch in raw.chunks(2 * HALF_BATCH) {
        let n = batch.len() / 2;
        for (b, c) in bits.iter_mut().zip(batch.chunks_exact(2)) {
            *b = u16::from_le_bytes([c[0], c[1]]);
        }
        let start = out.len();
        out.resize(start + n, 0.0);
        to_f32(&bits[..n], &mut out[start..]);
    }
}

/// Formats people save arrays in that klgpu does not read, told by their first bytes, so that
/// a file that is not safetensors either gets an error saying what it is rather than "header
/// length 193340853072 does not fit the file".
fn foreign_format(magic: &[u8]) -> Option<&'static str> {
    if magic.starts_with(b"PK\x03\x04") {
        Some("a zip archive (an .npz, or a PyTorch .pt or .bin file)")
    } else if magic.len() >= 2 && magic[0] == 0x80 && (2..=5).contains(&magic[1]) {
        Some("a Python pickle (an older PyTorch .pt file?)")
    } else {
        None
    }
}

/// Reads as many bytes as are there, up to `buf.len()`.
fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// The first top-level key a JSON object gives twice, if any: serde (and so the safetensors
/// crate) keeps the last copy, and either could be the tensor the writer meant (the .npy
/// reader refuses a repeated key for the same reason).
struct FirstRepeatedKey(Option<String>);

impl<'de> serde::Deserialize<'de> for FirstRepeatedKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = FirstRepeatedKey;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<FirstRepeatedKey, A::Error> {
                let mut seen = std::collections::HashSet::new();
                let mut repeated = None;
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    if repeated.is_none() && !seen.insert(key.clone()) {
                        repeated = Some(key);
                    }
                }
                Ok(FirstRepeatedKey(repeated))
            }
        }
        d.deserialize_map(Keys)
    }
}

/// Names the first tensor (by name) whose shape and dtype do not fill its data_offsets, as
/// " (tensor 'p': …)", for the safetensors crate's error, which names none; else "".
fn mismatched_tensor(header: &[u8]) -> String {
    let Ok(entries) =
        serde_json::from_slice::<std::collections::BTreeMap<String, serde_json::Value>>(header)
    else {
        return String::new();
    };
    for (name, entry) in entries {
        let Ok(info) = serde_json::from_value::<safetensors::tensor::TensorInfo>(entry) else {
            continue;
        };
        let (start, end) = info.data_offsets;
        let bits = info
            .shape
            .iter()
            .try_fold(info.dtype.bitsize(), |n, &d| n.checked_mul(d));
        let needed = bits.map(|b| b.div_ceil(8));
        if end < start || needed != Some(end - start) {
            let needs =
                needed.map_or_else(|| "more bytes than exist".into(), |n| format!("{n} bytes"));
            return format!(
                " (tensor '{name}': shape {:?} of {:?} needs {needs}, its data_offsets [{start}, \
                 {end}] hold {})",
                info.shape,
                info.dtype,
                end.saturating_sub(start)
            );
        }
    }
    String::new()
}

/// Parses a safetensors header (with the `safetensors` crate, reading only the header bytes)
/// and picks a tensor: the one named, or the only one. Returns its name, dtype, shape and the
/// file offset of its data.
fn open_safetensors(
    file: &mut File,
    file_len: u64,
    wanted: Option<&str>,
) -> Result<(String, Dtype, Vec<usize>, u64), String> {
    let mut len_bytes = [0u8; 8];
    let got = read_up_to(file, &mut len_bytes).map_err(|e| format!("cannot read: {e}"))?;
    // Only once the file fails as safetensors: a safetensors header of 640 bytes starts with
    // the bytes a pickle does.
    let not_ours = |why: String| match foreign_format(&len_bytes[..got]) {
        Some(what) => format!(
            "is {what}, not a .npy or safetensors file: save each array with numpy.save, or the \
             tensors with safetensors' save_file"
        ),
        None => format!("not a .npy file, nor a safetensors file ({why})"),
    };
    if got < 8 {
        return Err(not_ours("too short".into()));
    }
    let n = u64::from_le_bytes(len_bytes);
    if n > MAX_SAFETENSORS_HEADER || n.saturating_add(8) > file_len {
        return Err(not_ours(format!("header length {n} does not fit the file")));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)
        .map_err(|e| format!("cannot read: {e}"))?;
    // A JSON object first: what fails here is not a safetensors file at all.
    let repeated = serde_json::from_slice::<FirstRepeatedKey>(&header)
        .map_err(|e| not_ours(format!("bad header: {e}")))?;
    if let Some(key) = repeated.0 {
        return Err(format!("safetensors header gives '{key}' twice"));
    }
    let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&header)
        .map_err(|e| format!("bad safetensors header: {e}{}", mismatched_tensor(&header)))?;
    let data_start = 8 + n;
    // Offsets near 2^64 (which the safetensors crate takes, tensors being contiguous) must not
    // wrap to the header's own bytes.
    let data_end = data_start.checked_add(metadata.data_len() as u64);
    if data_end.is_none_or(|end| end > file_len) {
        return Err(format!(
            "safetensors file is truncated: its header describes {} bytes of data, the file \
             has {}",
            metadata.data_len(),
            file_len - data_start
        ));
    }
    let mut names = metadata.offset_keys();
    names.sort();
    let list = |names: &[String]| {
        let shown: Vec<&str> = names.iter().take(20).map(String::as_str).collect();
        let more = if names.len() > 20 { ", …" } else { "" };
        format!("{}{more}", shown.join(", "))
    };
    let name = match wanted {
        Some(w) => {
            if metadata.info(w).is_none() {
                return Err(format!(
                    "no tensor named '{w}'; the file holds: {}",
                    list(&names)
                ));
            }
            w.to_string()
        }
        None => match names.as_slice() {
            [only] => only.clone(),
            [] => return Err("the safetensors file holds no tensors".into()),
            _ => {
                return Err(format!(
                    "the file holds {} tensors ({}): choose one with --tensor",
                    names.len(),
                    list(&names)
                ));
            }
        },
    };
    let info = metadata
        .info(&name)
        .ok_or_else(|| format!("no tensor named '{name}'"))?;
    let dtype = match info.dtype {
        safetensors::Dtype::F32 => Dtype::F32,
        safetensors::Dtype::F64 => Dtype::F64,
        safetensors::Dtype::F16 => Dtype::F16,
        safetensors::Dtype::BF16 => Dtype::BF16,
        other => {
            return Err(format!(
                "tensor '{name}' has dtype {other:?}; klgpu reads F16, BF16, F32 and F64"
            ));
        }
    };
    let shape = info.shape.clone();
    if shape.is_empty() {
        return Err(format!("tensor '{name}' is a 0-D scalar; need 1-D or more"));
    }
    if shape.contains(&0) {
        return Err(format!(
            "tensor '{name}' is empty (shape {shape:?}): a distribution needs at least one \
             element"
        ));
    }
    Ok((name, dtype, shape, data_start + info.data_offsets.0 as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_every_dtype() {
        let mut out = Vec::new();
        assert_eq!(
            convert(Dtype::F64, &0.1f64.to_le_bytes(), &mut out, &mut Vec::new()),
            None
        );
        convert(
            Dtype::F16,
            &half::f16::from_f32(0.5).to_le_bytes(),
            &mut out,
            &mut Vec::new(),
        );
        convert(
            Dtype::BF16,
            &half::bf16::from_f32(-2.0).to_le_bytes(),
            &mut out,
            &mut Vec::new(),
        );
        convert(
            Dtype::F32,
            &f32::NAN.to_le_bytes(),
            &mut out,
            &mut Vec::new(),
        );
        assert_eq!(out[..3], [0.1f32, 0.5, -2.0]);
        assert!(out[3].is_nan());
    }

    #[test]
    fn halves_convert_bit_for_bit_as_one_at_a_time() {
        // Every f16 and bf16 bit pattern, from an odd byte offset (raw reads need not be
        // aligned) and in a length that ends mid-batch, against half's own element conversion.
        let all: Vec<u16> = (0..=u16::MAX).chain(0..100).collect();
        let mut raw = vec![0xAB];
        raw.extend(all.iter().flat_map(|b| b.to_le_bytes()));
        for dtype in [Dtype::F16, Dtype::BF16] {
            let mut out = vec![7.0];
            assert_eq!(convert(dtype, &raw[1..], &mut out, &mut Vec::new()), None);
            assert_eq!(out.len(), all.len() + 1, "{dtype:?}");
            assert_eq!(out[0], 7.0, "{dtype:?}: what was there stays");
            for (&b, &got) in all.iter().zip(&out[1..]) {
                let want = match dtype {
                    Dtype::F16 => half::f16::from_bits(b).to_f32(),
                    _ => half::bf16::from_bits(b).to_f32(),
                };
                let same = got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan());
                assert!(same, "{dtype:?} bits {b:#06x}: got {got:e}, want {want:e}");
            }
        }
    }

    #[test]
    fn finds_f64_values_beyond_f32() {
        let raw: Vec<u8> = [1.0f64, f64::INFINITY, 3.4e38, 3.5e38, -1e300]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        // ±∞ in the file is the file's own (reported as infinite later); 3.4e38 rounds to
        // f32::MAX; 3.5e38 and -1e300 would read ±∞: they read NaN, and the first is named.
        let mut out = Vec::new();
        assert_eq!(
            convert(Dtype::F64, &raw, &mut out, &mut Vec::new()),
            Some((3, 3.5e38))
        );
        assert_eq!(out[..3], [1.0, f32::INFINITY, 3.4e38]);
        assert!(out[3..].iter().all(|x| x.is_nan()), "{out:?}");
        out.clear();
        assert_eq!(
            convert(Dtype::F64, &raw[..24], &mut out, &mut Vec::new()),
            None
        );
        assert_eq!(out, [1.0, f32::INFINITY, 3.4e38]);
        // Nonzero values f32 rounds to ±0 are listed by their index in `out`; an f32 subnormal
        // and zeros are not.
        let values = [1e-50, 0.0, 1e-40, -1e-60, -0.0, 0.5];
        let raw: Vec<u8> = values.iter().flat_map(|v: &f64| v.to_le_bytes()).collect();
        let mut underflows = Vec::new();
        out.clear();
        out.push(7.0);
        assert_eq!(convert(Dtype::F64, &raw, &mut out, &mut underflows), None);
        assert_eq!(underflows, [(1, 1e-50), (4, -1e-60)]);
        assert_eq!(out[1..], [0.0, 0.0, 1e-40, -0.0, -0.0, 0.5]);
    }

    /// A seeded stream of small pseudo-random numbers (xorshift64*), so that the mutations
    /// below are the same on every run.
    struct Mutator(u64);

    impl Mutator {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n.max(1)
        }

        /// One damage to `file` near its header: a cut, bytes overwritten, characters that
        /// matter to the header's syntax inserted, bytes deleted, or bytes appended.
        fn damage(&mut self, file: &mut Vec<u8>) {
            let header = file.len().min(160);
            let at = self.below(header);
            match self.below(5) {
                0 => file.truncate(self.below(file.len() + 1)),
                1 => {
                    for _ in 0..1 + self.below(3) {
                        let i = self.below(header);
                        file[i] = self.below(256) as u8;
                    }
                }
                2 => {
                    const SYNTAX: &[u8] = b"(),:'{}[]\" 0123456789-eLx\n\x00";
                    let c = SYNTAX[self.below(SYNTAX.len())];
                    let n = 1 + self.below(4);
                    file.splice(at..at, std::iter::repeat_n(c, n));
                }
                3 => {
                    let end = (at + 1 + self.below(5)).min(file.len());
                    file.drain(at..end);
                }
                _ => file.extend((0..1 + self.below(8)).map(|i| i as u8)),
            }
        }
    }

    fn npy_file(dict: &str, data: &[u8]) -> Vec<u8> {
        let mut text = dict.to_string();
        while !(10 + text.len() + 1).is_multiple_of(64) {
            text.push(' ');
        }
        text.push('\n');
        let mut file = npy::MAGIC.to_vec();
        file.extend([1u8, 0]);
        file.extend((text.len() as u16).to_le_bytes());
        file.extend(text.as_bytes());
        file.extend(data);
        file
    }

    fn safetensors_file(header: &str, data: &[u8]) -> Vec<u8> {
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend(header.as_bytes());
        file.extend(data);
        file
    }

    #[test]
    fn safetensors_offsets_that_wrap_and_repeated_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let open = |file: &[u8]| {
            std::fs::write(&path, file).unwrap();
            Source::open(
                &path,
                &TensorChoice {
                    name: Some("p".into()),
                    flag: Some("--tensor"),
                },
            )
            .map(|s| s.shape)
        };
        // Contiguous filler tensors carry p's offset to 2^64 − (8 + header length), which the
        // data's start wrapped back to 0: the file's own bytes were read as p (exit 0).
        let header_len = 1024u64;
        let target = 0u64.wrapping_sub(8 + header_len);
        let mut entries = Vec::new();
        let mut at = 0u64;
        while at < target {
            let len = ((1u64 << 61) - 1).min(target - at);
            entries.push(format!(
                r#""pad{}":{{"dtype":"U8","shape":[{len}],"data_offsets":[{at},{}]}}"#,
                entries.len(),
                at + len
            ));
            at += len;
        }
        entries.push(format!(
            r#""p":{{"dtype":"F32","shape":[3],"data_offsets":[{target},{}]}}"#,
            target + 12
        ));
        let header = format!("{{{}}}", entries.join(","));
        let header = format!("{header:<width$}", width = header_len as usize);
        let err = open(&safetensors_file(&header, &[0; 12])).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        // A tensor named twice: the crate keeps the last copy, here 6 f16 for 3 f32.
        let header = r#"{"p":{"dtype":"F32","shape":[3],"data_offsets":[0,12]},"p":{"dtype":"F16","shape":[6],"data_offsets":[0,12]}}"#;
        let err = open(&safetensors_file(header, &[0; 12])).unwrap_err();
        assert!(err.to_string().contains("gives 'p' twice"), "{err}");
        // Named once, the same file opens.
        let header = r#"{"p":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}"#;
        assert_eq!(open(&safetensors_file(header, &[0; 12])).unwrap(), [3]);
        // A JSON object that is no safetensors header is called a bad one, not another format.
        let header = r#"{"p":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}"#;
        let err = open(&safetensors_file(header, &[0; 12])).unwrap_err();
        assert!(
            err.to_string().contains("bad safetensors header: ")
                && err.to_string().contains(
                    "(tensor 'p': shape [4] of F32 needs 16 bytes, its data_offsets [0, 12] hold 12)"
                ),
            "{err}"
        );
    }

    #[test]
    fn a_file_changed_between_reads_is_an_error() {
        // A long row is read twice (its sums, then its pieces): a file rewritten in between
        // gave values from two versions.
        let data: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.npy");
        std::fs::write(
            &path,
            npy_file(
                "{'descr': '<f4', 'fortran_order': False, 'shape': (6,), }",
                &data,
            ),
        )
        .unwrap();
        let mut source = Source::open(&path, &TensorChoice::default()).unwrap();
        let mut out = Vec::new();
        source.read_f32(0, 6, &mut out).unwrap();
        assert_eq!(out, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        // Rewritten in place, same length; the time set apart from the first in case the
        // file system's clock is coarse.
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let then = file.metadata().unwrap().modified().unwrap();
        file.set_modified(then + std::time::Duration::from_secs(2))
            .unwrap();
        let err = source.read_f32(2, 4, &mut out).unwrap_err().to_string();
        assert!(
            err.contains("p.npy: the file changed while klgpu read it") && err.contains("index 2"),
            "{err}"
        );
    }

    #[test]
    fn safetensors_that_start_like_a_pickle_still_open() {
        // A header of 640 bytes: the file starts 0x80 0x02, as a pickle of protocol 2 does.
        let json = r#"{"p":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}"#;
        let file = safetensors_file(&format!("{json:<640}"), &[0; 12]);
        assert_eq!(file[..2], [0x80, 0x02]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        std::fs::write(&path, &file).unwrap();
        let source = Source::open(&path, &TensorChoice::default()).unwrap();
        assert_eq!(source.shape, [3]);
        // Damaged so that it is not safetensors either, it is called what it looks like.
        std::fs::write(&path, &file[..100]).unwrap();
        let err = Source::open(&path, &TensorChoice::default()).unwrap_err();
        assert!(err.to_string().contains("pickle"), "{err}");
    }

    #[test]
    fn damaged_headers_are_refused_or_read_never_a_panic() {
        let data: Vec<u8> = (0..24)
            .flat_map(|i| (i as f32 / 24.0).to_le_bytes())
            .collect();
        let valid = [
            npy_file(
                "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 6), }",
                &data,
            ),
            npy_file(
                "{'descr': '<f2', 'fortran_order': False, 'shape': (48,), }",
                &data,
            ),
            safetensors_file(
                r#"{"p":{"dtype":"F32","shape":[4,6],"data_offsets":[0,96]}}"#,
                &data,
            ),
            safetensors_file(
                r#"{"__metadata__":{"a":"b"},"p":{"dtype":"BF16","shape":[2,12],"data_offsets":[0,48]},"q":{"dtype":"F64","shape":[6],"data_offsets":[48,96]}}"#,
                &data,
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("input");
        let mut mutator = Mutator(0x9e37_79b9_7f4a_7c15);
        let (mut opened, mut refused) = (0, 0);
        for trial in 0..4000 {
            let mut file = valid[trial % valid.len()].clone();
            for _ in 0..1 + mutator.below(2) {
                mutator.damage(&mut file);
            }
            std::fs::write(&path, &file).unwrap();
            let choice = TensorChoice {
                name: trial.is_multiple_of(3).then(|| "p".to_string()),
                flag: None,
            };
            match Source::open(&path, &choice) {
                Ok(mut source) => {
                    // What opened must lie inside the file, and read whole.
                    let elems: usize = source.shape.iter().product();
                    let end = source.data_offset + (elems * source.dtype.size()) as u64;
                    assert!(end <= file.len() as u64, "trial {trial}: {source:?}");
                    let mut out = Vec::new();
                    if source.read_f32(0, elems, &mut out).is_ok() {
                        assert_eq!(out.len(), elems);
                    }
                    opened += 1;
                }
                Err(e) => {
                    assert_eq!(e.code, crate::error::EXIT_INPUT, "{}", e.message);
                    assert!(
                        e.message.starts_with(path.to_str().unwrap()),
                        "{}",
                        e.message
                    );
                    refused += 1;
                }
            }
        }
        // Both outcomes occur, so the damage is neither always fatal nor always harmless.
        assert!(
            opened > 400 && refused > 400,
            "opened {opened}, refused {refused}"
        );
    }
}
