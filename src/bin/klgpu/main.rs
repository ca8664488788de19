//! `klgpu`: KL divergence, cross-entropy, entropy and Jensen–Shannon divergence of `.npy` or
//! safetensors inputs on the GPU, from the command line.
//!
//! The binary is a thin layer over the library: argument parsing (here), file formats
//! ([`source`], [`npy`]), streaming of inputs larger than memory ([`stream`]), statistics
//! ([`klgpu::stats`]), reports ([`output`]) and a demo ([`demo`]). Every message of ours on stderr
//! starts with `klgpu:`; bad input exits with code 2, other failures with 1.

mod compute;
mod demo;
mod error;
mod npy;
mod output;
mod progress;
mod source;
mod stream;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use klgpu::{Base, Input, Measure, Options, Reduction};

use crate::compute::{BackendChoice, MeasureRun};
use crate::error::CliError;

const AFTER_HELP: &str = "\
Inputs: .npy (float16/32/64, little-endian, C order) or safetensors (F16, BF16, F32, F64; pick a
tensor with --tensor), as regular files, not pipes. A 1-D input is one distribution; a 2-D input
is one distribution per row, and so is an N-D one's last dimension (the others are flattened
into rows in C order: [batch, seq, vocab] logits are batch·seq rows). f64 inputs are rounded to
f32.

Large inputs are streamed: a reader thread reads row blocks (32 MiB of f32 per input) while the
GPU computes the previous block, so memory stays bounded whatever the file size, but for the
per-row results (about 16 bytes a row: the summary's percentiles sort them). A row longer
than a block is cut into pieces whose values are summed in f64 (for probs and log-probs the
same value, every measure being a sum over elements, but each piece's rounded to f32: terms
of both signs that cancel across pieces meet the README's allowance, not its bar). For such a row given as logits, a first streamed pass
on the CPU computes the log-sum-exp of the row and of each piece in f64; KL, cross-entropy and
entropy then take each piece as logits of its own and combine them by the chain rule (no
precision lost), JS gets the pieces as log-probabilities x - lse rounded to f32. Likewise
--normalize on such a row first sums the row and each piece, then normalizes each piece on its
own and combines them the same way (JS: feeds x / sum, rounded to f32). A piece of logits
normalized on its own can weigh its values so that its own value leaves f32 (masks of the most
negative float beside the piece's maximum) where the whole row's does not: such a piece is
computed by the f64 CPU reference.

Results are in nats unless --base says otherwise. Exit codes: 0 success, 2 bad input (files,
shapes, values, arguments), 1 other failures (no adapter with --backend gpu, GPU errors).
Messages from Mesa such as `error: XDG_RUNTIME_DIR is invalid or not set` are not klgpu's: ours
start with `klgpu:`.";

/// The command line.
#[derive(Parser, Debug)]
#[command(
    name = "klgpu",
    version,
    about = "KL divergence, cross-entropy, entropy and Jensen-Shannon divergence on the GPU",
    after_long_help = AFTER_HELP,
    // The last of a repeated option wins, as in most tools (`--base 2 --base e` was an error).
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
enum Command {
    /// KL(P‖Q) = Σ p·log(p/q)
    #[command(after_long_help = AFTER_HELP)]
    Kl(PairArgs),
    /// Cross-entropy H(P,Q) = −Σ p·log q
    #[command(after_long_help = AFTER_HELP)]
    Ce(PairArgs),
    /// Jensen–Shannon divergence ½KL(P‖M) + ½KL(Q‖M), M = (P+Q)/2
    #[command(after_long_help = AFTER_HELP)]
    Js(PairArgs),
    /// Entropy H(P) = −Σ p·log p
    #[command(after_long_help = AFTER_HELP)]
    Entropy(SingleArgs),
    /// List the adapters wgpu sees and the one klgpu would pick
    Adapters(AdaptersArgs),
    /// Run a built-in workload on the GPU and the f64 CPU reference, and compare
    Demo(DemoArgs),
}

/// Arguments of two-input measures.
#[derive(Args, Debug)]
struct PairArgs {
    /// P: .npy or safetensors file
    p: PathBuf,
    /// Q: .npy or safetensors file
    q: PathBuf,
    /// Q's safetensors tensor, when it differs from P's (e.g. both in one file)
    #[arg(long, value_name = "NAME")]
    tensor_q: Option<String>,
    #[command(flatten)]
    common: CommonArgs,
}

/// Arguments of one-input measures.
#[derive(Args, Debug)]
struct SingleArgs {
    /// P: .npy or safetensors file
    p: PathBuf,
    #[command(flatten)]
    common: CommonArgs,
}

/// Options shared by the measure commands.
#[derive(Args, Debug)]
struct CommonArgs {
    /// How to read the numbers
    #[arg(long, value_enum, default_value_t = InputArg::Probs)]
    input: InputArg,
    /// Log base of the results: e (nats), 2 (bits), 10 (hartleys)
    #[arg(long, value_enum, default_value_t = BaseArg::E)]
    base: BaseArg,
    /// How to combine the per-row values of a 2-D or N-D input (a 1-D input has one value)
    #[arg(long, value_enum, default_value_t = ReductionArg::None)]
    reduction: ReductionArg,
    /// Write the per-row values as a 1-D f64 .npy file (replaced only on success)
    #[arg(long, value_name = "FILE.npy")]
    out: Option<PathBuf>,
    /// Print one JSON object on stdout instead of the report (elapsed_s: reading and computing,
    /// device setup excluded)
    #[arg(long)]
    json: bool,
    /// Who computes: the GPU, the f64 CPU reference, or the GPU if there is one
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    backend: BackendArg,
    /// The safetensors tensor to read (needed when a file holds several)
    #[arg(long, value_name = "NAME")]
    tensor: Option<String>,
    /// No notes and no progress bar on stderr
    #[arg(long, short)]
    quiet: bool,
    /// Normalize each row first: probabilities are divided by their sum, log-probabilities
    /// read as logits (e^x / Σ e^x); logits are normalized already
    #[arg(long)]
    normalize: bool,
    /// Bytes of f32 per input read and computed at once: fewer use less memory; a row longer
    /// than a block is computed in pieces
    #[arg(long, value_name = "BYTES", default_value_t = stream::DEFAULT_BLOCK_BYTES,
          value_parser = clap::value_parser!(u64).range(1..))]
    block_bytes: u64,
}

/// `klgpu adapters` options.
#[derive(Args, Debug)]
struct AdaptersArgs {
    /// Print one JSON object
    #[arg(long)]
    json: bool,
}

/// `klgpu demo` options.
#[derive(Args, Debug)]
struct DemoArgs {
    /// Rows of the generated batch
    #[arg(long, default_value_t = 1024)]
    rows: usize,
    /// Logits per row
    #[arg(long, default_value_t = 32000)]
    cols: usize,
    /// Seed of the generator
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Print one JSON object
    #[arg(long)]
    json: bool,
}

/// `--input`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum InputArg {
    /// Probabilities (finite, ≥ 0)
    Probs,
    /// Natural-log probabilities
    LogProbs,
    /// Raw scores, softmax per row
    Logits,
}

/// `--base`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum BaseArg {
    /// Natural log: nats
    #[value(name = "e")]
    E,
    /// Bits
    #[value(name = "2")]
    Two,
    /// Hartleys
    #[value(name = "10")]
    Ten,
}

/// `--reduction`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum ReductionArg {
    /// One value per row (see --out and the summary)
    None,
    /// Sum over rows
    Sum,
    /// Mean over rows (PyTorch's batchmean)
    MeanRows,
}

/// `--backend`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum BackendArg {
    /// The GPU if an adapter exists, else the CPU reference
    Auto,
    /// The GPU only
    Gpu,
    /// The f64 CPU reference
    Cpu,
}

impl CommonArgs {
    /// The run these options describe.
    fn into_run(
        self,
        measure: Measure,
        p: PathBuf,
        q: Option<PathBuf>,
        tensor_q: Option<String>,
    ) -> MeasureRun {
        let (base, base_name) = match self.base {
            BaseArg::E => (Base::E, "e"),
            BaseArg::Two => (Base::Two, "2"),
            BaseArg::Ten => (Base::Ten, "10"),
        };
        let (reduction, reduction_name) = match self.reduction {
            ReductionArg::None => (Reduction::None, "none"),
            ReductionArg::Sum => (Reduction::Sum, "sum"),
            ReductionArg::MeanRows => (Reduction::MeanOverRows, "mean-rows"),
        };
        let input = match self.input {
            InputArg::Probs => Input::Probs,
            InputArg::LogProbs => Input::LogProbs,
            InputArg::Logits => Input::Logits,
        };
        MeasureRun {
            measure,
            p,
            q,
            opts: Options {
                input,
                base,
                normalize: self.normalize,
                ..Options::default()
            },
            base_name,
            reduction,
            reduction_name,
            out: self.out,
            json: self.json,
            backend: match self.backend {
                BackendArg::Auto => BackendChoice::Auto,
                BackendArg::Gpu => BackendChoice::Gpu,
                BackendArg::Cpu => BackendChoice::Cpu,
            },
            tensor: self.tensor,
            tensor_q,
            quiet: self.quiet,
            block_bytes: self.block_bytes,
        }
    }
}

/// `klgpu adapters`: what wgpu sees, and the pick (exit code 1 if there is none to pick).
fn adapters(args: &AdaptersArgs) -> Result<(), CliError> {
    let (infos, pick) = klgpu::list_adapters();
    let picked = pick.as_ref().ok().copied();
    let text = if args.json {
        let list: Vec<_> = infos
            .iter()
            .enumerate()
            .map(|(i, info)| {
                serde_json::json!({
                    "index": i,
                    "name": info.name,
                    "backend": format!("{:?}", info.backend),
                    "device_type": format!("{:?}", info.device_type),
                    "driver": info.driver,
                    "driver_info": info.driver_info,
                    "picked": picked == Some(i),
                })
            })
            .collect();
        format!(
            "{}\n",
            serde_json::json!({ "adapters": list, "picked": picked })
        )
    } else if infos.is_empty() {
        "no adapters found\n".to_string()
    } else {
        let mut s = String::new();
        for (i, info) in infos.iter().enumerate() {
            let mark = if picked == Some(i) { "*" } else { " " };
            let driver = [info.driver.as_str(), info.driver_info.as_str()]
                .iter()
                .filter(|s| !s.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join(" ");
            s += &format!(
                "{mark} {i}: {} ({:?}, {:?}){}\n",
                info.name,
                info.backend,
                info.device_type,
                if driver.is_empty() {
                    String::new()
                } else {
                    format!(", driver {driver}")
                }
            );
        }
        if picked.is_some() {
            s += "(* = the adapter klgpu picks; set WGPU_ADAPTER_NAME or WGPU_BACKEND to choose)\n";
        }
        s
    };
    compute::print_stdout(&text)?;
    pick.map(drop)
        .map_err(|e| CliError::runtime(format!("no adapter to pick: {e}")))
}

fn run(cli: Cli) -> Result<(), CliError> {
    let pair = |m: Measure, a: PairArgs| a.common.into_run(m, a.p, Some(a.q), a.tensor_q);
    match cli.command {
        Command::Kl(a) => compute::run(&pair(Measure::KullbackLeibler, a)),
        Command::Ce(a) => compute::run(&pair(Measure::CrossEntropy, a)),
        Command::Js(a) => compute::run(&pair(Measure::JensenShannon, a)),
        Command::Entropy(a) => compute::run(&a.common.into_run(Measure::Entropy, a.p, None, None)),
        Command::Adapters(a) => adapters(&a),
        Command::Demo(a) => demo::run(&demo::Demo {
            rows: a.rows,
            cols: a.cols,
            seed: a.seed,
            json: a.json,
        }),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version (stdout, exit code 0); no subcommand at all (help on stderr,
        // exit code 2).
        Err(e)
            if !e.use_stderr()
                || e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            e.exit()
        }
        Err(e) => {
            // Usage errors: clap's message, each line marked as ours; exit code 2.
            let text = e.render().to_string();
            for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
                if i == 0 {
                    let line = line.strip_prefix("error: ").unwrap_or(line);
                    error::print_err(format_args!("klgpu: error: {line}"));
                } else {
                    error::print_err(format_args!("klgpu: {line}"));
                }
            }
            return ExitCode::from(error::EXIT_INPUT as u8);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error::print_err(format_args!("klgpu: error: {e}"));
            ExitCode::from(e.code as u8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_options() {
        let cli = Cli::try_parse_from([
            "klgpu",
            "kl",
            "p.npy",
            "q.npy",
            "--input",
            "logits",
            "--base",
            "2",
            "--reduction",
            "mean-rows",
            "--block-bytes",
            "64",
        ])
        .unwrap();
        let Command::Kl(a) = cli.command else {
            panic!("not kl")
        };
        let run = a
            .common
            .into_run(Measure::KullbackLeibler, a.p, Some(a.q), None);
        assert_eq!(run.opts.input, Input::Logits);
        assert_eq!(run.opts.base, Base::Two);
        assert_eq!(run.reduction, Reduction::MeanOverRows);
        assert_eq!(run.block_bytes, 64);
        assert!(Cli::try_parse_from(["klgpu", "kl", "p.npy", "q.npy", "--base", "3"]).is_err());
        assert!(Cli::try_parse_from(["klgpu", "entropy", "p.npy", "--tensor-q", "x"]).is_err());
    }
}
