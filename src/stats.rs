//! Summary statistics of per-row values: the numbers llama.cpp's `--kl-divergence` reports
//! (mean ± standard error, median, the 90th to 99.9th and the 10th to 0.1st percentiles, min,
//! max, and top-1 agreement ± its error). Pure functions, no GPU; [`crate::RowResults::summary`]
//! applies them to a batch's rows.
//!
//! ```
//! let per_row_kl = [0.02, 0.01, 0.5, 0.03, 0.0];
//! let s = klgpu::stats::summarize(&per_row_kl).unwrap();
//! assert_eq!((s.count, s.median, s.max), (5, 0.02, 0.5));
//! assert!((s.mean - 0.112).abs() < 1e-15);
//! // Four of five rows with the same arg-max: 0.8 ± √(0.8·0.2/4) = 0.8 ± 0.2.
//! let (share, stderr) = klgpu::stats::agreement(&[true, true, false, true, true]).unwrap();
//! assert_eq!(share, 0.8);
//! assert!((stderr.unwrap() - 0.2).abs() < 1e-15);
//! ```
//!
//! Infinities (a row with p > 0 where q = 0 has KL = +∞) are kept, not dropped:
//! - `mean` is +∞ as soon as one row is +∞ (NaN if both +∞ and −∞ occur), and then
//!   `stderr` is NaN, as numpy's `std` of such data is;
//! - percentiles and min/max see the infinite rows as the largest values, so the upper
//!   percentiles become +∞ only once the interpolation reaches an infinite row: a percentile
//!   that falls between a finite value and +∞ is +∞, one that lands exactly on a finite value
//!   stays finite.
//!
//! NaN rows are not expected (the library rejects NaN inputs); they would sort above +∞ and
//! make the mean NaN.

/// Statistics of a non-empty set of values.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Number of values.
    pub count: usize,
    /// Arithmetic mean (compensated sum / count).
    pub mean: f64,
    /// Standard error of the mean, √(s²/n) with the unbiased sample variance s²; `None` for
    /// a single value, where it is undefined.
    pub stderr: Option<f64>,
    /// 50th percentile.
    pub median: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
    /// 10th percentile.
    pub p10: f64,
    /// 5th percentile.
    pub p5: f64,
    /// 1st percentile.
    pub p1: f64,
    /// 0.1th percentile.
    pub p0_1: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// How many values are infinite (rows where P > 0 meets Q = 0, for KL and cross-entropy:
    /// +∞, or −∞ in a log base below 1): with one of them the mean and the upper (lower)
    /// percentiles read ∞ and say nothing more.
    pub infinite: usize,
    /// The first infinite value's index (its row), if any.
    pub first_infinite: Option<usize>,
}

/// A power of two to take sums and squares of `values` by: those of values near f64's ends
/// would overflow (or underflow); scaled, which is exact, they do not, and the results are
/// scaled back.
fn scale_for(values: &[f64]) -> f64 {
    let largest = values
        .iter()
        .filter(|v| v.is_finite())
        .fold(0.0f64, |m, v| m.max(v.abs()));
    if largest > 2f64.powi(400) {
        2f64.powi(-600)
    } else if largest < 2f64.powi(-400) && largest > 0.0 {
        2f64.powi(600)
    } else {
        1.0
    }
}

/// The mean of `values` (at least one), as [`summarize`] takes it: a mean of values near
/// f64::MAX is not +∞ because their sum is.
pub(crate) fn mean(values: &[f64]) -> f64 {
    let scale = scale_for(values);
    scaled_mean(values, scale) / scale
}

/// The mean of `values` times `scale`.
fn scaled_mean(values: &[f64], scale: f64) -> f64 {
    crate::cpu::compensated_sum(values.iter().map(|&x| x * scale)) / values.len() as f64
}

/// Summarizes `values`; `None` when there are none.
pub fn summarize(values: &[f64]) -> Option<Summary> {
    if values.is_empty() {
        return None;
    }
    let n = values.len();
    let scale = scale_for(values);
    let mean = scaled_mean(values, scale);
    let stderr = (n > 1).then(|| {
        if !mean.is_finite() {
            return f64::NAN;
        }
        let ss = crate::cpu::compensated_sum(values.iter().map(|&x| {
            let d = x * scale - mean;
            d * d
        }));
        (ss / (n - 1) as f64 / n as f64).sqrt() / scale
    });
    let mean = mean / scale;
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some(Summary {
        count: n,
        mean,
        stderr,
        median: percentile_sorted(&sorted, 500),
        p90: percentile_sorted(&sorted, 900),
        p95: percentile_sorted(&sorted, 950),
        p99: percentile_sorted(&sorted, 990),
        p99_9: percentile_sorted(&sorted, 999),
        p10: percentile_sorted(&sorted, 100),
        p5: percentile_sorted(&sorted, 50),
        p1: percentile_sorted(&sorted, 10),
        p0_1: percentile_sorted(&sorted, 1),
        min: sorted[0],
        max: sorted[n - 1],
        infinite: values.iter().filter(|v| v.is_infinite()).count(),
        first_infinite: values.iter().position(|v| v.is_infinite()),
    })
}

/// The share of rows whose arg-maxes agree (llama.cpp's "same top p") and its standard error
/// √(a(1 − a)/(n − 1)), as llama.cpp gives it; `None` without rows, no error for one row.
pub fn agreement(agree: &[bool]) -> Option<(f64, Option<f64>)> {
    if agree.is_empty() {
        return None;
    }
    let n = agree.len() as f64;
    let share = agree.iter().filter(|&&a| a).count() as f64 / n;
    let stderr = (agree.len() > 1).then(|| (share * (1.0 - share) / (n - 1.0)).sqrt());
    Some((share, stderr))
}

/// The percentile at `permille` thousandths (0–1000) of ascending `sorted` values,
/// interpolated linearly between the two nearest ranks like numpy's default
/// (`method="linear"`): rank h = (n−1)·permille/1000, in integers so that a whole rank is
/// exact (in f64, (n−1)·0.999 came out an ulp above 999 for n = 1001, and the 99.9th
/// percentile +∞ where the next value was infinite). `sorted` must not be empty
/// ([`summarize`] checks).
fn percentile_sorted(sorted: &[f64], permille: u64) -> f64 {
    let n = sorted.len();
    let scaled = (n as u64 - 1) * permille.min(1000);
    let lo = (scaled / 1000) as usize;
    let hi = (lo + 1).min(n - 1);
    let frac = (scaled % 1000) as f64 / 1000.0;
    let (a, b) = (sorted[lo], sorted[hi]);
    if frac == 0.0 || a == b {
        return a;
    }
    if a.is_infinite() || b.is_infinite() {
        // Between a finite value and ±∞ the line is at ±∞; between −∞ and +∞ it is undefined.
        return if a.is_infinite() && b.is_infinite() {
            f64::NAN
        } else if a.is_infinite() {
            a
        } else {
            b
        };
    }
    if (b - a).is_finite() {
        a + (b - a) * frac
    } else {
        // Values of opposite signs near f64's ends: b − a overflows, the weighted sum does not.
        a * (1.0 - frac) + b * frac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_is_none() {
        assert_eq!(summarize(&[]), None);
    }

    #[test]
    fn one_value() {
        let s = summarize(&[0.25]).unwrap();
        assert_eq!(s.count, 1);
        assert_eq!(s.mean, 0.25);
        assert_eq!(s.stderr, None);
        for v in [
            s.median, s.p90, s.p95, s.p99, s.p99_9, s.p10, s.p5, s.p1, s.p0_1, s.min, s.max,
        ] {
            assert_eq!(v, 0.25);
        }
        assert_eq!((s.infinite, s.first_infinite), (0, None));
    }

    #[test]
    fn matches_numpy() {
        // numpy: x = np.arange(1, 11, dtype=float)
        let x: Vec<f64> = (1..=10).rev().map(f64::from).collect();
        let s = summarize(&x).unwrap();
        assert_eq!(s.mean, 5.5);
        // x.std(ddof=1) / sqrt(10) = 0.9574271077563381
        assert!((s.stderr.unwrap() - 0.957_427_107_756_338_1).abs() < 1e-15);
        assert_eq!(s.median, 5.5); // np.percentile(x, 50)
        assert!((s.p90 - 9.1).abs() < 1e-12); // np.percentile(x, 90) = 9.1
        assert!((s.p95 - 9.55).abs() < 1e-12);
        assert!((s.p99 - 9.91).abs() < 1e-12);
        assert!((s.p99_9 - 9.991).abs() < 1e-12);
        assert!((s.p10 - 1.9).abs() < 1e-12); // np.percentile(x, 10) = 1.9
        assert!((s.p5 - 1.45).abs() < 1e-12);
        assert!((s.p1 - 1.09).abs() < 1e-12);
        assert!((s.p0_1 - 1.009).abs() < 1e-12);
        assert_eq!((s.min, s.max), (1.0, 10.0));
    }

    #[test]
    fn values_near_the_ends_of_f64() {
        // Sums, squares and differences of such values overflowed (or underflowed): the
        // median of ±1.7e308 read +∞, the mean of two f64::MAX +∞, stderr NaN or +∞ or 0.
        let big = 1.7e308;
        let s = summarize(&[-big, big]).unwrap();
        assert_eq!((s.mean, s.median, s.p10), (0.0, 0.0, -0.8 * big));
        assert_eq!(s.stderr, Some(big));
        let s = summarize(&[f64::MAX, f64::MAX]).unwrap();
        assert_eq!((s.mean, s.stderr), (f64::MAX, Some(0.0)));
        // The reduction's mean is the summary's: it read −∞ for two rows of −1.4e308 (the
        // entropy of log-probabilities 703).
        let rows = [-1.432e308, -1.432e308];
        assert_eq!(
            crate::Reduction::MeanOverRows.apply(&rows),
            Some(-1.432e308)
        );
        assert_eq!(crate::Reduction::Sum.apply(&rows), Some(f64::NEG_INFINITY));
        let s = summarize(&[1e200, -1e200]).unwrap();
        assert_eq!(s.stderr, Some(1e200));
        // Tiny: 1e-200 and 3e-200 have mean 2e-200 and stderr 1e-200 (their squares are 0).
        let s = summarize(&[1e-200, 3e-200]).unwrap();
        assert!((s.mean / 2e-200 - 1.0).abs() < 1e-15, "{}", s.mean);
        assert!(
            (s.stderr.unwrap() / 1e-200 - 1.0).abs() < 1e-15,
            "{:?}",
            s.stderr
        );
    }

    #[test]
    fn agreement_and_its_error() {
        assert_eq!(agreement(&[]), None);
        assert_eq!(agreement(&[true]), Some((1.0, None)));
        // 3 of 4: √(0.75·0.25/3) = 0.25.
        let (share, err) = agreement(&[true, false, true, true]).unwrap();
        assert_eq!(share, 0.75);
        assert!((err.unwrap() - 0.25).abs() < 1e-15);
    }

    #[test]
    fn infinities() {
        let inf = f64::INFINITY;
        // One infinite row among 11: the mean is infinite, the median is not.
        let mut x: Vec<f64> = (0..10).map(f64::from).collect();
        x.push(inf);
        let s = summarize(&x).unwrap();
        assert_eq!(s.mean, inf);
        assert!(s.stderr.unwrap().is_nan());
        assert_eq!(s.median, 5.0);
        // h = 10·0.9 = 9 exactly: lands on the finite 9.0.
        assert_eq!(s.p90, 9.0);
        // h = 9.5: between 9 and +∞.
        assert_eq!(s.p95, inf);
        assert_eq!(s.max, inf);
        assert_eq!(s.min, 0.0);
        assert_eq!((s.infinite, s.first_infinite), (1, Some(10)));
        x.insert(3, inf);
        let s = summarize(&x).unwrap();
        assert_eq!((s.infinite, s.first_infinite), (2, Some(3)));
        assert!(percentile_sorted(&[-inf, inf], 500).is_nan());
        assert_eq!(percentile_sorted(&[-inf, 1.0], 500), -inf);
        assert_eq!(percentile_sorted(&[inf, inf], 500), inf);
        // In a log base below 1, an infinite KL is −∞: counted too.
        let s = summarize(&[0.5, -inf, 1.0]).unwrap();
        assert_eq!((s.infinite, s.first_infinite), (1, Some(1)));
        // A whole rank that f64 missed by an ulp: n = 1001 at 99.9 is rank 999 exactly, a
        // finite value, though the next is +∞ (and at n = 100,001, rank 99,900).
        for n in [1001, 2001, 100_001] {
            let mut x: Vec<f64> = (0..n - 1).map(|i| i as f64).collect();
            x.push(inf);
            let s = summarize(&x).unwrap();
            assert_eq!(s.p99_9, ((n - 1) * 999 / 1000) as f64, "n = {n}");
        }
    }
}
