//! The command line's one error type. Every failure becomes one `klgpu: error: …` line on
//! stderr and an exit code: 2 for bad input (files, shapes, values, arguments), 1 for
//! everything else (no adapter, GPU errors, I/O while writing results).

use std::fmt;

use klgpu::{Error, Problem};

use crate::source::Beyond;

/// Exit code for bad input: unreadable or malformed files, invalid values, bad arguments.
/// clap uses the same code for usage errors.
pub const EXIT_INPUT: i32 = 2;
/// Exit code for everything else.
pub const EXIT_RUNTIME: i32 = 1;

/// Prints a line to standard error, as `eprintln!` does but without its panic when standard
/// error cannot be written (`2>/dev/full`): the exit code still tells what happened.
pub fn print_err(line: fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// A failure with the message to print and the exit code to return.
#[derive(Debug)]
pub struct CliError {
    /// What went wrong, without the `klgpu: error: ` prefix; one line.
    pub message: String,
    /// The process exit code.
    pub code: i32,
}

impl CliError {
    /// Bad input: exit code 2.
    pub fn input(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            code: EXIT_INPUT,
        }
    }

    /// Any other failure: exit code 1.
    pub fn runtime(message: impl Into<String>) -> Self {
        CliError {
            message: message.into(),
            code: EXIT_RUNTIME,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Keep it to one line whatever the source message holds.
        f.write_str(&self.message.replace('\n', " "))
    }
}

/// Where a library call's data came from, so that a library error can name the file, the
/// row and the column the user knows (not the block-relative ones the library sees).
#[derive(Clone, Copy, Debug)]
pub struct Origin<'a> {
    /// How P is named in messages (its path, plus `[tensor]` for safetensors).
    pub p_label: &'a str,
    /// How Q is named in messages.
    pub q_label: &'a str,
    /// Row of the file where the block starts.
    pub first_row: usize,
    /// Column of the file where the block starts (non-zero only for pieces of long rows).
    pub first_col: usize,
    /// The input is 1-D: positions are printed as `index N`, not as row and column.
    pub one_d: bool,
    /// P's and Q's first f64 beyond f32's range in the block, read as NaN
    /// ([`crate::source::Source::read_f32`]): named as the file holds it where the library
    /// finds that NaN first.
    pub beyond: [Option<Beyond>; 2],
}

impl Origin<'_> {
    /// Maps a library error to a CLI error with file-level positions.
    pub fn map(&self, err: Error) -> CliError {
        match err {
            Error::InvalidValue {
                side,
                index,
                row,
                col,
                value,
                problem,
            } => {
                let (label, beyond) = match side {
                    klgpu::Side::P => (self.p_label, self.beyond[0]),
                    klgpu::Side::Q => (self.q_label, self.beyond[1]),
                };
                let (row, col) = (self.first_row + row, self.first_col + col);
                match beyond {
                    Some((i, value)) if i == index => {
                        beyond_f32(label, self.one_d, row, col, value)
                    }
                    _ => invalid_value(label, self.one_d, row, col, value, problem),
                }
            }
            Error::Overflow { row, .. } => {
                let files = if self.q_label.is_empty() || self.q_label == self.p_label {
                    self.p_label.to_string()
                } else {
                    format!("{} / {}", self.p_label, self.q_label)
                };
                let at = if self.one_d {
                    String::new()
                } else {
                    format!("row {}: ", self.first_row + row)
                };
                // The library's cause and remedy for the input kind, in the command line's
                // terms, after the file and the row of the file.
                let text = err.to_string();
                let cause = text.split_once(": ").map_or(text.as_str(), |(_, c)| c);
                let cause = cause
                    .replace("the f64 CPU reference", "--backend cpu")
                    .replace("Input::Logits", "--input logits")
                    .replace("scale the row down", "scale the inputs down");
                CliError::input(format!("{files}: {at}{cause}"))
            }
            Error::EmptyInput
            | Error::LengthMismatch { .. }
            | Error::RaggedRows { .. }
            | Error::ZeroColumns
            | Error::InvalidArgument(_) => CliError::input(err.to_string()),
            other => CliError::runtime(other.to_string()),
        }
    }
}

/// The message for an f64 element f32 cannot hold: beyond its range, or a probability so
/// small that it would read as 0 where that changes the answer (`Reader::mark_underflows`).
pub fn beyond_f32(label: &str, one_d: bool, row: usize, col: usize, value: f64) -> CliError {
    let at = position(one_d, row, col);
    CliError::input(if value.abs() > f64::from(f32::MAX) {
        format!(
            "{label}: {at}: value {value:e} is beyond the range of f32 (±3.4e38), in which \
             klgpu computes; scale the input down (a mask such as np.finfo(np.float64).min: \
             save it as -inf)"
        )
    } else if value < 0.0 {
        format!(
            "{label}: {at}: value {value:e} is negative; probabilities must be >= 0 (in f32, \
             in which klgpu computes, it would round to -0)"
        )
    } else {
        format!(
            "{label}: {at}: value {value:e} is below f32's smallest positive value (1.4e-45), \
             in which klgpu computes; read as 0 there it would decide whether the result is \
             infinite (P > 0 where Q = 0); pass log-probabilities instead (np.log, --input \
             log-probs)"
        )
    })
}

/// An element as the user knows it: `index N` in 1-D, `row R, column C` in 2-D and up (rows
/// flattened).
pub fn position(one_d: bool, row: usize, col: usize) -> String {
    if one_d {
        format!("index {col}")
    } else {
        format!("row {row}, column {col}")
    }
}

/// The message for a rejected element: `FILE: row R, column C: value V is negative`.
pub fn invalid_value(
    label: &str,
    one_d: bool,
    row: usize,
    col: usize,
    value: f32,
    problem: Problem,
) -> CliError {
    let msg = match (problem, one_d) {
        (Problem::EmptyRow, true) => format!("{label}: {problem}"),
        (Problem::EmptyRow, false) => format!("{label}: row {row}: {problem}"),
        (Problem::NaN, _) => format!("{label}: {}: value is NaN", position(one_d, row, col)),
        _ => format!(
            "{label}: {}: value {value} {problem}",
            position(one_d, row, col)
        ),
    };
    // Negative values are most often log-space data read as probabilities (the default).
    let hint = match problem {
        Problem::Negative => {
            "; probabilities must be >= 0 (for log-probabilities or logits pass --input \
             log-probs or --input logits)"
        }
        _ => "",
    };
    CliError::input(msg + hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_values_name_file_row_and_column_with_offsets() {
        let origin = Origin {
            p_label: "P.npy",
            q_label: "Q.npy",
            first_row: 10,
            first_col: 0,
            one_d: false,
            beyond: [None, Some((3, 4e38))],
        };
        let err = origin.map(Error::InvalidValue {
            side: klgpu::Side::Q,
            index: 17,
            row: 0,
            col: 17,
            value: f32::NAN,
            problem: Problem::NaN,
        });
        assert_eq!(err.code, EXIT_INPUT);
        assert_eq!(err.message, "Q.npy: row 10, column 17: value is NaN");
        // Q's element 3 is the NaN that stands for an f64 beyond f32.
        let err = origin.map(Error::InvalidValue {
            side: klgpu::Side::Q,
            index: 3,
            row: 0,
            col: 3,
            value: f32::NAN,
            problem: Problem::NaN,
        });
        assert_eq!(
            err.message,
            "Q.npy: row 10, column 3: value 4e38 is beyond the range of f32 (±3.4e38), in \
             which klgpu computes; scale the input down (a mask such as \
             np.finfo(np.float64).min: save it as -inf)"
        );
        let err = origin.map(Error::Gpu("lost".into()));
        assert_eq!(err.code, EXIT_RUNTIME);
        let err = origin.map(Error::Overflow {
            row: 2,
            input: klgpu::Input::Probs,
        });
        assert_eq!(err.code, EXIT_INPUT);
        assert_eq!(
            err.message,
            "P.npy / Q.npy: row 12: the result exceeds the range of f32 arithmetic \
             (probabilities near f32::MAX, or a row sum beyond it); scale the inputs down or use \
             --backend cpu"
        );
        // Log-probabilities far above 0 are likely logits: the message says how to pass them.
        let err = origin.map(Error::Overflow {
            row: 0,
            input: klgpu::Input::LogProbs,
        });
        assert!(
            err.message
                .starts_with("P.npy / Q.npy: row 10: the result exceeds the floating")
                && err
                    .message
                    .ends_with("if these are logits, pass them as --input logits"),
            "{}",
            err.message
        );
    }

    #[test]
    fn one_d_positions_are_indices() {
        let origin = Origin {
            p_label: "p.npy",
            q_label: "q.npy",
            first_row: 0,
            first_col: 4096,
            one_d: true,
            beyond: [Some((5, -1e39)), None],
        };
        let err = origin.map(Error::InvalidValue {
            side: klgpu::Side::P,
            index: 3,
            row: 0,
            col: 3,
            value: -1.0,
            problem: Problem::Negative,
        });
        assert_eq!(
            err.message,
            "p.npy: index 4099: value -1 is negative; probabilities must be >= 0 (for \
             log-probabilities or logits pass --input log-probs or --input logits)"
        );
        let err = origin.map(Error::InvalidValue {
            side: klgpu::Side::P,
            index: 5,
            row: 0,
            col: 5,
            value: f32::NAN,
            problem: Problem::NaN,
        });
        assert!(
            err.message
                .starts_with("p.npy: index 4101: value -1e39 is beyond"),
            "{}",
            err.message
        );
    }
}
