//! The f64 reference, with the same conventions and the same errors as the GPU path. Every
//! GPU result in the test suite is checked against it.
//!
//! Each f32 input (f16 and bf16 ones by way of f32, as the kernels read them) is widened to
//! f64 exactly; ln(p/q) is taken from the exact difference p − q
//! where the quotient would cancel (`ln_1p`/`exp_m1` for log-space inputs), and sums are
//! compensated (Neumaier), so the reference sits within ~1e-12 relative of the exact value of
//! the same f32 inputs.
//!
//! It is also fast enough to use on real data: terms go through branch-free f64 ln and exp
//! (`cpu/math.rs`) the compiler vectorizes (AVX2 where the CPU has it, chosen at run
//! time), validation is fused into the same pass, and long inputs use every core. Over 10^7
//! pairs it keeps pace with NumPy's f32 `np.sum(p*np.log(p/q))` (BENCHMARKS.md).
//!
//! ```
//! let p = [0.5f32, 0.5];
//! let q = [0.25f32, 0.75];
//! let kl = klgpu::cpu::kl_divergence(&p, &q)?;
//! let expected = 0.5 * (2.0f64).ln() + 0.5 * (0.5f64 / 0.75).ln();
//! assert!((kl - expected).abs() < 1e-15);
//! # Ok::<(), klgpu::Error>(())
//! ```

use crate::error::{Error, Problem, Result, Side};
use crate::types::{Element, Input, Measure, Options, RowResults, widened};

mod math;

/// KL(P‖Q) = Σ p·ln(p/q) of two equally long slices of probabilities, in f64.
pub fn kl_divergence<T: Element>(p: &[T], q: &[T]) -> Result<f64> {
    divergence(Measure::KullbackLeibler, p, Some(q), &Options::default())
}

/// Cross-entropy H(P,Q) = −Σ p·ln q, in f64.
pub fn cross_entropy<T: Element>(p: &[T], q: &[T]) -> Result<f64> {
    divergence(Measure::CrossEntropy, p, Some(q), &Options::default())
}

/// Entropy H(P) = −Σ p·ln p, in f64.
pub fn entropy<T: Element>(p: &[T]) -> Result<f64> {
    divergence(Measure::Entropy, p, None, &Options::default())
}

/// Jensen–Shannon divergence ½KL(P‖M) + ½KL(Q‖M), M = (P+Q)/2, in f64.
pub fn js_divergence<T: Element>(p: &[T], q: &[T]) -> Result<f64> {
    divergence(Measure::JensenShannon, p, Some(q), &Options::default())
}

/// Any measure of one distribution (or pair), with options.
pub fn divergence<T: Element>(
    measure: Measure,
    p: &[T],
    q: Option<&[T]>,
    opts: &Options,
) -> Result<f64> {
    let cols = p.len().max(1);
    Ok(rows(measure, p, q, cols, opts)?.values[0])
}

/// Per-row KL(P‖Q) of row-major `[rows × cols]` inputs.
pub fn kl_divergence_rows<T: Element>(
    p: &[T],
    q: &[T],
    cols: usize,
    input: Input,
) -> Result<Vec<f64>> {
    Ok(rows(
        Measure::KullbackLeibler,
        p,
        Some(q),
        cols,
        &Options::input(input),
    )?
    .values)
}

/// Per-row cross-entropy H(P,Q).
pub fn cross_entropy_rows<T: Element>(
    p: &[T],
    q: &[T],
    cols: usize,
    input: Input,
) -> Result<Vec<f64>> {
    Ok(rows(
        Measure::CrossEntropy,
        p,
        Some(q),
        cols,
        &Options::input(input),
    )?
    .values)
}

/// Per-row entropy H(P).
pub fn entropy_rows<T: Element>(p: &[T], cols: usize, input: Input) -> Result<Vec<f64>> {
    Ok(rows(Measure::Entropy, p, None, cols, &Options::input(input))?.values)
}

/// Per-row Jensen–Shannon divergence.
pub fn js_divergence_rows<T: Element>(
    p: &[T],
    q: &[T],
    cols: usize,
    input: Input,
) -> Result<Vec<f64>> {
    Ok(rows(
        Measure::JensenShannon,
        p,
        Some(q),
        cols,
        &Options::input(input),
    )?
    .values)
}

/// Per-row values of any measure, with top-1 agreement for two-input logits. 16-bit inputs
/// are widened to f32 first (a copy), as the kernels widen them.
pub fn rows<T: Element>(
    measure: Measure,
    p: &[T],
    q: Option<&[T]>,
    cols: usize,
    opts: &Options,
) -> Result<RowResults> {
    let q = q.map(widened);
    rows_f32(measure, &widened(p), q.as_deref(), cols, opts)
}

fn rows_f32(
    measure: Measure,
    p: &[f32],
    q: Option<&[f32]>,
    cols: usize,
    opts: &Options,
) -> Result<RowResults> {
    let opts = &opts.resolved();
    // Shapes first, as the GPU paths check them: the same call gets the same error.
    let q = check_shapes(measure, p, q, cols)?;
    let per_nat = opts.base.per_nat()?;
    // Values and validity in one pass, as on the GPU; the first offender is located only when
    // a row saw one (or came out NaN, as a row with no mass does).
    let row = |r: usize| {
        let span = r * cols..(r + 1) * cols;
        row_value(measure, opts, &p[span.clone()], &q[span])
    };
    // Many rows: blocks of rows on all cores. One long row: row_value splits it instead.
    let rows = p.len() / cols;
    let sums: Vec<RowSum> = if rows > 1 && p.len() >= PARALLEL_MIN {
        parallel_blocks(rows, |range| range.map(row).collect::<Vec<_>>()).concat()
    } else {
        (0..rows).map(row).collect()
    };
    if sums.iter().any(|s| s.saw_invalid || s.value.is_nan())
        && let Some(err) = locate_invalid(measure, opts, p, q, cols)
    {
        return Err(err);
    }
    // A row that is not a number: +∞ if some p > 0 sits where q = 0 (KL and CE are infinite
    // by rule, whatever else overflowed, as on the GPU); otherwise f64 overflowed
    // (log-probabilities above ~709) and no element is to blame.
    let mut values = Vec::with_capacity(sums.len());
    for (r, s) in sums.iter().enumerate() {
        let mut value = s.value;
        if !value.is_finite() {
            let span = r * cols..(r + 1) * cols;
            if !has_infinite_term(measure, opts.input, &p[span.clone()], &q[span]) {
                return Err(Error::Overflow {
                    row: r,
                    input: opts.input,
                });
            }
            value = f64::INFINITY;
        }
        values.push(value * per_nat);
    }
    let top1_agree = (opts.input == Input::Logits && measure.uses_q()).then(|| {
        p.chunks(cols)
            .zip(q.chunks(cols))
            .map(|(pr, qr)| argmax(pr) == argmax(qr))
            .collect()
    });
    Ok(RowResults { values, top1_agree })
}

/// Whether a row has an element whose term is +∞ by rule: p > 0 where q = 0 (KL and CE).
fn has_infinite_term(measure: Measure, input: Input, p: &[f32], q: &[f32]) -> bool {
    let zero = |x: f32| match input {
        Input::Probs => x == 0.0,
        Input::LogProbs | Input::Logits => x == f32::NEG_INFINITY,
    };
    measure.uses_q()
        && measure != Measure::JensenShannon
        && p.iter().zip(q).any(|(&a, &b)| !zero(a) && zero(b))
}

/// Checks lengths and returns the slice to use as Q (P itself for one-input measures).
pub(crate) fn check_shapes<'a, T>(
    measure: Measure,
    p: &'a [T],
    q: Option<&'a [T]>,
    cols: usize,
) -> Result<&'a [T]> {
    let q = match (measure.uses_q(), q) {
        (true, Some(q)) => q,
        (true, None) => {
            return Err(Error::InvalidArgument(format!(
                "{} needs a second distribution Q",
                measure.name()
            )));
        }
        (false, _) => p,
    };
    if cols == 0 {
        return Err(Error::ZeroColumns);
    }
    if p.is_empty() || q.is_empty() {
        return Err(Error::EmptyInput);
    }
    if p.len() != q.len() {
        return Err(Error::LengthMismatch {
            p_len: p.len(),
            q_len: q.len(),
        });
    }
    if !p.len().is_multiple_of(cols) {
        return Err(Error::RaggedRows {
            side: Side::P,
            len: p.len(),
            cols,
        });
    }
    Ok(q)
}

/// Whether a whole row of `input` carries no probability mass where the measure needs some
/// (for resolved options: normalized log-probabilities are logits by then). The GPU buffers'
/// locator asks this too, to tell which side of a flagged row is empty.
pub(crate) fn row_is_empty(input: Input, normalize: bool, row: &[f32]) -> bool {
    match input {
        Input::Logits => row.iter().all(|&x| x == f32::NEG_INFINITY),
        Input::Probs if normalize => row.iter().all(|&x| x == 0.0),
        _ => false,
    }
}

/// The first offending element (or empty row) in index order, P before Q at the same index.
/// The GPU path calls this only after its kernel raised a flag.
pub(crate) fn locate_invalid(
    measure: Measure,
    opts: &Options,
    p: &[f32],
    q: &[f32],
    cols: usize,
) -> Option<Error> {
    let opts = &opts.resolved();
    let sides: &[(Side, &[f32])] = if measure.uses_q() {
        &[(Side::P, p), (Side::Q, q)]
    } else {
        &[(Side::P, p)]
    };
    for row in 0..p.len() / cols {
        let range = row * cols..(row + 1) * cols;
        for index in range.clone() {
            for &(side, data) in sides {
                if let Some(problem) = opts.input.problem(data[index]) {
                    return Some(Error::InvalidValue {
                        side,
                        index,
                        row,
                        col: index - row * cols,
                        value: data[index],
                        problem,
                    });
                }
            }
        }
        for &(side, data) in sides {
            if row_is_empty(opts.input, opts.normalize, &data[range.clone()]) {
                return Some(Error::InvalidValue {
                    side,
                    index: row * cols,
                    row,
                    col: 0,
                    value: data[row * cols],
                    problem: Problem::EmptyRow,
                });
            }
        }
    }
    None
}

/// Index of the largest element, lowest index on ties.
fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

/// log Σ exp(x) in f64 as (max, log Σ exp(x − max)), kept apart: logits near 1e30 would
/// swallow the second part if added (NaN for a row of −∞ only, which the caller reports).
fn log_sum_exp(row: &[f32]) -> (f64, f64) {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let sum = sum_terms(
        row,
        row,
        Input::Logits,
        #[inline(always)]
        |x, _| math::exp(x as f64 - max),
    )
    .value;
    (max, sum.ln())
}

/// Inputs at least this long use every core (below it, threads cost more than they save).
const PARALLEL_MIN: usize = 1 << 18;

/// Runs `work` on `n` items split into contiguous blocks, one per available core, and returns
/// the blocks' results in order.
fn parallel_blocks<T: Send>(n: usize, work: impl Fn(std::ops::Range<usize>) -> T + Sync) -> Vec<T> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(n)
        .max(1);
    let block = n.div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let work = &work;
                scope.spawn(move || work(t * block..((t + 1) * block).min(n)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

/// What a row's terms need besides the element pair: scale factors that normalize
/// probabilities, or the log-sum-exps that turn logits into log-probabilities (0 for
/// log-probabilities: x − 0 is x, −∞ included).
#[derive(Clone, Copy)]
enum RowContext {
    Probs {
        sp: f64,
        sq: f64,
    },
    /// Each side's log-sum-exp as (max, log Σ exp(x − max)): ln p = (x − max) − log Σ.
    Logs {
        mp: f64,
        lp: f64,
        mq: f64,
        lq: f64,
    },
}

/// The context of one row; a one-input measure gets P for Q, so its scale is not computed
/// twice.
fn row_context(measure: Measure, opts: &Options, p: &[f32], q: &[f32]) -> RowContext {
    fn both<T: Copy>(measure: Measure, p: &[f32], q: &[f32], f: fn(&[f32]) -> T) -> (T, T) {
        let of_p = f(p);
        (of_p, if measure.uses_q() { f(q) } else { of_p })
    }
    match opts.input {
        Input::Probs if opts.normalize => {
            let (sum_p, sum_q) = both(measure, p, q, |r| {
                sum_terms(r, r, Input::Probs, |x, _| x as f64).value
            });
            RowContext::Probs {
                sp: 1.0 / sum_p,
                sq: 1.0 / sum_q,
            }
        }
        Input::Probs => RowContext::Probs { sp: 1.0, sq: 1.0 },
        Input::LogProbs => RowContext::Logs {
            mp: 0.0,
            lp: 0.0,
            mq: 0.0,
            lq: 0.0,
        },
        Input::Logits => {
            let ((mp, lp), (mq, lq)) = both(measure, p, q, log_sum_exp);
            RowContext::Logs { mp, lp, mq, lq }
        }
    }
}

/// A row's value in nats, and whether any of its elements broke the input's rules (then the
/// value means nothing).
#[derive(Clone, Copy)]
struct RowSum {
    value: f64,
    saw_invalid: bool,
}

/// One row's value: compensated sum of its terms (on all cores for a long row).
fn row_value(measure: Measure, opts: &Options, p: &[f32], q: &[f32]) -> RowSum {
    let ctx = row_context(measure, opts, p, q);
    // One loop per measure and context kind, with neither left to branch on per element, so
    // each loop vectorizes.
    let sum = |range: std::ops::Range<usize>| {
        let (p, q, input) = (&p[range.clone()], &q[range], opts.input);
        if let (Measure::KullbackLeibler, Input::Logits, RowContext::Logs { mp, lp, mq, lq }) =
            (measure, input, ctx)
        {
            return sum_terms(
                p,
                q,
                input,
                #[inline(always)]
                |a, b| kl_logits_term((a as f64 - mp) - lp, (b as f64 - mq) - lq),
            );
        }
        macro_rules! per_measure {
            ($($measure:path),*) => {
                match (measure, ctx) {
                    $(
                        ($measure, RowContext::Probs { sp, sq }) => sum_terms(p, q, input, #[inline(always)] |a, b| {
                            prob_term($measure, a as f64 * sp, b as f64 * sq)
                        }),
                        ($measure, RowContext::Logs { mp, lp, mq, lq }) => sum_terms(p, q, input, #[inline(always)] |a, b| {
                            log_term($measure, (a as f64 - mp) - lp, (b as f64 - mq) - lq)
                        }),
                    )*
                }
            };
        }
        per_measure!(
            Measure::KullbackLeibler,
            Measure::CrossEntropy,
            Measure::Entropy,
            Measure::JensenShannon
        )
    };
    let row = if p.len() >= PARALLEL_MIN {
        let parts = parallel_blocks(p.len(), sum);
        RowSum {
            value: compensated_sum(parts.iter().map(|s| s.value)),
            saw_invalid: parts.iter().any(|s| s.saw_invalid),
        }
    } else {
        sum(0..p.len())
    };
    // A row that sums to 0 cannot be normalized (1/0 scaled its terms into a number that
    // means nothing): let the locator name it.
    let unnormalizable =
        matches!(ctx, RowContext::Probs { sp, sq } if !(sp.is_finite() && sq.is_finite()));
    RowSum {
        saw_invalid: row.saw_invalid || unnormalizable,
        ..row
    }
}

/// Terms are computed a block at a time into a buffer, by a loop simple enough for the compiler
/// to vectorize (see `math`), then added into independent compensated accumulators.
const BLOCK: usize = 64;
const LANES: usize = 8;

/// Σ term(a, b) over pairs, compensated, with every element checked against `input`'s rules.
///
/// Compiled twice: for the baseline CPU and, on x86-64, for AVX2, chosen at run time. The
/// baseline (SSE2) has no packed f64 operations the vectorizer finds worth the logarithm's bit
/// manipulation; AVX2 does, and is about 5× faster. Both run the same IEEE operations in the
/// same order (Rust never contracts a·b + c into an FMA), so results are bit-identical.
#[inline(always)]
fn sum_terms(p: &[f32], q: &[f32], input: Input, term: impl Fn(f32, f32) -> f64) -> RowSum {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the only requirement of a `target_feature` function is that the CPU has the
        // feature, checked on the line above.
        return unsafe { sum_terms_avx2(p, q, input, term) };
    }
    sum_terms_portable(p, q, input, term)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn sum_terms_avx2(p: &[f32], q: &[f32], input: Input, term: impl Fn(f32, f32) -> f64) -> RowSum {
    sum_terms_portable(p, q, input, term)
}

#[inline(always)]
fn sum_terms_portable(
    p: &[f32],
    q: &[f32],
    input: Input,
    term: impl Fn(f32, f32) -> f64,
) -> RowSum {
    let mut sums = [0.0f64; LANES];
    let mut errors = [0.0f64; LANES];
    let mut saw_invalid = false;
    let mut terms = [0.0f64; BLOCK];
    for (p, q) in p.chunks(BLOCK).zip(q.chunks(BLOCK)) {
        let terms = &mut terms[..p.len()];
        for ((t, &a), &b) in terms.iter_mut().zip(p).zip(q) {
            *t = term(a, b);
            saw_invalid |= !(input.is_valid(a) & input.is_valid(b));
        }
        let (blocks, rest) = terms.as_chunks::<LANES>();
        for block in blocks {
            for lane in 0..LANES {
                neumaier_add(&mut sums[lane], &mut errors[lane], block[lane]);
            }
        }
        for (lane, &t) in rest.iter().enumerate() {
            neumaier_add(&mut sums[lane], &mut errors[lane], t);
        }
    }
    RowSum {
        // An infinite term leaves NaN in its lane's error term; the sums alone are the answer.
        value: if sums.iter().all(|s| s.is_finite()) {
            compensated_sum(sums.into_iter().chain(errors))
        } else {
            sums.iter().sum()
        },
        saw_invalid,
    }
}

/// The per-element term for probabilities p, q. Both sides of every edge case are computed and
/// one is selected, so the loop has no branches to stop it from vectorizing.
#[inline(always)]
fn prob_term(measure: Measure, p: f64, q: f64) -> f64 {
    // x·ln(x/m) with m = (x+y)/2: x·ln(2x/(x+y)).
    let js_half = |x: f64, y: f64| {
        let value = x * math::ln_ratio(2.0 * x, x + y);
        if x == 0.0 { 0.0 } else { value }
    };
    let value = match measure {
        Measure::KullbackLeibler => p * math::ln_ratio(p, q),
        Measure::CrossEntropy => -p * math::ln(q),
        Measure::Entropy => -p * math::ln(p),
        Measure::JensenShannon => return 0.5 * (js_half(p, q) + js_half(q, p)),
    };
    let q_matters = measure != Measure::Entropy;
    if p == 0.0 {
        0.0 // 0·ln 0 = 0, whatever q is
    } else if q_matters && q == 0.0 {
        f64::INFINITY
    } else {
        value
    }
}

/// ln(x/m), m = (x+y)/2, from d = ln x − ln y, without overflow or cancellation.
#[inline(always)]
fn log_ratio_to_mean(d: f64) -> f64 {
    let below = d - math::ln_1p(math::exp(d)) + std::f64::consts::LN_2;
    let above = -math::ln_1p(0.5 * math::exp_m1(-d));
    if d < -1.0 { below } else { above }
}

/// The per-element term for log-probabilities a = ln p, b = ln q; branch-free like
/// [`prob_term`].
#[inline(always)]
fn log_term(measure: Measure, a: f64, b: f64) -> f64 {
    let ninf = f64::NEG_INFINITY;
    let value = match measure {
        Measure::KullbackLeibler => math::exp(a) * (a - b),
        Measure::CrossEntropy => -math::exp(a) * b,
        Measure::Entropy => -math::exp(a) * a,
        Measure::JensenShannon => {
            let half = |x: f64, y: f64| {
                let value = math::exp(x) * log_ratio_to_mean(x - y);
                if x == ninf { 0.0 } else { value }
            };
            return 0.5 * (half(a, b) + half(b, a));
        }
    };
    if a == ninf {
        0.0 // p = 0
    } else if measure.uses_q() && b == ninf {
        f64::INFINITY
    } else {
        value
    }
}

/// KL's term for log-probabilities a = ln p, b = ln q of rows that sum to 1 (logits):
/// p·φ(a − b), φ(u) = u + e^(−u) − 1, which is p·(a − b) plus q − p, whose sum over the row is 0
/// (so q where p = 0).
/// The rounding of the rows' log-sum-exps shifts every a − b alike; KL's terms take such a shift
/// in full, these cancel it to first order (KL of 1.7e-8 over 3000 logits was 1.8e-15 off with
/// p·(a − b), about an ulp of ln 3000). φ's parts cancel near u = 0, where its series takes over.
#[inline(always)]
fn kl_logits_term(a: f64, b: f64) -> f64 {
    let ninf = f64::NEG_INFINITY;
    let (u, p, q) = (a - b, math::exp(a), math::exp(b));
    let value = if u.abs() < 1.1 {
        p * math::phi_near_zero(u)
    } else {
        p * (u - 1.0) + q
    };
    if a == ninf {
        q // p = 0: q − p
    } else if b == ninf {
        f64::INFINITY
    } else {
        value
    }
}

/// Neumaier's compensated sum: error independent of the number of terms, to first order.
/// An infinite term gives +∞ (or −∞), never NaN from the compensation.
///
/// ```
/// let terms = [1e16, 1.0, -1e16];
/// assert_eq!(klgpu::cpu::compensated_sum(terms), 1.0);
/// ```
pub fn compensated_sum(terms: impl IntoIterator<Item = f64>) -> f64 {
    let (mut sum, mut error) = (0.0f64, 0.0f64);
    for x in terms {
        neumaier_add(&mut sum, &mut error, x);
    }
    if sum.is_finite() { sum + error } else { sum }
}

/// One step of Neumaier's sum: `sum + error` gains `x`, `error` holding what `sum` rounded off.
#[inline(always)]
fn neumaier_add(sum: &mut f64, error: &mut f64, x: f64) {
    let t = *sum + x;
    *error += if sum.abs() >= x.abs() {
        (*sum - t) + x
    } else {
        (x - t) + *sum
    };
    *sum = t;
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_relative_eq;

    #[test]
    fn closed_forms() {
        // Uniform over 4 against a 2-level distribution: KL = Σ ¼·ln(¼/q).
        let p = [0.25f32; 4];
        let q = [0.125f32, 0.125, 0.375, 0.375];
        let kl = kl_divergence(&p, &q).unwrap();
        let expected = 0.5 * (2.0f64).ln() + 0.5 * (0.25f64 / 0.375).ln();
        assert_relative_eq!(kl, expected, max_relative = 1e-15);
        assert_relative_eq!(entropy(&p).unwrap(), (4.0f64).ln(), max_relative = 1e-15);
        let ce = cross_entropy(&p, &q).unwrap();
        assert_relative_eq!(ce, entropy(&p).unwrap() + kl, max_relative = 1e-14);
        // Disjoint supports: JS = ln 2 exactly.
        let js = js_divergence(&[1.0, 0.0], &[0.0, 1.0]).unwrap();
        assert_relative_eq!(js, std::f64::consts::LN_2, max_relative = 1e-15);
    }

    #[test]
    fn kl_of_close_logits_is_not_shifted_by_the_log_sum_exps_rounding() {
        // P uniform over n, Q the same but for e^ε at column 0: KL = ln((n − 1 + e^ε)/n) − ε/n
        // = (e^ε − 1 − ε)/n + (ln(1 + y) − y), y = (e^ε − 1)/n, both parts by their series.
        // Σ p·(a − b) took the rounding of ln n (an ulp: 1.8e-15) in full, 1e-7 of this KL.
        for (n, eps) in [
            (3000usize, 0.01f32),
            (3000, 0.001),
            (32_000, 0.001),
            (1000, 0.001),
        ] {
            let e = eps as f64;
            let (mut term, mut a) = (e, 0.0);
            for k in 2..30 {
                term *= e / k as f64;
                a += term;
            }
            let y = (e.exp_m1()) / n as f64;
            let (mut power, mut b) = (y, 0.0);
            for k in 2..30 {
                power *= -y;
                b += power / k as f64;
            }
            let exact = a / n as f64 + b;
            let p = vec![0.0f32; n];
            let mut q = p.clone();
            q[0] = eps;
            let kl = rows(
                Measure::KullbackLeibler,
                &p,
                Some(&q),
                n,
                &Options::input(Input::Logits),
            )
            .unwrap()
            .values[0];
            assert_relative_eq!(kl, exact, max_relative = 1e-12);
        }
        // A column P masks but Q does not adds its q − p = q: KL([½, ½, 0] ‖ [⅓, ⅓, ⅓]) = ln 1.5.
        let kl = kl_divergence_rows(
            &[0.0f32, 0.0, f32::NEG_INFINITY],
            &[0.0; 3],
            3,
            Input::Logits,
        )
        .unwrap()[0];
        assert_relative_eq!(kl, 1.5f64.ln(), max_relative = 1e-15);
    }

    #[test]
    fn conventions_at_zero() {
        assert_eq!(kl_divergence(&[0.0, 1.0], &[0.0, 1.0]).unwrap(), 0.0);
        assert_eq!(
            kl_divergence(&[0.5, 0.5], &[1.0, 0.0]).unwrap(),
            f64::INFINITY
        );
        assert_eq!(
            cross_entropy(&[0.5, 0.5], &[1.0, 0.0]).unwrap(),
            f64::INFINITY
        );
        assert_eq!(kl_divergence(&[0.0, 1.0], &[0.5, 0.5]).unwrap(), 2f64.ln());
    }

    #[test]
    fn rows_beyond_f64_are_overflow_errors() {
        // e^800 overflows f64: row 1 has no number, and no element is invalid.
        let p = [-0.7f32, -0.7, 800.0, -0.7];
        let q = [-0.7f32; 4];
        for m in Measure::ALL {
            let qq = m.uses_q().then_some(&q[..]);
            let got = rows(m, &p, qq, 2, &Options::input(Input::LogProbs));
            assert!(
                matches!(
                    got,
                    Err(Error::Overflow {
                        row: 1,
                        input: Input::LogProbs
                    })
                ),
                "{m:?}: {got:?}"
            );
        }
    }

    #[test]
    fn log_inputs_agree_with_probabilities() {
        let p = [0.1f32, 0.2, 0.7];
        let q = [0.3f32, 0.3, 0.4];
        let lp: Vec<f32> = p.iter().map(|x| x.ln()).collect();
        let lq: Vec<f32> = q.iter().map(|x| x.ln()).collect();
        for m in Measure::ALL {
            let qq = m.uses_q().then_some(&q[..]);
            let lqq = m.uses_q().then_some(&lq[..]);
            let direct = divergence(m, &p, qq, &Options::default()).unwrap();
            let logs = divergence(m, &lp, lqq, &Options::input(Input::LogProbs)).unwrap();
            let logits = divergence(m, &lp, lqq, &Options::input(Input::Logits)).unwrap();
            assert_relative_eq!(direct, logs, max_relative = 1e-6);
            assert_relative_eq!(direct, logits, max_relative = 1e-6);
        }
    }

    /// Random probabilities with exact zeros, tiny values and near-identical pairs, an odd
    /// length so the remainder paths run too.
    fn awkward_pairs() -> (Vec<f32>, Vec<f32>) {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut uniform = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        (0..100_003)
            .map(|i| {
                let p = uniform();
                match i % 7 {
                    0 => (0.0, p),
                    1 => (p, 0.0),
                    2 => (p * 1e-30, uniform() * 1e-30),
                    3 => (p, f32::from_bits(p.to_bits() + 1)),
                    _ => (p, uniform()),
                }
            })
            .unzip()
    }

    /// Our value of `m` over the pairs whose term is finite, against the compensated sum of
    /// `textbook` terms. Each of our terms is within a few ulp, so the sums agree to 1e-14 of
    /// Σ|term|.
    fn assert_matches_textbook(
        m: Measure,
        input: Input,
        (p, q): (&[f32], &[f32]),
        textbook: impl Fn(Measure, f64, f64) -> f64,
    ) {
        let zero = if input == Input::Probs {
            0.0
        } else {
            f32::NEG_INFINITY
        };
        let finite = |&(&a, &b): &(&f32, &f32)| !(m.uses_q() && a > zero && b == zero);
        let (fp, fq): (Vec<f32>, Vec<f32>) = p.iter().zip(q).filter(finite).unzip();
        let terms: Vec<f64> = (fp.iter().zip(&fq))
            .map(|(&a, &b)| textbook(m, a as f64, b as f64))
            .collect();
        let expected = compensated_sum(terms.iter().copied());
        let scale: f64 = terms.iter().map(|t| t.abs()).sum();
        let opts = Options::input(input);
        let ours = divergence(m, &fp, m.uses_q().then_some(&fq[..]), &opts).unwrap();
        assert!(
            (ours - expected).abs() <= 1e-14 * scale,
            "{m:?} {input:?}: {ours:e} vs {expected:e}"
        );
    }

    #[test]
    fn vectorized_terms_match_the_textbook_formulas() {
        // The summation loop that runs here (AVX2 where the CPU has it) against the formulas
        // written with std's ln/ln_1p.
        let (p, q) = awkward_pairs();
        let ln_ratio = |a: f64, b: f64| {
            if (0.5..=2.0).contains(&(a / b)) {
                ((a - b) / b).ln_1p()
            } else {
                (a / b).ln()
            }
        };
        let xlogx_ratio = |x: f64, y: f64| if x == 0.0 { 0.0 } else { x * ln_ratio(x, y) };
        let textbook = |m: Measure, p: f64, q: f64| match m {
            Measure::KullbackLeibler => xlogx_ratio(p, q),
            Measure::CrossEntropy if p == 0.0 => 0.0,
            Measure::CrossEntropy => -p * q.ln(),
            Measure::Entropy if p == 0.0 => 0.0,
            Measure::Entropy => -p * p.ln(),
            Measure::JensenShannon => {
                0.5 * (xlogx_ratio(p, 0.5 * (p + q)) + xlogx_ratio(q, 0.5 * (p + q)))
            }
        };
        for m in Measure::ALL {
            assert_matches_textbook(m, Input::Probs, (&p, &q), textbook);
        }
        assert_eq!(kl_divergence(&p, &q).unwrap(), f64::INFINITY);
    }

    #[test]
    fn vectorized_log_terms_match_the_textbook_formulas() {
        // Log-probabilities (−∞ where p = 0) through the vectorized exp/ln_1p/exp_m1, against
        // std's functions.
        let (p, q) = awkward_pairs();
        let log = |v: &[f32]| v.iter().map(|x| x.ln()).collect::<Vec<f32>>();
        let (a, b) = (log(&p), log(&q));
        let ninf = f64::NEG_INFINITY;
        let to_mean = |d: f64| {
            if d < -1.0 {
                d - d.exp().ln_1p() + std::f64::consts::LN_2
            } else {
                -(0.5 * (-d).exp_m1()).ln_1p()
            }
        };
        let half = |x: f64, y: f64| {
            if x == ninf {
                0.0
            } else {
                x.exp() * to_mean(x - y)
            }
        };
        let textbook = |m: Measure, a: f64, b: f64| match m {
            _ if a == ninf && m != Measure::JensenShannon => 0.0,
            Measure::KullbackLeibler => a.exp() * (a - b),
            Measure::CrossEntropy => -a.exp() * b,
            Measure::Entropy => -a.exp() * a,
            Measure::JensenShannon => 0.5 * (half(a, b) + half(b, a)),
        };
        for m in Measure::ALL {
            assert_matches_textbook(m, Input::LogProbs, (&a, &b), textbook);
        }
    }

    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let (p, q) = awkward_pairs();
        let kl = |a: f32, b: f32| prob_term(Measure::KullbackLeibler, a as f64, b as f64);
        let dispatched = sum_terms(&p, &q, Input::Probs, kl);
        let portable = sum_terms_portable(&p, &q, Input::Probs, kl);
        assert_eq!(dispatched.value.to_bits(), portable.value.to_bits());
        let (p, q): (Vec<f32>, Vec<f32>) = p.iter().zip(&q).filter(|&(_, &b)| b > 0.0).unzip();
        let dispatched = sum_terms(&p, &q, Input::Probs, kl);
        let portable = sum_terms_portable(&p, &q, Input::Probs, kl);
        assert!(dispatched.value.is_finite());
        assert_eq!(dispatched.value.to_bits(), portable.value.to_bits());
    }

    #[test]
    fn errors_name_the_first_offender() {
        let err = kl_divergence(&[0.5, 0.5, f32::NAN], &[0.5, -1.0, 0.5]).unwrap_err();
        assert!(matches!(
            err,
            Error::InvalidValue {
                side: Side::Q,
                index: 1,
                problem: Problem::Negative,
                ..
            }
        ));
        let err = kl_divergence_rows(
            &[0.0, 0.0, f32::NEG_INFINITY, f32::NEG_INFINITY],
            &[0.0; 4],
            2,
            Input::Logits,
        )
        .unwrap_err();
        assert!(matches!(
            err,
            Error::InvalidValue {
                side: Side::P,
                row: 1,
                col: 0,
                problem: Problem::EmptyRow,
                ..
            }
        ));
        assert!(matches!(
            kl_divergence::<f32>(&[], &[]),
            Err(Error::EmptyInput)
        ));
        assert!(matches!(
            kl_divergence(&[1.0], &[0.5, 0.5]),
            Err(Error::LengthMismatch { .. })
        ));
        assert!(matches!(
            kl_divergence_rows(&[1.0; 3], &[1.0; 3], 2, Input::Probs),
            Err(Error::RaggedRows { .. })
        ));
        assert!(matches!(
            kl_divergence_rows(&[1.0; 3], &[1.0; 3], 0, Input::Probs),
            Err(Error::ZeroColumns)
        ));
    }
}
