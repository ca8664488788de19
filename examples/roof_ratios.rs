//! Each kernel against its own roofline, interleaved: a quick A/B tool for kernel and planner
//! changes (seconds on lavapipe and on a GPU).
//!
//! `examples/bench` times a kernel and its roofline in separate blocks; on a noisy machine
//! (lavapipe shares two cores with everything else) the two blocks can land in different
//! states. Here every round times one call of the kernel and then one of its roofline (a plain
//! sum over the same inputs and plan) for every case in turn, and each keeps its best round,
//! so both see the same conditions and each case's samples spread over the whole run. To
//! compare two builds, run their binaries alternately a few times.
//!
//! ```text
//! cargo run --release --example roof_ratios -- [--rounds R] [--workgroups W]
//!     [--min-iterations M] [--blocked-lanes 0|1] [--quick 0|1] [--one-pass-kl 0|1]
//!     [--one-pass-normalized-kl 0|1] [--scale S] [--dtype f32|f16|bf16] [CASE,CASE,...]
//! ```
//! Cases: KL CE H JS (N = 4·10^6), KLbare (KL's term alone: no validation, plain sums; a
//! diagnostic between the roof and KL), KLlp and JSlp (KL and JS of log-probabilities, 4·10^6), KL10
//! (400,000 × 10), KL1k (1000 × 1000), logits (64 × 32,000, P and Q drawn apart), close (the
//! same shape, two close models: Q = P + N(0, 0.1²) on peaked rows), masked (close, with a tenth
//! of the columns −∞ in both, as a masked vocabulary has them), JSlogits, CElogits, Hlogits
//! (the same, JS, cross-entropy, entropy), long (8 × 262,144 logits), KLnorm, JSnorm, CEnorm and
//! Hnorm (4000 × 1000 probabilities, normalized in the kernel), KLnormS and JSnormS (KLnorm and
//! JSnorm with Q's rows summing to 3.7: rows the one pass leaves to the terms pass); named
//! cases run in the order given. `--workgroups`,
//! `--min-iterations`, `--blocked-lanes`, `--quick` (the quick path for plain vec4s),
//! `--one-pass-kl` (KL of logits' one-pass kernel), `--one-pass-normalized-kl` and
//! `--one-pass-normalized-js` (KL's and JS's one pass over normalized probabilities) override
//! the defaults for the adapter (`klgpu::Tuning`). `--scale S` multiplies every case's size (rows, or N for the single
//! distributions) by S: the defaults suit lavapipe; on a data-centre GPU they are a few
//! microseconds of work, and `--scale 25` makes them bandwidth-bound. `--dtype f16|bf16`
//! stores every case's inputs in 16 bits (kernel and roof alike read 2 bytes per element;
//! GB/s count those bytes).

#[path = "../benches/support/mod.rs"]
mod support;
use support::{Rng, Timer, calls_per_sample, data, parse_dtype, time_calls, upload_as};

use klgpu::{Dtype, Engine, EngineOptions, Input, Measure, Options};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut options = EngineOptions::default();
    let mut rounds = 10;
    let mut scale = 1;
    let mut only: Vec<String> = vec![];
    let mut dtype = Dtype::F32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || -> Result<u32, Box<dyn std::error::Error>> {
            Ok(args.next().ok_or(format!("{a} needs a value"))?.parse()?)
        };
        match a.as_str() {
            "--rounds" => rounds = value()?,
            "--workgroups" => options.tuning.target_workgroups = Some(value()?),
            "--min-iterations" => options.tuning.min_iterations = Some(value()?),
            "--blocked-lanes" => options.tuning.blocked_lanes = Some(value()? != 0),
            "--quick" => options.tuning.quick_vec4 = Some(value()? != 0),
            "--one-pass-kl" => options.tuning.one_pass_kl = value()? != 0,
            "--one-pass-normalized-kl" => options.tuning.one_pass_normalized_kl = value()? != 0,
            "--one-pass-normalized-js" => options.tuning.one_pass_normalized_js = value()? != 0,
            "--scale" => scale = value()? as usize,
            "--dtype" => dtype = parse_dtype(args.next().as_deref())?,
            cases => only = cases.split(',').map(str::to_string).collect(),
        }
    }
    let engine = Engine::with_options(options)?;
    println!("adapter: {}", engine.adapter_info().name);
    let timer = Timer::new(&engine);
    let n = 4_000_000;
    let kl = Measure::KullbackLeibler;
    let cases = [
        ("KL", kl, Input::Probs, 1, n),
        ("KLbare", kl, Input::Probs, 1, n),
        ("CE", Measure::CrossEntropy, Input::Probs, 1, n),
        ("H", Measure::Entropy, Input::Probs, 1, n),
        ("JS", Measure::JensenShannon, Input::Probs, 1, n),
        ("KLlp", kl, Input::LogProbs, 1, n),
        ("JSlp", Measure::JensenShannon, Input::LogProbs, 1, n),
        ("KL10", kl, Input::Probs, n / 10, 10),
        ("KL1k", kl, Input::Probs, 1000, 1000),
        ("logits", kl, Input::Logits, 64, 32_000),
        ("close", kl, Input::Logits, 64, 32_000),
        ("masked", kl, Input::Logits, 64, 32_000),
        (
            "JSlogits",
            Measure::JensenShannon,
            Input::Logits,
            64,
            32_000,
        ),
        ("CElogits", Measure::CrossEntropy, Input::Logits, 64, 32_000),
        ("Hlogits", Measure::Entropy, Input::Logits, 64, 32_000),
        ("long", kl, Input::Logits, 8, 262_144),
        ("KLnorm", kl, Input::Probs, 4000, 1000),
        ("JSnorm", Measure::JensenShannon, Input::Probs, 4000, 1000),
        ("CEnorm", Measure::CrossEntropy, Input::Probs, 4000, 1000),
        ("Hnorm", Measure::Entropy, Input::Probs, 4000, 1000),
        ("KLnormS", kl, Input::Probs, 4000, 1000),
        ("JSnormS", Measure::JensenShannon, Input::Probs, 4000, 1000),
    ];
    let mut rng = Rng(42);
    // The cases named, in the order given (a name may repeat), or all of them.
    let chosen: Vec<_> = if only.is_empty() {
        cases.to_vec()
    } else {
        only.iter()
            .map(|n| {
                cases
                    .iter()
                    .find(|c| c.0 == n)
                    .copied()
                    .ok_or(format!("no case {n}"))
            })
            .collect::<Result<_, _>>()?
    };
    // Every case's data first; then rounds that visit every case in turn, so that each case's
    // samples spread over the whole run. lavapipe has phases of a second or so in which its
    // two worker threads share one core (everything takes twice as long); timing one case
    // after another put a whole case into such a phase now and then.
    let mut states = vec![];
    for (name, measure, input, rows, cols) in chosen {
        let (rows, cols) = if rows == 1 {
            (1, cols * scale)
        } else {
            (rows * scale, cols)
        };
        let mut p_data = data(&mut rng, rows, cols, input);
        let close = name == "close" || name == "masked";
        if close {
            peaked(&mut rng, &mut p_data, cols);
        }
        let mut q_data = if close {
            close_logits(&mut rng, &p_data)
        } else {
            data(&mut rng, rows, cols, input)
        };
        if name == "KLnormS" || name == "JSnormS" {
            q_data.iter_mut().for_each(|y| *y *= 3.7);
        }
        let p = upload_as(&engine, "roof_ratios.p", &p_data, dtype);
        let q = upload_as(&engine, "roof_ratios.q", &q_data, dtype);
        // The roof reads the inputs before they are masked: its plain sum cannot add −∞, and
        // what it reads costs the same whatever the values.
        let roof_inputs = (p.clone(), q.clone());
        if name == "masked" {
            for (x, y) in p_data.iter_mut().zip(&mut q_data) {
                if rng.next_f32() < 0.1 {
                    (*x, *y) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                }
            }
        }
        let case = Case {
            name,
            measure,
            // The normalized cases: probabilities divided by their row sums in the kernel.
            opts: Options {
                normalize: name.contains("norm"),
                dtype,
                ..Options::input(input)
            },
            rows,
            cols,
            out: engine.create_f32_buffer("roof_ratios.out", rows as u64)?,
            p: if name == "masked" {
                upload_as(&engine, "roof_ratios.p", &p_data, dtype)
            } else {
                p
            },
            q: if name == "masked" {
                upload_as(&engine, "roof_ratios.q", &q_data, dtype)
            } else {
                q
            },
            roof_inputs,
        };
        // Samples of about 2 ms of back-to-back calls: one call at a time lets a GPU drop its
        // clocks between submissions (on lavapipe a call alone takes longer than that).
        let mut pool = vec![];
        let calls = calls_per_sample(&timer, &engine, &mut pool, &mut |e, w| {
            case.roof(&engine, e, w)
        });
        states.push((case, pool, calls, f64::MAX, f64::MAX));
    }
    // Warm up for a third of a second: a GPU that idled while the host made the data starts at
    // low clocks and needs that long to raise them.
    let warm = std::time::Instant::now();
    while warm.elapsed().as_secs_f64() < 0.3 {
        for (case, pool, calls, _, _) in states.iter_mut() {
            time_calls(&timer, &engine, pool, *calls, &mut |e, w| {
                case.kernel(&engine, e, w)
            });
        }
    }
    for _ in 0..rounds {
        for (case, pool, calls, kernel, roof) in states.iter_mut() {
            let k = time_calls(&timer, &engine, pool, *calls, &mut |e, w| {
                case.kernel(&engine, e, w)
            });
            let r = time_calls(&timer, &engine, pool, *calls, &mut |e, w| {
                case.roof(&engine, e, w)
            });
            *kernel = kernel.min(k);
            *roof = roof.min(r);
        }
    }
    for (case, _, _, kernel, roof) in &states {
        let sides = if case.measure.uses_q() { 2 } else { 1 };
        let gb = (case.rows * case.cols * dtype.size() as usize * sides) as f64 / 1e9;
        println!(
            "{:8} kernel {:8.3} ms {:7.1} GB/s  roof {:8.3} ms {:7.1} GB/s  of roof {:5.1} %",
            case.name,
            kernel * 1e3,
            gb / kernel,
            roof * 1e3,
            gb / roof,
            100.0 * roof / kernel
        );
    }
    Ok(())
}

/// One workload: its inputs on the GPU and the two things timed over them.
struct Case {
    name: &'static str,
    measure: Measure,
    opts: Options,
    rows: usize,
    cols: usize,
    out: wgpu::Buffer,
    p: wgpu::Buffer,
    q: wgpu::Buffer,
    /// What the roof reads: P and Q themselves, but for `masked`, the same before masking.
    roof_inputs: (wgpu::Buffer, wgpu::Buffer),
}

impl Case {
    fn q(&self) -> Option<wgpu::BufferSlice<'_>> {
        self.measure.uses_q().then(|| self.q.slice(..))
    }

    fn roof_q(&self) -> Option<wgpu::BufferSlice<'_>> {
        self.measure.uses_q().then(|| self.roof_inputs.1.slice(..))
    }

    fn kernel(&self, engine: &Engine, enc: &mut wgpu::CommandEncoder, ws: &mut klgpu::Workspace) {
        if self.name == "KLbare" {
            assert_eq!(self.opts.dtype, Dtype::F32, "KLbare reads f32 only");
            let (p, q, out) = (self.p.slice(..), self.q.slice(..), self.out.slice(..));
            engine
                .record_kl_bare_rows(enc, ws, p, q, self.cols, out)
                .expect("record the bare kernel");
            return;
        }
        engine
            .record_rows(
                enc,
                ws,
                self.measure,
                self.p.slice(..),
                self.q(),
                self.cols,
                &self.opts,
                self.out.slice(..),
            )
            .expect("record the kernel");
    }

    /// The roofline: a plain sum over the same inputs and plan.
    fn roof(&self, engine: &Engine, enc: &mut wgpu::CommandEncoder, ws: &mut klgpu::Workspace) {
        engine
            .record_sum_rows_of(
                self.opts.dtype,
                enc,
                ws,
                self.roof_inputs.0.slice(..),
                self.roof_q(),
                self.cols,
                self.out.slice(..),
            )
            .expect("record the roofline");
    }
}

/// Rows with a few tokens far above the rest, as a language model's next-token logits are: one
/// 12 above the spread, one 10 (the top token then holds most of the mass).
fn peaked(rng: &mut Rng, p: &mut [f32], cols: usize) {
    for row in p.chunks_mut(cols) {
        for lift in [12.0, 10.0] {
            let col = ((rng.next_f32() * cols as f32) as usize).min(cols - 1);
            row[col] += lift;
        }
    }
}

/// A second model close to the first: each logit moved by N(0, 0.1²) (Irwin–Hall of three).
fn close_logits(rng: &mut Rng, p: &[f32]) -> Vec<f32> {
    p.iter()
        .map(|&x| {
            let z = (rng.next_f32() + rng.next_f32() + rng.next_f32() - 1.5) * 2.0;
            x + 0.1 * z
        })
        .collect()
}
