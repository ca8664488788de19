//! Fits logits z to a target distribution P by gradient descent, entirely on the GPU.
//!
//! Each step records into one command encoder: klgpu's fused loss-and-gradient pass
//! (KL(P‖softmax(z)) and ∂KL/∂z = softmax(z) − p), klgpu's cross-entropy H(P, softmax(z)) from
//! the same z, and this example's own update pass z ← z − lr·∂KL/∂z. Only the per-row losses
//! are read back. KL and cross-entropy fall together; their difference stays at H(P), which is
//! why minimizing either gives the same model.
//!
//! Run: `cargo run --release --example fit_logits`

use klgpu::wgpu::{self, util::DeviceExt};
use klgpu::{Engine, Input, Measure, Options};

const UPDATE: &str = r#"
@group(0) @binding(0) var<storage, read_write> z: array<f32>;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
override LR: f32 = 1.0;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    let i = id.x + id.y * 65535u * 256u;
    if (i < arrayLength(&z)) { z[i] = z[i] - LR * grad[i]; }
}
"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let engine = Engine::new()?;
    let info = engine.adapter_info();
    println!(
        "adapter: {} ({:?}, {:?})",
        info.name, info.backend, info.device_type
    );
    let (rows, cols) = (4usize, 1000usize);

    // A target with a few dominant entries and some exact zeros, from a fixed-seed LCG.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    let mut target = vec![0f32; rows * cols];
    for row in target.chunks_mut(cols) {
        for x in row.iter_mut() {
            let u = next();
            *x = if u < 0.1 { 0.0 } else { u.powi(8) };
        }
        let sum: f32 = row.iter().sum();
        row.iter_mut().for_each(|x| *x /= sum);
    }
    let log_target: Vec<f32> = target.iter().map(|&p| p.ln()).collect(); // −∞ where p = 0

    let device = engine.device();
    let storage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let init = |label, data: &[f32]| {
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: bytemuck::cast_slice(data),
            usage: storage,
        })
    };
    let p = init("target", &target);
    let log_p = init("log target", &log_target);
    let z = init("logits", &vec![0f32; rows * cols]);
    let grad = init("grad", &vec![0f32; rows * cols]);
    let kl_out = init("kl", &vec![0f32; rows]);
    let ce_out = init("ce", &vec![0f32; rows]);

    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("update"),
        source: wgpu::ShaderSource::Wgsl(UPDATE.into()),
    });
    // The softmax Hessian's largest eigenvalue is at most max q, which approaches max p: a
    // step of 1/max p stays stable.
    let lr = 1.0 / target.iter().fold(0f32, |m, &x| m.max(x)) as f64;
    let update = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some("update"),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: wgpu::PipelineCompilationOptions {
            constants: &[("LR", lr)],
            ..Default::default()
        },
        cache: None,
    });
    let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some("update"),
        layout: &update.get_bind_group_layout(0),
        entries: &[
            wgpu::BindGroupEntry {
                binding: 0,
                resource: z.as_entire_binding(),
            },
            wgpu::BindGroupEntry {
                binding: 1,
                resource: grad.as_entire_binding(),
            },
        ],
    });

    let entropy = engine.entropy_rows(&target, cols, Input::Probs)?;
    let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    let h_p = entropy.iter().sum::<f64>() / rows as f64;
    println!("H(P) = {h_p:.6} nats (mean over {rows} rows of {cols})\n");
    println!(
        "{:>4}  {:>12}  {:>12}  {:>12}",
        "step", "KL(P‖Q)", "H(P,Q)", "H(P,Q)−KL"
    );

    let (mut ws_loss, mut ws_ce) = (engine.workspace(), engine.workspace());
    for step in 0..=60 {
        let mut encoder = device.create_command_encoder(&Default::default());
        // Cross-entropy of the current z: P given as log-probabilities read as logits.
        engine.record_rows(
            &mut encoder,
            &mut ws_ce,
            Measure::CrossEntropy,
            log_p.slice(..),
            Some(z.slice(..)),
            cols,
            &Options::input(Input::Logits),
            ce_out.slice(..),
        )?;
        engine.record_kl_loss_and_grad(
            &mut encoder,
            &mut ws_loss,
            p.slice(..),
            z.slice(..),
            cols,
            kl_out.slice(..),
            grad.slice(..),
        )?;
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&update);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(((rows * cols) as u32).div_ceil(256), 1, 1);
        }
        engine.queue().submit([encoder.finish()]);
        ws_ce.check(&engine)?;
        ws_loss.check(&engine)?;
        if step % 6 == 0 {
            let kl = mean(&engine.read_f32(kl_out.slice(..))?);
            let ce = mean(&engine.read_f32(ce_out.slice(..))?);
            println!("{step:>4}  {kl:>12.6}  {ce:>12.6}  {:>12.6}", ce - kl);
        }
    }
    Ok(())
}
