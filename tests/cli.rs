//! End-to-end tests of the `klgpu` binary: fixtures are written by the tests into a temporary
//! directory (.npy by a tiny writer here, safetensors by the `safetensors` crate), the binary
//! runs on them, and its results are compared with the library's f64 reference.
//!
//! Mesa may print `error: XDG_RUNTIME_DIR is invalid or not set in the environment.` when the
//! GPU instance is created: that is not klgpu's. Every stderr line of ours starts with
//! `klgpu:`, and the helpers below check that nothing else (a panic, say) is printed.

use std::path::{Path, PathBuf};
use std::process::Command;

use klgpu::{Base, Input, Measure, Options};
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use serde_json::Value;

// ---------------------------------------------------------------------------------------
// Fixtures

/// A seeded generator (SplitMix64), so the tests need no RNG crate API.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        let u = 1.0 - self.next();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * self.next()).cos()
    }
}

/// `rows` probability rows of length `cols`, each normalized in f64.
fn probs(seed: u64, rows: usize, cols: usize) -> Vec<f32> {
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(rows * cols);
    for _ in 0..rows {
        let row: Vec<f64> = (0..cols).map(|_| rng.next() + 1e-3).collect();
        let sum: f64 = row.iter().sum();
        out.extend(row.iter().map(|x| (x / sum) as f32));
    }
    out
}

/// Gaussian logits with standard deviation `scale`.
fn logits(seed: u64, n: usize, scale: f64) -> Vec<f32> {
    let mut rng = Rng(seed);
    (0..n).map(|_| (scale * rng.normal()) as f32).collect()
}

/// `base` plus small noise: a second model's logits.
fn perturbed(base: &[f32], seed: u64) -> Vec<f32> {
    let mut rng = Rng(seed);
    base.iter()
        .map(|&x| x + (0.3 * rng.normal()) as f32)
        .collect()
}

fn f32_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A `.npy` file with any header fields and raw data.
fn npy_raw(path: &Path, descr: &str, fortran: bool, shape: &[usize], data: &[u8]) {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if shape.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let fortran = if fortran { "True" } else { "False" };
    let dict = format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}");
    let mut header = dict.into_bytes();
    let total = (10 + header.len() + 1).div_ceil(64) * 64;
    header.resize(total - 11, b' ');
    header.push(b'\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

fn npy_f32(path: &Path, shape: &[usize], data: &[f32]) {
    npy_raw(path, "<f4", false, shape, &f32_bytes(data));
}

fn npy_f64(path: &Path, shape: &[usize], data: &[f64]) {
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    npy_raw(path, "<f8", false, shape, &bytes);
}

/// Reads a 1-D f64 `.npy` file (as klgpu writes it).
fn read_npy_f64(path: &Path) -> Vec<f64> {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + len]).unwrap();
    assert!(header.contains("'descr': '<f8'"), "{header}");
    bytes[10 + len..]
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// A safetensors file holding the named tensors.
fn safetensors_file(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            (
                name.to_string(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

// ---------------------------------------------------------------------------------------
// Running the binary

struct Run {
    code: i32,
    stdout: String,
    /// Our stderr lines (those starting with `klgpu:`).
    ours: Vec<String>,
}

impl Run {
    fn json(&self) -> Value {
        assert_eq!(self.code, 0, "exit code; stderr: {:?}", self.ours);
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {}", self.stdout))
    }
}

fn klgpu_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_klgpu"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run klgpu");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let mut ours = Vec::new();
    for line in stderr.lines() {
        if line.starts_with("klgpu:") {
            ours.push(line.to_string());
        } else {
            // Anything else must be Mesa's window-system noise, never a panic of ours.
            assert!(
                line.contains("XDG_RUNTIME_DIR") || line.trim().is_empty(),
                "unexpected stderr line {line:?} in:\n{stderr}"
            );
        }
    }
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        ours,
    }
}

fn klgpu(args: &[&str]) -> Run {
    klgpu_env(args, &[])
}

/// Every measure's subcommand.
const EVERY_COMMAND: [(&str, Measure); 4] = [
    ("kl", Measure::KullbackLeibler),
    ("ce", Measure::CrossEntropy),
    ("entropy", Measure::Entropy),
    ("js", Measure::JensenShannon),
];

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Close within 1e-5 relative (1e-11 absolute for values below 1e-6).
fn assert_close(got: f64, want: f64, what: &str) {
    let ok = if want == f64::INFINITY {
        got == want
    } else {
        (got - want).abs() <= 1e-5 * want.abs() || (want.abs() < 1e-6 && (got - want).abs() < 1e-11)
    };
    assert!(ok, "{what}: got {got}, want {want}");
}

/// P and Q written as `p.npy` and `q.npy` in `dir`, both of `shape`.
fn npy_pair(dir: &Path, shape: &[usize], p: &[f32], q: &[f32]) -> (PathBuf, PathBuf) {
    let (pp, qp) = (dir.join("p.npy"), dir.join("q.npy"));
    npy_f32(&pp, shape, p);
    npy_f32(&qp, shape, q);
    (pp, qp)
}

/// The per-row values a `--out` file holds, each against the reference's.
fn assert_rows_file(out: &Path, want: &[f64], what: &str) {
    let got = read_npy_f64(out);
    assert_eq!(got.len(), want.len(), "{what}rows");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert_close(g, w, &format!("{what}row {i}"));
    }
}

fn reference(
    measure: Measure,
    p: &[f32],
    q: Option<&[f32]>,
    cols: usize,
    opts: Options,
) -> klgpu::RowResults {
    klgpu::cpu::rows(measure, p, q, cols, &opts).unwrap()
}

fn as_f64(v: &Value) -> f64 {
    match v {
        Value::String(s) if s == "inf" => f64::INFINITY,
        Value::String(s) if s == "-inf" => f64::NEG_INFINITY,
        Value::String(s) if s == "nan" => f64::NAN,
        _ => v.as_f64().unwrap_or_else(|| panic!("not a number: {v}")),
    }
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

// ---------------------------------------------------------------------------------------
// Results

#[test]
fn json_schema_and_values_match_the_reference() {
    let dir = tmp();
    let (rows, cols) = (37, 100);
    let p = probs(1, rows, cols);
    let q = probs(2, rows, cols);
    let (pp, qp) = (dir.path().join("P.npy"), dir.path().join("Q.npy"));
    npy_f32(&pp, &[rows, cols], &p);
    npy_f32(&qp, &[rows, cols], &q);
    let r = reference(
        Measure::KullbackLeibler,
        &p,
        Some(&q),
        cols,
        Options::default(),
    );
    let mean = klgpu::Reduction::MeanOverRows.apply(&r.values).unwrap();

    let j = klgpu(&["kl", s(&pp), s(&qp), "--json", "--reduction", "mean-rows"]).json();
    let obj = j.as_object().unwrap();
    for key in [
        "measure",
        "input",
        "base",
        "rows",
        "cols",
        "reduction",
        "value",
        "summary",
        "adapter",
        "elapsed_s",
    ] {
        assert!(obj.contains_key(key), "missing {key}: {j}");
    }
    assert_eq!(obj.len(), 10, "{j}");
    assert_eq!(j["measure"], "kl");
    assert_eq!(j["input"], "probs");
    assert_eq!(j["base"], "e");
    assert_eq!(j["rows"], rows);
    assert_eq!(j["cols"], cols);
    assert_eq!(j["reduction"], "mean-rows");
    assert!(j["elapsed_s"].is_f64());
    assert_close(as_f64(&j["value"]), mean, "mean-rows value");
    let sum = j["summary"].as_object().unwrap();
    for key in [
        "mean", "stderr", "median", "p90", "p95", "p99", "p99_9", "p10", "p5", "p1", "p0_1", "min",
        "max",
    ] {
        assert!(sum[key].is_f64(), "summary.{key}: {j}");
    }
    assert!(
        !sum.contains_key("top1_agreement"),
        "probs have no top-1: {j}"
    );
    assert_close(as_f64(&sum["mean"]), mean, "summary.mean");
    let min = r.values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = r.values.iter().copied().fold(0.0, f64::max);
    assert_close(as_f64(&sum["min"]), min, "min");
    assert_close(as_f64(&sum["max"]), max, "max");
    let mut sorted = r.values.clone();
    sorted.sort_by(f64::total_cmp);
    assert_close(
        as_f64(&sum["median"]),
        sorted[18],
        "median (37 rows: the 19th)",
    );
    // 10th percentile: rank 36 × 0.1 = 3.6, between the 4th and 5th smallest.
    assert_close(
        as_f64(&sum["p10"]),
        sorted[3] + 0.6 * (sorted[4] - sorted[3]),
        "p10",
    );
    for key in ["name", "backend", "device_type"] {
        assert!(j["adapter"][key].is_string(), "adapter.{key}: {j}");
    }
    assert_ne!(j["adapter"]["name"], "cpu-reference");

    // 1-D: value is the result, summary null; other measures and bases.
    let (p1, q1) = (dir.path().join("p1.npy"), dir.path().join("q1.npy"));
    npy_f32(&p1, &[cols], &p[..cols]);
    npy_f32(&q1, &[cols], &q[..cols]);
    for (cmd, measure) in EVERY_COMMAND {
        let mut args = vec![cmd, s(&p1)];
        if measure.uses_q() {
            args.push(s(&q1));
        }
        args.extend(["--json", "--base", "2"]);
        let j = klgpu(&args).json();
        let opts = Options {
            base: klgpu::Base::Two,
            ..Default::default()
        };
        let want = klgpu::cpu::divergence(measure, &p[..cols], Some(&q[..cols]), &opts).unwrap();
        assert_close(as_f64(&j["value"]), want, cmd);
        assert_eq!(j["summary"], Value::Null);
        assert_eq!(
            (j["rows"].as_u64(), j["cols"].as_u64()),
            (Some(1), Some(cols as u64))
        );
        assert_eq!(j["base"], "2");
    }
}

#[test]
fn human_report_and_uniform_entropy_in_bits() {
    let dir = tmp();
    let p = dir.path().join("uniform.npy");
    npy_f32(&p, &[256], &[1.0 / 256.0; 256]);
    let r = klgpu(&["entropy", s(&p), "--base", "2"]);
    assert_eq!(r.code, 0, "{:?}", r.ours);
    let first = r.stdout.lines().next().unwrap_or_default();
    let value = first
        .strip_prefix("H(P) = ")
        .and_then(|rest| rest.strip_suffix(" bits"))
        .unwrap_or_else(|| panic!("{}", r.stdout));
    assert_close(value.parse().unwrap(), 8.0, "entropy of 256 equal outcomes");
    assert!(r.stdout.contains("P: "), "{}", r.stdout);
    assert!(r.ours.is_empty(), "{:?}", r.ours);
}

#[test]
fn per_row_output_file_and_top1_agreement() {
    let dir = tmp();
    let (rows, cols) = (50, 300);
    let p = logits(3, rows * cols, 2.0);
    let q = perturbed(&p, 4);
    let (pp, qp) = npy_pair(dir.path(), &[rows, cols], &p, &q);
    let out = dir.path().join("rows.npy");
    std::fs::write(&out, b"old contents").unwrap();
    let j = klgpu(&[
        "kl",
        s(&pp),
        s(&qp),
        "--input",
        "logits",
        "--json",
        "--out",
        s(&out),
        "--quiet",
    ])
    .json();
    let want = reference(
        Measure::KullbackLeibler,
        &p,
        Some(&q),
        cols,
        Options::input(Input::Logits),
    );
    assert_rows_file(&out, &want.values, "");
    assert_eq!(j["value"], Value::Null, "reduction none: {j}");
    let share = want.top1_agreement().unwrap();
    assert_close(
        as_f64(&j["summary"]["top1_agreement"]),
        share,
        "top-1 agreement",
    );
    // llama.cpp's error of "same top p": √(a(1 − a)/(n − 1)).
    assert_close(
        as_f64(&j["summary"]["top1_agreement_stderr"]),
        (share * (1.0 - share) / (rows - 1) as f64).sqrt(),
        "top-1 agreement's standard error",
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Entropy has no second distribution to agree with: no top-1 keys (they read null).
    let j = klgpu(&["entropy", s(&pp), "--input", "logits", "--json", "-q"]).json();
    let sum = j["summary"].as_object().unwrap();
    assert!(
        !sum.contains_key("top1_agreement") && !sum.contains_key("top1_agreement_stderr"),
        "{j}"
    );
}

#[test]
fn reductions_and_infinite_rows() {
    let dir = tmp();
    let (rows, cols) = (9, 64);
    let p = probs(5, rows, cols);
    let mut q = probs(6, rows, cols);
    let (pp, qp) = npy_pair(dir.path(), &[rows, cols], &p, &q);
    let r = reference(
        Measure::CrossEntropy,
        &p,
        Some(&q),
        cols,
        Options::default(),
    );
    for (red, want) in [
        ("sum", klgpu::Reduction::Sum.apply(&r.values).unwrap()),
        (
            "mean-rows",
            klgpu::Reduction::MeanOverRows.apply(&r.values).unwrap(),
        ),
    ] {
        let j = klgpu(&["ce", s(&pp), s(&qp), "--json", "--reduction", red]).json();
        assert_close(as_f64(&j["value"]), want, red);
    }

    // Row 4 of Q gets a zero where P is positive: KL of that row is +inf.
    q[4 * cols + 7] = 0.0;
    npy_f32(&qp, &[rows, cols], &q);
    let r = klgpu(&["kl", s(&pp), s(&qp), "--json", "--reduction", "sum"]);
    // The row, and where in it: the summary named only the row.
    let note = format!("row 4, column 7: P is {} where Q is 0", p[4 * cols + 7]);
    assert!(
        r.ours.len() == 1 && r.ours[0].contains(&note),
        "{:?}",
        r.ours
    );
    let j = r.json();
    assert_eq!(j["value"], "inf", "{j}");
    assert_eq!(j["summary"]["mean"], "inf");
    assert_eq!(j["summary"]["max"], "inf");
    assert_eq!(j["summary"]["stderr"], "nan");
    assert!(
        j["summary"]["median"].is_f64(),
        "one infinite row of 9 leaves the median: {j}"
    );
    // Which rows, and how many: the statistics alone only say "inf".
    assert_eq!(j["summary"]["infinite_rows"], 1, "{j}");
    assert_eq!(j["summary"]["first_infinite_row"], 4, "{j}");
    let human = klgpu(&["kl", s(&pp), s(&qp)]);
    assert!(
        human
            .stdout
            .contains("infinite rows    1 of 9 (P > 0 where Q = 0), the first row 4"),
        "{}",
        human.stdout
    );
    // Masks that differ: f16's finite minimum against -inf.
    let (lp, lq) = (dir.path().join("lp.npy"), dir.path().join("lq.npy"));
    npy_f32(&lp, &[3], &[0.0, 0.0, -65504.0]);
    npy_f32(&lq, &[3], &[0.0, 0.0, f32::NEG_INFINITY]);
    let r = klgpu(&["kl", s(&lp), s(&lq), "--input", "logits", "--json"]);
    assert!(
        r.ours.len() == 1 && r.ours[0].contains("index 2: P is -65504 where Q is -inf"),
        "{:?}",
        r.ours
    );
    assert_eq!(r.json()["value"], "inf");
    let finite = klgpu(&["js", s(&pp), s(&qp), "--json"]).json();
    assert_eq!(finite["summary"]["infinite_rows"], 0, "{finite}");
    assert!(
        finite["summary"]["first_infinite_row"].is_null(),
        "{finite}"
    );
}

/// `--input` name, P, Q, input kind, `--normalize`.
type StreamCase<'a> = (&'a str, &'a [f32], &'a [f32], Input, bool);

#[test]
fn streaming_many_blocks_gives_the_one_block_answer() {
    let dir = tmp();
    // 2-D logits: 3 rows per block, and rows cut in pieces (70-element blocks).
    let (rows, cols) = (40, 200);
    let p = logits(7, rows * cols, 3.0);
    let q = perturbed(&p, 8);
    let (pp, qp) = npy_pair(dir.path(), &[rows, cols], &p, &q);
    let want = reference(
        Measure::KullbackLeibler,
        &p,
        Some(&q),
        cols,
        Options::input(Input::Logits),
    );
    let one = klgpu(&[
        "kl",
        s(&pp),
        s(&qp),
        "--input",
        "logits",
        "--json",
        "--reduction",
        "sum",
    ])
    .json();
    assert_close(
        as_f64(&one["value"]),
        klgpu::Reduction::Sum.apply(&want.values).unwrap(),
        "one block",
    );
    for block in [4 * cols * 3, 280] {
        let out = dir.path().join(format!("rows-{block}.npy"));
        let bb = block.to_string();
        let j = klgpu(&[
            "kl",
            s(&pp),
            s(&qp),
            "--input",
            "logits",
            "--json",
            "--reduction",
            "sum",
            "--block-bytes",
            &bb,
            "--out",
            s(&out),
        ])
        .json();
        assert_close(
            as_f64(&j["value"]),
            as_f64(&one["value"]),
            &format!("block {block}"),
        );
        assert_eq!(
            j["summary"]["top1_agreement"], one["summary"]["top1_agreement"],
            "block {block}"
        );
        assert_rows_file(&out, &want.values, &format!("block {block}, "));
    }

    // A 1-D input of 20,000 elements in 1,000-element pieces, for every input kind.
    let n = 20_000;
    let lp = logits(9, n, 2.0);
    let lq = perturbed(&lp, 10);
    let pr = probs(11, 1, n);
    let qr = probs(12, 1, n);
    let unnormalized: Vec<f32> = pr.iter().map(|x| x * 3.0).collect();
    let log_p: Vec<f32> = pr.iter().map(|x| x.ln()).collect();
    let log_q: Vec<f32> = qr.iter().map(|x| x.ln()).collect();
    let cases: [StreamCase; 4] = [
        ("logits", &lp, &lq, Input::Logits, false),
        ("probs", &pr, &qr, Input::Probs, false),
        ("probs", &unnormalized, &qr, Input::Probs, true),
        ("log-probs", &log_p, &log_q, Input::LogProbs, false),
    ];
    for (k, (input, a, b, kind, normalize)) in cases.into_iter().enumerate() {
        let (pa, qa) = (
            dir.path().join(format!("a{k}.npy")),
            dir.path().join(format!("b{k}.npy")),
        );
        npy_f32(&pa, &[n], a);
        npy_f32(&qa, &[n], b);
        for (cmd, measure) in [
            ("kl", Measure::KullbackLeibler),
            ("js", Measure::JensenShannon),
        ] {
            let opts = Options {
                input: kind,
                normalize,
                ..Default::default()
            };
            let want = klgpu::cpu::divergence(measure, a, Some(b), &opts).unwrap();
            let mut args = vec![
                cmd,
                s(&pa),
                s(&qa),
                "--json",
                "--input",
                input,
                "--block-bytes",
                "4000",
            ];
            if normalize {
                args.push("--normalize");
            }
            let j = klgpu(&args).json();
            assert_close(
                as_f64(&j["value"]),
                want,
                &format!("1-D {input} {cmd} normalize={normalize}"),
            );
        }
    }
}

/// Runs a `--json` command on the GPU and on the CPU backend: each value must be ≥ 0 and meet
/// the bar against `want`.
fn on_both_backends(args: &[&str], want: f64, what: &str) {
    for backend in ["gpu", "cpu"] {
        let mut a = args.to_vec();
        a.extend(["--backend", backend]);
        let got = as_f64(&klgpu(&a).json()["value"]);
        let what = format!("{what} on the {backend}");
        assert!(got >= 0.0, "{what}: {got}");
        assert_close(got, want, &what);
    }
}

#[test]
fn blocks_large_enough_to_read_p_and_q_in_parallel() {
    // Blocks of at least 64 Ki elements read Q on a second thread, into recycled buffers:
    // 2-D f16 logits in blocks of two rows (three blocks, the last short), and 1-D logits and
    // normalized probabilities in 70,000-element pieces (a first pass, then the pieces).
    let dir = tmp();
    let (rows, cols) = (5, 100_000);
    let p: Vec<f32> = logits(21, rows * cols, 2.0)
        .iter()
        .map(|&x| half::f16::from_f32(x).to_f32())
        .collect();
    let q: Vec<f32> = perturbed(&p, 22)
        .iter()
        .map(|&x| half::f16::from_f32(x).to_f32())
        .collect();
    let f16_bytes = |v: &[f32]| -> Vec<u8> {
        v.iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect()
    };
    let (pp, qp) = (dir.path().join("p.npy"), dir.path().join("q.npy"));
    npy_raw(&pp, "<f2", false, &[rows, cols], &f16_bytes(&p));
    npy_raw(&qp, "<f2", false, &[rows, cols], &f16_bytes(&q));
    let want = reference(
        Measure::KullbackLeibler,
        &p,
        Some(&q),
        cols,
        Options::input(Input::Logits),
    );
    let out = dir.path().join("rows.npy");
    let block = (4 * 2 * cols).to_string();
    let args = ["kl", s(&pp), s(&qp), "--input", "logits", "--json"];
    klgpu(&[&args[..], &["--block-bytes", &block, "--out", s(&out)]].concat()).json();
    assert_rows_file(&out, &want.values, "2-D f16 logits, ");

    let n = 300_000;
    let lp = logits(23, n, 2.0);
    let lq = perturbed(&lp, 24);
    let pr: Vec<f32> = probs(25, 1, n).iter().map(|x| x * 3.0).collect();
    let qr = probs(26, 1, n);
    for (k, (input, a, b, normalize)) in [("logits", &lp, &lq, false), ("probs", &pr, &qr, true)]
        .into_iter()
        .enumerate()
    {
        let (pa, qa) = (
            dir.path().join(format!("a{k}.npy")),
            dir.path().join(format!("b{k}.npy")),
        );
        npy_f32(&pa, &[n], a);
        npy_f32(&qa, &[n], b);
        let opts = Options {
            input: if input == "logits" {
                Input::Logits
            } else {
                Input::Probs
            },
            normalize,
            ..Default::default()
        };
        let want = klgpu::cpu::divergence(Measure::KullbackLeibler, a, Some(b), &opts).unwrap();
        let mut args = vec!["kl", s(&pa), s(&qa), "--input", input, "--json"];
        args.extend(["--block-bytes", "280000"]);
        if normalize {
            args.push("--normalize");
        }
        on_both_backends(
            &args,
            want,
            &format!("1-D {input} in 70,000-element pieces"),
        );
    }
}

#[test]
fn long_rows_of_close_logits_keep_their_digits() {
    // One row of 20,000 logits in 1,000-element pieces, Q = P + 7 + 1e-3·noise (KL ≈ 5e-7),
    // with a piece masked (−∞) in both; then the same with a piece masked in P alone (which
    // puts Q's mass there into KL). The pieces are logits rows of their own, put together by
    // the chain rule; as log-probabilities x − lse rounded to f32 they carried ~5e-7 per
    // element into ln p − ln q (KL 8e-7 relative off here, negative for closer rows).
    let dir = tmp();
    let n = 20_000;
    let mut p = logits(13, n, 3.0);
    let noise = logits(14, n, 1e-3);
    let mut q: Vec<f32> = p.iter().zip(&noise).map(|(&x, &e)| x + 7.0 + e).collect();
    p[5000..6000].fill(f32::NEG_INFINITY);
    q[5000..6000].fill(f32::NEG_INFINITY);
    let mut p_masked = p.clone();
    p_masked[2000..3000].fill(f32::NEG_INFINITY);
    for (k, p) in [p, p_masked].iter().enumerate() {
        let (pp, qp) = (
            dir.path().join(format!("p{k}.npy")),
            dir.path().join("q.npy"),
        );
        npy_f32(&pp, &[n], p);
        npy_f32(&qp, &[n], &q);
        for (cmd, measure, base) in [
            ("kl", Measure::KullbackLeibler, Base::E),
            ("kl", Measure::KullbackLeibler, Base::Two),
            ("ce", Measure::CrossEntropy, Base::E),
            ("entropy", Measure::Entropy, Base::Ten),
            ("js", Measure::JensenShannon, Base::E),
        ] {
            let opts = Options {
                input: Input::Logits,
                base,
                ..Default::default()
            };
            let qq = measure.uses_q().then_some(&q[..]);
            let want = klgpu::cpu::divergence(measure, p, qq, &opts).unwrap();
            let base_arg = match base {
                Base::Two => "2",
                Base::Ten => "10",
                _ => "e",
            };
            let mut args = vec![cmd, s(&pp)];
            if measure.uses_q() {
                args.push(s(&qp));
            }
            args.extend(["--json", "--input", "logits", "--base", base_arg]);
            args.extend(["--block-bytes", "4000"]);
            on_both_backends(&args, want, &format!("case {k}, {cmd} base {base_arg}"));
        }
    }
}

#[test]
fn long_rows_near_f32_max_in_pieces() {
    // Rows of 100 in pieces of 16, on both backends, against the whole rows. Logits:
    // 0. P uniform at 1e37: each piece's share of it, ln(16/100), is the small part of a
    //    log-sum-exp near 1e37, which f64 rounded away (KL 2961 for 139);
    // 1. Q at −1e37: the same on Q's side;
    // 2. a piece of P at −1e37, whose share e^(−1e37) is 0 in f64 yet positive, against a −∞
    //    in Q: KL and cross-entropy +∞ (once 6.07);
    // 3. that piece of P against Q's maximum 1e37 and f32::MIN: the piece overflows f32 on its
    //    own but weighs nothing in the row (once an Overflow error);
    // 4. a piece where P is e^(−20) of its maximum against Q's maximum 1e6 and f32::MIN: on
    //    its own P is uniform there and Σ p·(−ln q) leaves f32, in the row it weighs 2e-9·16%;
    //    the f64 reference computes such a piece (once an Overflow error).
    // Probabilities: a piece that overflows (3e38·ln(1e41)) and one with p > 0 against q = 0
    // make the row +∞, as whole (once an Overflow error).
    let dir = tmp();
    let cols = 100;
    let moderate = logits(21, cols, 3.0);
    let mut tiny = logits(22, cols, 3.0);
    tiny[16..32].fill(-1e37);
    let mut holed = logits(23, cols, 3.0);
    holed[20] = f32::NEG_INFINITY;
    let mut far = logits(24, cols, 3.0);
    far[16] = 1e37;
    far[17..32].fill(f32::MIN);
    let mut low: Vec<f32> = logits(25, cols, 1.0).iter().map(|x| x + 10.0).collect();
    low[16..32].fill(-10.0);
    let mut masked = logits(26, cols, 1.0);
    masked[16] = 1e6;
    masked[17..32].fill(f32::MIN);
    let p = [vec![1e37; cols], moderate.clone(), tiny.clone(), tiny, low].concat();
    let q = [moderate, vec![-1e37; cols], holed, far, masked].concat();
    let mut p_probs = vec![0.01f32; cols];
    p_probs[3] = 3e38;
    let mut q_probs = vec![0.01f32; cols];
    q_probs[3] = 0.003;
    q_probs[70] = 0.0;
    let out = dir.path().join("rows.npy");
    for (input, arg, p, q) in [
        (Input::Logits, "logits", p, q),
        (Input::Probs, "probs", p_probs, q_probs),
    ] {
        let rows = p.len() / cols;
        let (pp, qp) = npy_pair(dir.path(), &[rows, cols], &p, &q);
        for (cmd, measure) in EVERY_COMMAND {
            if input == Input::Probs && measure == Measure::Entropy {
                continue; // −3e38·ln 3e38 is beyond f32 on the GPU, as whole and in pieces
            }
            let qq = measure.uses_q().then_some(&q[..]);
            let want = reference(measure, &p, qq, cols, Options::input(input));
            for backend in ["gpu", "cpu"] {
                let mut args = vec![cmd, s(&pp)];
                if measure.uses_q() {
                    args.push(s(&qp));
                }
                args.extend(["--input", arg, "--block-bytes", "64", "--backend", backend]);
                args.extend(["-q", "--out", s(&out)]);
                let run = klgpu(&args);
                let what = format!("{cmd} of {arg} on the {backend}");
                assert_eq!(run.code, 0, "{what}: {:?}", run.ours);
                assert_rows_file(&out, &want.values, &format!("{what}: "));
            }
        }
    }
}

#[test]
fn long_rows_normalized_in_pieces_keep_their_digits() {
    // --normalize on one row of 20,000 in 1,000-element pieces: each piece is normalized on its
    // own and the row put together by the chain rule, so a KL of ~1e-7 between unnormalized
    // close rows keeps the bar (fed as x/Σ rounded to f32, each value carried a rounding).
    let dir = tmp();
    let n = 20_000;
    let mut p: Vec<f32> = probs(15, 1, n).iter().map(|x| x * 3.0).collect();
    p[2000..3000].fill(0.0);
    let q: Vec<f32> = p
        .iter()
        .zip(logits(16, n, 1e-3))
        .map(|(&x, e)| x * 5.0 * (1.0 + e))
        .collect();
    let (pp, qp) = npy_pair(dir.path(), &[n], &p, &q);
    let opts = Options {
        normalize: true,
        ..Default::default()
    };
    for (cmd, measure) in EVERY_COMMAND {
        let qq = measure.uses_q().then_some(&q[..]);
        let want = klgpu::cpu::divergence(measure, &p, qq, &opts).unwrap();
        let mut args = vec![cmd, s(&pp)];
        if measure.uses_q() {
            args.push(s(&qp));
        }
        args.extend(["--json", "--normalize", "--block-bytes", "4000"]);
        on_both_backends(&args, want, cmd);
    }
}

#[test]
fn f64_f16_and_bf16_inputs() {
    let dir = tmp();
    let (rows, cols) = (6, 50);
    // f64 .npy: read and rounded to f32.
    let p64: Vec<f64> = probs(13, rows, cols)
        .iter()
        .map(|&x| x as f64 * (1.0 + 1e-9))
        .collect();
    let q64: Vec<f64> = probs(14, rows, cols).iter().map(|&x| x as f64).collect();
    let (pp, qp) = (dir.path().join("p64.npy"), dir.path().join("q64.npy"));
    npy_f64(&pp, &[rows, cols], &p64);
    npy_f64(&qp, &[rows, cols], &q64);
    let p32: Vec<f32> = p64.iter().map(|&x| x as f32).collect();
    let q32: Vec<f32> = q64.iter().map(|&x| x as f32).collect();
    let want = reference(
        Measure::JensenShannon,
        &p32,
        Some(&q32),
        cols,
        Options::default(),
    );
    let j = klgpu(&["js", s(&pp), s(&qp), "--json", "--reduction", "sum"]).json();
    assert_close(
        as_f64(&j["value"]),
        klgpu::Reduction::Sum.apply(&want.values).unwrap(),
        "f64 npy",
    );

    // f16 and bf16 tensors in one safetensors file, with --tensor / --tensor-q.
    let lp = logits(15, rows * cols, 2.0);
    let lq = perturbed(&lp, 16);
    let h: Vec<half::f16> = lp.iter().map(|&x| half::f16::from_f32(x)).collect();
    let b: Vec<half::bf16> = lq.iter().map(|&x| half::bf16::from_f32(x)).collect();
    let st = dir.path().join("model.safetensors");
    safetensors_file(
        &st,
        &[
            (
                "p_f16",
                Dtype::F16,
                vec![rows, cols],
                h.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            (
                "q_bf16",
                Dtype::BF16,
                vec![rows, cols],
                b.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            ("p_f32", Dtype::F32, vec![rows, cols], f32_bytes(&lp)),
        ],
    );
    let hp: Vec<f32> = h.iter().map(|x| x.to_f32()).collect();
    let bq: Vec<f32> = b.iter().map(|x| x.to_f32()).collect();
    let want = reference(
        Measure::KullbackLeibler,
        &hp,
        Some(&bq),
        cols,
        Options::input(Input::Logits),
    );
    let j = klgpu(&[
        "kl",
        s(&st),
        s(&st),
        "--tensor",
        "p_f16",
        "--tensor-q",
        "q_bf16",
        "--input",
        "logits",
        "--json",
        "--reduction",
        "mean-rows",
    ])
    .json();
    assert_close(
        as_f64(&j["value"]),
        klgpu::Reduction::MeanOverRows.apply(&want.values).unwrap(),
        "f16 vs bf16",
    );
    // A safetensors P against a .npy Q: --tensor applies to P only.
    let qn = dir.path().join("q.npy");
    npy_f32(&qn, &[rows, cols], &bq);
    let j2 = klgpu(&[
        "kl",
        s(&st),
        s(&qn),
        "--tensor",
        "p_f16",
        "--input",
        "logits",
        "--json",
        "--reduction",
        "mean-rows",
    ])
    .json();
    assert_close(
        as_f64(&j2["value"]),
        as_f64(&j["value"]),
        "safetensors vs npy",
    );
}

#[test]
fn cpu_backend_is_the_reference() {
    let dir = tmp();
    let (rows, cols) = (5, 40);
    let p = probs(17, rows, cols);
    let q = probs(18, rows, cols);
    let (pp, qp) = npy_pair(dir.path(), &[rows, cols], &p, &q);
    let j = klgpu(&[
        "kl",
        s(&pp),
        s(&qp),
        "--json",
        "--backend",
        "cpu",
        "--reduction",
        "sum",
    ])
    .json();
    let want = reference(
        Measure::KullbackLeibler,
        &p,
        Some(&q),
        cols,
        Options::default(),
    );
    assert_eq!(
        as_f64(&j["value"]),
        klgpu::Reduction::Sum.apply(&want.values).unwrap()
    );
    assert_eq!(j["adapter"]["name"], "cpu-reference");
}

#[test]
fn no_adapter() {
    let dir = tmp();
    let p = dir.path().join("p.npy");
    npy_f32(&p, &[4], &[0.25; 4]);
    // WGPU_BACKEND=metal on Linux: wgpu finds nothing.
    let env = [("WGPU_BACKEND", "metal")];
    if !cfg!(target_os = "linux") {
        return;
    }
    let r = klgpu_env(&["entropy", s(&p), "--backend", "gpu"], &env);
    assert_eq!(r.code, 1, "{:?}", r.ours);
    assert_eq!(r.ours.len(), 1, "{:?}", r.ours);
    assert!(
        r.ours[0].starts_with("klgpu: error: no GPU adapter"),
        "{:?}",
        r.ours
    );
    let r = klgpu_env(&["entropy", s(&p), "--json"], &env);
    assert_eq!(r.code, 0, "{:?}", r.ours);
    assert_eq!(r.ours.len(), 1, "a note about the fallback: {:?}", r.ours);
    assert!(r.ours[0].starts_with("klgpu: note:"), "{:?}", r.ours);
    let j = r.json();
    assert_eq!(j["adapter"]["name"], "cpu-reference");
    assert_close(as_f64(&j["value"]), 4f64.ln(), "entropy");
    let r = klgpu_env(&["entropy", s(&p), "--json", "--quiet"], &env);
    assert!(r.ours.is_empty(), "{:?}", r.ours);
}

#[test]
fn adapters_and_demo() {
    let r = klgpu(&["adapters", "--json"]);
    let j = r.json();
    let picked = j["picked"].as_u64().expect("an adapter is picked");
    assert!(j["adapters"][picked as usize]["picked"].as_bool().unwrap());
    let human = klgpu(&["adapters"]);
    assert!(human.stdout.contains('*'), "{}", human.stdout);

    let j = klgpu(&["demo", "--rows", "8", "--cols", "1000", "--json"]).json();
    let measures = j["measures"].as_array().unwrap();
    assert_eq!(measures.len(), 4);
    for m in measures {
        assert!(as_f64(&m["max_rel_diff"]) < 1e-5, "{m}");
        assert_close(as_f64(&m["gpu_mean"]), as_f64(&m["cpu_mean"]), "demo mean");
    }
}

// ---------------------------------------------------------------------------------------
// Bad input: exit code 2, one `klgpu:` line naming the file, no output file.

/// Runs a failing command with `--out`, and checks the contract.
fn expect_bad(dir: &Path, mut args: Vec<String>, needles: &[&str]) -> String {
    let out: PathBuf = dir.join("must-not-exist.npy");
    args.extend(["--out".to_string(), s(&out).to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = klgpu(&refs);
    assert_eq!(r.code, 2, "{args:?}: {:?}", r.ours);
    assert_eq!(r.ours.len(), 1, "{args:?}: {:?}", r.ours);
    let line = &r.ours[0];
    assert!(line.starts_with("klgpu: error: "), "{line}");
    for needle in needles {
        assert!(line.contains(needle), "{line:?} lacks {needle:?}");
    }
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    assert!(!out.exists(), "{args:?} left an output file");
    let tmp: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(tmp.is_empty(), "{tmp:?}");
    line.clone()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

/// File name, how to write it, what the message must say.
type BadFile = (&'static str, Box<dyn Fn(&Path)>, &'static [&'static str]);

#[test]
fn bad_files_and_shapes() {
    let dir = tmp();
    let d = dir.path();
    let good = d.join("good.npy");
    npy_f32(&good, &[2, 3], &[0.2, 0.3, 0.5, 0.1, 0.1, 0.8]);
    let g = s(&good);
    let cases: Vec<BadFile> = vec![
        (
            "ints.npy",
            Box::new(|p| npy_raw(p, "<i4", false, &[2, 3], &[0; 24])),
            &["integer"],
        ),
        (
            "complex.npy",
            Box::new(|p| npy_raw(p, "<c8", false, &[2, 3], &[0; 48])),
            &["complex"],
        ),
        (
            "big.npy",
            Box::new(|p| npy_raw(p, ">f4", false, &[2, 3], &[0; 24])),
            &["big-endian"],
        ),
        (
            "fortran.npy",
            Box::new(|p| npy_raw(p, "<f4", true, &[2, 3], &[0; 24])),
            &["Fortran"],
        ),
        (
            "cube.npy",
            Box::new(|p| npy_raw(p, "<f4", false, &[1, 2, 3], &[0; 24])),
            &["shapes differ", "[1, 2, 3]"],
        ),
        (
            "short.npy",
            Box::new(|p| npy_raw(p, "<f4", false, &[2, 3], &[0; 20])),
            &["truncated"],
        ),
        (
            "wide.npy",
            Box::new(|p| npy_f32(p, &[2, 4], &[0.25; 8])),
            &["shapes differ", "[2, 4]"],
        ),
        (
            "text.npy",
            Box::new(|p| std::fs::write(p, "hello, world").unwrap()),
            &["not a .npy"],
        ),
        (
            "arrays.npz",
            Box::new(|p| std::fs::write(p, b"PK\x03\x04\x14\0\0\0\0\0").unwrap()),
            &["zip archive", ".npz", "numpy.save"],
        ),
        (
            "model.pt",
            Box::new(|p| std::fs::write(p, b"\x80\x02\x8a\x0alz\xfc\x9cF\xf9").unwrap()),
            &["pickle"],
        ),
    ];
    for (name, make, needles) in cases {
        let path = d.join(name);
        make(&path);
        let mut want = vec![name];
        want.extend(needles);
        expect_bad(d, strings(&["kl", g, s(&path)]), &want);
    }
    let missing = d.join("missing.npy");
    expect_bad(
        d,
        strings(&["kl", s(&missing), g]),
        &["missing.npy", "cannot open"],
    );
    expect_bad(d, strings(&["entropy", s(d)]), &["directory"]);
    // A device or a pipe (`<(zcat p.npy.gz)`): not read by position, so refused up front.
    expect_bad(
        d,
        strings(&["kl", "/dev/null", g]),
        &["/dev/null", "not a regular file"],
    );

    // Safetensors: absent tensor, several tensors and none chosen, integer dtype.
    let st = d.join("m.safetensors");
    safetensors_file(
        &st,
        &[
            (
                "a",
                Dtype::F32,
                vec![2, 3],
                f32_bytes(&[0.2, 0.3, 0.5, 0.1, 0.1, 0.8]),
            ),
            ("ids", Dtype::I64, vec![2], vec![0; 16]),
        ],
    );
    expect_bad(
        d,
        strings(&["kl", s(&st), g, "--tensor", "nope"]),
        &["m.safetensors", "nope", "a, ids"],
    );
    // Q takes --tensor's name when --tensor-q gives none: the message says so.
    let other = d.join("other.safetensors");
    let x = f32_bytes(&[0.2, 0.3, 0.5, 0.1, 0.1, 0.8]);
    safetensors_file(&other, &[("x", Dtype::F32, vec![2, 3], x)]);
    expect_bad(
        d,
        strings(&["kl", s(&st), s(&other), "--tensor", "a"]),
        &["other.safetensors", "no tensor named 'a'", "--tensor-q"],
    );
    expect_bad(
        d,
        strings(&["entropy", s(&st)]),
        &["m.safetensors", "--tensor"],
    );
    expect_bad(
        d,
        strings(&["entropy", s(&st), "--tensor", "ids"]),
        &["m.safetensors", "I64"],
    );
    expect_bad(
        d,
        strings(&["entropy", g, "--tensor", "a"]),
        &["good.npy", "--tensor"],
    );
    let bytes = std::fs::read(&st).unwrap();
    let cut = d.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() - 4]).unwrap();
    expect_bad(
        d,
        strings(&["entropy", s(&cut), "--tensor", "a"]),
        &["cut.safetensors", "truncated"],
    );
}

#[test]
fn sixteen_bit_pairs_are_computed_as_stored() {
    // P and Q both bf16 (or both f16): whole-row blocks go to the GPU as stored. Values meet
    // the bar against the reference over the widened values on both backends, in one block
    // and in blocks of three rows; a bad value is named by file, row and column.
    let dir = tmp();
    let (rows, cols) = (7, 301);
    let p = probs(31, rows, cols);
    let q = probs(32, rows, cols);
    for (name, dtype) in [("bf16", Dtype::BF16), ("f16", Dtype::F16)] {
        let narrow = |v: &[f32]| -> (Vec<u8>, Vec<f32>) {
            let bits: Vec<u16> = v
                .iter()
                .map(|&x| match dtype {
                    Dtype::BF16 => half::bf16::from_f32(x).to_bits(),
                    _ => half::f16::from_f32(x).to_bits(),
                })
                .collect();
            let wide = bits
                .iter()
                .map(|&b| match dtype {
                    Dtype::BF16 => half::bf16::from_bits(b).to_f32(),
                    _ => half::f16::from_bits(b).to_f32(),
                })
                .collect();
            (bits.iter().flat_map(|b| b.to_le_bytes()).collect(), wide)
        };
        let ((pb, pw), (qb, qw)) = (narrow(&p), narrow(&q));
        let st = dir.path().join(format!("{name}.safetensors"));
        safetensors_file(
            &st,
            &[
                ("p", dtype, vec![rows, cols], pb.clone()),
                ("q", dtype, vec![rows, cols], qb),
            ],
        );
        for m in [Measure::KullbackLeibler, Measure::JensenShannon] {
            let want = reference(m, &pw, Some(&qw), cols, Options::default());
            let sum = klgpu::Reduction::Sum.apply(&want.values).unwrap();
            let base = [
                "--tensor",
                "p",
                "--tensor-q",
                "q",
                "--json",
                "--reduction",
                "sum",
            ];
            let block = (3 * cols * 4).to_string();
            for blocks in [&[][..], &["--block-bytes", &block][..]] {
                let args = [&[m.name(), s(&st), s(&st)][..], &base, blocks].concat();
                on_both_backends(&args, sum, &format!("{name} {m:?} {blocks:?}"));
            }
        }
        let mut bad = pb;
        let at = 5 * cols + 17;
        bad[2 * at..2 * at + 2].copy_from_slice(&match dtype {
            Dtype::BF16 => half::bf16::from_f32(-0.25).to_le_bytes(),
            _ => half::f16::from_f32(-0.25).to_le_bytes(),
        });
        let bad_st = dir.path().join(format!("bad_{name}.safetensors"));
        safetensors_file(&bad_st, &[("p", dtype, vec![rows, cols], bad)]);
        let args = ["kl", s(&bad_st), s(&st), "--tensor", "p", "--tensor-q", "q"];
        let block = (2 * cols * 4).to_string();
        let line = expect_bad(
            dir.path(),
            strings(&[&args[..], &["--block-bytes", &block]].concat()),
            &[],
        );
        assert!(
            line.contains(&format!(
                "bad_{name}.safetensors[p]: row 5, column 17: value -0.25 is negative"
            )),
            "{line}"
        );
    }
}

#[test]
fn bad_values_name_file_row_and_column() {
    let dir = tmp();
    let d = dir.path();
    let (rows, cols) = (8, 20);
    let good = probs(19, rows, cols);
    let (gp, bp) = (d.join("Q.npy"), d.join("P.npy"));
    npy_f32(&gp, &[rows, cols], &good);

    let mut bad = good.clone();
    bad[3 * cols + 17] = f32::NAN;
    npy_f32(&bp, &[rows, cols], &bad);
    let line = expect_bad(d, strings(&["kl", s(&bp), s(&gp)]), &[]);
    assert!(
        line.ends_with("P.npy: row 3, column 17: value is NaN"),
        "{line}"
    );
    // Same with 2 rows per block: the block offset is added back.
    let line = expect_bad(
        d,
        strings(&["kl", s(&bp), s(&gp), "--block-bytes", "160"]),
        &[],
    );
    assert!(
        line.ends_with("P.npy: row 3, column 17: value is NaN"),
        "{line}"
    );
    // And on the CPU backend.
    let line = expect_bad(d, strings(&["kl", s(&bp), s(&gp), "--backend", "cpu"]), &[]);
    assert!(
        line.ends_with("P.npy: row 3, column 17: value is NaN"),
        "{line}"
    );

    // A negative probability in Q, in the last block: named after Q's file.
    let mut neg = good.clone();
    neg[6 * cols + 2] = -0.5;
    let np = d.join("neg.npy");
    npy_f32(&np, &[rows, cols], &neg);
    let line = expect_bad(
        d,
        strings(&["js", s(&gp), s(&np), "--block-bytes", "240"]),
        &[],
    );
    assert!(
        line.contains(
            "neg.npy: row 6, column 2: value -0.5 is negative; probabilities must be >= 0"
        ) && line.ends_with("pass --input log-probs or --input logits)"),
        "{line}"
    );

    // An f64 value beyond f32's range, in a later block: named as the file holds it, not as
    // the +inf it would round to; the same on the CPU backend. 1-D: by index.
    let mut wide: Vec<f64> = good.iter().map(|&x| x as f64).collect();
    wide[5 * cols + 11] = -1e300;
    let wp = d.join("wide.npy");
    npy_f64(&wp, &[rows, cols], &wide);
    for backend in ["gpu", "cpu"] {
        let line = expect_bad(
            d,
            strings(&[
                "ce",
                s(&gp),
                s(&wp),
                "--block-bytes",
                "160",
                "--backend",
                backend,
            ]),
            &[],
        );
        assert!(
            line.contains("wide.npy: row 5, column 11: value -1e300 is beyond the range of f32"),
            "{line}"
        );
    }
    npy_f64(&wp, &[rows * cols], &wide);
    let line = expect_bad(d, strings(&["entropy", s(&wp)]), &[]);
    assert!(line.contains("wide.npy: index 111: value -1e300"), "{line}");

    // 1-D logits cut in pieces: +inf found by the first (log-sum-exp) pass, and a row of -inf.
    let n = 5000;
    let mut l = logits(20, n, 1.0);
    l[3210] = f32::INFINITY;
    let (lp, lq) = (d.join("lp.npy"), d.join("lq.npy"));
    npy_f32(&lp, &[n], &l);
    npy_f32(&lq, &[n], &logits(21, n, 1.0));
    let line = expect_bad(
        d,
        strings(&[
            "kl",
            s(&lq),
            s(&lp),
            "--input",
            "logits",
            "--block-bytes",
            "4000",
        ]),
        &[],
    );
    assert!(
        line.ends_with("lp.npy: index 3210: value inf is infinite"),
        "{line}"
    );
    npy_f32(&lp, &[n], &vec![f32::NEG_INFINITY; n]);
    expect_bad(
        d,
        strings(&[
            "entropy",
            s(&lp),
            "--input",
            "logits",
            "--block-bytes",
            "4000",
        ]),
        &["lp.npy", "no probability mass"],
    );
    // 1-D probabilities cut in pieces without a first pass: the piece offset is added back.
    let mut p1 = probs(22, 1, n);
    p1[4321] = -1.0;
    npy_f32(&lp, &[n], &p1);
    let line = expect_bad(
        d,
        strings(&["entropy", s(&lp), "--block-bytes", "4000"]),
        &[],
    );
    assert!(
        line.contains("lp.npy: index 4321: value -1 is negative;"),
        "{line}"
    );
}

#[test]
fn the_first_offender_is_named_whatever_the_block_size() {
    // Errors name the element a single library call over the whole input names first: invalid
    // values in element order (P before Q), and a row that overflows f32 only where no value
    // anywhere is invalid. Streamed in blocks, an f64 beyond f32's range in Q's first block
    // was named ahead of a NaN in P's row 0 (the read failed before the block was computed),
    // and a row that overflowed in block 0 ahead of a NaN in a later block; with one block
    // (or on the CPU backend) the NaN was named. The cli_fuzz.py --edges found the first.
    let dir = tmp();
    let d = dir.path();
    let (rows, cols) = (6, 8);
    let flat = vec![0.125f64; rows * cols];
    let (mut p, mut q) = (flat.clone(), flat.clone());
    p[2] = f64::NAN;
    q[cols + 2] = 3.5e38;
    let (pf, qf) = (d.join("P.npy"), d.join("Q.npy"));
    npy_f64(&pf, &[rows, cols], &p);
    npy_f64(&qf, &[rows, cols], &q);
    // Log-probabilities: row 0's 100 has e^100 beyond f32 (an overflow of the row, on the
    // GPU), row 4 holds a NaN.
    let mut lp = vec![(0.125f32).ln(); rows * cols];
    lp[1] = 100.0;
    let mut lq = lp.clone();
    lq[4 * cols + 3] = f32::NAN;
    let (lpf, lqf) = (d.join("lp.npy"), d.join("lq.npy"));
    npy_f32(&lpf, &[rows, cols], &lp);
    npy_f32(&lqf, &[rows, cols], &lq);
    let cases = [
        (
            vec![s(&pf), s(&qf)],
            "probs",
            "P.npy: row 0, column 2: value is NaN",
        ),
        // Q's value beyond f32 first, where P's NaN is gone; in pieces (with a first pass
        // under --normalize) and whole.
        (
            vec![s(&qf), s(&qf)],
            "probs",
            "Q.npy: row 1, column 2: value 3.5e38 is beyond the range of f32",
        ),
        (
            vec![s(&lpf), s(&lqf)],
            "log-probs",
            "lq.npy: row 4, column 3: value is NaN",
        ),
    ];
    for (files, input, want) in cases {
        for backend in ["gpu", "cpu"] {
            for block in ["4", "16", "32", "96", "100000"] {
                for norm in [&[][..], &["--normalize"][..]] {
                    let mut args = strings(&["kl"]);
                    args.extend(strings(&files));
                    args.extend(strings(&["--input", input, "--backend", backend]));
                    args.extend(strings(&["--block-bytes", block]));
                    args.extend(strings(norm));
                    let line = expect_bad(d, args.clone(), &[]);
                    assert!(line.contains(want), "{args:?}: {line}");
                }
            }
        }
    }
}

#[test]
fn failure_keeps_an_existing_output_file() {
    let dir = tmp();
    let p = dir.path().join("p.npy");
    npy_f32(&p, &[3], &[0.5, f32::NAN, 0.5]);
    let out = dir.path().join("out.npy");
    std::fs::write(&out, b"precious").unwrap();
    let r = klgpu(&["entropy", s(&p), "--out", s(&out)]);
    assert_eq!(r.code, 2, "{:?}", r.ours);
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
}

#[test]
fn output_never_replaces_an_input() {
    // Renaming the per-row file over P or Q would destroy it: refused before any work, by
    // the path as given, through another spelling, a symbolic link or a hard link.
    let dir = tmp();
    let (p, q) = (dir.path().join("p.npy"), dir.path().join("q.npy"));
    npy_f32(&p, &[2, 2], &[0.5; 4]);
    npy_f32(&q, &[2, 2], &[0.25, 0.75, 0.5, 0.5]);
    let original = std::fs::read(&p).unwrap();
    let dotted = dir.path().join(".").join("p.npy");
    let hard = dir.path().join("hard.npy");
    std::fs::hard_link(&p, &hard).unwrap();
    let mut outs = vec![
        (p.clone(), "p.npy"),
        (dotted, "p.npy"),
        (hard, "p.npy"),
        (q.clone(), "q.npy"),
    ];
    #[cfg(unix)]
    {
        let link = dir.path().join("link.npy");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        outs.push((link, "p.npy"));
    }
    for (out, input) in &outs {
        let r = klgpu(&["kl", s(&p), s(&q), "--out", s(out)]);
        assert_eq!(r.code, 2, "{out:?}: {:?}", r.ours);
        assert_eq!(r.ours.len(), 1, "{:?}", r.ours);
        assert!(
            r.ours[0].contains("--out names the input") && r.ours[0].contains(input),
            "{:?}",
            r.ours
        );
    }
    let r = klgpu(&["entropy", s(&p), "--out", s(&p)]);
    assert_eq!(r.code, 2, "{:?}", r.ours);
    assert_eq!(std::fs::read(&p).unwrap(), original);
    // A new file beside them is written.
    let out = dir.path().join("rows.npy");
    let r = klgpu(&["kl", s(&p), s(&q), "--out", s(&out)]);
    assert_eq!(r.code, 0, "{:?}", r.ours);
    assert!(out.exists());
}

#[test]
fn out_dash_is_refused_not_a_file_named_dash() {
    // `-` reads as standard output, where an .npy file is not wanted: a file named `-` was
    // written in the working directory.
    let dir = tmp();
    let p = dir.path().join("p.npy");
    npy_f32(&p, &[2, 2], &[0.5; 4]);
    let r = klgpu(&["entropy", s(&p), "--out", "-"]);
    assert_eq!(r.code, 2, "{:?}", r.ours);
    assert!(r.ours[0].contains("--out -: klgpu writes"), "{:?}", r.ours);
    assert!(!std::path::Path::new("-").exists());
    // A file so named, given with its directory, is written.
    let named = dir.path().join("-");
    let r = klgpu(&["entropy", s(&p), "--out", s(&named)]);
    assert_eq!(r.code, 0, "{:?}", r.ours);
    assert!(named.exists());
}

#[test]
fn usage_errors_are_ours_and_exit_2() {
    for args in [
        &["kl", "a.npy"][..],
        &["kl", "a.npy", "b.npy", "--base", "3"],
        &["kl", "a.npy", "b.npy", "--block-bytes", "0"],
        &["entropy", "a.npy", "--tensor-q", "x"],
    ] {
        let r = klgpu(args);
        assert_eq!(r.code, 2, "{args:?}");
        assert!(r.ours[0].starts_with("klgpu: error: "), "{:?}", r.ours);
    }
    let dir = tmp();
    let p = dir.path().join("p.npy");
    npy_f32(&p, &[2], &[0.5, 0.5]);
    let out = dir.path().join("no/such/dir/out.npy");
    let r = klgpu(&["entropy", s(&p), "--out", s(&out)]);
    assert_eq!(r.code, 2, "{:?}", r.ours);
    assert_eq!(r.ours.len(), 1, "{:?}", r.ours);
    assert!(r.ours[0].contains("does not exist"), "{:?}", r.ours);
    // A parent that is a file: it said "directory p.npy does not exist".
    let out = p.join("out.npy");
    let r = klgpu(&["entropy", s(&p), "--out", s(&out)]);
    assert_eq!(r.code, 2, "{:?}", r.ours);
    assert!(r.ours[0].contains("is not a directory"), "{:?}", r.ours);
}

#[test]
fn normalized_log_probabilities_are_read_as_logits() {
    // Rows of log-probabilities that do not sum to one: --normalize makes them e^x / Σ e^x,
    // the logits' reading, in one block and in rows cut into pieces (it was ignored, with a
    // note that claimed log-probabilities were normalized by construction).
    let dir = tmp();
    let (rows, cols) = (6, 3000);
    let p = logits(31, rows * cols, 1.0);
    let q = perturbed(&p, 32);
    let shifted: Vec<f32> = p.iter().map(|v| v + 2.0).collect();
    let (pp, qp) = npy_pair(dir.path(), &[rows, cols], &shifted, &q);
    for block in ["4000", "33554432"] {
        let out = |input: &str, normalize: bool| {
            let mut args = vec!["kl", s(&pp), s(&qp), "--json", "--input", input];
            args.extend(["--block-bytes", block, "--reduction", "sum"]);
            if normalize {
                args.push("--normalize");
            }
            let r = klgpu(&args);
            assert!(r.ours.is_empty(), "no note: {:?}", r.ours);
            as_f64(&r.json()["value"])
        };
        let as_logits = out("logits", false);
        assert_close(out("log-probs", true), as_logits, "normalized log-probs");
        assert!(
            (out("log-probs", false) - as_logits).abs() > 1e-3 * as_logits,
            "without --normalize the rows are taken as given"
        );
    }
}

#[test]
fn f64_probabilities_below_f32_are_refused_where_they_decide_infinity() {
    // klgpu computes in f32, where 1e-50 is 0: a Q value under P > 0 would make KL and
    // cross-entropy infinite (they are finite), a P value over Q = 0 finite (it is infinite),
    // and a negative one would pass as -0. Elsewhere such values change nothing f32 resolves:
    // rows of f64 probabilities hold them often, and they are computed.
    let dir = tmp();
    let d = dir.path();
    let (up, uq) = (d.join("up.npy"), d.join("uq.npy"));
    npy_f64(&up, &[1, 2], &[0.5, 0.5]);
    npy_f64(&uq, &[1, 2], &[1.0 - 1e-50, 1e-50]);
    for command in ["kl", "ce"] {
        for backend in ["gpu", "cpu"] {
            expect_bad(
                d,
                strings(&[command, s(&up), s(&uq), "--backend", backend]),
                &["uq.npy: row 0, column 1: value 1e-50 is below f32's smallest positive value"],
            );
        }
    }
    let (p3, q3) = (d.join("p3.npy"), d.join("q3.npy"));
    npy_f64(&p3, &[3], &[0.5, 0.5 - 1e-60, 1e-60]);
    npy_f64(&q3, &[3], &[0.5, 0.5, 0.0]);
    expect_bad(
        d,
        strings(&["kl", s(&p3), s(&q3)]),
        &["p3.npy: index 2: value 1e-60"],
    );
    let neg = d.join("neg.npy");
    npy_f64(&neg, &[3], &[0.5, 0.5, -1e-60]);
    expect_bad(
        d,
        strings(&["entropy", s(&neg)]),
        &["neg.npy: index 2: value -1e-60 is negative"],
    );
    // Where no answer depends on them: JS, both sides tiny, P = 0 over a tiny Q, and inputs
    // other than probabilities (a logit of 1e-50 is 0 to f32's resolution).
    let (bp, bq) = (d.join("bp.npy"), d.join("bq.npy"));
    npy_f64(&bp, &[2, 3], &[0.5, 0.5 - 1e-50, 1e-50, 0.3, 0.7, 0.0]);
    npy_f64(
        &bq,
        &[2, 3],
        &[0.5, 0.5 - 1e-55, 1e-55, 0.3, 0.7 - 1e-60, 1e-60],
    );
    for args in [
        ["js", s(&up), s(&uq), "--input", "probs"],
        ["kl", s(&bp), s(&bq), "--input", "probs"],
        ["kl", s(&up), s(&uq), "--input", "log-probs"],
    ] {
        let r = klgpu(&[&args[..], &["--json", "--reduction", "sum"]].concat());
        assert_eq!(r.code, 0, "{args:?}: {:?}", r.ours);
        assert!(as_f64(&r.json()["value"]).is_finite(), "{args:?}");
    }
    let r = klgpu(&["kl", s(&bp), s(&bq), "--json", "--reduction", "sum"]);
    assert!(as_f64(&r.json()["value"]).abs() < 1e-6, "{}", r.stdout);
}

#[cfg(unix)]
#[test]
fn outputs_and_inputs_that_are_not_plain_files() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tmp();
    let d = dir.path();
    let (p, q) = (d.join("p.npy"), d.join("q.npy"));
    npy_f32(&p, &[2, 2], &[0.5; 4]);
    npy_f32(&q, &[2, 2], &[0.25, 0.75, 0.5, 0.5]);
    let fifo = d.join("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let is_fifo = |path: &Path| {
        use std::os::unix::fs::FileTypeExt;
        std::fs::symlink_metadata(path)
            .unwrap()
            .file_type()
            .is_fifo()
    };
    // A FIFO as --out: the output was renamed over it (as it would be over /dev/null).
    let r = klgpu(&["kl", s(&p), s(&q), "--out", s(&fifo)]);
    assert_eq!(r.code, 2, "{:?}", r.ours);
    assert!(r.ours[0].contains("device, pipe or socket"), "{:?}", r.ours);
    assert!(is_fifo(&fifo));
    // A FIFO as input: refused at once (opening one blocked until something wrote to it).
    let r = klgpu(&["entropy", s(&fifo)]);
    assert_eq!(r.code, 2, "{:?}", r.ours);
    assert!(r.ours[0].contains("not a regular file"), "{:?}", r.ours);
    let r = klgpu(&["entropy", "-"]);
    assert_eq!(r.code, 2, "{:?}", r.ours);
    assert!(
        r.ours[0].contains("does not read standard input"),
        "{:?}",
        r.ours
    );
    // A path with a trailing slash names a directory, refused before any work.
    let slash = format!("{}/", d.join("new.npy").display());
    let r = klgpu(&["kl", s(&p), s(&q), "--out", &slash]);
    assert_eq!(r.code, 2, "{:?}", r.ours);
    assert!(r.ours[0].contains("names a directory"), "{:?}", r.ours);
    // A symbolic link stays one, and its target gets the values; a replaced file keeps its
    // permissions.
    let is_link = |path: &Path| {
        std::fs::symlink_metadata(path)
            .unwrap()
            .file_type()
            .is_symlink()
    };
    let (target, link) = (d.join("target.npy"), d.join("link.npy"));
    std::fs::write(&target, b"old").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let r = klgpu(&["kl", s(&p), s(&q), "--out", s(&link)]);
    assert_eq!(r.code, 0, "{:?}", r.ours);
    assert!(is_link(&link));
    assert_eq!(read_npy_f64(&target).len(), 2);
    let mode = std::fs::metadata(&target).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // So does a dangling one (it was replaced by a plain file): its target is made.
    let (target, link) = (d.join("runs").join("latest.npy"), d.join("dangling.npy"));
    std::fs::create_dir(d.join("runs")).unwrap();
    std::os::unix::fs::symlink("runs/latest.npy", &link).unwrap();
    let r = klgpu(&["kl", s(&p), s(&q), "--out", s(&link)]);
    assert_eq!(r.code, 0, "{:?}", r.ours);
    assert!(is_link(&link));
    assert_eq!(read_npy_f64(&target).len(), 2);
    // A run whose report cannot be printed failed: it leaves --out as it was (the file was
    // replaced before the report was printed).
    #[cfg(target_os = "linux")]
    {
        std::fs::write(&target, b"old").unwrap();
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let status = Command::new(env!("CARGO_BIN_EXE_klgpu"))
            .args(["kl", s(&p), s(&q), "--out", s(&target)])
            .stdout(full)
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(1));
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
    }
}

#[cfg(target_os = "linux")]
#[test]
fn an_unwritable_standard_error_is_no_panic() {
    // eprintln! panics when standard error cannot be written; the exit code must still say
    // "bad input" (2), not a panic's 101.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_klgpu"))
        .args(["entropy", "no-such-file.npy"])
        .stderr(full)
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
}

#[test]
fn negative_divergences_of_rows_that_are_not_distributions_get_a_note() {
    // KL of rows that do not sum to 1 can be negative, and said nothing: a user who forgot
    // --normalize read it as a result.
    let dir = tmp();
    let (pp, qp) = npy_pair(
        dir.path(),
        &[2, 2],
        &[0.5, 0.5, 0.2, 0.2],
        &[0.9, 0.9, 0.5, 0.5],
    );
    let r = klgpu(&["kl", s(&pp), s(&qp)]);
    assert_eq!(r.code, 0, "{:?}", r.ours);
    assert!(
        r.ours
            .iter()
            .any(|l| l.contains("2 of 2 rows came out negative") && l.contains("--normalize")),
        "{:?}",
        r.ours
    );
    let r = klgpu(&["kl", s(&pp), s(&qp), "--normalize"]);
    assert!(r.ours.is_empty(), "{:?}", r.ours);
    let r = klgpu(&["kl", s(&pp), s(&qp), "-q"]);
    assert!(r.ours.is_empty(), "{:?}", r.ours);
}

#[test]
fn the_last_of_a_repeated_option_wins() {
    // `--base 2 --base e` was refused ("cannot be used multiple times"), unlike most tools.
    let dir = tmp();
    let (pp, qp) = npy_pair(dir.path(), &[2], &[0.5, 0.5], &[0.25, 0.75]);
    let j = klgpu(&[
        "kl",
        s(&pp),
        s(&qp),
        "--base",
        "2",
        "--base",
        "e",
        "-q",
        "-q",
        "--json",
    ])
    .json();
    assert_eq!(j["base"], "e", "{j}");
}

#[test]
fn a_misspelt_wgpu_backend_is_named() {
    // WGPU_BACKEND=vulkn searches no backend: the "no adapter" error blamed the drivers.
    let dir = tmp();
    let (pp, qp) = npy_pair(dir.path(), &[2], &[0.5, 0.5], &[0.25, 0.75]);
    // The default backend (auto) fell back to the CPU with a note, which -q hid: an error now,
    // as an unmatched WGPU_ADAPTER_NAME is.
    for more in [&["--backend", "gpu"][..], &[], &["-q"]] {
        let mut args = vec!["kl", s(&pp), s(&qp)];
        args.extend(more);
        let r = klgpu_env(&args, &[("WGPU_BACKEND", "vulkan,vulkn")]);
        assert_eq!(r.code, 1, "{:?}", r.ours);
        assert!(
            r.ours[0].contains("names \"vulkn\", which wgpu does not know"),
            "{:?}",
            r.ours
        );
        // Empty, wgpu searches nothing too.
        let r = klgpu_env(&args, &[("WGPU_BACKEND", " , ")]);
        assert_eq!(r.code, 1, "{:?}", r.ours);
        assert!(r.ours[0].contains("names no backend"), "{:?}", r.ours);
    }
}

#[test]
fn n_d_inputs_are_rows_of_their_last_dimension() {
    // [batch, seq, vocab] logits (Hugging Face's shape) were refused: "reshape first".
    let dir = tmp();
    let d = dir.path();
    let (rows, cols) = (6, 5);
    let p = logits(31, rows * cols, 3.0);
    let q = perturbed(&p, 32);
    let kl = Measure::KullbackLeibler;
    let want = reference(kl, &p, Some(&q), cols, Options::input(Input::Logits)).values;
    let (pp, qp) = npy_pair(d, &[2, 3, cols], &p, &q);
    let st = d.join("both.safetensors");
    safetensors_file(
        &st,
        &[
            ("p", Dtype::F32, vec![1, 2, 3, cols], f32_bytes(&p)),
            ("q", Dtype::F32, vec![1, 2, 3, cols], f32_bytes(&q)),
        ],
    );
    let runs: [Vec<&str>; 2] = [
        vec![s(&pp), s(&qp)],
        vec![s(&st), s(&st), "--tensor", "p", "--tensor-q", "q"],
    ];
    for inputs in runs {
        let out = d.join("rows.npy");
        let mut args = vec!["kl"];
        args.extend(&inputs);
        args.extend(["--input", "logits", "--json", "--out", s(&out)]);
        let j = klgpu(&args).json();
        assert_eq!(j["rows"], rows, "{j}");
        assert_rows_file(&out, &want, &format!("{inputs:?}: "));
    }
}

#[test]
fn p_and_q_that_are_the_same_data_get_a_note() {
    // `--tensor p` on a file holding P and Q gave Q the same tensor: every row compared with
    // itself, KL 0 and 100 % agreement, silently.
    let dir = tmp();
    let d = dir.path();
    let st = d.join("both.safetensors");
    let (p, q) = ([0.5f32, 0.5], [0.25f32, 0.75]);
    safetensors_file(
        &st,
        &[
            ("p", Dtype::F32, vec![1, 2], f32_bytes(&p)),
            ("q", Dtype::F32, vec![1, 2], f32_bytes(&q)),
        ],
    );
    let r = klgpu(&["kl", s(&st), s(&st), "--tensor", "p", "--json"]);
    assert_eq!(r.code, 0, "{:?}", r.ours);
    assert_eq!(r.ours.len(), 1, "{:?}", r.ours);
    assert!(
        r.ours[0].contains("the same data") && r.ours[0].contains("--tensor-q"),
        "{:?}",
        r.ours
    );
    let (pp, _) = npy_pair(d, &[2], &p, &q);
    let link = d.join("link.npy");
    std::os::unix::fs::symlink(&pp, &link).unwrap();
    let r = klgpu(&["kl", s(&pp), s(&link)]);
    assert!(
        r.ours.iter().any(|l| l.contains("the same data")),
        "{:?}",
        r.ours
    );
    for args in [
        vec!["kl", s(&st), s(&st), "--tensor", "p", "--tensor-q", "q"],
        vec!["kl", s(&st), s(&st), "--tensor", "p", "-q"],
    ] {
        let r = klgpu(&args);
        assert_eq!(r.code, 0, "{:?}", r.ours);
        assert!(r.ours.is_empty(), "{args:?}: {:?}", r.ours);
    }
    let help = klgpu(&["kl", "--help"]);
    assert!(help.stdout.contains("--block-bytes"), "the README names it");
}

#[test]
fn rows_that_leave_f32_on_the_gpu_are_computed_in_f64() {
    // A row of probabilities near f32::MAX overflows the GPU's f32 sums: it was an error
    // ("use --backend cpu"); the f64 reference computes the block now, as it did pieces.
    let dir = tmp();
    let p = [0.5, 0.5, 3e38, 3e38];
    let q = [0.25, 0.75, 0.5, 0.5];
    let (pp, qp) = npy_pair(dir.path(), &[2, 2], &p, &q);
    let opts = Options {
        normalize: true,
        ..Options::default()
    };
    let want = reference(Measure::KullbackLeibler, &p, Some(&q), 2, opts);
    for backend in ["gpu", "cpu"] {
        let args = ["kl", s(&pp), s(&qp), "--normalize", "--backend", backend];
        let j = klgpu(&[&args[..], &["--json", "--reduction", "sum"]].concat()).json();
        let sum: f64 = want.values.iter().sum();
        assert_close(as_f64(&j["value"]), sum, backend);
    }
}
