//! What a run prints: the human-readable report, the `--json` object, and the `--out` file
//! (written to a temporary file beside the target and renamed into place only on success).

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use klgpu::{Input, Measure};
use serde_json::{Value, json};

use crate::error::CliError;
use crate::npy;
use klgpu::stats::Summary;

/// The adapter that computed the results, as reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterDesc {
    /// Adapter name (`cpu-reference` for `--backend cpu`).
    pub name: String,
    /// wgpu backend (`Vulkan`, `Metal`, …; `cpu` for the reference).
    pub backend: String,
    /// wgpu device type (`DiscreteGpu`, `Cpu`, …; `cpu` for the reference).
    pub device_type: String,
}

impl AdapterDesc {
    /// From wgpu's adapter info.
    pub fn from_info(info: &klgpu::wgpu::AdapterInfo) -> Self {
        AdapterDesc {
            name: info.name.clone(),
            backend: format!("{:?}", info.backend),
            device_type: format!("{:?}", info.device_type),
        }
    }

    /// The f64 CPU reference.
    pub fn cpu_reference() -> Self {
        AdapterDesc {
            name: "cpu-reference".into(),
            backend: "cpu".into(),
            device_type: "cpu".into(),
        }
    }

    /// As a JSON object.
    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "backend": self.backend,
            "device_type": self.device_type,
        })
    }
}

/// Everything one measure run reports.
#[derive(Clone, Debug)]
pub struct Report {
    /// What was computed.
    pub measure: Measure,
    /// How the inputs were read.
    pub input: Input,
    /// Log base as given on the command line (`e`, `2`, `10`).
    pub base: &'static str,
    /// Unit name of the base (`nats`, `bits`, `hartleys`).
    pub unit: &'static str,
    /// Rows (1 for a 1-D input).
    pub rows: usize,
    /// Elements per row.
    pub cols: usize,
    /// Whether the input was 1-D.
    pub one_d: bool,
    /// Reduction as given (`none`, `sum`, `mean-rows`).
    pub reduction: &'static str,
    /// The 1-D result, or the reduced result of rows (`None` for reduction none).
    pub value: Option<f64>,
    /// Statistics of the per-row values (2-D and N-D inputs only).
    pub summary: Option<Summary>,
    /// Whether top-1 agreement applies (logits): then `top1` is reported, possibly as null.
    pub top1_applies: bool,
    /// Fraction of rows whose arg-max agrees, with its standard error.
    pub top1: Option<(f64, Option<f64>)>,
    /// Who computed it.
    pub adapter: AdapterDesc,
    /// Seconds spent reading and computing (device setup excluded).
    pub elapsed_s: f64,
    /// P's name in messages.
    pub p_label: String,
    /// Q's name, for two-input measures.
    pub q_label: Option<String>,
    /// Where per-row values were written.
    pub out: Option<PathBuf>,
}

/// A number for JSON: finite values as numbers, ±∞ and NaN as the strings `"inf"`, `"-inf"`,
/// `"nan"` (JSON has no such numbers).
pub fn num(x: f64) -> Value {
    if x.is_nan() {
        Value::from("nan")
    } else if x == f64::INFINITY {
        Value::from("inf")
    } else if x == f64::NEG_INFINITY {
        Value::from("-inf")
    } else {
        Value::from(x)
    }
}

/// [`num`] of an optional value, `null` when absent.
pub fn opt_num(x: Option<f64>) -> Value {
    x.map_or(Value::Null, num)
}

/// A number for people: ten significant digits, exponent notation when very small or large.
pub fn fmt_num(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.into();
    }
    if x == 0.0 {
        return "0".into();
    }
    let mag = x.abs().log10().floor() as i32;
    if (-4..7).contains(&mag) {
        let decimals = (9 - mag).max(0) as usize;
        format!("{x:.decimals$}")
    } else {
        format!("{x:.9e}")
    }
}

/// How a measure is written in formulas.
pub fn formula(measure: Measure) -> &'static str {
    match measure {
        Measure::KullbackLeibler => "KL(P‖Q)",
        Measure::CrossEntropy => "H(P,Q)",
        Measure::Entropy => "H(P)",
        Measure::JensenShannon => "JS(P,Q)",
        // Measure is non_exhaustive: a later one is written by name until it has a formula.
        other => other.name(),
    }
}

impl Report {
    /// The `--json` object: always the same top-level keys (`summary` is null for 1-D input;
    /// its `top1_*` keys appear where agreement applies).
    pub fn to_json(&self) -> Value {
        let summary = self.summary.as_ref().map_or(Value::Null, |s| {
            let mut obj = json!({
                "mean": num(s.mean),
                "stderr": opt_num(s.stderr),
                "median": num(s.median),
                "p90": num(s.p90),
                "p95": num(s.p95),
                "p99": num(s.p99),
                "p99_9": num(s.p99_9),
                "p10": num(s.p10),
                "p5": num(s.p5),
                "p1": num(s.p1),
                "p0_1": num(s.p0_1),
                "min": num(s.min),
                "max": num(s.max),
                "infinite_rows": s.infinite,
                "first_infinite_row": s.first_infinite,
            });
            if self.top1_applies {
                obj["top1_agreement"] = opt_num(self.top1.map(|t| t.0));
                obj["top1_agreement_stderr"] = opt_num(self.top1.and_then(|t| t.1));
            }
            obj
        });
        json!({
            "measure": self.measure.name(),
            "input": self.input.name(),
            "base": self.base,
            "rows": self.rows,
            "cols": self.cols,
            "reduction": self.reduction,
            "value": opt_num(self.value),
            "summary": summary,
            "adapter": self.adapter.to_json(),
            "elapsed_s": self.elapsed_s,
        })
    }

    /// The human-readable report.
    pub fn human(&self) -> String {
        let mut s = String::new();
        let f = formula(self.measure);
        let shape = if self.one_d {
            format!("1-D, {} {}", self.cols, self.input.name())
        } else {
            let rows = if self.rows == 1 { "row" } else { "rows" };
            format!("{} {rows} × {} {}", self.rows, self.cols, self.input.name())
        };
        if self.one_d {
            let v = self.value.map_or_else(|| "-".into(), fmt_num);
            s += &format!("{f} = {v} {}\n", self.unit);
        } else {
            s += &format!("{f} per row, in {}\n", self.unit);
        }
        s += &format!("  P: {}\n", self.p_label);
        if let Some(q) = &self.q_label {
            s += &format!("  Q: {q}\n");
        }
        s += &format!("  input: {shape}\n");
        if let Some(sum) = &self.summary {
            if let Some(v) = self.value {
                let what = if self.reduction == "sum" {
                    "sum over rows"
                } else {
                    "mean over rows"
                };
                s += &format!("  {what:<16} {}\n", fmt_num(v));
            }
            let err = sum
                .stderr
                .map_or_else(String::new, |e| format!(" ± {}", fmt_num(e)));
            s += &format!("  {:<16} {}{err}\n", "mean", fmt_num(sum.mean));
            // From the top down, as llama.cpp lists them.
            for (name, v) in [
                ("max", sum.max),
                ("p99.9", sum.p99_9),
                ("p99", sum.p99),
                ("p95", sum.p95),
                ("p90", sum.p90),
                ("median", sum.median),
                ("p10", sum.p10),
                ("p5", sum.p5),
                ("p1", sum.p1),
                ("p0.1", sum.p0_1),
                ("min", sum.min),
            ] {
                s += &format!("  {name:<16} {}\n", fmt_num(v));
            }
            if let Some(first) = sum.first_infinite {
                s += &format!(
                    "  {:<16} {} of {} (P > 0 where Q = 0), the first row {first}\n",
                    "infinite rows", sum.infinite, sum.count
                );
            }
            if let Some((t, err)) = self.top1 {
                let err = err.map_or_else(String::new, |e| format!(" ± {:.4}", 100.0 * e));
                s += &format!("  {:<16} {:.4}{err} %\n", "top-1 agreement", 100.0 * t);
            }
        }
        if let Some(out) = &self.out {
            s += &format!("  per-row values: {}\n", out.display());
        }
        s += &format!(
            "  adapter: {} ({}, {}), {:.3} s\n",
            self.adapter.name, self.adapter.backend, self.adapter.device_type, self.elapsed_s
        );
        s
    }
}

/// The directory a file is to be created in (`.` for a bare name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A temporary file beside `path`, readable as a normal output file once renamed.
fn temp_beside(path: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    let mut builder = tempfile::Builder::new();
    builder.prefix(".klgpu-").suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // Like a plain File::create: 0666 less the umask.
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    builder.tempfile_in(parent_dir(path))
}

/// Checks, before any work, that `path` can be written: not a directory, not one of the
/// `inputs` (renaming the output over an input would destroy it), and a temporary file can be
/// created beside it (which is removed at once).
pub fn check_out_path(path: &Path, inputs: &[&Path]) -> Result<(), CliError> {
    let shown = path.display();
    if path.as_os_str() == "-" {
        return Err(CliError::input(
            "--out -: klgpu writes the per-row values as an .npy file, not to standard output; \
             name a file (./- for one named -)",
        ));
    }
    if path.is_dir() || path.as_os_str().as_encoded_bytes().ends_with(b"/") {
        return Err(CliError::input(format!(
            "{shown}: --out names a directory, not a file"
        )));
    }
    // The output replaces a file by renaming a new one over it: over a device or a pipe
    // (`--out /dev/null`) that would put a plain file in its place.
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        return Err(CliError::input(format!(
            "{shown}: --out names a device, pipe or socket; klgpu writes the per-row values to \
             a regular file, replacing it whole"
        )));
    }
    let path = &out_target(path);
    if let Some(input) = inputs.iter().find(|input| same_file(path, input)) {
        return Err(CliError::input(format!(
            "{shown}: --out names the input {}; the per-row values would replace it",
            input.display()
        )));
    }
    let dir = parent_dir(path);
    if !dir.is_dir() {
        let what = if dir.exists() {
            "is not a directory"
        } else {
            "does not exist"
        };
        return Err(CliError::input(format!(
            "{shown}: cannot write the --out file: {} {what}",
            dir.display()
        )));
    }
    temp_beside(path)
        .map(drop)
        .map_err(|e| CliError::input(format!("{shown}: cannot write the --out file here: {e}")))
}

/// Whether `a` and `b` are one file: by device and inode on Unix (hard links and symbolic
/// links alike), by canonical path elsewhere. A path that does not exist is no file.
pub fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    {
        match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        }
    }
}

/// Where an `--out` path's file is: a symbolic link's target (which the output replaces,
/// keeping the link), else the path itself. Links are followed one at a time, so that a
/// dangling one's target is still where the output goes (`canonicalize` fails on it, and the
/// link was replaced by a plain file).
fn out_target(path: &Path) -> PathBuf {
    let mut target = path.to_path_buf();
    for _ in 0..40 {
        let Ok(next) = std::fs::read_link(&target) else {
            break;
        };
        target = match target.parent() {
            Some(dir) if next.is_relative() => dir.join(next),
            _ => next,
        };
    }
    target
}

/// Per-row values written to a temporary file beside `--out`, not yet in its place:
/// [`PendingRows::commit`] renames it over the target; dropped, it is removed and `--out`
/// stays as it was (the report is printed in between: a run that fails to print it is a
/// failed run, and leaves `--out` alone).
pub struct PendingRows {
    tmp: tempfile::NamedTempFile,
    path: PathBuf,
    shown: String,
}

impl PendingRows {
    /// Puts the file in its place.
    pub fn commit(self) -> Result<(), CliError> {
        let shown = self.shown;
        self.tmp
            .persist(&self.path)
            .map_err(|e| CliError::runtime(format!("{shown}: cannot write: {}", e.error)))?;
        Ok(())
    }
}

/// Writes per-row values as a 1-D f64 `.npy` file: to a temporary file in the same
/// directory, renamed over `path` by [`PendingRows::commit`], so a failed run never leaves a
/// partial file nor truncates an existing one. A file it replaces keeps its permissions, and
/// a symbolic link its place: the link's target is replaced.
pub fn write_rows_atomically(path: &Path, values: &[f64]) -> Result<PendingRows, CliError> {
    let shown = path.display().to_string();
    let fail = |e: std::io::Error| CliError::runtime(format!("{shown}: cannot write: {e}"));
    let path = &out_target(path);
    let tmp = temp_beside(path).map_err(fail)?;
    if let Ok(existing) = std::fs::metadata(path) {
        tmp.as_file()
            .set_permissions(existing.permissions())
            .map_err(fail)?;
    }
    {
        let mut w = BufWriter::new(tmp.as_file());
        npy::write_f64_1d(&mut w, values).map_err(fail)?;
        w.flush().map_err(fail)?;
    }
    tmp.as_file().sync_all().map_err(fail)?;
    Ok(PendingRows {
        tmp,
        path: path.clone(),
        shown,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_numbers() {
        assert_eq!(num(1.5), json!(1.5));
        assert_eq!(num(f64::INFINITY), json!("inf"));
        assert_eq!(num(f64::NEG_INFINITY), json!("-inf"));
        assert_eq!(num(f64::NAN), json!("nan"));
        assert_eq!(opt_num(None), Value::Null);
    }

    #[test]
    fn human_numbers() {
        assert_eq!(fmt_num(0.0), "0");
        assert_eq!(fmt_num(0.5), "0.5000000000");
        assert_eq!(fmt_num(123.0), "123.0000000");
        assert_eq!(fmt_num(1.25e-9), "1.250000000e-9");
        assert_eq!(fmt_num(f64::INFINITY), "inf");
    }
}
