//! Shared helpers for the GPU tests: one engine per test binary, seeded data generators,
//! and the precision bar.
#![allow(dead_code)]

use std::sync::OnceLock;

use klgpu::wgpu;
use klgpu::{Dtype, Element, Engine, EngineOptions, Error, Input, Measure, Options, Tuning, plan};
use rand::prelude::*;
use rand_distr::Gamma;

/// The engine every test shares (tests run on parallel threads: this also exercises
/// concurrent use). No adapter is a hard failure, never a skip.
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        Engine::new()
            .unwrap_or_else(|e| panic!("klgpu tests need a GPU adapter (lavapipe counts): {e}"))
    })
}

/// An engine with tiny windows (4 KiB per input): streaming paths on small data. Uploads go
/// through staging buffers, as on a discrete GPU (a CPU adapter's default writes the windows
/// directly, as [`engine`] does).
pub fn small_window_engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        Engine::with_options(EngineOptions {
            window_bytes: Some(4096),
            tuning: Tuning {
                direct_uploads: Some(false),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("klgpu tests need a GPU adapter: {e}"))
    })
}

/// An engine whose calls take turns, as on OpenGL (`EngineOptions::take_turns`).
pub fn turns_engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        Engine::with_options(EngineOptions {
            take_turns: Some(true),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("klgpu tests need a GPU adapter: {e}"))
    })
}

/// The plan a GPU gets (many short workgroups of 256, rows split into chunks and combined, lanes
/// interleaved), and its uploads through staging buffers, whatever the adapter: on a CPU
/// adapter the default plan is a few long workgroups with blocked lanes instead. With the quick path for plain vec4s on
/// (`Tuning::quick_vec4`), so every test over all plans checks it against the reference.
pub fn gpu_plan_engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| short_loop_engine(false, true))
}

/// [`gpu_plan_engine`] without the quick path: the two differ in nothing else.
pub fn gpu_plan_general_engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| short_loop_engine(false, false))
}

/// The GPU plan's short loops with a CPU adapter's blocked lanes, so that rows are spread over
/// many lanes each walking a block of its chunk (the default CPU plan's tiny test windows give
/// one lane per row). KL and JS of normalized probabilities take their two passes alone here
/// (the sums pass, then the terms pass; `Tuning::one_pass_normalized_kl` and `_js` off), and
/// their one pass first on every other engine.
pub fn blocked_lanes_engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        engine_with_tuning(Tuning {
            one_pass_normalized_kl: false,
            one_pass_normalized_js: false,
            ..short_loop_tuning(true, false)
        })
    })
}

fn short_loop_engine(blocked_lanes: bool, quick_vec4: bool) -> Engine {
    engine_with_tuning(short_loop_tuning(blocked_lanes, quick_vec4))
}

/// A new engine with `tuning` and the default options otherwise.
pub fn engine_with_tuning(tuning: Tuning) -> Engine {
    Engine::with_options(EngineOptions {
        tuning,
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("klgpu tests need a GPU adapter: {e}"))
}

/// The GPU's plan (see [`gpu_plan_engine`]) with lanes blocked or not and the quick path on
/// or off.
pub fn short_loop_tuning(blocked_lanes: bool, quick_vec4: bool) -> Tuning {
    Tuning {
        min_iterations: Some(plan::MIN_ITERATIONS),
        target_workgroups: Some(plan::TARGET_WORKGROUPS),
        blocked_lanes: Some(blocked_lanes),
        quick_vec4: Some(quick_vec4),
        direct_uploads: Some(false),
        one_pass_kl: true,
        // Workgroups of 256 for any shape, as on a GPU (a CPU adapter's default runs a few
        // short rows in one small workgroup).
        small_workgroups: Some(false),
        ..Default::default()
    }
}

/// Every plan: the adapter's default, a GPU's, and a GPU's with blocked lanes. KL of logits
/// takes the two passes alone on the first and the one-pass kernel first on the others
/// (`Tuning::one_pass_kl`; also on [`shared_memory_engine`]).
pub fn all_plans() -> [&'static Engine; 3] {
    [engine(), gpu_plan_engine(), blocked_lanes_engine()]
}

/// Every plan of [`all_plans`], rows split across tiny windows, and the shared-memory
/// reduction: every path a kernel's state goes through.
pub fn every_path() -> [&'static Engine; 5] {
    [
        engine(),
        gpu_plan_engine(),
        blocked_lanes_engine(),
        small_window_engine(),
        shared_memory_engine(),
    ]
}

/// The shared-memory reduction path, whatever the adapter supports.
pub fn shared_memory_engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        Engine::with_options(EngineOptions {
            subgroups: false,
            tuning: Tuning {
                one_pass_kl: true,
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("klgpu tests need a GPU adapter: {e}"))
    })
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `rows` Dirichlet(α) rows of length `cols`, normalized in f64 and rounded to f32.
pub fn dirichlet(rng: &mut StdRng, rows: usize, cols: usize, alpha: f64) -> Vec<f32> {
    let gamma = Gamma::new(alpha, 1.0).expect("alpha > 0");
    let mut out = Vec::with_capacity(rows * cols);
    let mut row = vec![0f64; cols];
    for _ in 0..rows {
        // Very small α underflows Gamma samples to 0; keep at least one positive entry.
        for x in row.iter_mut() {
            *x = rng.sample(gamma);
        }
        if row.iter().all(|&x| x == 0.0) {
            row[0] = 1.0;
        }
        let sum: f64 = row.iter().sum();
        out.extend(row.iter().map(|&x| (x / sum) as f32));
    }
    out
}

/// A distribution with `zero_fraction` of its entries exactly 0.
pub fn sparse(rng: &mut StdRng, n: usize, zero_fraction: f64) -> Vec<f32> {
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            if rng.random::<f64>() < zero_fraction {
                0.0
            } else {
                rng.random::<f64>() + 1e-3
            }
        })
        .collect();
    if v.iter().all(|&x| x == 0.0) {
        v[0] = 1.0;
    }
    let sum: f64 = v.iter().sum();
    v.iter().map(|&x| (x / sum) as f32).collect()
}

/// Q = P·exp(δ·z), renormalized in f64: KL(P‖Q) ≈ δ²·Var(z)/2.
pub fn perturbed(rng: &mut StdRng, p: &[f32], delta: f64) -> Vec<f32> {
    let q: Vec<f64> = p
        .iter()
        .map(|&x| x as f64 * (delta * (rng.random::<f64>() * 2.0 - 1.0)).exp())
        .collect();
    let sum: f64 = q.iter().sum();
    q.iter().map(|&x| (x / sum) as f32).collect()
}

/// The seeds `KLGPU_FUZZ_SEEDS=FIRST..END` asks the differential fuzz tests to run instead of
/// their own, for hunting; None when unset.
pub fn fuzz_seeds() -> Option<std::ops::Range<u64>> {
    let range = std::env::var("KLGPU_FUZZ_SEEDS").ok()?;
    let bounds = range
        .split_once("..")
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
    let (first, end) = bounds.expect("KLGPU_FUZZ_SEEDS=FIRST..END");
    Some(first..end)
}

/// One value of a differential fuzz: zeros, subnormals, values near f32::MAX, ordinary ones;
/// for logs, −∞ and f32::MIN (masks, as models write them), ±1e38, ±3.4e38 (whose distances
/// overflow f32), ±100 and offsets.
pub fn edge_value(r: &mut StdRng, input: Input) -> f32 {
    let k: f64 = r.random();
    let u: f64 = r.random();
    match input {
        Input::Probs => match k {
            k if k < 0.1 => 0.0,
            k if k < 0.2 => (u * 1e-38) as f32,
            k if k < 0.25 => (u * 1e-44) as f32,
            k if k < 0.3 => (u * 3e38) as f32,
            k if k < 0.35 => 1.0,
            _ => 10f64.powf(-40.0 * u) as f32,
        },
        _ => match k {
            k if k < 0.1 => f32::NEG_INFINITY,
            k if k < 0.13 => f32::MIN,
            k if k < 0.2 => (u * 2e38 - 1e38) as f32,
            k if k < 0.23 => (u * 6.8e38 - 3.4e38) as f32,
            k if k < 0.3 => (u * 200.0 - 100.0) as f32,
            k if k < 0.35 => -1e30,
            _ => (u * 20.0 - 10.0) as f32,
        },
    }
}

/// `x` rounded to the element type `T` (f32: itself).
pub fn narrow<T: Element>(x: &[f32]) -> Vec<T> {
    x.iter()
        .map(|&v| match T::DTYPE {
            Dtype::F16 => bytemuck::cast(klgpu::half::f16::from_f32(v).to_bits()),
            Dtype::BF16 => bytemuck::cast(klgpu::half::bf16::from_f32(v).to_bits()),
            _ => bytemuck::cast(v),
        })
        .collect()
}

/// One seed's 60 batches of edge values as `T`, with empty rows (all −∞; all 0 when
/// normalized) and up to three invalid values on either side: GPU buffers and recordings,
/// whose kernels record the first flagged index, and host slices must name the element the
/// CPU reference names first; where the input is valid, they must fail alike (the same row's
/// Overflow) or not at all.
pub fn invalid_values_named_as_from_host_slices<T: Element>(seed: u64) {
    let mut r = rng(seed);
    for trial in 0..60 {
        let input = [Input::Probs, Input::LogProbs, Input::Logits][trial % 3];
        let normalize = input == Input::Probs && trial % 2 == 1;
        let cols = [1usize, 3, 17, 64, 300][trial / 3 % 5];
        let rows = 1 + trial % 4;
        let n = rows * cols;
        let mut p: Vec<f32> = (0..n).map(|_| edge_value(&mut r, input)).collect();
        let mut q: Vec<f32> = (0..n).map(|_| edge_value(&mut r, input)).collect();
        let empty = if input == Input::Probs {
            0.0
        } else {
            f32::NEG_INFINITY
        };
        for side in [&mut p, &mut q] {
            if r.random_bool(0.3) {
                let row = r.random_range(0..rows);
                side[row * cols..(row + 1) * cols].fill(empty);
            }
        }
        for _ in 0..r.random_range(0..4) {
            let bad = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -1e-30][r.random_range(0..4)];
            let i = r.random_range(0..n);
            if r.random_bool(0.5) {
                p[i] = bad
            } else {
                q[i] = bad
            }
        }
        let (p, q) = (narrow::<T>(&p), narrow::<T>(&q));
        let (wp, wq) = (
            p.iter().map(|v| v.to_f32()).collect::<Vec<f32>>(),
            q.iter().map(|v| v.to_f32()).collect::<Vec<f32>>(),
        );
        let e = every_path()[trial % 5];
        let opts = Options {
            input,
            normalize,
            dtype: T::DTYPE,
            ..Default::default()
        };
        let (pb, qb) = (
            e.create_buffer_init("p", &p).unwrap(),
            e.create_buffer_init("q", &q).unwrap(),
        );
        let out = e.create_f32_buffer("out", rows as u64).unwrap();
        for m in Measure::ALL {
            let what = format!(
                "{:?} seed {seed}, trial {trial}, {m:?} {input:?} normalize={normalize}, p {wp:?} q {wq:?}",
                T::DTYPE
            );
            let wqq = m.uses_q().then_some(&wq[..]);
            let reference = klgpu::cpu::rows(m, &wp, wqq, cols, &opts);
            let host = e.rows(m, &p, m.uses_q().then_some(&q[..]), cols, &opts);
            // The buffers hold whole words: slices of just the n elements.
            let bytes = (n * std::mem::size_of::<T>()) as u64;
            let qs = m.uses_q().then(|| qb.slice(..bytes));
            let bufs = e.rows_buffers(m, pb.slice(..bytes), qs, cols, &opts, out.slice(..));
            // The same recorded into an encoder, found by Workspace::check.
            let qs = m.uses_q().then(|| qb.slice(..bytes));
            let recorded = recorded_rows(e, m, pb.slice(..bytes), qs, cols, &opts, out.slice(..));
            let named = |r: klgpu::Result<()>| r.err().map(|e| e.to_string());
            let (host, bufs, recorded) = (named(host.map(|_| ())), named(bufs), named(recorded));
            match reference {
                Err(want @ Error::InvalidValue { .. }) => {
                    let want = Some(want.to_string());
                    assert_eq!(host, want, "host slices, {what}");
                    assert_eq!(bufs, want, "GPU buffers, {what}");
                    assert_eq!(recorded, want, "recording, {what}");
                }
                // Valid input: an Overflow (or none) alike on every path.
                _ => {
                    assert_eq!(bufs, host, "GPU buffers against host slices, {what}");
                    assert_eq!(recorded, host, "recording against host slices, {what}");
                }
            }
        }
    }
}

/// `Engine::record_rows` into a fresh encoder and workspace, submitted, and the workspace
/// checked: the recorded twin of `Engine::rows_buffers`.
pub fn recorded_rows(
    e: &Engine,
    m: Measure,
    p: wgpu::BufferSlice<'_>,
    q: Option<wgpu::BufferSlice<'_>>,
    cols: usize,
    opts: &Options,
    out: wgpu::BufferSlice<'_>,
) -> klgpu::Result<()> {
    let mut ws = e.workspace();
    let mut encoder = e.device().create_command_encoder(&Default::default());
    e.record_rows(&mut encoder, &mut ws, m, p, q, cols, opts, out)?;
    e.queue().submit([encoder.finish()]);
    ws.check(e)
}

/// Standard-normal-ish logits scaled to `scale`.
pub fn logits(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u: f32 = rng.random::<f32>() + rng.random::<f32>() + rng.random::<f32>() - 1.5;
            u * 2.0 * scale
        })
        .collect()
}

/// The precision bar of the issues: relative 1e-5, or absolute 1e-11 where |exact| < 1e-6.
/// Infinities must match exactly.
pub fn assert_close(gpu: f64, exact: f64, what: &str) {
    if exact.is_infinite() || gpu.is_infinite() {
        assert_eq!(gpu, exact, "{what}: gpu {gpu} vs exact {exact}");
        return;
    }
    let err = (gpu - exact).abs();
    if exact.abs() < 1e-6 {
        assert!(
            err <= 1e-11,
            "{what}: gpu {gpu:e} vs exact {exact:e}, abs err {err:e} > 1e-11"
        );
    } else {
        let rel = err / exact.abs();
        assert!(
            rel <= 1e-5,
            "{what}: gpu {gpu:e} vs exact {exact:e}, rel err {rel:e} > 1e-5"
        );
    }
}

/// Element-wise [`assert_close`] over rows; prints the first failing row.
pub fn assert_rows_close(gpu: &[f64], exact: &[f64], what: &str) {
    assert_eq!(gpu.len(), exact.len(), "{what}: row count");
    for (i, (&g, &e)) in gpu.iter().zip(exact).enumerate() {
        assert_close(g, e, &format!("{what}, row {i}"));
    }
}

/// `measures` over `[rows × cols]` inputs on every plan of [`all_plans`], row by row against
/// the reference.
pub fn assert_plans_match_reference(
    measures: &[Measure],
    p: &[f32],
    q: &[f32],
    cols: usize,
    opts: &Options,
    what: &str,
) {
    for &m in measures {
        let qq = m.uses_q().then_some(q);
        let want = klgpu::cpu::rows(m, p, qq, cols, opts).unwrap().values;
        for e in all_plans() {
            let got = e.rows(m, p, qq, cols, opts).unwrap().values;
            assert_rows_close(&got, &want, &format!("{what} {m:?}"));
        }
    }
}

/// The whole of an f32 buffer, widened for comparison with the reference.
pub fn read_f64(engine: &Engine, buffer: &wgpu::Buffer) -> Vec<f64> {
    let values = engine.read_f32(buffer.slice(..)).unwrap();
    values.iter().map(|&v| v as f64).collect()
}

/// A storage buffer on `engine`'s device holding `data` (copyable both ways).
pub fn upload(engine: &Engine, label: &str, data: &[f32]) -> wgpu::Buffer {
    engine
        .create_f32_buffer_init(label, data)
        .expect("upload test data")
}

/// KL(P‖softmax(z)) per row and its gradient, through GPU buffers (the gradient's buffer
/// starts as NaN, so an element left unwritten shows).
#[allow(dead_code)]
pub fn loss_and_grad(e: &Engine, target: &[f32], z: &[f32], cols: usize) -> (Vec<f64>, Vec<f32>) {
    let (tb, zb) = (upload(e, "target", target), upload(e, "z", z));
    let grad = upload(e, "grad", &vec![f32::NAN; z.len()]);
    let loss = e
        .kl_loss_and_grad_buffers(tb.slice(..), zb.slice(..), cols, grad.slice(..))
        .unwrap();
    (loss, e.read_f32(grad.slice(..)).unwrap())
}
