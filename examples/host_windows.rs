//! KL from host slices (uploads included, wall clock) with host windows of several sizes,
//! several numbers of copying threads, and with or without direct uploads, interleaved: for
//! choosing `EngineOptions::window_bytes`, `Tuning::upload_threads` and
//! `Tuning::direct_uploads` on an adapter.
//!
//! Every round times one call per (N, configuration) in turn, and each keeps its best round,
//! so all see the same machine state. Also prints the best single-threaded copy of one input, a
//! floor for what any upload through host memory costs.
//!
//! ```text
//! cargo run --release --example host_windows -- [--rounds R] [--n N,...] [--mib W,...]
//!     [--threads T,...] [--direct D,...] [--dtype f32|f16|bf16]
//! ```
//! Defaults: 7 rounds, N = 10^7 and 10^8, windows of 4, 32 and 128 MiB per input (of f32:
//! a window holds as many 16-bit elements, in half the bytes), the adapter's default threads
//! (`--threads 0`) and uploads (`--direct 2`; 0 off, 1 on), f32 slices (`--dtype`: the same
//! values rounded to f16 or bf16, for choosing windows of 16-bit inputs).

#[path = "../benches/support/mod.rs"]
mod support;
use support::{Rng, data, parse_dtype, stored_as};

use std::time::Instant;

use klgpu::half::{bf16, f16};
use klgpu::{Dtype, Element, Engine, EngineOptions, Input};

fn list(text: &str) -> Result<Vec<u64>, std::num::ParseIntError> {
    text.split(',').map(str::parse).collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut rounds = 7;
    let mut sizes: Vec<u64> = vec![10_000_000, 100_000_000];
    let mut mib: Vec<u64> = vec![4, 32, 128];
    let mut threads: Vec<u64> = vec![0];
    let mut direct: Vec<u64> = vec![2];
    let mut dtype = Dtype::F32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let value = args.next().ok_or(format!("{a} needs a value"))?;
        match a.as_str() {
            "--dtype" => dtype = parse_dtype(Some(&value))?,
            "--rounds" => rounds = value.parse()?,
            "--n" => sizes = list(&value)?,
            "--mib" => mib = list(&value)?,
            "--threads" => threads = list(&value)?,
            "--direct" => direct = list(&value)?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let mut configs: Vec<(u64, u64, u64)> = vec![];
    for &m in &mib {
        for &t in &threads {
            configs.extend(direct.iter().map(|&d| (m, t, d)));
        }
    }
    let engines = configs
        .iter()
        .map(|&(m, t, d)| {
            let mut options = EngineOptions {
                window_bytes: Some(m << 20),
                ..Default::default()
            };
            options.tuning.upload_threads = (t > 0).then_some(t as u32);
            options.tuning.direct_uploads = (d < 2).then_some(d == 1);
            Engine::with_options(options)
        })
        .collect::<Result<Vec<_>, _>>()?;
    println!("adapter: {}", engines[0].adapter_info().name);
    let max_n = *sizes.iter().max().unwrap_or(&0) as usize;
    let mut rng = Rng(7);
    let p = data(&mut rng, 1, max_n, Input::Probs);
    let q = data(&mut rng, 1, max_n, Input::Probs);
    println!("{} slices", dtype.name());
    let best = match dtype {
        Dtype::F32 => sweep(&engines, &sizes, rounds, &p, &q)?,
        Dtype::F16 => sweep(
            &engines,
            &sizes,
            rounds,
            &stored_as::<f16>(&p),
            &stored_as::<f16>(&q),
        )?,
        Dtype::BF16 => sweep(
            &engines,
            &sizes,
            rounds,
            &stored_as::<bf16>(&p),
            &stored_as::<bf16>(&q),
        )?,
    };

    println!("best of {rounds} rounds; GB/s counts both inputs");
    for (i, &n) in sizes.iter().enumerate() {
        let bytes = 2.0 * dtype.size() as f64 * n as f64;
        println!(
            "N = {n}: copy of one input {:.2} ms ({:.1} GB/s)",
            best.copy[i] * 1e3,
            bytes / 2.0 / best.copy[i] / 1e9
        );
        for (j, &(m, t, _)) in configs.iter().enumerate() {
            let t = if t == 0 {
                "default".to_string()
            } else {
                t.to_string()
            };
            // What the engine does, which for the default depends on the adapter.
            let d = if engines[j].direct_uploads() {
                "direct"
            } else {
                "staged"
            };
            println!(
                "  windows of {m:>4} MiB, threads {t:>7}, uploads {d:>7}: {:8.2} ms {:6.2} GB/s",
                best.calls[i][j] * 1e3,
                bytes / best.calls[i][j] / 1e9
            );
        }
    }
    Ok(())
}

/// Best seconds per size: of a plain copy of one input, and of a call on each engine.
struct Best {
    copy: Vec<f64>,
    calls: Vec<Vec<f64>>,
}

/// Every round times a copy and one call per engine for each size in turn.
fn sweep<T: Element>(
    engines: &[Engine],
    sizes: &[u64],
    rounds: u32,
    p: &[T],
    q: &[T],
) -> klgpu::Result<Best> {
    let mut copy = p.to_vec();
    let mut best = Best {
        copy: vec![f64::MAX; sizes.len()],
        calls: vec![vec![f64::MAX; engines.len()]; sizes.len()],
    };
    for _ in 0..rounds {
        for (i, &n) in sizes.iter().enumerate() {
            let n = n as usize;
            let start = Instant::now();
            copy[..n].copy_from_slice(&p[..n]);
            std::hint::black_box(&copy);
            best.copy[i] = best.copy[i].min(start.elapsed().as_secs_f64());
            for (j, engine) in engines.iter().enumerate() {
                let start = Instant::now();
                std::hint::black_box(engine.kl_divergence(&p[..n], &q[..n])?);
                best.calls[i][j] = best.calls[i][j].min(start.elapsed().as_secs_f64());
            }
        }
    }
    Ok(best)
}
