//! The f64 reference: short, obviously correct, with the same conventions and the same errors
//! as the GPU path. Every GPU result in the test suite is checked against it.
//!
//! Each f32 input is widened to f64 exactly; terms use `ln_1p`/`exp_m1` where a plain `ln`
//! would cancel, and sums are compensated (Neumaier), so the reference sits within ~1e-12
//! relative of the exact value of the same f32 inputs.
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
use crate::types::{Input, Measure, Options, RowResults};

/// KL(P‖Q) = Σ p·ln(p/q) of two equally long slices of probabilities, in f64.
pub fn kl_divergence(p: &[f32], q: &[f32]) -> Result<f64> {
    divergence(Measure::KullbackLeibler, p, Some(q), &Options::default())
}

/// Cross-entropy H(P,Q) = −Σ p·ln q, in f64.
pub fn cross_entropy(p: &[f32], q: &[f32]) -> Result<f64> {
    divergence(Measure::CrossEntropy, p, Some(q), &Options::default())
}

/// Entropy H(P) = −Σ p·ln p, in f64.
pub fn entropy(p: &[f32]) -> Result<f64> {
    divergence(Measure::Entropy, p, None, &Options::default())
}

/// Jensen–Shannon divergence ½KL(P‖M) + ½KL(Q‖M), M = (P+Q)/2, in f64.
pub fn js_divergence(p: &[f32], q: &[f32]) -> Result<f64> {
    divergence(Measure::JensenShannon, p, Some(q), &Options::default())
}

/// Any measure of one distribution (or pair), with options.
pub fn divergence(measure: Measure, p: &[f32], q: Option<&[f32]>, opts: &Options) -> Result<f64> {
    let cols = p.len().max(1);
    Ok(rows(measure, p, q, cols, opts)?.values[0])
}

/// Per-row KL(P‖Q) of row-major `[rows × cols]` inputs.
pub fn kl_divergence_rows(p: &[f32], q: &[f32], cols: usize, input: Input) -> Result<Vec<f64>> {
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
pub fn cross_entropy_rows(p: &[f32], q: &[f32], cols: usize, input: Input) -> Result<Vec<f64>> {
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
pub fn entropy_rows(p: &[f32], cols: usize, input: Input) -> Result<Vec<f64>> {
    Ok(rows(Measure::Entropy, p, None, cols, &Options::input(input))?.values)
}

/// Per-row Jensen–Shannon divergence.
pub fn js_divergence_rows(p: &[f32], q: &[f32], cols: usize, input: Input) -> Result<Vec<f64>> {
    Ok(rows(
        Measure::JensenShannon,
        p,
        Some(q),
        cols,
        &Options::input(input),
    )?
    .values)
}

/// Per-row values of any measure, with top-1 agreement for two-input logits.
pub fn rows(
    measure: Measure,
    p: &[f32],
    q: Option<&[f32]>,
    cols: usize,
    opts: &Options,
) -> Result<RowResults> {
    opts.base.per_nat()?;
    let q = check_shapes(measure, p, q, cols)?;
    if let Some(err) = locate_invalid(measure, opts, p, q, cols) {
        return Err(err);
    }
    let per_nat = opts.base.per_nat()?;
    // Many rows: blocks of rows on all cores. One long row: row_value splits it instead.
    let rows = p.len() / cols;
    let values = if rows > 1 && p.len() >= PARALLEL_MIN {
        parallel_blocks(rows, |range| {
            range
                .map(|r| {
                    let span = r * cols..(r + 1) * cols;
                    row_value(measure, opts, &p[span.clone()], &q[span]) * per_nat
                })
                .collect::<Vec<_>>()
        })
        .concat()
    } else {
        p.chunks(cols)
            .zip(q.chunks(cols))
            .map(|(pr, qr)| row_value(measure, opts, pr, qr) * per_nat)
            .collect()
    };
    let top1_agree = (opts.input == Input::Logits && measure.uses_q()).then(|| {
        p.chunks(cols)
            .zip(q.chunks(cols))
            .map(|(pr, qr)| argmax(pr) == argmax(qr))
            .collect()
    });
    Ok(RowResults { values, top1_agree })
}

/// Checks lengths and returns the slice to use as Q (P itself for one-input measures).
pub(crate) fn check_shapes<'a>(
    measure: Measure,
    p: &'a [f32],
    q: Option<&'a [f32]>,
    cols: usize,
) -> Result<&'a [f32]> {
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

/// Whether a whole row carries no probability mass where the measure needs some.
fn row_is_empty(opts: &Options, row: &[f32]) -> bool {
    match opts.input {
        Input::Logits => row.iter().all(|&x| x == f32::NEG_INFINITY),
        Input::Probs if opts.normalize => row.iter().all(|&x| x == 0.0),
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
            if row_is_empty(opts, &data[range.clone()]) {
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

/// log Σ exp(x) in f64.
fn log_sum_exp(row: &[f32]) -> f64 {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let sum = compensated_sum(row.iter().map(|&x| (x as f64 - max).exp()));
    max + sum.ln()
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

/// What a row's terms need besides the element pair: normalization factors or log-sum-exps.
#[derive(Clone, Copy)]
enum RowContext {
    Probs { sp: f64, sq: f64 },
    LogProbs,
    Logits { lp: f64, lq: f64 },
}

fn row_context(opts: &Options, p: &[f32], q: &[f32]) -> RowContext {
    match opts.input {
        Input::Probs if opts.normalize => {
            let sum = |r: &[f32]| compensated_sum(r.iter().map(|&x| x as f64));
            RowContext::Probs {
                sp: 1.0 / sum(p),
                sq: 1.0 / sum(q),
            }
        }
        Input::Probs => RowContext::Probs { sp: 1.0, sq: 1.0 },
        Input::LogProbs => RowContext::LogProbs,
        Input::Logits => RowContext::Logits {
            lp: log_sum_exp(p),
            lq: log_sum_exp(q),
        },
    }
}

/// One element pair's term in nats.
fn term(measure: Measure, ctx: RowContext, a: f32, b: f32) -> f64 {
    match ctx {
        RowContext::Probs { sp, sq } => prob_term(measure, a as f64 * sp, b as f64 * sq),
        RowContext::LogProbs => log_term(measure, a as f64, b as f64),
        RowContext::Logits { lp, lq } => log_term(measure, a as f64 - lp, b as f64 - lq),
    }
}

/// One row's value in nats: compensated sum of its terms (on all cores for a long row).
fn row_value(measure: Measure, opts: &Options, p: &[f32], q: &[f32]) -> f64 {
    let ctx = row_context(opts, p, q);
    let sum = |range: std::ops::Range<usize>| {
        compensated_sum(
            p[range.clone()]
                .iter()
                .zip(&q[range])
                .map(|(&a, &b)| term(measure, ctx, a, b)),
        )
    };
    if p.len() >= PARALLEL_MIN {
        compensated_sum(parallel_blocks(p.len(), sum))
    } else {
        sum(0..p.len())
    }
}

/// ln(a/b) for a, b > 0 (widened f32, so a/b neither overflows nor underflows): through
/// ln_1p((a−b)/b) near 1, where a − b is exact and ln(a/b) would lose digits.
fn ln_ratio(a: f64, b: f64) -> f64 {
    let r = a / b;
    if (0.5..=2.0).contains(&r) {
        ((a - b) / b).ln_1p()
    } else {
        r.ln()
    }
}

/// The per-element term for probabilities p, q.
fn prob_term(measure: Measure, p: f64, q: f64) -> f64 {
    // x·ln(x/m) with m = (x+y)/2: x·ln_ratio(2x, x+y).
    let js_half = |x: f64, y: f64| {
        if x == 0.0 {
            0.0
        } else {
            x * ln_ratio(2.0 * x, x + y)
        }
    };
    match measure {
        Measure::KullbackLeibler | Measure::CrossEntropy if p > 0.0 && q == 0.0 => f64::INFINITY,
        _ if p == 0.0 && measure != Measure::JensenShannon => 0.0,
        Measure::KullbackLeibler => p * ln_ratio(p, q),
        Measure::CrossEntropy => -p * q.ln(),
        Measure::Entropy => -p * p.ln(),
        Measure::JensenShannon => 0.5 * (js_half(p, q) + js_half(q, p)),
    }
}

/// ln(x/m), m = (x+y)/2, from d = ln x − ln y, without overflow or cancellation.
fn log_ratio_to_mean(d: f64) -> f64 {
    if d < -1.0 {
        d - d.exp().ln_1p() + std::f64::consts::LN_2
    } else {
        -(0.5 * (-d).exp_m1()).ln_1p()
    }
}

/// The per-element term for log-probabilities a = ln p, b = ln q.
fn log_term(measure: Measure, a: f64, b: f64) -> f64 {
    let ninf = f64::NEG_INFINITY;
    match measure {
        Measure::KullbackLeibler | Measure::CrossEntropy if a > ninf && b == ninf => f64::INFINITY,
        _ if a == ninf && measure != Measure::JensenShannon => 0.0,
        Measure::KullbackLeibler => a.exp() * (a - b),
        Measure::CrossEntropy => -a.exp() * b,
        Measure::Entropy => -a.exp() * a,
        Measure::JensenShannon => {
            let half = |x: f64, y: f64| {
                if x == ninf {
                    0.0
                } else {
                    x.exp() * log_ratio_to_mean(x - y)
                }
            };
            0.5 * (half(a, b) + half(b, a))
        }
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
    let (mut sum, mut comp) = (0.0f64, 0.0f64);
    for x in terms {
        let t = sum + x;
        if sum.abs() >= x.abs() {
            comp += (sum - t) + x;
        } else {
            comp += (x - t) + sum;
        }
        sum = t;
    }
    if sum.is_finite() { sum + comp } else { sum }
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
        assert!(matches!(kl_divergence(&[], &[]), Err(Error::EmptyInput)));
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
