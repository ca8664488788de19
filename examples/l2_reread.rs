//! A probe, not a klgpu path: does a logits kernel gain by re-reading each row from the L2
//! cache instead of from memory?
//!
//! klgpu's KL of logits reads its input twice: a log-sum-exp pass over every row, then the
//! term pass (docs/ARCHITECTURE.md). On a data-centre GPU that caps it near half the
//! adapter's bandwidth. If one workgroup took a row through both passes back to back, the
//! second read might come from L2 (50 MB on an H100/H200) — but only if the rows in flight fit
//! there. This probe times, on 4096 × 32,000 logits, a stripped-down KL of logits in three
//! forms and prints each one's bandwidth in input bytes:
//!
//! - `stream`: one pass summing both rows (what a one-pass kernel could reach);
//! - `two-dispatch`: the log-sum-exp pass over all rows, then the term pass (klgpu's form);
//! - `fused`: one dispatch, each workgroup taking rows through both passes, at several
//!   workgroup sizes and workgroup counts (fewer workgroups, fewer rows in flight).
//!
//! ```text
//! cargo run --release --example l2_reread -- [ROWS [COLS]]
//! ```

#[path = "../benches/support/mod.rs"]
mod support;
use support::{Rng, Timer};

use klgpu::Engine;
use wgpu::util::DeviceExt;

const SHADER: &str = r#"
struct Params { rows: u32, n4: u32, groups: u32, _pad: u32 }
@group(0) @binding(0) var<uniform> prm: Params;
@group(0) @binding(1) var<storage, read> zp: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> zq: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> stats: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const LOWEST: f32 = -3.0e38;
var<workgroup> red: array<vec4<f32>, WG_SIZE>;

// (m, s) with s = Σ exp(x − m), merged.
fn merge(a: vec2<f32>, b: vec2<f32>) -> vec2<f32> {
    let m = max(a.x, b.x);
    return vec2<f32>(m, a.y * exp(a.x - m) + b.y * exp(b.x - m));
}

fn fold4(a: vec2<f32>, v: vec4<f32>) -> vec2<f32> {
    let m = max(a.x, max(max(v.x, v.y), max(v.z, v.w)));
    let e = exp(v - vec4<f32>(m));
    return vec2<f32>(m, a.y * exp(a.x - m) + ((e.x + e.y) + (e.z + e.w)));
}

fn lse_pass(row: u32, lid: u32) -> vec4<f32> {
    var p = vec2<f32>(LOWEST, 0.0);
    var q = vec2<f32>(LOWEST, 0.0);
    let base = row * prm.n4;
    for (var i = lid; i < prm.n4; i = i + WG_SIZE) {
        p = fold4(p, zp[base + i]);
        q = fold4(q, zq[base + i]);
    }
    red[lid] = vec4<f32>(p, q);
    workgroupBarrier();
    for (var half = WG_SIZE / 2u; half > 0u; half = half / 2u) {
        if (lid < half) {
            let a = red[lid];
            let b = red[lid + half];
            red[lid] = vec4<f32>(merge(a.xy, b.xy), merge(a.zw, b.zw));
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn term_pass(row: u32, lid: u32, st: vec4<f32>) -> f32 {
    let lp = st.x + log(st.y);
    let lq = st.z + log(st.w);
    let base = row * prm.n4;
    var acc = 0.0;
    for (var i = lid; i < prm.n4; i = i + WG_SIZE) {
        let a = zp[base + i] - vec4<f32>(lp);
        let b = zq[base + i] - vec4<f32>(lq);
        let t = exp(a) * (a - b);
        acc = acc + ((t.x + t.y) + (t.z + t.w));
    }
    red[lid] = vec4<f32>(acc);
    workgroupBarrier();
    for (var half = WG_SIZE / 2u; half > 0u; half = half / 2u) {
        if (lid < half) { red[lid] = red[lid] + red[lid + half]; }
        workgroupBarrier();
    }
    let r = red[0].x;
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(WG_SIZE)
fn fused(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    for (var row = wg.x; row < prm.rows; row = row + prm.groups) {
        let st = lse_pass(row, lid);
        let kl = term_pass(row, lid, st);
        if (lid == 0u) { out[row] = kl; }
    }
}

@compute @workgroup_size(WG_SIZE)
fn pass_a(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    for (var row = wg.x; row < prm.rows; row = row + prm.groups) {
        let st = lse_pass(row, lid);
        if (lid == 0u) { stats[row] = st; }
    }
}

@compute @workgroup_size(WG_SIZE)
fn pass_b(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    for (var row = wg.x; row < prm.rows; row = row + prm.groups) {
        let kl = term_pass(row, lid, stats[row]);
        if (lid == 0u) { out[row] = kl; }
    }
}

@compute @workgroup_size(WG_SIZE)
fn stream(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    for (var row = wg.x; row < prm.rows; row = row + prm.groups) {
        let base = row * prm.n4;
        var acc = vec4<f32>(0.0);
        for (var i = lid; i < prm.n4; i = i + WG_SIZE) {
            acc = acc + zp[base + i] + zq[base + i];
        }
        red[lid] = acc;
        workgroupBarrier();
        for (var half = WG_SIZE / 2u; half > 0u; half = half / 2u) {
            if (lid < half) { red[lid] = red[lid] + red[lid + half]; }
            workgroupBarrier();
        }
        if (lid == 0u) { out[row] = dot(red[0], vec4<f32>(1.0)); }
        workgroupBarrier();
    }
}
"#;

struct Probe<'a> {
    engine: &'a Engine,
    timer: Timer,
    zp: wgpu::Buffer,
    zq: wgpu::Buffer,
    stats: wgpu::Buffer,
    out: wgpu::Buffer,
    rows: u32,
    n4: u32,
}

impl Probe<'_> {
    /// One dispatch sequence: (entry point, workgroup size, workgroups) in order.
    fn record(
        &self,
        steps: &[(&str, u32, u32)],
    ) -> Vec<(wgpu::ComputePipeline, wgpu::BindGroup, u32)> {
        let device = self.engine.device();
        steps
            .iter()
            .map(|&(entry, wg, groups)| {
                let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some("l2_reread"),
                    source: wgpu::ShaderSource::Wgsl(
                        SHADER.replace("WG_SIZE", &format!("{wg}u")).into(),
                    ),
                });
                let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(entry),
                    layout: None,
                    module: &module,
                    entry_point: Some(entry),
                    compilation_options: Default::default(),
                    cache: None,
                });
                let params = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("l2_reread.params"),
                    contents: bytemuck::cast_slice(&[self.rows, self.n4, groups, 0]),
                    usage: wgpu::BufferUsages::UNIFORM,
                });
                let layout = pipeline.get_bind_group_layout(0);
                let mut entries = vec![wgpu::BindGroupEntry {
                    binding: 0,
                    resource: params.as_entire_binding(),
                }];
                let used: &[(u32, &wgpu::Buffer)] = match entry {
                    "fused" => &[(1, &self.zp), (2, &self.zq), (4, &self.out)],
                    "pass_a" => &[(1, &self.zp), (2, &self.zq), (3, &self.stats)],
                    "pass_b" => &[
                        (1, &self.zp),
                        (2, &self.zq),
                        (3, &self.stats),
                        (4, &self.out),
                    ],
                    _ => &[(1, &self.zp), (2, &self.zq), (4, &self.out)],
                };
                for &(binding, buffer) in used {
                    entries.push(wgpu::BindGroupEntry {
                        binding,
                        resource: buffer.as_entire_binding(),
                    });
                }
                let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("l2_reread.bind"),
                    layout: &layout,
                    entries: &entries,
                });
                (pipeline, bind, groups)
            })
            .collect()
    }

    /// Best GPU seconds per run of `steps` over a few samples of about 2 ms each.
    fn time(&self, steps: &[(&str, u32, u32)]) -> f64 {
        let recorded = self.record(steps);
        let run = |k: usize| {
            self.timer.time(self.engine, &mut |enc| {
                for _ in 0..k {
                    for (pipeline, bind, groups) in &recorded {
                        let mut pass = enc.begin_compute_pass(&Default::default());
                        pass.set_pipeline(pipeline);
                        pass.set_bind_group(0, bind, &[]);
                        pass.dispatch_workgroups(*groups, 1, 1);
                    }
                }
            }) / k as f64
        };
        let single = run(1);
        let k = ((2e-3 / single.max(1e-7)).ceil() as usize).clamp(1, 64);
        (0..5).map(|_| run(k)).fold(f64::MAX, f64::min)
    }

    fn read_out(&self) -> Vec<f32> {
        let device = self.engine.device();
        let size = self.rows as u64 * 4;
        let read = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("l2_reread.read"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&self.out, 0, &read, 0, size);
        self.engine.queue().submit([enc.finish()]);
        read.slice(..).map_async(wgpu::MapMode::Read, |_| {});
        device
            .poll(wgpu::PollType::wait_indefinitely())
            .expect("poll");
        let view = read.slice(..).get_mapped_range().expect("mapped");
        bytemuck::cast_slice(&view).to_vec()
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let rows: u32 = args.next().map(|v| v.parse()).transpose()?.unwrap_or(4096);
    let cols: u32 = args
        .next()
        .map(|v| v.parse())
        .transpose()?
        .unwrap_or(32_000);
    if !cols.is_multiple_of(4) || rows == 0 {
        return Err("ROWS must be positive and COLS a multiple of 4".into());
    }
    let engine = Engine::new()?;
    let limits = engine.device().limits();
    println!(
        "adapter: {}; {rows} x {cols} logits; max workgroup size {}",
        engine.adapter_info().name,
        limits.max_compute_invocations_per_workgroup
    );
    let mut rng = Rng(7);
    let mut logits = || -> Vec<f32> {
        (0..rows as usize * cols as usize)
            .map(|_| 4.0 * rng.next_f32() - 2.0)
            .collect()
    };
    let (p, q) = (logits(), logits());
    let device = engine.device();
    let storage = |label, data: &[f32]| {
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: bytemuck::cast_slice(data),
            usage: wgpu::BufferUsages::STORAGE,
        })
    };
    let probe = Probe {
        engine: &engine,
        timer: Timer::new(&engine),
        zp: storage("zp", &p),
        zq: storage("zq", &q),
        stats: storage("stats", &vec![0.0; rows as usize * 4]),
        out: device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("out"),
            size: rows as u64 * 4,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        }),
        rows,
        n4: cols / 4,
    };
    // The f64 KL of a few rows, to check that every form computes the same thing.
    let exact = |row: usize| -> f64 {
        let r = |z: &[f32]| {
            z[row * cols as usize..][..cols as usize]
                .iter()
                .map(|&x| x as f64)
                .collect::<Vec<_>>()
        };
        let (a, b) = (r(&p), r(&q));
        let lse = |z: &[f64]| {
            let m = z.iter().cloned().fold(f64::MIN, f64::max);
            m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
        };
        let (la, lb) = (lse(&a), lse(&b));
        a.iter()
            .zip(&b)
            .map(|(x, y)| (x - la).exp() * ((x - la) - (y - lb)))
            .sum()
    };
    let checked: Vec<f64> = [0, rows as usize / 2, rows as usize - 1]
        .iter()
        .map(|&r| exact(r))
        .collect();
    let gb = 8.0 * rows as f64 * cols as f64 / 1e9;
    let report = |name: String, steps: &[(&str, u32, u32)]| {
        let t = probe.time(steps);
        let out = probe.read_out();
        let worst = [0, rows as usize / 2, rows as usize - 1]
            .iter()
            .zip(&checked)
            .map(|(&r, &e)| ((out[r] as f64 - e) / e).abs())
            .fold(0.0, f64::max);
        println!(
            "{name:34} {:8.3} ms {:8.1} GB/s   rel err {worst:.1e}",
            t * 1e3,
            gb / t
        );
    };
    let max_wg = limits.max_compute_invocations_per_workgroup;
    let sizes: Vec<u32> = [256, 512, 1024]
        .into_iter()
        .filter(|&w| w <= max_wg)
        .collect();
    for &wg in &sizes {
        report(format!("stream wg {wg}"), &[("stream", wg, rows)]);
    }
    for &wg in &sizes {
        report(
            format!("two-dispatch wg {wg}"),
            &[("pass_a", wg, rows), ("pass_b", wg, rows)],
        );
    }
    for &wg in &sizes {
        for groups in [rows, 1056, 528, 264, 132] {
            if groups <= rows {
                report(
                    format!("fused wg {wg} groups {groups}"),
                    &[("fused", wg, groups)],
                );
            }
        }
    }
    Ok(())
}
