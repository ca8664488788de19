//! The small vocabulary shared by the GPU engine, the CPU reference and the command line.

use crate::error::{Error, Result};

/// The four quantities klgpu computes. Each is a sum over elements of a per-element term
/// (natural log unless a [`Base`] is chosen):
///
/// ```text
/// KullbackLeibler  KL(P‖Q) = Σ p·log(p/q)        0 where p = 0, +∞ where p > 0 = q
/// CrossEntropy     H(P,Q)  = −Σ p·log q           0 where p = 0, +∞ where p > 0 = q
/// Entropy          H(P)    = −Σ p·log p           0 where p = 0
/// JensenShannon    JS(P,Q) = ½KL(P‖M) + ½KL(Q‖M), M = (P+Q)/2, 0 ≤ JS ≤ log 2 for distributions
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Measure {
    /// Kullback–Leibler divergence KL(P‖Q).
    KullbackLeibler,
    /// Cross-entropy H(P, Q) = H(P) + KL(P‖Q).
    CrossEntropy,
    /// Shannon entropy H(P); Q is not used.
    Entropy,
    /// Jensen–Shannon divergence, symmetric, and bounded by log 2 for distributions (inputs are
    /// not renormalized unless [`Options::normalize`] says so).
    JensenShannon,
}

impl Measure {
    /// All four, in a fixed order.
    pub const ALL: [Measure; 4] = [
        Measure::KullbackLeibler,
        Measure::CrossEntropy,
        Measure::Entropy,
        Measure::JensenShannon,
    ];

    /// Whether the measure reads a second distribution.
    pub fn uses_q(self) -> bool {
        self != Measure::Entropy
    }

    /// Short name (`kl`, `ce`, `entropy`, `js`), as the command line spells it.
    pub fn name(self) -> &'static str {
        match self {
            Measure::KullbackLeibler => "kl",
            Measure::CrossEntropy => "ce",
            Measure::Entropy => "entropy",
            Measure::JensenShannon => "js",
        }
    }
}

/// How the numbers in P and Q are to be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Input {
    /// Probabilities: finite, ≥ 0. Taken as given (not renormalized) unless
    /// [`Options::normalize`] is set.
    #[default]
    Probs,
    /// Natural-log probabilities; −∞ is a legal value (probability 0). NaN and +∞ are errors.
    LogProbs,
    /// Raw scores; each row is passed through a numerically stable softmax inside the kernel
    /// (never materialized). −∞ masks an entry; a row must have at least one finite logit.
    Logits,
}

impl Input {
    /// What is wrong with one element read as this kind of input, if anything: NaN always;
    /// ±∞ or a negative value for probabilities; +∞ for log-probabilities and logits (−∞ is
    /// a legal p = 0). These are the rules the kernels check.
    ///
    /// ```
    /// use klgpu::{Input, Problem};
    /// assert_eq!(Input::Probs.problem(-0.5), Some(Problem::Negative));
    /// assert_eq!(Input::Logits.problem(f32::NEG_INFINITY), None);
    /// ```
    pub fn problem(self, x: f32) -> Option<crate::Problem> {
        use crate::Problem;
        if self.is_valid(x) {
            None
        } else if x.is_nan() {
            Some(Problem::NaN)
        } else if x.is_infinite() {
            Some(Problem::Infinite)
        } else {
            Some(Problem::Negative)
        }
    }

    /// [`Input::problem`] as one comparison pair (NaN fails both), so a loop over elements
    /// can check every element without branches.
    #[inline(always)]
    pub(crate) fn is_valid(self, x: f32) -> bool {
        let lowest = match self {
            Input::Probs => 0.0,
            Input::LogProbs | Input::Logits => f32::NEG_INFINITY,
        };
        x >= lowest && x < f32::INFINITY
    }

    /// Short name (`probs`, `log-probs`, `logits`).
    pub fn name(self) -> &'static str {
        match self {
            Input::Probs => "probs",
            Input::LogProbs => "log-probs",
            Input::Logits => "logits",
        }
    }
}

/// How the elements of an input are stored. The kernels read each as the f32 it widens to
/// (exactly: every f16 and bf16 value is an f32 value), so a half-precision input gives the
/// result of its f32 widening while the GPU reads half the bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Dtype {
    /// IEEE binary32.
    #[default]
    F32,
    /// IEEE binary16 ([`half::f16`]).
    F16,
    /// bfloat16 ([`half::bf16`]): f32's exponent with 8 significant bits.
    BF16,
}

impl Dtype {
    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }

    /// Name as Rust spells the type (`f32`, `f16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::BF16 => "bf16",
        }
    }
}

/// Element types that host slices may hold: `f32`, [`half::f16`] and [`half::bf16`].
///
/// ```no_run
/// use klgpu::half::bf16;
/// let engine = klgpu::Engine::new()?;
/// let p: Vec<bf16> = [0.25f32, 0.75].iter().map(|&x| bf16::from_f32(x)).collect();
/// let q: Vec<bf16> = [0.5f32, 0.5].iter().map(|&x| bf16::from_f32(x)).collect();
/// let kl = engine.kl_divergence(&p, &q)?; // the GPU reads 2 bytes per element
/// # Ok::<(), klgpu::Error>(())
/// ```
pub trait Element: bytemuck::Pod + Send + Sync + sealed::Sealed {
    /// The storage this type stands for.
    const DTYPE: Dtype;
    /// The value as the kernels read it.
    fn to_f32(self) -> f32;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

impl Element for f32 {
    const DTYPE: Dtype = Dtype::F32;
    fn to_f32(self) -> f32 {
        self
    }
}

impl Element for half::f16 {
    const DTYPE: Dtype = Dtype::F16;
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

impl Element for half::bf16 {
    const DTYPE: Dtype = Dtype::BF16;
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

/// The f32 widening of a slice, for the host-side paths that read values one by one (the
/// error locator); a borrowed slice when it is f32 already.
pub(crate) fn widened<T: Element>(data: &[T]) -> std::borrow::Cow<'_, [f32]> {
    if T::DTYPE == Dtype::F32 {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(data))
    } else {
        std::borrow::Cow::Owned(data.iter().map(|x| x.to_f32()).collect())
    }
}

/// Logarithm base of the results.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum Base {
    /// Natural log: nats.
    #[default]
    E,
    /// Base 2: bits.
    Two,
    /// Base 10: hartleys.
    Ten,
    /// Any other base b > 0, b ≠ 1.
    Other(f64),
}

impl Base {
    /// The factor that turns nats into this base: 1 / ln(b).
    pub fn per_nat(self) -> Result<f64> {
        let b = match self {
            Base::E => return Ok(1.0),
            Base::Two => 2.0,
            Base::Ten => 10.0,
            Base::Other(b) => b,
        };
        if !(b.is_finite() && b > 0.0 && b != 1.0) {
            return Err(Error::InvalidArgument(format!(
                "log base must be finite, > 0 and != 1, got {b}"
            )));
        }
        Ok(1.0 / b.ln())
    }
}

/// How per-row results are combined into one number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Reduction {
    /// Keep one value per row.
    #[default]
    None,
    /// Sum over rows.
    Sum,
    /// Mean over rows: the sum divided by the number of rows (taken scaled by a power of two,
    /// so that rows near f64's ends, whose sum overflows, still have a finite mean). This is
    /// PyTorch's `reduction="batchmean"`, not a mean over all elements.
    MeanOverRows,
}

impl Reduction {
    /// Reduces per-row values in f64 with compensated summation; `None` for [`Reduction::None`]
    /// and for the mean of no rows.
    ///
    /// ```
    /// use klgpu::Reduction;
    /// assert_eq!(Reduction::MeanOverRows.apply(&[1.0, 2.0, 6.0]), Some(3.0));
    /// assert_eq!(Reduction::None.apply(&[1.0]), None);
    /// assert_eq!(Reduction::MeanOverRows.apply(&[]), None); // no mean of nothing
    /// ```
    pub fn apply(self, rows: &[f64]) -> Option<f64> {
        let sum = || crate::cpu::compensated_sum(rows.iter().copied());
        match self {
            Reduction::None => None,
            Reduction::Sum => Some(sum()),
            Reduction::MeanOverRows if rows.is_empty() => None,
            Reduction::MeanOverRows => Some(crate::stats::mean(rows)),
        }
    }
}

/// Options shared by every computation.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Options {
    /// How to read the inputs.
    pub input: Input,
    /// Log base of the results.
    pub base: Base,
    /// Normalize each row first: probabilities are divided by their sum; log-probabilities x
    /// are read as logits, p = e^x / Σ e^x, which is the same normalization; logits are
    /// normalized already. Cross-entropy and entropy normalize within their one pass; KL and
    /// JS do too for rows whose sums are close enough ([`Tuning::one_pass_normalized_kl`],
    /// [`Tuning::one_pass_normalized_js`]), and pay a second pass for the others.
    ///
    /// [`Tuning::one_pass_normalized_kl`]: crate::Tuning::one_pass_normalized_kl
    /// [`Tuning::one_pass_normalized_js`]: crate::Tuning::one_pass_normalized_js
    pub normalize: bool,
    /// How the elements of GPU-buffer inputs are stored, for the buffer calls that take
    /// options (`divergence_buffers`, `rows_buffers`, `record_rows`), whose slices are
    /// untyped; outputs, gradients and the loss's inputs are f32. Host slices carry their own
    /// type ([`Element`]) and ignore this.
    pub dtype: Dtype,
}

impl Options {
    /// Options for the given input kind, natural log, no normalization.
    pub fn input(input: Input) -> Self {
        Options {
            input,
            ..Default::default()
        }
    }

    /// The options a computation runs with: normalized log-probabilities are logits, and
    /// `normalize` stays set only for probabilities. (Ignoring it for log-probabilities, as
    /// before, silently gave the unnormalized value that was asked not to be.)
    ///
    /// ```
    /// use klgpu::{Input, Options};
    /// let asked = Options { normalize: true, ..Options::input(Input::LogProbs) };
    /// assert_eq!(asked.resolved(), Options::input(Input::Logits));
    /// ```
    pub fn resolved(&self) -> Options {
        let input = match self.input {
            Input::LogProbs if self.normalize => Input::Logits,
            other => other,
        };
        Options {
            input,
            normalize: self.normalize && input == Input::Probs,
            ..*self
        }
    }
}

/// Per-row results of a batched computation.
#[derive(Clone, Debug, PartialEq)]
pub struct RowResults {
    /// One value per row.
    pub values: Vec<f64>,
    /// For [`Input::Logits`] (and log-probabilities with [`Options::normalize`], which are
    /// read as logits) with two inputs: whether P's and Q's arg-max agree in each row
    /// (llama.cpp's "same top p"); ties go to the lowest index.
    pub top1_agree: Option<Vec<bool>>,
}

impl RowResults {
    /// The rows reduced to one number (`None` for [`Reduction::None`]).
    ///
    /// ```
    /// use klgpu::{Reduction, RowResults};
    /// let r = RowResults { values: vec![0.5, 1.5], top1_agree: None };
    /// assert_eq!(r.reduce(Reduction::Sum), Some(2.0));
    /// assert_eq!(r.reduce(Reduction::MeanOverRows), Some(1.0));
    /// ```
    pub fn reduce(&self, reduction: Reduction) -> Option<f64> {
        reduction.apply(&self.values)
    }

    /// Fraction of rows whose arg-max agrees, if known.
    pub fn top1_agreement(&self) -> Option<f64> {
        crate::stats::agreement(self.top1_agree.as_deref()?).map(|(share, _)| share)
    }

    /// The standard error of [`RowResults::top1_agreement`], √(a(1 − a)/(n − 1)) as llama.cpp
    /// gives it; `None` if unknown or for a single row.
    pub fn top1_agreement_stderr(&self) -> Option<f64> {
        crate::stats::agreement(self.top1_agree.as_deref()?).and_then(|(_, err)| err)
    }

    /// llama.cpp's statistics of the per-row values (mean ± standard error, percentiles, min,
    /// max, how many rows are +∞); `None` for no rows.
    ///
    /// ```
    /// use klgpu::RowResults;
    /// let r = RowResults { values: vec![0.1, 0.3, f64::INFINITY], top1_agree: None };
    /// let s = r.summary().unwrap();
    /// assert_eq!((s.median, s.min, s.infinite, s.first_infinite), (0.3, 0.1, 1, Some(2)));
    /// assert_eq!(s.mean, f64::INFINITY);
    /// ```
    pub fn summary(&self) -> Option<crate::stats::Summary> {
        crate::stats::summarize(&self.values)
    }
}
