//! criterion benches: throughput (input bytes per second) of klgpu on GPU data, on host data
//! (uploads included) and of the f64 CPU reference, next to the roofline (a plain streaming
//! sum through the same kernel family) in the same run on the same adapter.
//!
//! GPU-data timings come from GPU timestamps where the adapter has TIMESTAMP_QUERY (the wall
//! clock otherwise), with calls recorded back to back. Sizes shrink on software adapters
//! (lavapipe) so that `cargo bench` finishes in minutes; `KLGPU_BENCH_MAX_N` overrides the
//! largest single distribution. For the full table with peers, see examples/bench.rs and
//! scripts/peers.py.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use klgpu::wgpu;
use klgpu::{Engine, Input, Measure, Options, cpu};

mod support;
use support::{Rng, Timer, data, time_calls, upload};

struct Case {
    name: String,
    measure: Measure,
    input: Input,
    rows: usize,
    cols: usize,
}

fn cases(software: bool) -> (Vec<Case>, usize) {
    let max_n: usize = std::env::var("KLGPU_BENCH_MAX_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if software { 10_000_000 } else { 100_000_000 });
    let mut cases = vec![];
    let mut n = 1000;
    while n <= max_n {
        cases.push(Case {
            name: format!("kl_probs_n{n:.0e}"),
            measure: Measure::KullbackLeibler,
            input: Input::Probs,
            rows: 1,
            cols: n,
        });
        n *= 10;
    }
    let (short, logit_rows) = if software {
        (100_000, 256)
    } else {
        (1_000_000, 4096)
    };
    cases.push(Case {
        name: format!("kl_probs_{short}x10"),
        measure: Measure::KullbackLeibler,
        input: Input::Probs,
        rows: short,
        cols: 10,
    });
    cases.push(Case {
        name: format!("kl_logits_{logit_rows}x32000"),
        measure: Measure::KullbackLeibler,
        input: Input::Logits,
        rows: logit_rows,
        cols: 32_000,
    });
    cases.push(Case {
        name: "kl_logits_16x262144".into(),
        measure: Measure::KullbackLeibler,
        input: Input::Logits,
        rows: 16,
        cols: 262_144,
    });
    (cases, max_n)
}

fn throughput(c: &mut Criterion) {
    let engine = Engine::new().unwrap_or_else(|e| panic!("the benches need a GPU adapter: {e}"));
    let info = engine.adapter_info().clone();
    let software = info.device_type == wgpu::DeviceType::Cpu;
    eprintln!(
        "adapter: {} ({:?}, {:?})",
        info.name, info.backend, info.device_type
    );
    let timer = Timer::new(&engine);
    let mut rng = Rng(42);
    let (cases, max_n) = cases(software);

    // Roofline: Σx over as many bytes as the largest two-input case reads.
    let roof_n = 2 * max_n;
    let roof = upload(&engine, "bench", &data(&mut rng, 1, roof_n, Input::Logits));
    let out = engine.create_f32_buffer("out", 1 << 22).expect("out");
    let mut group = c.benchmark_group("roofline");
    group.throughput(Throughput::Bytes(roof_n as u64 * 4));
    let mut pool = vec![];
    group.bench_function(BenchmarkId::new("gpu_sum", roof_n), |b| {
        b.iter_custom(|iters| {
            gpu_time(iters, &mut |k| {
                time_calls(&timer, &engine, &mut pool, k, &mut |enc, ws| {
                    engine
                        .record_sum_rows(enc, ws, roof.slice(..), None, roof_n, out.slice(..))
                        .expect("record");
                })
            })
        })
    });
    group.finish();
    drop(roof);

    for case in &cases {
        let p = data(&mut rng, case.rows, case.cols, case.input);
        let q = data(&mut rng, case.rows, case.cols, case.input);
        let (pb, qb) = (upload(&engine, "bench", &p), upload(&engine, "bench", &q));
        let rows_out = engine
            .create_f32_buffer("rows", case.rows as u64)
            .expect("rows");
        let opts = Options::input(case.input);
        let mut group = c.benchmark_group(&case.name);
        group.throughput(Throughput::Bytes(2 * (case.rows * case.cols) as u64 * 4));
        let mut pool = vec![];
        group.bench_function("gpu_device", |b| {
            b.iter_custom(|iters| {
                gpu_time(iters, &mut |k| {
                    time_calls(&timer, &engine, &mut pool, k, &mut |enc, ws| {
                        engine
                            .record_rows(
                                enc,
                                ws,
                                case.measure,
                                pb.slice(..),
                                Some(qb.slice(..)),
                                case.cols,
                                &opts,
                                rows_out.slice(..),
                            )
                            .expect("record");
                    })
                })
            })
        });
        group.bench_function("gpu_roofline_same_inputs", |b| {
            b.iter_custom(|iters| {
                gpu_time(iters, &mut |k| {
                    time_calls(&timer, &engine, &mut pool, k, &mut |enc, ws| {
                        engine
                            .record_sum_rows(
                                enc,
                                ws,
                                pb.slice(..),
                                Some(qb.slice(..)),
                                case.cols,
                                rows_out.slice(..),
                            )
                            .expect("record");
                    })
                })
            })
        });
        group.bench_function("gpu_host_data", |b| {
            b.iter(|| {
                engine
                    .rows(case.measure, &p, Some(&q), case.cols, &opts)
                    .expect("gpu")
            })
        });
        group.bench_function("cpu_reference", |b| {
            b.iter(|| cpu::rows(case.measure, &p, Some(&q), case.cols, &opts).expect("cpu"))
        });
        group.finish();
    }
}

/// Total GPU time of `iters` calls, recorded in batches of at most 64 per submission.
fn gpu_time(iters: u64, run_batch: &mut dyn FnMut(usize) -> f64) -> Duration {
    let mut left = iters;
    let mut total = 0.0;
    while left > 0 {
        let k = left.min(64) as usize;
        total += run_batch(k) * k as f64;
        left -= k as u64;
    }
    Duration::from_secs_f64(total)
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! { name = benches; config = config(); targets = throughput }
criterion_main!(benches);
