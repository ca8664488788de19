//! klgpu's benchmark driver: roofline, single distributions, batches, per-call overhead and
//! the CPU reference, in one run on one adapter. Prints a table; `--json FILE` writes every
//! number. `scripts/peers.py` runs this next to NumPy, SciPy and PyTorch.
//!
//! Timing: GPU timestamps (TIMESTAMP_QUERY, empty timestamped passes around the recorded work)
//! where the adapter has them, wall clock otherwise; the median of repeated runs after a
//! warm-up. A workload and its own roofline are sampled in turn, so both see the same machine
//! state. Throughput counts input bytes (4 per f32 element of each input).
//!
//! ```text
//! cargo run --release --example bench -- [--quick] [--json FILE] [--max-n N] [--no-cpu] [--no-verify]
//! cargo run --release --example bench -- --adapters   # only list the adapters wgpu sees, and exit
//! ```
//!
//! Every workload's per-row values from the GPU are checked once against the f64 CPU reference
//! (outside the timings; `--no-verify` skips it): a run whose numbers are wrong says so and
//! exits with an error, after printing and writing what it measured.

use std::time::{Duration, Instant};

#[path = "../benches/support/mod.rs"]
mod support;
use support::{
    Rng, Timer, data, measure_gpu, measure_gpu_pair, median, stored_as, upload, upload_as,
};

use klgpu::half::bf16;
use klgpu::wgpu;
use klgpu::{Dtype, Engine, EngineOptions, Input, Measure, Options, Tuning, cpu};

struct Args {
    quick: bool,
    json: Option<String>,
    max_n: u64,
    cpu: bool,
    verify: bool,
    adapters: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        quick: false,
        json: None,
        max_n: 100_000_000,
        cpu: true,
        verify: true,
        adapters: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => args.quick = true,
            "--no-cpu" => args.cpu = false,
            "--no-verify" => args.verify = false,
            "--adapters" => args.adapters = true,
            "--json" => args.json = it.next(),
            "--max-n" => args.max_n = it.next().and_then(|v| v.parse().ok()).unwrap_or(args.max_n),
            "--bench" => {} // passed by `cargo bench`
            other => eprintln!("bench: ignoring unknown argument {other}"),
        }
    }
    if args.quick {
        args.max_n = args.max_n.min(10_000_000);
    }
    args
}

struct Row {
    workload: String,
    path: &'static str,
    timer: &'static str,
    bytes: f64,
    seconds: f64,
    /// Time of a plain sum over the same inputs and plan (GPU-data rows).
    roof_seconds: Option<f64>,
}

impl Row {
    fn gbps(&self) -> f64 {
        self.bytes / self.seconds / 1e9
    }
}

/// A planner variant: its label, the engine options, and whether Q is near-identical to P.
type Variant = (String, EngineOptions, bool);

struct Workload {
    name: String,
    measure: Measure,
    input: Input,
    rows: usize,
    cols: usize,
    /// How the inputs are stored (bf16: model logits as saved, read at 2 bytes per element).
    dtype: Dtype,
}

impl Workload {
    fn opts(&self) -> Options {
        Options {
            dtype: self.dtype,
            ..Options::input(self.input)
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args();
    if args.adapters {
        // What a lent machine's script asks first (scripts/device_run.sh), in a second.
        let (infos, picked) = klgpu::list_adapters();
        for (i, info) in infos.iter().enumerate() {
            let mark = if picked.as_ref().ok() == Some(&i) {
                "*"
            } else {
                " "
            };
            println!(
                "{mark} adapter {i}: {} ({:?}, {:?}), driver: {} {}",
                info.name, info.backend, info.device_type, info.driver, info.driver_info
            );
        }
        if infos.is_empty() {
            println!("no adapters");
        }
        return Ok(());
    }
    let engine = Engine::new()?;
    let info = engine.adapter_info().clone();
    let timer = Timer::new(&engine);
    let budget = Duration::from_millis(if args.quick { 300 } else { 1500 });
    println!(
        "adapter: {} ({:?}, {:?}), driver: {} {}; subgroups: {}; timer: {}",
        info.name,
        info.backend,
        info.device_type,
        info.driver,
        info.driver_info,
        engine.uses_subgroups(),
        timer.kind()
    );
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut rows_out: Vec<Row> = vec![];

    // Roofline: the plain streaming sum over as many bytes as the largest two-input workload.
    let roof_n = (2 * args.max_n).min(if args.quick { 1 << 25 } else { 1 << 28 }) as usize;
    let roof_data = data(&mut rng, 1, roof_n, Input::Logits);
    let roof_buf = upload(&engine, "roofline", &roof_data);
    drop(roof_data);
    let out = engine.create_f32_buffer("bench.out", 1 << 22)?;
    let roof_s = measure_gpu(budget, &timer, &engine, &mut |enc, ws| {
        engine
            .record_sum_rows(enc, ws, roof_buf.slice(..), None, roof_n, out.slice(..))
            .expect("record");
    });
    drop(roof_buf);
    let roof = Row {
        workload: format!("roofline: sum of {roof_n} f32"),
        path: "gpu-device",
        timer: timer.kind(),
        bytes: roof_n as f64 * 4.0,
        seconds: roof_s,
        roof_seconds: Some(roof_s),
    };
    let roof_gbps = roof.gbps();
    rows_out.push(roof);

    let mut workloads = vec![];
    let mut n = 1000u64;
    while n <= args.max_n {
        workloads.push(Workload {
            name: format!("KL probs N={n:.0e}"),
            measure: Measure::KullbackLeibler,
            input: Input::Probs,
            rows: 1,
            cols: n as usize,
            dtype: Dtype::F32,
        });
        n *= 10;
    }
    let mid = args.max_n.min(10_000_000) as usize;
    for m in [
        Measure::CrossEntropy,
        Measure::Entropy,
        Measure::JensenShannon,
    ] {
        workloads.push(Workload {
            name: format!("{} probs N={mid:.0e}", m.name()),
            measure: m,
            input: Input::Probs,
            rows: 1,
            cols: mid,
            dtype: Dtype::F32,
        });
    }
    let batch = |rows: usize, cols: usize, input: Input| Workload {
        name: format!("KL {} {rows}x{cols}", input.name()),
        measure: Measure::KullbackLeibler,
        input,
        rows,
        cols,
        dtype: Dtype::F32,
    };
    if args.quick {
        workloads.push(batch(100_000, 10, Input::Probs));
        workloads.push(batch(256, 32_000, Input::Logits));
        workloads.push(batch(16, 262_144, Input::Logits));
    } else {
        workloads.push(batch(1_000_000, 10, Input::Probs));
        workloads.push(batch(4096, 32_000, Input::Logits));
        workloads.push(batch(16, 262_144, Input::Logits));
    }
    // The same logits batch stored as bf16, as models save them.
    let mut half = batch(if args.quick { 256 } else { 4096 }, 32_000, Input::Logits);
    half.name.push_str(" bf16");
    half.dtype = Dtype::BF16;
    workloads.push(half);

    // Device timings first, back to back, so that no CPU-bound phase lets the GPU's clocks
    // drop between them; then the host-data paths; then the CPU reference.
    let inputs: Vec<(Vec<f32>, Vec<f32>)> = workloads
        .iter()
        .map(|w| {
            (
                data(&mut rng, w.rows, w.cols, w.input),
                data(&mut rng, w.rows, w.cols, w.input),
            )
        })
        .collect();
    let bytes_of = |w: &Workload| {
        let inputs = if w.measure.uses_q() { 2.0 } else { 1.0 };
        inputs * (w.rows * w.cols) as f64 * w.dtype.size() as f64
    };
    for (w, (p, q)) in workloads.iter().zip(&inputs) {
        let opts = w.opts();
        let (pb, qb) = (
            upload_as(&engine, "p", p, w.dtype),
            upload_as(&engine, "q", q, w.dtype),
        );
        let out = engine.create_f32_buffer("bench.rows", w.rows as u64)?;
        let qs = || w.measure.uses_q().then(|| qb.slice(..));
        // With this workload's own roofline (a plain sum over the same inputs and plan),
        // sampled in turn.
        let (s, roof) = measure_gpu_pair(
            budget,
            &timer,
            &engine,
            &mut |enc, ws| {
                engine
                    .record_rows(
                        enc,
                        ws,
                        w.measure,
                        pb.slice(..),
                        qs(),
                        w.cols,
                        &opts,
                        out.slice(..),
                    )
                    .expect("record");
            },
            &mut |enc, ws| {
                let (p, out) = (pb.slice(..), out.slice(..));
                engine
                    .record_sum_rows_of(w.dtype, enc, ws, p, qs(), w.cols, out)
                    .expect("record");
            },
        );
        rows_out.push(Row {
            workload: w.name.clone(),
            path: "gpu-device",
            timer: timer.kind(),
            bytes: bytes_of(w),
            seconds: s,
            roof_seconds: Some(roof),
        });
    }
    // The roofline again: how stable the numbers are.
    let roof_buf = upload(
        &engine,
        "roofline",
        &data(&mut rng, 1, roof_n, Input::Logits),
    );
    let again = measure_gpu(budget, &timer, &engine, &mut |enc, ws| {
        engine
            .record_sum_rows(enc, ws, roof_buf.slice(..), None, roof_n, out.slice(..))
            .expect("record");
    });
    drop(roof_buf);
    rows_out.push(Row {
        workload: "roofline again".into(),
        path: "gpu-device",
        timer: timer.kind(),
        bytes: roof_n as f64 * 4.0,
        seconds: again,
        roof_seconds: Some(roof_s),
    });
    for (w, (p, q)) in workloads.iter().zip(&inputs) {
        let opts = w.opts();
        let qq = w.measure.uses_q().then_some(&q[..]);
        let (p16, q16) = if w.dtype == Dtype::BF16 {
            (stored_as::<bf16>(p), stored_as::<bf16>(q))
        } else {
            (vec![], vec![])
        };
        let s = median(budget, || {
            let t = Instant::now();
            if w.dtype == Dtype::BF16 {
                let qq = w.measure.uses_q().then_some(&q16[..]);
                engine
                    .rows(w.measure, &p16, qq, w.cols, &opts)
                    .expect("gpu");
            } else {
                engine.rows(w.measure, p, qq, w.cols, &opts).expect("gpu");
            }
            t.elapsed().as_secs_f64()
        });
        rows_out.push(Row {
            workload: w.name.clone(),
            path: "gpu-host",
            timer: "wall",
            bytes: bytes_of(w),
            seconds: s,
            roof_seconds: None,
        });
    }
    // Every workload's values against the f64 reference, once: a fast wrong number is no
    // result (a split row once lost most of its data at sizes the tests did not reach).
    let mut wrong = vec![];
    let mut worst = (0.0f64, String::new());
    if args.verify {
        for (w, (p, q)) in workloads.iter().zip(&inputs) {
            let opts = w.opts();
            let (got, exact) = if w.dtype == Dtype::BF16 {
                let (p16, q16) = (stored_as::<bf16>(p), stored_as::<bf16>(q));
                let qq = w.measure.uses_q().then_some(&q16[..]);
                (
                    engine.rows(w.measure, &p16, qq, w.cols, &opts)?,
                    cpu::rows(w.measure, &p16, qq, w.cols, &opts)?,
                )
            } else {
                let qq = w.measure.uses_q().then_some(&q[..]);
                (
                    engine.rows(w.measure, p, qq, w.cols, &opts)?,
                    cpu::rows(w.measure, p, qq, w.cols, &opts)?,
                )
            };
            // A coarse bar, for gross errors: the tests hold the README's 1e-5, which has
            // exceptions (short rows of small KL, terms that cancel) this data could meet.
            for (row, (&g, &e)) in got.values.iter().zip(&exact.values).enumerate() {
                let err = if g == e {
                    0.0
                } else {
                    (g - e).abs() / e.abs().max(1e-3)
                };
                if err > worst.0 {
                    worst = (err, format!("{}, row {row}", w.name));
                }
                if err.is_nan() || err > 1e-4 {
                    wrong.push(format!("{}, row {row}: gpu {g} vs reference {e}", w.name));
                }
            }
        }
        println!(
            "checked against the f64 reference: {} workloads, {} rows off by more than 1e-4 \
             (worst relative error {:.1e}: {})",
            workloads.len(),
            wrong.len(),
            worst.0,
            worst.1
        );
        for line in wrong.iter().take(10) {
            println!("  WRONG: {line}");
        }
    }
    // Host-data windows (klgpu::plan::default_window_bytes): one long row and the logits batch.
    let mut variants: Vec<(String, String, f64)> = vec![];
    for (w, (p, q)) in workloads.iter().zip(&inputs) {
        if w.dtype != Dtype::F32
            || (w.name != format!("KL probs N={mid:.0e}") && w.input != Input::Logits)
        {
            continue;
        }
        for mb in [4u64, 16, 32, 128] {
            let e = Engine::with_options(EngineOptions {
                window_bytes: Some(mb << 20),
                ..Default::default()
            })?;
            let opts = Options::input(w.input);
            let s = median(budget / 2, || {
                let t = Instant::now();
                e.rows(w.measure, p, Some(q), w.cols, &opts).expect("gpu");
                t.elapsed().as_secs_f64()
            });
            let label = format!("host window={mb}MiB");
            variants.push((w.name.clone(), label, bytes_of(w) / s / 1e9));
        }
    }
    if args.cpu {
        for (w, (p, q)) in workloads.iter().zip(&inputs) {
            if w.dtype != Dtype::F32 {
                continue; // The reference widens 16-bit inputs first: the f32 row times it.
            }
            let opts = Options::input(w.input);
            let qq = w.measure.uses_q().then_some(&q[..]);
            let s = median(budget / 2, || {
                let t = Instant::now();
                cpu::rows(w.measure, p, qq, w.cols, &opts).expect("cpu");
                t.elapsed().as_secs_f64()
            });
            rows_out.push(Row {
                workload: w.name.clone(),
                path: "cpu-reference",
                timer: "wall",
                bytes: bytes_of(w),
                seconds: s,
                roof_seconds: None,
            });
        }
    }
    drop(inputs);

    // Planner variants on GPU data: the numbers behind the defaults in klgpu::Tuning.
    let options = |t: Tuning| EngineOptions {
        tuning: t,
        ..Default::default()
    };
    let variant_cases: Vec<(Workload, Vec<Variant>)> = {
        let d = Tuning::default();
        let big = args.max_n.min(100_000_000) as usize;
        let (short_rows, logit_rows) = if args.quick {
            (100_000, 256)
        } else {
            (1_000_000, 4096)
        };
        // Around each kind's defaults (klgpu::plan::PlanLimits::for_adapter). Rows short enough
        // for one lane each on a GPU; on a CPU adapter, rows where the lanes per row change.
        let (workgroup_targets, min_it_shape, min_it_values): (&[u32], _, &[u32]) =
            if info.device_type == wgpu::DeviceType::Cpu {
                (
                    &[4, 8, 16, 32, 128, 4096],
                    (1000, 1000),
                    &[16, 64, 256, 1024],
                )
            } else {
                (
                    &[1024, 2048, 4096, 8192, 16384],
                    (short_rows, 10),
                    &[1, 2, 4, 16],
                )
            };
        let min_iterations = |values: &[u32]| -> Vec<Variant> {
            values
                .iter()
                .map(|&m| {
                    let tuning = Tuning {
                        min_iterations: Some(m),
                        ..d
                    };
                    (format!("min_iterations={m}"), options(tuning), false)
                })
                .collect()
        };
        vec![
            (
                Workload {
                    dtype: Dtype::F32,
                    name: format!("KL probs N={big:.0e}"),
                    measure: Measure::KullbackLeibler,
                    input: Input::Probs,
                    rows: 1,
                    cols: big,
                },
                workgroup_targets
                    .iter()
                    .map(|&t| {
                        (
                            format!("target_workgroups={t}"),
                            Tuning {
                                target_workgroups: Some(t),
                                ..d
                            },
                        )
                    })
                    .map(|(l, t)| (l, options(t), false))
                    .chain([
                        // Close distributions (the model-comparison case): every term takes
                        // the series branch, no divergence.
                        ("near-identical Q".to_string(), options(d), true),
                        // The shared-memory reduction instead of subgroup shuffles.
                        (
                            "subgroups off".to_string(),
                            EngineOptions {
                                subgroups: false,
                                ..options(d)
                            },
                            false,
                        ),
                    ])
                    .collect(),
            ),
            (
                Workload {
                    dtype: Dtype::F32,
                    name: format!("KL probs {}x{}", min_it_shape.0, min_it_shape.1),
                    measure: Measure::KullbackLeibler,
                    input: Input::Probs,
                    rows: min_it_shape.0,
                    cols: min_it_shape.1,
                },
                min_iterations(min_it_values),
            ),
            (
                // One long row: how short a loop a GPU's invocations may have (at 16, an
                // H200 gives each invocation 4 vec4 loads at N = 1e7).
                Workload {
                    dtype: Dtype::F32,
                    name: format!("KL probs N={mid:.0e}"),
                    measure: Measure::KullbackLeibler,
                    input: Input::Probs,
                    rows: 1,
                    cols: mid,
                },
                min_iterations(&[16, 64, 256, 1024]),
            ),
            (
                // A few short rows: in one small workgroup (a CPU adapter's default) or in one
                // of 256 (a GPU's, which skips idle warps).
                Workload {
                    dtype: Dtype::F32,
                    name: "KL probs N=1e3".to_string(),
                    measure: Measure::KullbackLeibler,
                    input: Input::Probs,
                    rows: 1,
                    cols: 1000,
                },
                [false, true]
                    .iter()
                    .map(|&small| {
                        let tuning = Tuning {
                            small_workgroups: Some(small),
                            ..d
                        };
                        (format!("small_workgroups={small}"), options(tuning), false)
                    })
                    .collect(),
            ),
            (
                Workload {
                    dtype: Dtype::F32,
                    name: format!("KL logits {logit_rows}x32000"),
                    measure: Measure::KullbackLeibler,
                    input: Input::Logits,
                    rows: logit_rows,
                    cols: 32000,
                },
                [4u64, 16, 64, 4096]
                    .iter()
                    .map(|&mb| {
                        (
                            format!("two_pass_window={mb}MiB"),
                            Tuning {
                                two_pass_window_bytes: mb << 20,
                                ..d
                            },
                        )
                    })
                    .map(|(l, t)| (l, options(t), false))
                    .collect(),
            ),
        ]
    };
    for (w, tunings) in &variant_cases {
        let p = data(&mut rng, w.rows, w.cols, w.input);
        let q = data(&mut rng, w.rows, w.cols, w.input);
        let bytes = 2.0 * (w.rows * w.cols) as f64 * 4.0;
        // Q close to P: ratios within 1 ± 5e-4.
        let close: Vec<f32> = p
            .iter()
            .map(|&x| x * (1.0 + 1e-3 * (rng.next_f32() - 0.5)))
            .collect();
        for (label, opts, near) in tunings {
            let q = if *near { &close } else { &q };
            let e = Engine::with_options(opts.clone())?;
            let timer = Timer::new(&e);
            let (pb, qb) = (upload(&e, "p", &p), upload(&e, "q", q));
            let out = e.create_f32_buffer("bench.rows", w.rows as u64)?;
            let opts = Options::input(w.input);
            let s = measure_gpu(budget / 2, &timer, &e, &mut |enc, ws| {
                e.record_rows(
                    enc,
                    ws,
                    w.measure,
                    pb.slice(..),
                    Some(qb.slice(..)),
                    w.cols,
                    &opts,
                    out.slice(..),
                )
                .expect("record");
            });
            variants.push((w.name.clone(), label.clone(), bytes / s / 1e9));
        }
    }

    // Per-call overhead: a blocking N = 1000 call on GPU data against an empty submit and
    // a 4-byte readback.
    let small_p = upload(&engine, "small p", &data(&mut rng, 1, 1000, Input::Probs));
    let small_q = upload(&engine, "small q", &data(&mut rng, 1, 1000, Input::Probs));
    let read_buf = engine.create_f32_buffer("bench.rt", 1)?;
    // Interleaved, so both see the same clocks and thread-pool state: timed one after the
    // other, lavapipe's drift between the two blocks moved the ratio from 1.5 to 2.4.
    let (mut calls, mut round_trips) = (vec![], vec![]);
    let start = Instant::now();
    while calls.len() < 20 || (start.elapsed() < 2 * budget && calls.len() < 5000) {
        let t = Instant::now();
        engine
            .kl_divergence_buffers(small_p.slice(..), small_q.slice(..))
            .expect("call");
        calls.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        engine.queue().submit([engine
            .device()
            .create_command_encoder(&Default::default())
            .finish()]);
        engine.read_f32(read_buf.slice(..)).expect("readback");
        round_trips.push(t.elapsed().as_secs_f64());
    }
    let middle = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (call, round_trip) = (middle(&mut calls), middle(&mut round_trips));

    // The GPU's floor per call: back-to-back passes of one trivial dispatch each, and of two
    // dependent ones (a kernel and its combine), against KL at N = 1000 on GPU data. Below
    // about 10^7 elements a call is its fixed cost; this says how much of it is the pass and
    // its barriers rather than klgpu's kernels.
    let (one_dispatch, two_dispatches) = dispatch_floor(budget, &timer, &engine);

    // "of roof": the plain sum over the same inputs and plan, over this kernel's time.
    // "of 1-D roof": GB/s over the big one-input streaming sum's GB/s.
    println!(
        "\n{:<34} {:<14} {:<15} {:>12} {:>10} {:>8} {:>11}",
        "workload", "path", "timer", "time", "GB/s", "of roof", "of 1-D roof"
    );
    for r in &rows_out {
        let own = r.roof_seconds.map_or(String::new(), |roof| {
            format!("{:.0} %", 100.0 * roof / r.seconds)
        });
        let flat = if r.path == "gpu-device" {
            format!("{:.0} %", 100.0 * r.gbps() / roof_gbps)
        } else {
            String::new()
        };
        println!(
            "{:<34} {:<14} {:<15} {:>9.3} ms {:>10.2} {:>8} {:>11}",
            r.workload,
            r.path,
            r.timer,
            r.seconds * 1e3,
            r.gbps(),
            own,
            flat
        );
    }
    println!(
        "\n{:<34} {:<26} {:>10} {:>9}",
        "planner variant", "tuning", "GB/s", "of roof"
    );
    for (w, label, gbps) in &variants {
        println!(
            "{:<34} {:<26} {:>10.2} {:>7.0} %",
            w,
            label,
            gbps,
            100.0 * gbps / roof_gbps
        );
    }
    println!(
        "\nper-call overhead, N = 1000 on GPU data: {:.1} µs; empty submit + 4-byte readback: {:.1} µs; ratio {:.2}",
        call * 1e6,
        round_trip * 1e6,
        call / round_trip
    );
    println!(
        "GPU time per call back to back ({}): a pass of one trivial dispatch {:.1} µs, of two dependent ones {:.1} µs",
        timer.kind(),
        one_dispatch * 1e6,
        two_dispatches * 1e6
    );

    if let Some(path) = args.json {
        let records: Vec<_> = rows_out
            .iter()
            .map(|r| {
                serde_json::json!({
                    "workload": r.workload, "path": r.path, "timer": r.timer, "bytes": r.bytes,
                    "seconds": r.seconds, "gbps": r.gbps(),
                    "roofline_seconds": r.roof_seconds,
                    "of_roofline": r.roof_seconds.map(|roof| roof / r.seconds),
                    "of_1d_roofline": (r.path == "gpu-device").then(|| r.gbps() / roof_gbps),
                })
            })
            .collect();
        let doc = serde_json::json!({
            "adapter": { "name": info.name, "backend": format!("{:?}", info.backend),
                         "device_type": format!("{:?}", info.device_type), "driver": info.driver,
                         "driver_info": info.driver_info },
            "subgroups": engine.uses_subgroups(),
            "timer": timer.kind(),
            "roofline_gbps": roof_gbps,
            "overhead": { "call_n1000_s": call, "empty_round_trip_s": round_trip,
                          "gpu_pass_one_dispatch_s": one_dispatch,
                          "gpu_pass_two_dispatches_s": two_dispatches },
            "results": records,
            // The values' check (null with --no-verify): JSON readers see a wrong run too.
            "check": args.verify.then(|| serde_json::json!({
                "workloads": workloads.len(), "rows_off": wrong.len(),
                "worst_relative_error": worst.0, "worst_at": worst.1,
            })),
            "variants": variants.iter().map(|(w, l, g)| serde_json::json!({"workload": w, "tuning": l, "gbps": g})).collect::<Vec<_>>(),
        });
        std::fs::write(&path, serde_json::to_string_pretty(&doc)?)?;
        println!("wrote {path}");
    }
    if !wrong.is_empty() {
        return Err(format!(
            "{} rows differ from the f64 reference by more than 1e-4 (listed above)",
            wrong.len()
        )
        .into());
    }
    Ok(())
}

/// GPU seconds per back-to-back pass of one trivial dispatch (one invocation adding 1 to a
/// storage word), and of two such dependent dispatches in one pass.
fn dispatch_floor(budget: Duration, timer: &Timer, engine: &Engine) -> (f64, f64) {
    let device = engine.device();
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("bench.floor"),
        source: wgpu::ShaderSource::Wgsl(
            "@group(0) @binding(0) var<storage, read_write> word: array<u32>;\n\
             @compute @workgroup_size(1) fn main() { word[0] = word[0] + 1u; }"
                .into(),
        ),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("bench.floor"),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    let word = engine
        .create_f32_buffer("bench.floor", 1)
        .expect("a one-word buffer");
    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("bench.floor"),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &[wgpu::BindGroupEntry {
            binding: 0,
            resource: word.as_entire_binding(),
        }],
    });
    let passes = |dispatches: u32| {
        measure_gpu(budget, timer, engine, &mut |enc, _| {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            for _ in 0..dispatches {
                pass.dispatch_workgroups(1, 1, 1);
            }
        })
    };
    (passes(1), passes(2))
}
