//! Streaming inputs of any size through the library in bounded blocks.
//!
//! A reader thread reads P and Q block by block (whole rows, about `block_elems` elements of
//! each input) and hands them to the computing thread through a bounded channel, so reading
//! the next block overlaps the GPU's work on the current one, and at most three blocks per
//! input (one being read, one queued, one being computed) are resident at once.
//!
//! A row longer than a block (typically a huge 1-D input, which is one row) is cut into
//! pieces and its value is the compensated f64 sum of the pieces' values, which is exact
//! for probabilities and log-probabilities because every measure is a sum of per-element
//! terms. Two cases need a first streamed pass over such a row on the CPU, in f64:
//! - logits: the log-sum-exp of the row and of each piece (and the arg-max, for top-1
//!   agreement). KL, cross-entropy and entropy then take each piece as logits of its own and
//!   put the row together by the chain rule: with w_k = e^(lse_k − lse) the piece's share of
//!   P (w'_k of Q), KL = Σ w_k·KL_k + Σ w_k·φ(ln w_k − ln w'_k), CE = Σ w_k·(CE_k − ln w'_k),
//!   H = Σ w_k·(H_k − ln w_k), every part ≥ 0 and the host's parts in f64, so the row keeps
//!   the library's precision. ln w_k takes the maxima's difference before the log-sums' (near
//!   f32::MAX the log-sums are below f64's resolution), and a piece whose w_k underflows f64
//!   is still computed, as it is +∞ where it meets q = 0. (Feeding the pieces as
//!   log-probabilities x − lse rounded to f32 cost ~1e-7·|x − lse| per element: 1e-4 of a KL,
//!   or a negative KL for close rows.) JS does not split that way and still gets
//!   log-probabilities;
//! - probabilities with `--normalize`: the sums of the row and of each piece; the pieces are
//!   normalized on their own and combined the same way, with w_k = Σ_k / Σ (JS: fed as
//!   x / sum, rounded to f32).
//!
//! The first pass also validates the elements with the library's rules, so errors still name
//! the first offending element.
//!
//! A piece whose value overflows f32 adds nothing if it weighs nothing in its row (a piece
//! of logits normalized on its own can hold values 3.4e38 apart that the row weighs
//! e^(−1e37)); otherwise the f64 reference computes it, and if that overflows too (or on the
//! CPU backend) its row is an overflow, unless another piece makes it +∞, as it is when
//! computed whole.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::thread;
use std::time::Duration;

use klgpu::{Input, Measure, Options, Problem};

use crate::compute::Backend;
use crate::error::{CliError, Origin, beyond_f32, invalid_value};
use crate::progress::Progress;
use crate::source::{Beyond, Source, Values};

/// Default block size: bytes of f32 per input (32 MiB = 8 Mi elements), rounded to whole rows.
/// Measured on lavapipe with two 4 GiB inputs: peak RSS 440 MB when first built (64 MiB blocks:
/// 786 MB), same speed; 336 MB since the library's uploads stopped allocating per call. On a
/// discrete GPU 8 Mi elements per dispatch already amortize the launch costs.
pub const DEFAULT_BLOCK_BYTES: u64 = 32 << 20;

/// The logical shape shared by P and Q.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Number of distributions (1 for a 1-D input).
    pub rows: usize,
    /// Elements per distribution.
    pub cols: usize,
    /// Whether the input was 1-D (positions in messages are indices).
    pub one_d: bool,
}

/// How the input is cut into blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// Whole rows per block.
    Rows {
        /// Rows in each block (the last may have fewer).
        rows_per_block: usize,
    },
    /// Each row in pieces of at most `piece` elements.
    Pieces {
        /// Elements per piece (the last piece of a row may have fewer).
        piece: usize,
        /// The first pass each row needs, if any.
        prepass: Option<Prepass>,
    },
}

/// A first f64 pass over a long row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prepass {
    /// Log-sum-exp (logits), and arg-max.
    Lse,
    /// Sum (probabilities with normalization).
    Sum,
}

impl Plan {
    /// Whole rows if a row fits in `block_elems`, else pieces of a row.
    pub fn new(layout: Layout, block_elems: usize, opts: &Options) -> Plan {
        let block_elems = block_elems.max(1);
        if layout.cols <= block_elems {
            return Plan::Rows {
                rows_per_block: (block_elems / layout.cols).max(1),
            };
        }
        let prepass = match opts.input {
            Input::Logits => Some(Prepass::Lse),
            Input::Probs if opts.normalize => Some(Prepass::Sum),
            _ => None,
        };
        Plan::Pieces {
            piece: block_elems,
            prepass,
        }
    }

    /// How many times the data is read.
    pub fn passes(&self) -> u64 {
        match self {
            Plan::Pieces {
                prepass: Some(_), ..
            } => 2,
            _ => 1,
        }
    }
}

/// One block of both inputs, as the library is to see it.
#[derive(Debug)]
struct Block {
    /// Row of the file where the block starts.
    first_row: usize,
    /// Column of the file where the block starts (pieces only).
    first_col: usize,
    /// Row length within the block.
    cols: usize,
    p: Values,
    q: Option<Values>,
    /// Options to compute the block with (pieces after a first pass are log-probs or scaled).
    opts: Options,
    /// For pieces: `Some` on the last piece of a row, with its top-1 agreement if known.
    row_end: Option<Option<bool>>,
    /// For a piece of a row: how its value enters the row's; `None` for whole rows.
    piece: Option<PieceTerm>,
    /// P's and Q's first f64 beyond f32's range in the block, read as NaN.
    beyond: [Option<Beyond>; 2],
}

/// A piece's part of its row's value: weight·value + extra, or extra alone where the piece
/// need not be computed (it holds none of P's mass, or all of it where Q has none).
#[derive(Clone, Copy, Debug, PartialEq)]
struct PieceTerm {
    weight: f64,
    extra: f64,
    compute: bool,
}

impl PieceTerm {
    /// The piece's value as it is.
    const WHOLE: PieceTerm = PieceTerm {
        weight: 1.0,
        extra: 0.0,
        compute: true,
    };

    /// The chain rule for a piece of a row that each piece normalizes on its own (logits, or
    /// `--normalize`; see the module docs): `lp`, `lq` are ln w_k, ln w'_k (−∞ for a piece
    /// with no mass), in nats; `per_nat` converts to the base.
    fn chain(measure: Measure, lp: f64, lq: f64, per_nat: f64) -> PieceTerm {
        if lp == f64::NEG_INFINITY {
            // No mass of P here: KL still counts Q's (the −w + w' of its stable form).
            let extra = if measure == Measure::KullbackLeibler {
                lq.exp() * per_nat
            } else {
                0.0
            };
            return PieceTerm {
                weight: 0.0,
                extra,
                compute: false,
            };
        }
        if lq == f64::NEG_INFINITY && measure != Measure::Entropy {
            return PieceTerm {
                weight: 0.0,
                extra: f64::INFINITY,
                compute: false,
            };
        }
        // P's mass here is positive, though w may underflow f64 (logits ~1e37 below the
        // row's maximum): the piece is computed all the same, as `value` keeps a +∞ of it.
        let w = lp.exp();
        let extra = match measure {
            Measure::KullbackLeibler => {
                // w·φ(r), φ(r) = r + e^(−r) − 1; where Q's share is far above P's, w·e^(−r)
                // is w' itself, and e^(−r) alone can overflow f64 (w = e^(−720) against
                // w' = 0.004 read +∞).
                let r = lp - lq;
                if r < -1.0 {
                    w * (r - 1.0) + lq.exp()
                } else {
                    w * (r + (-r).exp_m1())
                }
            }
            Measure::CrossEntropy => -w * lq,
            Measure::Entropy => -w * lp,
            other => unreachable!("only the measures `chains` admits come here, not {other:?}"),
        };
        PieceTerm {
            weight: w,
            extra: extra * per_nat,
            compute: true,
        }
    }

    /// The piece's part given its own value `v` (0 for a piece not computed). A piece of +∞
    /// (p > 0 against q = 0) makes its row +∞ whatever its weight.
    fn value(&self, v: f64) -> f64 {
        if v == f64::INFINITY {
            v
        } else {
            self.weight * v + self.extra
        }
    }

    /// Whether a long row that needs a first pass is put together by the chain rule for
    /// `measure`.
    fn chains(measure: Measure) -> bool {
        // Listed, not "all but JS": a later measure needs its own term in `chain`.
        matches!(
            measure,
            Measure::KullbackLeibler | Measure::CrossEntropy | Measure::Entropy
        )
    }
}

/// Per-row results of a whole input.
#[derive(Debug, Default)]
pub struct Outcome {
    /// One value per row.
    pub values: Vec<f64>,
    /// Top-1 agreement per row, for two-input logits.
    pub top1: Option<Vec<bool>>,
}

/// Runs `measure` over the inputs, block by block, on `compute`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    compute: &Backend,
    measure: Measure,
    p: Source,
    q: Option<Source>,
    layout: Layout,
    opts: Options,
    block_elems: usize,
    progress: &Progress,
) -> Result<Outcome, CliError> {
    let plan = Plan::new(layout, block_elems, &opts);
    let p_label = p.label.clone();
    let q_label = q.as_ref().map_or_else(String::new, |q| q.label.clone());
    progress.set_total(layout.rows as u64 * layout.cols as u64 * plan.passes());
    let (tx, rx) = mpsc::sync_channel(1);
    // Blocks' buffers go back to the reader once computed: a fresh 32 MiB buffer per block
    // cost a page fault per 4 KiB, and reading ran 4.5× slower (0.4 against 1.8 G elements/s).
    let (spare_tx, spare_rx) = mpsc::channel();
    let recycle = spare_tx.clone();
    let bar = progress.bar();
    let reader = thread::Builder::new()
        .name("klgpu-reader".into())
        .spawn(move || {
            let mut reader = Reader {
                p,
                q,
                layout,
                opts,
                measure,
                tx,
                bar,
                spare: spare_rx,
                recycle: spare_tx,
            };
            if let Err(Halt::Failed(e)) = reader.produce(plan) {
                let _ = reader.tx.send(Err(e));
            }
        })
        .map_err(|e| CliError::runtime(format!("cannot start the reader thread: {e}")))?;
    let result = consume(
        compute, measure, &rx, &recycle, layout, &p_label, &q_label, progress,
    );
    drop(rx);
    if reader.join().is_err() {
        return Err(CliError::runtime("the reader thread panicked"));
    }
    result
}

/// Receives blocks and computes them, and hands their buffers back to the reader.
#[allow(clippy::too_many_arguments)]
fn consume(
    compute: &Backend,
    measure: Measure,
    rx: &Receiver<Result<Block, CliError>>,
    recycle: &Sender<Values>,
    layout: Layout,
    p_label: &str,
    q_label: &str,
    progress: &Progress,
) -> Result<Outcome, CliError> {
    let mut out = Outcome {
        values: Vec::with_capacity(layout.rows.min(1 << 24)),
        top1: None,
    };
    let mut pieces: Vec<f64> = Vec::new();
    // The first piece of the current row whose value overflowed f32 (or f64, on the CPU).
    let mut piece_overflow: Option<CliError> = None;
    // The first row that overflowed. It is reported only at the end: an invalid value
    // anywhere in the input comes first, as in one library call over the whole input, so the
    // error does not depend on the block size.
    let mut first_overflow: Option<CliError> = None;
    loop {
        let block = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(block) => block?,
            Err(RecvTimeoutError::Timeout) => {
                progress.tick();
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let origin = Origin {
            p_label,
            q_label,
            first_row: block.first_row,
            first_col: block.first_col,
            one_d: layout.one_d,
            beyond: block.beyond,
        };
        let placeholder = || klgpu::RowResults {
            values: vec![0.0],
            top1_agree: None,
        };
        let result = if !block.piece.is_none_or(|t| t.compute) {
            placeholder()
        } else {
            match rows_of(compute, measure, &block) {
                // Rows or a piece that left f32 on the GPU (no value of the block is invalid,
                // or the GPU would have named it): the f64 reference computes them, and only
                // where f64 overflows too is that an error. An overflowed piece holds no p > 0
                // against q = 0 (that would read +∞): it adds nothing if it weighs nothing
                // (normalized on its own, a piece can leave f32 where its row does not), and
                // its row fails unless another piece makes it +∞, as the whole row would.
                Err(e @ klgpu::Error::Overflow { .. }) => {
                    let weighs = block.piece.is_none_or(|t| t.weight != 0.0);
                    let in_f64 = match compute {
                        Backend::Gpu(_) if weighs => rows_of(&Backend::Cpu, measure, &block).ok(),
                        _ => None,
                    };
                    in_f64.unwrap_or_else(|| match block.piece {
                        Some(_) => {
                            if weighs {
                                piece_overflow.get_or_insert(origin.map(e));
                            }
                            placeholder()
                        }
                        None => {
                            first_overflow.get_or_insert(origin.map(e));
                            klgpu::RowResults {
                                values: vec![0.0; block.p.len() / block.cols],
                                top1_agree: None,
                            }
                        }
                    })
                }
                result => result.map_err(|e| origin.map(e))?,
            }
        };
        if let Some(term) = block.piece {
            // A piece not computed (or overflowed) has the placeholder 0: its extra alone.
            pieces.extend(result.values.iter().map(|&v| term.value(v)));
            if let Some(top1) = block.row_end {
                let value = klgpu::cpu::compensated_sum(pieces.drain(..));
                if let Some(overflow) = piece_overflow.take()
                    && value != f64::INFINITY
                {
                    first_overflow.get_or_insert(overflow);
                }
                out.values.push(value);
                if let Some(agree) = top1 {
                    out.top1.get_or_insert_with(Vec::new).push(agree);
                }
            }
        } else {
            out.values.extend(result.values);
            if let Some(agree) = result.top1_agree {
                out.top1.get_or_insert_with(Vec::new).extend(agree);
            }
        }
        progress.inc(block.p.len() as u64);
        progress.tick();
        give_back(recycle, block.p, block.q);
    }
    if let Some(overflow) = first_overflow {
        return Err(overflow);
    }
    if out.values.len() != layout.rows {
        return Err(CliError::runtime(format!(
            "internal error: {} row results for {} rows",
            out.values.len(),
            layout.rows
        )));
    }
    Ok(out)
}

/// A block's per-row values, its elements read as they were stored.
fn rows_of(compute: &Backend, measure: Measure, block: &Block) -> klgpu::Result<klgpu::RowResults> {
    use klgpu::half::{bf16, f16};
    fn bits_as<T: bytemuck::Pod>(bits: &[u16]) -> &[T] {
        bytemuck::cast_slice(bits)
    }
    let (cols, opts) = (block.cols, &block.opts);
    // The reader reads both sides alike (`Reader::stored_half`).
    let mismatch = || {
        klgpu::Error::InvalidArgument("internal error: P and Q blocks of different types".into())
    };
    match (&block.p, &block.q) {
        (Values::F32(p), None) => compute.rows(measure, p, None, cols, opts),
        (Values::F32(p), Some(Values::F32(q))) => compute.rows(measure, p, Some(q), cols, opts),
        (Values::Half(p, dtype), q) => {
            let q = match q {
                None => None,
                Some(Values::Half(q, d)) if d == dtype => Some(&q[..]),
                Some(_) => return Err(mismatch()),
            };
            match dtype {
                klgpu::Dtype::F16 => {
                    compute.rows::<f16>(measure, bits_as(p), q.map(bits_as), cols, opts)
                }
                _ => compute.rows::<bf16>(measure, bits_as(p), q.map(bits_as), cols, opts),
            }
        }
        _ => Err(mismatch()),
    }
}

/// Why the reader stopped early.
enum Halt {
    /// The receiver is gone (the computing side failed or finished): stop quietly.
    Closed,
    /// A read or validation error to report.
    Failed(CliError),
}

impl From<CliError> for Halt {
    fn from(e: CliError) -> Self {
        Halt::Failed(e)
    }
}

/// Blocks smaller than this (elements) read P and Q in turn: a thread costs about as much as
/// reading 64 Ki elements (6,250 blocks of 16 took 0.39 s instead of 0.19 s).
const PARALLEL_READ_MIN: usize = 1 << 16;

/// P and Q read as f32 (Q if there is one), with each side's first f64 beyond f32.
type F32Read = (Vec<f32>, Option<Vec<f32>>, [Option<Beyond>; 2]);

/// The reader thread's state.
struct Reader {
    p: Source,
    q: Option<Source>,
    layout: Layout,
    opts: Options,
    measure: Measure,
    tx: SyncSender<Result<Block, CliError>>,
    bar: indicatif::ProgressBar,
    /// Buffers of blocks already computed (and of the first pass), to read into again.
    spare: Receiver<Values>,
    recycle: Sender<Values>,
}

/// Running first-pass state of one side of a long row.
#[derive(Clone, Copy, Debug)]
struct RowScan {
    /// Largest logit so far, and its first index.
    max: f64,
    argmax: usize,
    /// Σ exp(x − max) (logits) or Σ x (probabilities), with Neumaier compensation.
    sum: f64,
    comp: f64,
    /// The row's first element (reported for an empty row).
    first: f32,
}

impl RowScan {
    fn new() -> Self {
        RowScan {
            max: f64::NEG_INFINITY,
            argmax: 0,
            sum: 0.0,
            comp: 0.0,
            first: 0.0,
        }
    }

    fn add(&mut self, x: f64) {
        let t = self.sum + x;
        if self.sum.abs() >= x.abs() {
            self.comp += (self.sum - t) + x;
        } else {
            self.comp += (x - t) + self.sum;
        }
        self.sum = t;
    }

    fn total(&self) -> f64 {
        self.sum + self.comp
    }

    /// Folds the value at column `col` into what the first pass of `kind` gathers.
    fn push(&mut self, kind: Prepass, col: usize, x: f32) {
        match kind {
            Prepass::Lse => self.push_logit(col, x),
            Prepass::Sum => self.add(x as f64),
        }
    }

    /// Folds a logit at column `col` into the running log-sum-exp.
    fn push_logit(&mut self, col: usize, x: f32) {
        let x = x as f64;
        if x == f64::NEG_INFINITY {
            return;
        }
        if x > self.max {
            // Rescale what was summed against the old maximum.
            let scale = (self.max - x).exp();
            self.sum *= scale;
            self.comp *= scale;
            self.max = x;
            self.argmax = col;
            self.add(1.0);
        } else {
            self.add((x - self.max).exp());
        }
    }

    /// The log-sum-exp less the maximum, ln Σ exp(x − max). It is kept apart from the
    /// maximum because max + it rounds it away for logits near f32::MAX (1e37 + ln 333 is
    /// 1e37 in f64), and every use subtracts maxima first.
    fn ln_total(&self) -> f64 {
        self.total().ln()
    }

    /// ln of this piece's share of the row's mass (`whole`): −∞ for a piece with none.
    fn ln_share(&self, whole: &RowScan, kind: Prepass) -> f64 {
        match kind {
            Prepass::Lse if self.max == f64::NEG_INFINITY => f64::NEG_INFINITY,
            Prepass::Lse => (self.max - whole.max) + (self.ln_total() - whole.ln_total()),
            Prepass::Sum => (self.total() / whole.total()).ln(),
        }
    }
}

impl Reader {
    fn send(&self, block: Block) -> Result<(), Halt> {
        self.tx.send(Ok(block)).map_err(|_| Halt::Closed)
    }

    /// The 16-bit type both inputs are stored as, if they are: then whole-row blocks go to the
    /// GPU as stored, at half the bytes, and nothing converts them on the host. (Long rows'
    /// pieces are read as f32: their first pass shifts or scales them.)
    fn stored_half(&self) -> Option<klgpu::Dtype> {
        let p = self.p.half_dtype()?;
        match &self.q {
            Some(q) if q.half_dtype() != Some(p) => None,
            _ => Some(p),
        }
    }

    /// A spare buffer of the kind asked for, if one came back (any other is dropped).
    fn spare_f32(&self) -> Vec<f32> {
        match self.spare.try_recv() {
            Ok(Values::F32(v)) => v,
            _ => Vec::new(),
        }
    }

    fn spare_half(&self) -> Vec<u16> {
        match self.spare.try_recv() {
            Ok(Values::Half(v, _)) => v,
            _ => Vec::new(),
        }
    }

    /// Reads elements `start .. start + count` of P and Q as f32, into spare buffers if there
    /// are any, with each side's first f64 beyond f32 (read as NaN).
    fn read(&mut self, start: usize, count: usize) -> Result<F32Read, Halt> {
        let (mut p, mut q) = (self.spare_f32(), self.spare_f32());
        let mut beyond = self.read_both(
            count,
            |src, out| src.read_f32(start, count, out),
            &mut p,
            &mut q,
        )?;
        self.mark_underflows(&mut p, &mut q, &mut beyond);
        Ok((p, self.q.is_some().then_some(q), beyond))
    }

    /// Reads as NaN, named by the file's value like an f64 beyond f32, each probability f32
    /// rounds to ±0 (`Source::underflows`) where that changes the answer: a negative one (−0
    /// passes as 0), and in KL and cross-entropy a Q value under P > 0 (its term would be
    /// infinite) or a P value over Q = 0 (it would be finite, and is infinite). Elsewhere a
    /// value below 1.4e-45 read as 0 changes a term by less than f32 resolves, and rows of
    /// f64 probabilities hold such values often (a softmax of logits 104 apart).
    fn mark_underflows(&self, p: &mut [f32], q: &mut [f32], beyond: &mut [Option<Beyond>; 2]) {
        if self.opts.input != Input::Probs {
            return;
        }
        let q_src = self.q.as_ref();
        let pairs = matches!(
            self.measure,
            Measure::KullbackLeibler | Measure::CrossEntropy
        ) && q_src.is_some();
        let q_under = q_src.map_or(&[][..], |q| &q.underflows[..]);
        let is_under = |list: &[Beyond], i: usize| list.binary_search_by_key(&i, |u| u.0).is_ok();
        let mark = |values: &mut [f32], first: &mut Option<Beyond>, (i, v): Beyond| {
            values[i] = f32::NAN;
            if first.is_none_or(|(j, _)| i < j) {
                *first = Some((i, v));
            }
        };
        let [beyond_p, beyond_q] = beyond;
        for &(i, v) in &self.p.underflows {
            if v < 0.0 || (pairs && q[i] == 0.0 && !is_under(q_under, i)) {
                mark(p, beyond_p, (i, v));
            }
        }
        for &(i, v) in q_under {
            if v < 0.0 || (pairs && p[i] != 0.0) {
                mark(q, beyond_q, (i, v));
            }
        }
    }

    /// Reads elements `start .. start + count` of P and Q as stored, in `dtype`.
    fn read_stored(
        &mut self,
        start: usize,
        count: usize,
        dtype: klgpu::Dtype,
    ) -> Result<(Values, Option<Values>), Halt> {
        let (mut p, mut q) = (self.spare_half(), self.spare_half());
        self.read_both(
            count,
            |src, out| src.read_half(start, count, out).map(|()| None),
            &mut p,
            &mut q,
        )?;
        Ok((
            Values::Half(p, dtype),
            self.q.is_some().then_some(Values::Half(q, dtype)),
        ))
    }

    /// Runs `read` for P and, if there is one, for Q, Q on a second thread: reading and
    /// converting is CPU work (a few GB/s per core), and on a fast GPU it is the command
    /// line's bottleneck. P's error comes first, as read in turn. Returns what each read
    /// returned (None for a Q that is not there).
    fn read_both<T: Send>(
        &mut self,
        count: usize,
        read: impl Fn(&mut Source, &mut Vec<T>) -> Result<Option<Beyond>, CliError> + Sync,
        p: &mut Vec<T>,
        q: &mut Vec<T>,
    ) -> Result<[Option<Beyond>; 2], Halt> {
        let Some(q_src) = &mut self.q else {
            return Ok([read(&mut self.p, p)?, None]);
        };
        let (p_read, q_read) = if count < PARALLEL_READ_MIN {
            let p_read = read(&mut self.p, p);
            (p_read, read(q_src, q))
        } else {
            thread::scope(|scope| {
                let q_reader = scope.spawn(|| read(q_src, q));
                let p_read = read(&mut self.p, p);
                let q_read = q_reader
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                (p_read, q_read)
            })
        };
        Ok([p_read?, q_read?])
    }

    fn produce(&mut self, plan: Plan) -> Result<(), Halt> {
        let Layout { rows, cols, .. } = self.layout;
        match plan {
            Plan::Rows { rows_per_block } => {
                let mut row = 0;
                let stored = self.stored_half();
                while row < rows {
                    let n = rows_per_block.min(rows - row);
                    let (p, q, beyond) = match stored {
                        Some(dtype) => {
                            let (p, q) = self.read_stored(row * cols, n * cols, dtype)?;
                            (p, q, [None; 2])
                        }
                        None => {
                            let (p, q, beyond) = self.read(row * cols, n * cols)?;
                            (Values::F32(p), q.map(Values::F32), beyond)
                        }
                    };
                    self.send(Block {
                        first_row: row,
                        first_col: 0,
                        cols,
                        p,
                        q,
                        opts: self.opts,
                        row_end: None,
                        piece: None,
                        beyond,
                    })?;
                    row += n;
                }
            }
            Plan::Pieces { piece, prepass } => {
                for row in 0..rows {
                    self.row_in_pieces(row, piece, prepass)?;
                }
            }
        }
        Ok(())
    }

    /// One long row: an optional first pass, then its pieces.
    fn row_in_pieces(
        &mut self,
        row: usize,
        piece: usize,
        prepass: Option<Prepass>,
    ) -> Result<(), Halt> {
        let cols = self.layout.cols;
        let base = row * cols;
        let scans = match prepass {
            Some(kind) => Some(self.scan_row(row, piece, kind)?),
            None => None,
        };
        let per_nat = self
            .opts
            .base
            .per_nat()
            .map_err(|e| CliError::input(e.to_string()))?;
        let mut col = 0;
        while col < cols {
            let n = piece.min(cols - col);
            let (mut p, mut q, beyond) = self.read(base + col, n)?;
            let mut opts = self.opts;
            let mut term = PieceTerm::WHOLE;
            if let Some(scan) = &scans {
                let (sp, sq) = (&scan.p, &scan.q);
                match prepass {
                    // Each piece normalized on its own (as logits, or with `normalize`), the
                    // row put together by the chain rule.
                    Some(kind) if PieceTerm::chains(self.measure) => {
                        let (pp, pq) = &scan.pieces[col / piece];
                        let lq = match (pq, sq) {
                            (Some(pq), Some(sq)) => pq.ln_share(sq, kind),
                            _ => 0.0,
                        };
                        term = PieceTerm::chain(self.measure, pp.ln_share(sp, kind), lq, per_nat);
                    }
                    Some(Prepass::Lse) => {
                        shift(&mut p, sp);
                        if let (Some(q), Some(sq)) = (&mut q, sq) {
                            shift(q, sq);
                        }
                        opts.input = Input::LogProbs;
                    }
                    Some(Prepass::Sum) => {
                        scale(&mut p, sp.total());
                        if let (Some(q), Some(sq)) = (&mut q, sq) {
                            scale(q, sq.total());
                        }
                        opts.normalize = false;
                    }
                    None => {}
                }
            }
            col += n;
            let row_end = (col == cols).then(|| match &scans {
                Some(LongRow {
                    p: sp, q: Some(sq), ..
                }) if prepass == Some(Prepass::Lse) && self.measure.uses_q() => {
                    Some(sp.argmax == sq.argmax)
                }
                _ => None,
            });
            self.send(Block {
                first_row: row,
                first_col: col - n,
                cols: n,
                p: Values::F32(p),
                q: q.map(Values::F32),
                opts,
                row_end,
                piece: Some(term),
                beyond,
            })?;
        }
        Ok(())
    }

    /// The first pass over one long row: validates it and returns each side's scan, of the
    /// whole row and of each piece.
    fn scan_row(&mut self, row: usize, piece: usize, kind: Prepass) -> Result<LongRow, Halt> {
        let cols = self.layout.cols;
        let input = self.opts.input;
        let (mut sp, mut sq) = (RowScan::new(), RowScan::new());
        let mut pieces = Vec::new();
        let mut col = 0;
        while col < cols {
            let n = piece.min(cols - col);
            let (p, q, [beyond_p, beyond_q]) = self.read(row * cols + col, n)?;
            if col == 0 {
                sp.first = p[0];
                sq.first = q.as_ref().map_or(0.0, |q| q[0]);
            }
            let one_d = self.layout.one_d;
            let (mut pp, mut pq) = (RowScan::new(), RowScan::new());
            for i in 0..n {
                let at =
                    |x: f32, beyond: Option<Beyond>, scans: &mut [&mut RowScan], label: &str| {
                        // The file's value, where this element is an f64 beyond f32 read as NaN.
                        let beyond = beyond.filter(|&(j, _)| j == i).map(|(_, v)| v);
                        scan_one(kind, input, one_d, (row, col + i), x, beyond, scans, label)
                    };
                at(p[i], beyond_p, &mut [&mut sp, &mut pp], &self.p.label)?;
                if let (Some(q), Some(src)) = (&q, &self.q) {
                    at(q[i], beyond_q, &mut [&mut sq, &mut pq], &src.label)?;
                }
            }
            pieces.push((pp, self.q.is_some().then_some(pq)));
            give_back(&self.recycle, Values::F32(p), q.map(Values::F32));
            col += n;
            self.bar.inc(n as u64);
        }
        check_not_empty(kind, self.layout.one_d, row, &sp, &self.p.label)?;
        let sq = match &self.q {
            Some(src) => {
                check_not_empty(kind, self.layout.one_d, row, &sq, &src.label)?;
                Some(sq)
            }
            None => None,
        };
        Ok(LongRow {
            p: sp,
            q: sq,
            pieces,
        })
    }
}

/// The first pass's scans of one long row: each side's, and each piece's.
struct LongRow {
    p: RowScan,
    q: Option<RowScan>,
    pieces: Vec<(RowScan, Option<RowScan>)>,
}

/// Hands a block's buffers back to the reader for its next reads. (Once the reader has sent
/// its last block, nobody takes them and they are freed.)
fn give_back(recycle: &Sender<Values>, p: Values, q: Option<Values>) {
    let _ = recycle.send(p);
    if let Some(q) = q {
        let _ = recycle.send(q);
    }
}

/// Validates one element of a long row and folds it into the scans (the row's, the piece's).
/// `beyond`: the file's value, where `x` is the NaN read for an f64 beyond f32.
#[allow(clippy::too_many_arguments)]
fn scan_one(
    kind: Prepass,
    input: Input,
    one_d: bool,
    (row, col): (usize, usize),
    x: f32,
    beyond: Option<f64>,
    scans: &mut [&mut RowScan],
    label: &str,
) -> Result<(), CliError> {
    if let Some(problem) = input.problem(x) {
        return Err(match beyond {
            Some(value) => beyond_f32(label, one_d, row, col, value),
            None => invalid_value(label, one_d, row, col, x, problem),
        });
    }
    for scan in scans {
        scan.push(kind, col, x);
    }
    Ok(())
}

/// A row with no mass: all logits −∞, or probabilities summing to 0.
fn check_not_empty(
    kind: Prepass,
    one_d: bool,
    row: usize,
    scan: &RowScan,
    label: &str,
) -> Result<(), CliError> {
    let empty = match kind {
        Prepass::Lse => scan.max == f64::NEG_INFINITY,
        Prepass::Sum => scan.total() == 0.0,
    };
    if empty {
        return Err(invalid_value(
            label,
            one_d,
            row,
            0,
            scan.first,
            Problem::EmptyRow,
        ));
    }
    Ok(())
}

/// x ← x − lse of the row `scan` holds, in f64, rounded to f32 (−∞ stays −∞). The maximum
/// goes first: x − max is exact wherever it is not far below the maximum.
fn shift(xs: &mut [f32], scan: &RowScan) {
    let ln_total = scan.ln_total();
    for x in xs {
        *x = ((*x as f64 - scan.max) - ln_total) as f32;
    }
}

/// x ← x / sum, in f64, rounded to f32.
fn scale(xs: &mut [f32], sum: f64) {
    let inv = 1.0 / sum;
    for x in xs {
        *x = (*x as f64 * inv) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans() {
        let two_d = Layout {
            rows: 10,
            cols: 100,
            one_d: false,
        };
        let opts = Options::input(Input::Logits);
        assert_eq!(
            Plan::new(two_d, 1000, &opts),
            Plan::Rows { rows_per_block: 10 }
        );
        assert_eq!(
            Plan::new(two_d, 150, &opts),
            Plan::Rows { rows_per_block: 1 }
        );
        assert_eq!(
            Plan::new(two_d, 99, &opts),
            Plan::Pieces {
                piece: 99,
                prepass: Some(Prepass::Lse)
            }
        );
        let probs = Options::default();
        assert_eq!(
            Plan::new(two_d, 10, &probs),
            Plan::Pieces {
                piece: 10,
                prepass: None
            }
        );
        let norm = Options {
            normalize: true,
            ..Default::default()
        };
        assert_eq!(Plan::new(two_d, 10, &norm).passes(), 2);
        assert_eq!(Plan::new(two_d, 0, &probs).passes(), 1);
    }

    /// The row `p`, `q` put together by the chain rule over pieces of 7, as the reader and
    /// `consume` do, with the CPU reference computing each piece.
    fn chained(kind: Prepass, measure: Measure, p: &[f32], q: &[f32], opts: &Options) -> f64 {
        let scan = |xs: &[f32]| {
            let mut s = RowScan::new();
            for (i, &x) in xs.iter().enumerate() {
                s.push(kind, i, x);
            }
            s
        };
        let (sp, sq) = (scan(p), scan(q));
        let mut parts = Vec::new();
        for (a, b) in p.chunks(7).zip(q.chunks(7)) {
            let lq = scan(b).ln_share(&sq, kind);
            let t = PieceTerm::chain(measure, scan(a).ln_share(&sp, kind), lq, 1.0);
            let v = if t.compute {
                klgpu::cpu::divergence(measure, a, Some(b), opts).unwrap()
            } else {
                0.0
            };
            parts.push(t.value(v));
        }
        klgpu::cpu::compensated_sum(parts)
    }

    const CHAINED: [Measure; 3] = [
        Measure::KullbackLeibler,
        Measure::CrossEntropy,
        Measure::Entropy,
    ];

    #[test]
    fn chain_rule_over_pieces_gives_the_whole_row() {
        // 30 values in pieces of 7, one piece empty in P alone and one in both: logits (−∞),
        // and probabilities with normalization (0).
        let mut p: Vec<f32> = (0..30).map(|i| ((i * 7) % 11) as f32 * 0.6 - 2.0).collect();
        let mut q: Vec<f32> = p
            .iter()
            .enumerate()
            .map(|(i, x)| x + 0.1 * (i % 3) as f32)
            .collect();
        p[7..14].fill(f32::NEG_INFINITY);
        p[21..28].fill(f32::NEG_INFINITY);
        q[21..28].fill(f32::NEG_INFINITY);
        let probs = |xs: &[f32]| xs.iter().map(|x| x.exp() * 3.0).collect::<Vec<f32>>();
        let normalize = Options {
            normalize: true,
            ..Default::default()
        };
        for (kind, p, q, opts) in [
            (
                Prepass::Lse,
                p.clone(),
                q.clone(),
                Options::input(Input::Logits),
            ),
            (Prepass::Sum, probs(&p), probs(&q), normalize),
        ] {
            for measure in CHAINED {
                let whole = klgpu::cpu::divergence(measure, &p, Some(&q), &opts).unwrap();
                let sum = chained(kind, measure, &p, &q, &opts);
                assert!(
                    (sum - whole).abs() <= 1e-12 * whole.abs(),
                    "{kind:?} {measure:?}: {sum} vs {whole}"
                );
            }
        }
    }

    #[test]
    fn chain_rule_over_pieces_of_logits_near_f32_max() {
        // Uniform P at 1e37 against Q of moderate logits, and the reverse: the pieces' shares
        // ln(7/30) live in the log-sum-exps' small parts, which 1e37 + ln 30 rounds away in
        // f64 (the command line once gave KL 2961 for 139 in pieces of 16).
        let opts = Options::input(Input::Logits);
        let moderate: Vec<f32> = (0..30).map(|i| ((i * 7) % 11) as f32 * 0.6 - 2.0).collect();
        let huge = vec![1e37f32; 30];
        for (p, q) in [(&huge, &moderate), (&moderate, &huge)] {
            for measure in CHAINED {
                let whole = klgpu::cpu::divergence(measure, p, Some(q), &opts).unwrap();
                let sum = chained(Prepass::Lse, measure, p, q, &opts);
                assert!(
                    (sum - whole).abs() <= 1e-12 * whole.abs(),
                    "{measure:?}: {sum} vs {whole}"
                );
            }
        }
        // P's mass in the second piece is e^(−1e37) of the row's: 0 in f64, yet positive, so
        // against Q = 0 there KL and cross-entropy are +∞ (they once skipped the piece); with
        // Q > 0 there the piece adds nothing (nor a 0·∞).
        let mut p = moderate.clone();
        p[7..14].fill(-1e37);
        for hole in [false, true] {
            let mut q = moderate.clone();
            if hole {
                q[10] = f32::NEG_INFINITY;
            }
            for measure in CHAINED {
                let whole = klgpu::cpu::divergence(measure, &p, Some(&q), &opts).unwrap();
                let sum = chained(Prepass::Lse, measure, &p, &q, &opts);
                if hole && measure != Measure::Entropy {
                    assert_eq!((sum, whole), (f64::INFINITY, f64::INFINITY), "{measure:?}");
                } else {
                    assert!(
                        (sum - whole).abs() <= 1e-12 * whole,
                        "{measure:?}, hole {hole}: {sum} vs {whole}"
                    );
                }
            }
        }
    }

    #[test]
    fn chain_rule_where_q_far_outweighs_p() {
        // P's second piece weighs e^(−720) (a subnormal f64, not 0), Q's 7/30: e^(−r) of the
        // shares' ratio overflows f64 while w·e^(−r) = w' does not (KL read +∞).
        let opts = Options::input(Input::Logits);
        let mut p: Vec<f32> = (0..30).map(|i| ((i * 7) % 11) as f32 * 0.6 - 2.0).collect();
        p[7..14].fill(-720.0);
        let q = vec![0.5f32; 30];
        let whole = klgpu::cpu::divergence(Measure::KullbackLeibler, &p, Some(&q), &opts).unwrap();
        let sum = chained(Prepass::Lse, Measure::KullbackLeibler, &p, &q, &opts);
        assert!((sum - whole).abs() <= 1e-12 * whole, "{sum} vs {whole}");
    }

    #[test]
    fn streaming_log_sum_exp_matches_direct() {
        let xs = [0.5f32, -3.0, f32::NEG_INFINITY, 7.25, 7.25, -100.0, 2.0];
        let mut scan = RowScan::new();
        for (i, &x) in xs.iter().enumerate() {
            scan.push_logit(i, x);
        }
        let max = 7.25f64;
        let direct = xs.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
        assert_eq!(scan.max, max);
        assert!((scan.ln_total() - direct).abs() < 1e-14);
        assert_eq!(scan.argmax, 3, "ties go to the lowest index");
    }
}
