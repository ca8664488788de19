//! Shared by the criterion benches (benches/throughput.rs) and the benchmark driver
//! (examples/bench.rs): seeded data, a GPU-timestamp timer, steady-state sampling.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use klgpu::wgpu;
use klgpu::{Engine, Input};

/// xorshift64*: fast, seeded, good enough for benchmark data.
pub struct Rng(pub u64);
impl Rng {
    pub fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }
}

/// Rows of probabilities (uniform draws, normalized per row) or of logits (spread ±8).
pub fn data(rng: &mut Rng, rows: usize, cols: usize, input: Input) -> Vec<f32> {
    let mut v: Vec<f32> = (0..rows * cols).map(|_| rng.next_f32()).collect();
    match input {
        Input::Logits => v.iter_mut().for_each(|x| *x = (*x - 0.5) * 16.0),
        _ => {
            for row in v.chunks_mut(cols) {
                let s: f64 = row.iter().map(|&x| x as f64).sum();
                row.iter_mut().for_each(|x| *x = (*x as f64 / s) as f32);
                if input == Input::LogProbs {
                    row.iter_mut().for_each(|x| *x = x.ln());
                }
            }
        }
    }
    v
}

/// A storage buffer holding `data` on the engine's device.
pub fn upload(engine: &Engine, label: &str, data: &[f32]) -> wgpu::Buffer {
    engine
        .create_f32_buffer_init(label, data)
        .expect("upload benchmark data")
}

/// `--dtype`'s value: f32, f16 or bf16.
pub fn parse_dtype(text: Option<&str>) -> Result<klgpu::Dtype, String> {
    match text {
        Some("f32") => Ok(klgpu::Dtype::F32),
        Some("f16") => Ok(klgpu::Dtype::F16),
        Some("bf16") => Ok(klgpu::Dtype::BF16),
        other => Err(format!("--dtype f32|f16|bf16, not {other:?}")),
    }
}

/// `data` rounded to nearest in `T` (f32: a copy). Through bytes, since the sealed
/// `klgpu::Element` converts only to f32.
pub fn stored_as<T: klgpu::Element>(data: &[f32]) -> Vec<T> {
    use klgpu::half::{bf16, f16};
    let bytes: Vec<u8> = match T::DTYPE {
        klgpu::Dtype::F32 => bytemuck::cast_slice(data).to_vec(),
        klgpu::Dtype::F16 => data
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect(),
        klgpu::Dtype::BF16 => data
            .iter()
            .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
            .collect(),
    };
    bytemuck::pod_collect_to_vec(&bytes)
}

/// A storage buffer holding `data` stored as `dtype` (rounded to nearest for 16 bits).
pub fn upload_as(engine: &Engine, label: &str, data: &[f32], dtype: klgpu::Dtype) -> wgpu::Buffer {
    use klgpu::half::{bf16, f16};
    let made = match dtype {
        klgpu::Dtype::F32 => engine.create_buffer_init(label, data),
        klgpu::Dtype::F16 => engine.create_buffer_init(label, &stored_as::<f16>(data)),
        klgpu::Dtype::BF16 => engine.create_buffer_init(label, &stored_as::<bf16>(data)),
    };
    made.expect("upload benchmark data")
}

/// Times recorded GPU work with timestamp queries, or the wall clock of submit-and-wait.
pub struct Timer {
    queries: Option<(wgpu::QuerySet, wgpu::Buffer, wgpu::Buffer, f64)>,
}

impl Timer {
    pub fn new(engine: &Engine) -> Timer {
        let device = engine.device();
        let queries = device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
            .then(|| {
                let set = device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("bench.timestamps"),
                    ty: wgpu::QueryType::Timestamp,
                    count: 2,
                });
                let resolve = device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("bench.resolve"),
                    size: 16,
                    usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                });
                let read = device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("bench.read"),
                    size: 16,
                    usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                (
                    set,
                    resolve,
                    read,
                    engine.queue().get_timestamp_period() as f64,
                )
            });
        Timer { queries }
    }

    pub fn kind(&self) -> &'static str {
        if self.queries.is_some() {
            "gpu-timestamps"
        } else {
            "wall"
        }
    }

    /// Seconds the GPU spent on what `record` records.
    pub fn time(&self, engine: &Engine, record: &mut dyn FnMut(&mut wgpu::CommandEncoder)) -> f64 {
        let device = engine.device();
        let mut encoder = device.create_command_encoder(&Default::default());
        let stamp = |encoder: &mut wgpu::CommandEncoder, set: &wgpu::QuerySet, index: u32| {
            encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("bench.stamp"),
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: set,
                    beginning_of_pass_write_index: Some(index),
                    end_of_pass_write_index: None,
                }),
            });
        };
        let start = Instant::now();
        if let Some((set, _, _, _)) = &self.queries {
            stamp(&mut encoder, set, 0);
        }
        record(&mut encoder);
        if let Some((set, resolve, read, _)) = &self.queries {
            stamp(&mut encoder, set, 1);
            encoder.resolve_query_set(set, 0..2, resolve, 0);
            encoder.copy_buffer_to_buffer(resolve, 0, read, 0, 16);
        }
        engine.queue().submit([encoder.finish()]);
        let Some((_, _, read, period)) = &self.queries else {
            device
                .poll(wgpu::PollType::wait_indefinitely())
                .expect("poll");
            return start.elapsed().as_secs_f64();
        };
        read.slice(..).map_async(wgpu::MapMode::Read, |_| {});
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .expect("poll");
        let ticks: Vec<u64> = {
            let view = read.slice(..).get_mapped_range().expect("mapped");
            bytemuck::cast_slice(&view).to_vec()
        };
        read.unmap();
        ticks[1].saturating_sub(ticks[0]) as f64 * period * 1e-9
    }
}

/// GPU seconds per call of `record`, with `k` calls back to back in one submission (each with
/// its own workspace), so that the GPU stays busy long enough to keep its clocks up.
pub fn time_calls(
    timer: &Timer,
    engine: &Engine,
    pool: &mut Vec<klgpu::Workspace>,
    k: usize,
    record: &mut dyn FnMut(&mut wgpu::CommandEncoder, &mut klgpu::Workspace),
) -> f64 {
    while pool.len() < k {
        pool.push(engine.workspace());
    }
    let s = timer.time(engine, &mut |enc| {
        for ws in pool[..k].iter_mut() {
            record(enc, ws);
        }
    });
    for ws in pool[..k].iter_mut() {
        ws.check(engine).expect("valid input");
    }
    s / k as f64
}

/// Recorded GPU work, as the timing helpers take it.
pub type Record<'a> = &'a mut dyn FnMut(&mut wgpu::CommandEncoder, &mut klgpu::Workspace);

/// Calls of `record` per sample for samples of about 2 ms of back-to-back work.
pub fn calls_per_sample(
    timer: &Timer,
    engine: &Engine,
    pool: &mut Vec<klgpu::Workspace>,
    record: Record,
) -> usize {
    let single = (0..3)
        .map(|_| time_calls(timer, engine, pool, 1, record))
        .fold(f64::MAX, f64::min);
    ((2e-3 / single.max(1e-7)).ceil() as usize).clamp(1, 64)
}

/// Median GPU seconds per call of steady back-to-back work: samples of about 2 ms each.
pub fn measure_gpu(budget: Duration, timer: &Timer, engine: &Engine, record: Record) -> f64 {
    let mut pool = vec![];
    let k = calls_per_sample(timer, engine, &mut pool, record);
    median(budget, || time_calls(timer, engine, &mut pool, k, record))
}

/// Median GPU seconds per call of `a` and of `b`, their samples interleaved so that both see
/// the same machine state (a kernel and its roofline: on lavapipe, which shares the CPU with
/// everything else, separate blocks of samples can land in different states).
pub fn measure_gpu_pair(
    budget: Duration,
    timer: &Timer,
    engine: &Engine,
    a: Record,
    b: Record,
) -> (f64, f64) {
    let mut pool = vec![];
    let (ka, kb) = (
        calls_per_sample(timer, engine, &mut pool, a),
        calls_per_sample(timer, engine, &mut pool, b),
    );
    let (times_a, times_b) = samples(budget, || {
        (
            time_calls(timer, engine, &mut pool, ka, a),
            time_calls(timer, engine, &mut pool, kb, b),
        )
    });
    (middle(times_a), middle(times_b))
}

/// Median seconds of `run`, after a warm-up long enough for the GPU's clocks to ramp up (a
/// GPU idling at its lowest clock runs several times slower), repeated within a time budget.
pub fn median(budget: Duration, mut run: impl FnMut() -> f64) -> f64 {
    middle(samples(budget, || (run(), 0.0)).0)
}

/// Pairs of timings from `run`, after the warm-up, within the budget.
fn samples(budget: Duration, mut run: impl FnMut() -> (f64, f64)) -> (Vec<f64>, Vec<f64>) {
    let warm = Instant::now();
    let mut runs = 0;
    while runs < 2 || (warm.elapsed() < budget / 3 && runs < 200) {
        run();
        runs += 1;
    }
    let start = Instant::now();
    let mut times = vec![];
    while times.len() < 3 || (start.elapsed() < budget && times.len() < 50) {
        times.push(run());
    }
    times.into_iter().unzip()
}

/// The median.
fn middle(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}
