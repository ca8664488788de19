//! The `kl`, `ce`, `js` and `entropy` commands: open and check the inputs, pick the backend,
//! stream, reduce, summarize, write and print.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use klgpu::{Engine, Input, Measure, Options, Reduction, RowResults};

use crate::error::CliError;
use crate::output::{self, AdapterDesc, Report};
use crate::progress::Progress;
use crate::source::{Source, Stamp, TensorChoice};
use crate::stream::{self, Layout};
use klgpu::stats;

/// Which implementation computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// The GPU if wgpu finds an adapter, else the CPU reference (with a note).
    Auto,
    /// The GPU; no adapter is an error.
    Gpu,
    /// The f64 CPU reference, `klgpu::cpu`.
    Cpu,
}

/// An opened backend.
pub enum Backend {
    /// A GPU engine (boxed: it is much larger than the other variant).
    Gpu(Box<Engine>),
    /// The f64 reference.
    Cpu,
}

fn open_p(cmd: &MeasureRun) -> Result<Source, CliError> {
    let choice = TensorChoice {
        name: cmd.tensor.clone(),
        flag: cmd.tensor.as_ref().map(|_| "--tensor"),
    };
    Source::open(&cmd.p, &choice)
}

fn open_q(cmd: &MeasureRun, path: &Path) -> Result<Source, CliError> {
    let choice = TensorChoice {
        name: cmd.tensor_q.clone().or_else(|| cmd.tensor.clone()),
        flag: cmd.tensor_q.as_ref().map(|_| "--tensor-q"),
    };
    Source::open(path, &choice)
}

/// The first column of `row` whose term is +∞ (P > 0 where Q = 0; as logs, P > −∞ where
/// Q = −∞) and both values there, read again from the files a piece at a time: the summary
/// names the row, and a user looking for the mask that differs wants the column. Only for a
/// note: `None` where the files cannot be read again as they were read (`stamps`).
fn first_infinite_term(
    cmd: &MeasureRun,
    layout: Layout,
    row: usize,
    input: Input,
    stamps: &(Stamp, Option<Stamp>),
) -> Option<(usize, f32, f32)> {
    let (mut p, mut q) = (open_p(cmd).ok()?, open_q(cmd, cmd.q.as_ref()?).ok()?);
    if (p.stamp(), Some(q.stamp())) != *stamps {
        return None;
    }
    let infinite = |x: f32, y: f32| match input {
        Input::Probs => x > 0.0 && y == 0.0,
        _ => x > f32::NEG_INFINITY && y == f32::NEG_INFINITY,
    };
    const PIECE: usize = 1 << 20;
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for start in (0..layout.cols).step_by(PIECE) {
        let n = PIECE.min(layout.cols - start);
        p.read_f32(row * layout.cols + start, n, &mut xs).ok()?;
        q.read_f32(row * layout.cols + start, n, &mut ys).ok()?;
        if let Some(i) = (0..n).find(|&i| infinite(xs[i], ys[i])) {
            return Some((start + i, xs[i], ys[i]));
        }
    }
    None
}

impl Backend {
    /// Opens the backend asked for. `auto` falls back to the CPU only when there is no
    /// adapter at all; other failures are errors (exit code 1).
    pub fn open(choice: BackendChoice, quiet: bool) -> Result<Backend, CliError> {
        match choice {
            BackendChoice::Cpu => Ok(Backend::Cpu),
            BackendChoice::Gpu => Engine::new()
                .map(|e| Backend::Gpu(Box::new(e)))
                .map_err(|e| CliError::runtime(e.to_string())),
            BackendChoice::Auto => match Engine::new() {
                Ok(e) => Ok(Backend::Gpu(Box::new(e))),
                Err(klgpu::Error::NoAdapter { details }) => {
                    if !quiet {
                        crate::error::print_err(format_args!(
                            "klgpu: note: no GPU adapter found ({details}); computing with the \
                             f64 CPU reference (--backend cpu)"
                        ));
                    }
                    Ok(Backend::Cpu)
                }
                Err(e) => Err(CliError::runtime(e.to_string())),
            },
        }
    }

    /// The adapter as reported.
    pub fn adapter(&self) -> AdapterDesc {
        match self {
            Backend::Gpu(e) => AdapterDesc::from_info(e.adapter_info()),
            Backend::Cpu => AdapterDesc::cpu_reference(),
        }
    }

    /// Per-row values of `[rows × cols]` inputs (see `klgpu::Engine::rows`).
    pub fn rows<T: klgpu::Element>(
        &self,
        measure: Measure,
        p: &[T],
        q: Option<&[T]>,
        cols: usize,
        opts: &Options,
    ) -> klgpu::Result<RowResults> {
        match self {
            Backend::Gpu(engine) => engine.rows(measure, p, q, cols, opts),
            Backend::Cpu => klgpu::cpu::rows(measure, p, q, cols, opts),
        }
    }
}

/// A fully parsed `kl`/`ce`/`js`/`entropy` invocation.
#[derive(Clone, Debug)]
pub struct MeasureRun {
    /// What to compute.
    pub measure: Measure,
    /// P's file.
    pub p: PathBuf,
    /// Q's file (two-input measures).
    pub q: Option<PathBuf>,
    /// How to read the inputs, base and normalization.
    pub opts: Options,
    /// The base as given (`e`, `2`, `10`).
    pub base_name: &'static str,
    /// How to combine per-row values of a 2-D (or N-D) input.
    pub reduction: Reduction,
    /// The reduction as given (`none`, `sum`, `mean-rows`).
    pub reduction_name: &'static str,
    /// Where to write per-row values.
    pub out: Option<PathBuf>,
    /// Print one JSON object instead of the human-readable report.
    pub json: bool,
    /// Which implementation to use.
    pub backend: BackendChoice,
    /// P's safetensors tensor (and Q's unless `tensor_q` is given).
    pub tensor: Option<String>,
    /// Q's safetensors tensor.
    pub tensor_q: Option<String>,
    /// No notes, no progress bar.
    pub quiet: bool,
    /// Bytes of f32 per input and block.
    pub block_bytes: u64,
}

/// Runs one measure command.
pub fn run(cmd: &MeasureRun) -> Result<(), CliError> {
    // Inputs first: bad files fail fast, before any device is created.
    let p = open_p(cmd)?;
    let q = cmd.q.as_ref().map(|path| open_q(cmd, path)).transpose()?;
    if let Some(q) = &q
        && q.shape != p.shape
    {
        return Err(CliError::input(format!(
            "shapes differ: {} has shape {:?}, {} has shape {:?}",
            p.label, p.shape, q.label, q.shape
        )));
    }
    // Dimensions before the last are rows, in C order: [batch, seq, vocab] logits are
    // batch·seq rows (the sources checked that the element count fits).
    let (cols, leading) = p
        .shape
        .split_last()
        .expect("sources have 1 dimension or more");
    let one_d = leading.is_empty();
    let layout = Layout {
        rows: leading.iter().product(),
        cols: *cols,
        one_d,
    };
    // Known before any work, said after it succeeds (a failed run prints its error alone).
    let same_data = match (&q, &cmd.q) {
        (Some(q), Some(q_path)) => p.same_data(q, &cmd.p, q_path),
        _ => false,
    };
    if let Some(out) = &cmd.out {
        let inputs: Vec<&Path> = std::iter::once(cmd.p.as_path())
            .chain(cmd.q.as_deref())
            .collect();
        output::check_out_path(out, &inputs)?;
    }
    if cmd.opts.normalize && cmd.opts.input == Input::Logits && !cmd.quiet {
        crate::error::print_err(format_args!(
            "klgpu: note: logits are normalized by construction; --normalize changes nothing"
        ));
    }
    // Normalized log-probabilities are read as logits (the library's rule): the report keeps
    // the input kind as given.
    let opts = cmd.opts.resolved();
    let backend = Backend::open(cmd.backend, cmd.quiet)?;
    let p_label = p.label.clone();
    let q_label = q.as_ref().map(|q| q.label.clone());

    let start = Instant::now();
    let progress = Progress::new(cmd.quiet);
    let block_elems = usize::try_from(cmd.block_bytes / 4)
        .unwrap_or(usize::MAX)
        .max(1);
    // The files as read: the +∞ note reads them again, and only if they are still these.
    let stamps = (p.stamp(), q.as_ref().map(Source::stamp));
    let result = stream::run(
        &backend,
        cmd.measure,
        p,
        q,
        layout,
        opts,
        block_elems,
        &progress,
    );
    progress.finish();
    let outcome = result?;
    let elapsed_s = start.elapsed().as_secs_f64();
    if same_data && !cmd.quiet {
        let hint = if cmd.tensor_q.is_none() && cmd.tensor.is_some() {
            " (Q took --tensor's name; --tensor-q names its own)"
        } else {
            ""
        };
        crate::error::print_err(format_args!(
            "klgpu: note: P and Q are the same data, {p_label}: every row is compared with \
             itself{hint}"
        ));
    }
    if let Some(row) = outcome.values.iter().position(|v| *v == f64::INFINITY)
        && !cmd.quiet
        && let Some((col, x, y)) = first_infinite_term(cmd, layout, row, opts.input, &stamps)
    {
        let at = crate::error::position(one_d, row, col);
        // f32's shortest digits, in exponent form far from 1 (1e-45 printed 45 zeros).
        let short = |v: f32| {
            if v != 0.0 && v.is_finite() && !(1e-4..1e7).contains(&v.abs()) {
                format!("{v:e}")
            } else {
                format!("{v}")
            }
        };
        let (x, y) = (short(x), short(y));
        let cause = match opts.input {
            Input::Probs => "Q has no mass where P has some",
            _ => {
                "masks that differ between P and Q, such as -inf against a finite minimum, do this"
            }
        };
        crate::error::print_err(format_args!(
            "klgpu: note: {}: {at}: P is {x} where Q is {y}, the first term that makes {} +∞ \
             ({cause})",
            q_label.as_deref().unwrap_or_default(),
            if one_d { "the value" } else { "a row" }
        ));
    }
    // KL and JS of distributions are never negative (nor made so by rounding): a negative
    // row was given rows that are not distributions, which the user may not know.
    let negative = outcome.values.iter().filter(|v| **v < 0.0).count();
    let divergence = matches!(
        cmd.measure,
        Measure::KullbackLeibler | Measure::JensenShannon
    );
    if divergence && negative > 0 && !cmd.quiet {
        crate::error::print_err(format_args!(
            "klgpu: note: {negative} of {} rows came out negative, which only rows that are not \
             distributions give: --normalize divides each row by its sum, and --input logits or \
             log-probs reads other forms",
            outcome.values.len()
        ));
    }

    let value = if one_d {
        outcome.values.first().copied()
    } else {
        cmd.reduction.apply(&outcome.values)
    };
    let summary = if one_d {
        None
    } else {
        stats::summarize(&outcome.values)
    };
    let top1 = outcome
        .top1
        .as_ref()
        .and_then(|agree| stats::agreement(agree));
    let pending = match &cmd.out {
        Some(out) => Some(output::write_rows_atomically(out, &outcome.values)?),
        None => None,
    };
    let report = Report {
        measure: cmd.measure,
        input: cmd.opts.input,
        base: cmd.base_name,
        unit: unit_name(cmd.base_name),
        rows: layout.rows,
        cols: layout.cols,
        one_d,
        reduction: cmd.reduction_name,
        value,
        summary,
        // As the library gives it: rows of two inputs read as logits.
        top1_applies: opts.input == Input::Logits && cmd.measure.uses_q(),
        top1,
        adapter: backend.adapter(),
        elapsed_s,
        p_label,
        q_label,
        out: cmd.out.clone(),
    };
    let text = if cmd.json {
        format!("{}\n", report.to_json())
    } else {
        report.human()
    };
    print_stdout(&text)?;
    pending.map_or(Ok(()), output::PendingRows::commit)
}

/// The unit of a log base.
fn unit_name(base: &str) -> &'static str {
    match base {
        "2" => "bits",
        "10" => "hartleys",
        _ => "nats",
    }
}

/// Writes to stdout; a closed pipe is not worth a panic.
pub fn print_stdout(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError::runtime(format!("writing to stdout: {e}"))),
    }
}
