//! One error type for the library: every failure is an `Err`, never a panic.

use std::fmt;

use crate::types::Input;

/// Which of the two inputs a problem was found in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The first distribution, P.
    P,
    /// The second distribution, Q.
    Q,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::P => "P",
            Side::Q => "Q",
        })
    }
}

/// Why an element was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Problem {
    /// Not a number.
    NaN,
    /// A probability below zero.
    Negative,
    /// +∞ or −∞ where a finite probability was expected, or +∞ as a log-probability or logit.
    Infinite,
    /// The row has no mass: every logit is −∞, or (with normalization) the probabilities sum to 0.
    EmptyRow,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Problem::NaN => "is NaN",
            Problem::Negative => "is negative",
            Problem::Infinite => "is infinite",
            Problem::EmptyRow => "row has no probability mass (all logits -inf, or a zero sum)",
        })
    }
}

/// Everything that can go wrong in klgpu.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No adapter could be found at all.
    #[error(
        "no GPU adapter found ({details}). klgpu needs a Vulkan, Metal or DX12 driver (or \
         OpenGL 4.3 / GLES 3.1); \
         on Linux without a GPU install Mesa's software Vulkan driver \
         (Debian/Ubuntu: `apt-get install mesa-vulkan-drivers`)"
    )]
    NoAdapter {
        /// What was tried.
        details: String,
    },
    /// `WGPU_ADAPTER_NAME` names no adapter that is present.
    #[error("WGPU_ADAPTER_NAME={wanted:?} matches none of the adapters present: {available}")]
    AdapterNotFound {
        /// The requested name (substring, case-insensitive).
        wanted: String,
        /// The adapters that exist.
        available: String,
    },
    /// The device could not be created, was lost, or ran out of memory.
    #[error("GPU error: {0}")]
    Gpu(String),
    /// An input was empty.
    #[error("empty input: a distribution needs at least one element")]
    EmptyInput,
    /// P and Q have different lengths.
    #[error("length mismatch: P has {p_len} elements, Q has {q_len}")]
    LengthMismatch {
        /// Elements in P.
        p_len: usize,
        /// Elements in Q.
        q_len: usize,
    },
    /// `cols` was zero.
    #[error("cols must be at least 1")]
    ZeroColumns,
    /// The input length is not a whole number of rows.
    #[error("{side} has {len} elements, which is not a multiple of cols = {cols}")]
    RaggedRows {
        /// Which input.
        side: Side,
        /// Its length.
        len: usize,
        /// The requested row length.
        cols: usize,
    },
    /// An element was rejected.
    #[error("{side}[{index}] (row {row}, column {col}) = {value}: {problem}{}", negative_hint(.problem))]
    InvalidValue {
        /// Which input.
        side: Side,
        /// Flat index of the first offending element.
        index: usize,
        /// Its row (0 for a single distribution).
        row: usize,
        /// Its column.
        col: usize,
        /// The value found there.
        value: f32,
        /// What is wrong with it.
        problem: Problem,
    },
    /// A row's result, or (with normalization) its sum, is beyond f32's range: the kernels
    /// compute in f32, and values near `f32::MAX` (or sums of them) overflow, as does the
    /// probability e^x of a log-probability above about 88.7. The f64 CPU reference
    /// ([`crate::cpu`]) computes such rows, and reports this error only where f64 overflows
    /// too (log-probabilities above about 709.8). The message says what to do for the input
    /// kind.
    #[error("row {row}: {}", overflow_cause(.input))]
    Overflow {
        /// The first such row.
        row: usize,
        /// How the row's values were taken: what overflows, and the remedy, depend on it.
        input: Input,
    },
    /// A GPU buffer argument cannot be used as given.
    #[error("buffer argument `{name}`: {reason}")]
    InvalidBuffer {
        /// The argument's name.
        name: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A parameter is out of range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What overflows for each input kind, and what to do about it. Log-probabilities far above 0
/// are usually logits passed as log-probabilities; a mask near −f32::MAX is not.
fn overflow_cause(input: &Input) -> &'static str {
    match input {
        Input::Probs => {
            "the result exceeds the range of f32 arithmetic (probabilities near f32::MAX, or a \
             row sum beyond it); scale the row down or use the f64 CPU reference"
        }
        Input::LogProbs => {
            "the result exceeds the floating-point range: a log-probability x above ~88.7 has a \
             probability e^x beyond f32::MAX (above ~709.8, beyond f64's), and two near \
             ±f32::MAX a difference beyond it (the f64 CPU reference takes those); if these are \
             logits, pass them as Input::Logits"
        }
        Input::Logits => {
            "the result exceeds the range of f32 arithmetic (logits near ±f32::MAX, whose \
             differences overflow); scale the row down or use the f64 CPU reference"
        }
    }
}

/// For a negative value: probabilities must not be, and the likeliest cause is log-space data
/// read as probabilities.
fn negative_hint(problem: &Problem) -> &'static str {
    match problem {
        Problem::Negative => {
            "; probabilities must be >= 0 (log-probabilities and logits are read with \
             Input::LogProbs and Input::Logits)"
        }
        _ => "",
    }
}
