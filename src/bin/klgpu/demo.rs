//! `klgpu demo`: a built-in workload that shows what the GPU path does and how far it is from
//! the f64 reference, with no files needed. P is a batch of seeded Gaussian logits, Q the same
//! logits perturbed, as two models' outputs over a vocabulary would be.

use std::time::Instant;

use klgpu::{Engine, Input, Measure, Options, Reduction};
use serde_json::json;

use crate::compute::print_stdout;
use crate::error::CliError;
use crate::output::{AdapterDesc, fmt_num, num};

/// Demo parameters.
#[derive(Clone, Copy, Debug)]
pub struct Demo {
    /// Rows (distributions).
    pub rows: usize,
    /// Logits per row.
    pub cols: usize,
    /// RNG seed.
    pub seed: u64,
    /// Print one JSON object.
    pub json: bool,
}

/// SplitMix64: a tiny, good-enough seeded generator, so the demo needs no RNG crate and
/// gives the same data everywhere.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next_u64() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// Two standard normal samples (Box–Muller).
    fn normal_pair(&mut self) -> (f64, f64) {
        let r = (-2.0 * self.unit().ln()).sqrt();
        let t = std::f64::consts::TAU * self.unit();
        (r * t.cos(), r * t.sin())
    }
}

/// P: N(0, 2²) logits; Q = P + N(0, 0.3²).
fn generate(rows: usize, cols: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let n = rows * cols;
    let mut rng = SplitMix64(seed);
    let mut p = Vec::with_capacity(n);
    let mut q = Vec::with_capacity(n);
    while p.len() < n {
        let (a, b) = rng.normal_pair();
        let (c, d) = rng.normal_pair();
        p.push((2.0 * a) as f32);
        q.push((2.0 * a + 0.3 * c) as f32);
        if p.len() < n {
            p.push((2.0 * b) as f32);
            q.push((2.0 * b + 0.3 * d) as f32);
        }
    }
    (p, q)
}

/// One measure's comparison.
struct Row {
    measure: Measure,
    gpu_mean: f64,
    cpu_mean: f64,
    max_rel_diff: f64,
    gpu_s: f64,
    cpu_s: f64,
    gpu_gb_s: f64,
}

/// Runs the demo.
pub fn run(demo: &Demo) -> Result<(), CliError> {
    if demo.rows == 0 || demo.cols == 0 {
        return Err(CliError::input("--rows and --cols must be at least 1"));
    }
    if demo.rows.checked_mul(demo.cols).is_none_or(|n| n > 1 << 28) {
        return Err(CliError::input(
            "--rows × --cols must be at most 2^28 (1 GiB of f32 per input)",
        ));
    }
    let engine = Engine::new().map_err(|e| CliError::runtime(e.to_string()))?;
    let adapter = AdapterDesc::from_info(engine.adapter_info());
    let (p, q) = generate(demo.rows, demo.cols, demo.seed);
    let opts = Options::input(Input::Logits);
    let gpu_err = |e: klgpu::Error| CliError::runtime(e.to_string());
    // Warm-up: first-use costs (buffers sized for the batch, pipelines) are not throughput.
    engine
        .rows(Measure::KullbackLeibler, &p, Some(&q), demo.cols, &opts)
        .map_err(gpu_err)?;
    let mut table = Vec::new();
    for measure in Measure::ALL {
        let qq = measure.uses_q().then_some(&q[..]);
        let warm = measure.uses_q().then_some(&q[..demo.cols]);
        engine
            .rows(measure, &p[..demo.cols], warm, demo.cols, &opts)
            .map_err(gpu_err)?;
        let t = Instant::now();
        let gpu = engine
            .rows(measure, &p, qq, demo.cols, &opts)
            .map_err(gpu_err)?;
        let gpu_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let cpu = klgpu::cpu::rows(measure, &p, qq, demo.cols, &opts).map_err(gpu_err)?;
        let cpu_s = t.elapsed().as_secs_f64();
        let max_rel_diff = gpu
            .values
            .iter()
            .zip(&cpu.values)
            .map(|(&g, &c)| {
                if g == c {
                    0.0
                } else if c == 0.0 {
                    (g - c).abs()
                } else {
                    ((g - c) / c).abs()
                }
            })
            .fold(0.0f64, f64::max);
        let bytes = 4.0 * (p.len() + qq.map_or(0, <[f32]>::len)) as f64;
        table.push(Row {
            measure,
            gpu_mean: Reduction::MeanOverRows
                .apply(&gpu.values)
                .unwrap_or(f64::NAN),
            cpu_mean: Reduction::MeanOverRows
                .apply(&cpu.values)
                .unwrap_or(f64::NAN),
            max_rel_diff,
            gpu_s,
            cpu_s,
            gpu_gb_s: bytes / gpu_s / 1e9,
        });
    }
    let text = if demo.json {
        let measures: Vec<_> = table
            .iter()
            .map(|r| {
                json!({
                    "measure": r.measure.name(),
                    "gpu_mean": num(r.gpu_mean),
                    "cpu_mean": num(r.cpu_mean),
                    "max_rel_diff": num(r.max_rel_diff),
                    "gpu_s": r.gpu_s,
                    "cpu_s": r.cpu_s,
                    "gpu_gb_s": r.gpu_gb_s,
                })
            })
            .collect();
        let obj = json!({
            "rows": demo.rows,
            "cols": demo.cols,
            "input": "logits",
            "seed": demo.seed,
            "adapter": adapter.to_json(),
            "measures": measures,
        });
        format!("{obj}\n")
    } else {
        let mut s = format!(
            "klgpu demo: {} rows × {} logits (P ~ N(0, 2²), Q = P + N(0, 0.3²), seed {}), \
             nats, mean over rows\nadapter: {} ({}, {})\n\n",
            demo.rows, demo.cols, demo.seed, adapter.name, adapter.backend, adapter.device_type
        );
        s += &format!(
            "{:<8} {:>17} {:>17} {:>13} {:>9} {:>9} {:>9}\n",
            "measure", "GPU", "CPU f64", "max rel diff", "GPU s", "CPU s", "GPU GB/s"
        );
        for r in &table {
            s += &format!(
                "{:<8} {:>17} {:>17} {:>13.2e} {:>9.3} {:>9.3} {:>9.2}\n",
                r.measure.name(),
                fmt_num(r.gpu_mean),
                fmt_num(r.cpu_mean),
                r.max_rel_diff,
                r.gpu_s,
                r.cpu_s,
                r.gpu_gb_s
            );
        }
        s += "\nGPU s: one batched call from host memory (upload, kernels, readback) after a \
              warm-up; CPU: the f64 reference (klgpu::cpu) on all cores.\n";
        s
    };
    print_stdout(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_seeded_and_normal_ish() {
        let (p, q) = generate(3, 1001, 7);
        assert_eq!(p.len(), 3003);
        assert_eq!(generate(3, 1001, 7).0, p);
        let mean = p.iter().map(|&x| x as f64).sum::<f64>() / p.len() as f64;
        let var = p.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / p.len() as f64;
        assert!(mean.abs() < 0.2, "{mean}");
        assert!((var - 4.0).abs() < 0.5, "{var}");
        let d = p
            .iter()
            .zip(&q)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>();
        assert!((d / p.len() as f64 - 0.09).abs() < 0.02);
    }
}
