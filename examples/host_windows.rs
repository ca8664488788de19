//! KL from host slices (uploads included, wall clock) with host windows of several sizes and
//! several numbers of copying threads, interleaved: for choosing `EngineOptions::window_bytes`
//! and `Tuning::upload_threads` on an adapter, and for A/B of the upload path.
//!
//! Every round times one call per (N, window, threads) in turn, and each keeps its best round,
//! so all see the same machine state. Also prints the best single-threaded copy of one input, a
//! floor for what any upload through host memory costs.
//!
//! ```text
//! cargo run --release --example host_windows -- [--rounds R] [--n N,...] [--mib W,...]
//!     [--threads T,...]
//! ```
//! Defaults: 7 rounds, N = 10^7 and 10^8, windows of 4, 32 and 128 MiB per input, the
//! adapter's default threads (`--threads 0`).

#[path = "../benches/support/mod.rs"]
mod support;
use support::{Rng, data};

use std::time::Instant;

use klgpu::{Engine, EngineOptions, Input};

fn list(text: &str) -> Result<Vec<u64>, std::num::ParseIntError> {
    text.split(',').map(str::parse).collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut rounds = 7;
    let mut sizes: Vec<u64> = vec![10_000_000, 100_000_000];
    let mut mib: Vec<u64> = vec![4, 32, 128];
    let mut threads: Vec<u64> = vec![0];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let value = args.next().ok_or(format!("{a} needs a value"))?;
        match a.as_str() {
            "--rounds" => rounds = value.parse()?,
            "--n" => sizes = list(&value)?,
            "--mib" => mib = list(&value)?,
            "--threads" => threads = list(&value)?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let configs: Vec<(u64, u64)> = mib
        .iter()
        .flat_map(|&m| threads.iter().map(move |&t| (m, t)))
        .collect();
    let engines = configs
        .iter()
        .map(|&(m, t)| {
            let mut options = EngineOptions {
                window_bytes: Some(m << 20),
                ..Default::default()
            };
            options.tuning.upload_threads = (t > 0).then_some(t as u32);
            Engine::with_options(options)
        })
        .collect::<Result<Vec<_>, _>>()?;
    println!("adapter: {}", engines[0].adapter_info().name);
    let max_n = *sizes.iter().max().unwrap_or(&0) as usize;
    let mut rng = Rng(7);
    let p = data(&mut rng, 1, max_n, Input::Probs);
    let q = data(&mut rng, 1, max_n, Input::Probs);

    let mut copy = vec![0f32; max_n];
    let mut copy_best = vec![f64::MAX; sizes.len()];
    let mut best = vec![vec![f64::MAX; engines.len()]; sizes.len()];
    for _ in 0..rounds {
        for (i, &n) in sizes.iter().enumerate() {
            let n = n as usize;
            let start = Instant::now();
            copy[..n].copy_from_slice(&p[..n]);
            std::hint::black_box(&copy);
            copy_best[i] = copy_best[i].min(start.elapsed().as_secs_f64());
            for (j, engine) in engines.iter().enumerate() {
                let start = Instant::now();
                std::hint::black_box(engine.kl_divergence(&p[..n], &q[..n])?);
                best[i][j] = best[i][j].min(start.elapsed().as_secs_f64());
            }
        }
    }
    println!("best of {rounds} rounds; GB/s counts both inputs");
    for (i, &n) in sizes.iter().enumerate() {
        let bytes = 8.0 * n as f64;
        println!(
            "N = {n}: copy of one input {:.2} ms ({:.1} GB/s)",
            copy_best[i] * 1e3,
            bytes / 2.0 / copy_best[i] / 1e9
        );
        for (j, &(m, t)) in configs.iter().enumerate() {
            let t = if t == 0 {
                "default".to_string()
            } else {
                t.to_string()
            };
            println!(
                "  windows of {m:>4} MiB, threads {t:>7}: {:8.2} ms {:6.2} GB/s",
                best[i][j] * 1e3,
                bytes / best[i][j] / 1e9
            );
        }
    }
    Ok(())
}
