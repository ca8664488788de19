//! [`Engine`]: the adapter, device, compiled pipelines and scratch buffers, created once and
//! reused by every call.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use crate::cpu;
use crate::error::{Error, Result};
use crate::kernels::{self, InputCode, Kernels, Term};
use crate::launch::{Gpu, HostData, Job, OnePass, Prepass, Readback, ScratchPool, Stray, Upload};
use crate::plan::{Plan, PlanLimits};
use crate::types::{Element, Input, Measure, Options, RowResults, widened};

/// Knobs of the dispatch planner. The defaults were measured on an H200 and lavapipe
/// (BENCHMARKS.md); other adapters may prefer others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// Columns each invocation aims to take: a row gets the fewest power-of-two lanes (up to a
    /// workgroup) that leave each at most this many (a dispatch of a few short rows widens them
    /// to fill a small workgroup), and a longer row is split into chunks only as far as each
    /// invocation keeps at least this many. Higher: fewer lanes per row and fewer chunks.
    /// `None` (the default) picks one for the adapter
    /// ([`PlanLimits::for_adapter`](crate::plan::PlanLimits::for_adapter)).
    pub min_iterations: Option<u32>,
    /// Workgroups to aim for in one dispatch. `None` (the default) picks a number for the
    /// adapter: 4096 on GPUs, a few per host thread on CPU adapters such as lavapipe.
    pub target_workgroups: Option<u32>,
    /// Whether each invocation walks a contiguous block of its row segment (`Some(true)`)
    /// or every n-th element from its own offset (`Some(false)`). `None` (the default) picks
    /// for the adapter: interleaved on GPUs, whose warps then read coalesced memory; blocked on
    /// CPU adapters, whose SIMD lanes then each read a stream.
    pub blocked_lanes: Option<bool>,
    /// Window cap (bytes per input) for two-pass jobs (logits, normalization). Windows small
    /// enough for the second pass to re-read them from L2 lost on an H200 (the dispatch gaps
    /// cost more than the re-read), so by default there is no extra cap. Caps below 4 MiB are
    /// taken as 4 MiB: every window of the caller's buffers takes a few KB of parameters in
    /// one buffer, which smaller windows made outgrow the device's `max_buffer_size`, and
    /// KL and JS of logits lose a little precision for each window a row is split across.
    pub two_pass_window_bytes: u64,
    /// Whether a vec4 of probabilities whose values are all positive normal numbers, in every
    /// lane of its subgroup, skips validation, subnormal splits and zero cases: the same
    /// formulas with less work (KL, cross-entropy and entropy, also of rows the kernel
    /// normalizes: KL's one pass, [`Tuning::one_pass_normalized_kl`], and its terms pass, and
    /// cross-entropy's and entropy's one pass; JS gained nothing). Needs
    /// subgroups; ignored without them. `None` (the default) is on for GPUs (KL over 10^8 on
    /// an H200 1.33× faster, rows of 10 1.16×; `roof_ratios --quick 0|1`) and off for CPU
    /// adapters, which run both sides of a branch.
    pub quick_vec4: Option<bool>,
    /// Whether a dispatch whose rows all fit in fewer than 256 invocations runs in a workgroup
    /// just large enough for them, at least the adapter's subgroup size, with the lanes widened
    /// to fill one subgroup-sized workgroup
    /// ([`PlanLimits::small_workgroup`](crate::plan::PlanLimits::small_workgroup)). `None` (the
    /// default) is on for CPU adapters, which run every invocation of a workgroup (a KL call
    /// over 1000 elements of GPU data on lavapipe 1.36–1.38× faster, over 8 to 8192 elements
    /// 1.13–1.30×, over 10^4 about 1.5×), and off for GPUs, which skip idle warps.
    pub small_workgroups: Option<bool>,
    /// Most threads that copy one window of host data into the GPU's staging memory. `None`
    /// (the default) picks for the adapter
    /// ([`plan::default_upload_threads`](crate::plan::default_upload_threads)): one on CPU
    /// adapters, one per core up to eight on GPUs (not measured on a GPU yet:
    /// `examples/host_windows --threads 1,8`).
    pub upload_threads: Option<u32>,
    /// Whether host data is written straight into the kernels' input buffers, mapped, instead
    /// of into staging buffers that the GPU then copies. Only where the device has
    /// `Features::MAPPABLE_PRIMARY_BUFFERS` (an engine that creates its device asks for it
    /// when this is on). `None` (the default) is on for CPU and integrated adapters, whose
    /// memory is the host's, so the copy would only copy host memory; off for discrete GPUs,
    /// which would read the inputs across the bus.
    pub direct_uploads: Option<bool>,
    /// Whether KL of logits first runs a one-pass kernel that finishes every row it can prove
    /// exact enough (a bound on its own rounding, per row), leaving the terms pass only the
    /// others (rows of unrelated models, whose sums cancel too far), mostly with their
    /// log-sum-exps from the same read, and the log-sum-exp pass too only the few it declines
    /// (invalid input, q = 0 against p > 0); masked vocabularies (−∞ or −f32::MAX logits)
    /// are finished like any other rows (shaders/kernels_rel.wgsl). Off by default: on
    /// lavapipe the one pass costs more than both passes (64 × 32,000 logits of two close
    /// models at 20 % of their roof against 23–24.5 %; of unrelated ones 15–16 % against
    /// 21–24 %, thirty-second session), and no GPU has timed it yet
    /// (`roof_ratios --one-pass-kl 0|1 logits,close,long`). Its state takes 16 KiB of
    /// workgroup memory (wgpu's default limit; the other kernels 12 KiB): an engine with it on
    /// refuses a device with less.
    pub one_pass_kl: bool,
    /// Whether KL of probabilities the kernel normalizes ([`Options::normalize`]) first runs a
    /// one-pass kernel that finishes every row it can prove exact enough: rows whose sums are
    /// close enough for their KL (ratio of the sums ρ with ρ − 1 − ln ρ at most half the
    /// value: distributions rounded to f16 or bf16, or a few percent short), read once, with
    /// the arithmetic of plain KL. It writes the others' sums, so they take only the terms
    /// pass after it, not the sums pass, and pay the one pass's arithmetic on top
    /// (shaders/kernels_norm.wgsl). On by default: on lavapipe (4000 × 1000) rows it
    /// finishes run 1.9× faster and rows it leaves (sums 3.7 times apart) about 15 % slower
    /// (`roof_ratios --one-pass-normalized-kl 0|1 KLnorm,KLnormS`); no GPU has timed it yet.
    pub one_pass_normalized_kl: bool,
    /// The same for JS of probabilities the kernel normalizes, for rows whose sums are close
    /// enough for their JS. JS is expanded in the sums' relative difference ε, and a row is
    /// kept where the truncation bound, about ε²·JS/28 + |ε|³/8, is below 2^-22 of the value:
    /// distributions rounded to f16 or bf16 (|ε| up to ~7e-5) at any JS, |ε| = 1e-3 where JS
    /// is above 6.2e-4, none with |ε| above 2.6e-3, so no rows a few percent short. It reads
    /// them once, with the arithmetic of plain JS (shaders/kernels_norm.wgsl). On by default:
    /// on lavapipe (4000 × 1000) rows it finishes run 1.6× faster and rows it leaves (sums 3.7
    /// times apart) about 1.4× slower (`roof_ratios --one-pass-normalized-js 0|1
    /// JSnorm,JSnormS`); on a GPU, where a read costs more than the arithmetic, rows it leaves
    /// read the data twice, as the two passes do. No GPU has timed it yet.
    pub one_pass_normalized_js: bool,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            min_iterations: None,
            target_workgroups: None,
            blocked_lanes: None,
            two_pass_window_bytes: u64::MAX,
            quick_vec4: None,
            small_workgroups: None,
            upload_threads: None,
            direct_uploads: None,
            one_pass_kl: false,
            one_pass_normalized_kl: true,
            one_pass_normalized_js: true,
        }
    }
}

/// How an [`Engine`] is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineOptions {
    /// Use subgroup operations in the reductions where the adapter has
    /// `Features::SUBGROUP` (default `true`); `false` forces the shared-memory path.
    pub subgroups: bool,
    /// Most bytes of one input uploaded and bound at once from host memory. Larger inputs
    /// stream through windows of this size, so memory stays bounded: a call over host data
    /// keeps two windows per input on the device and (unless [`Tuning::direct_uploads`]) two
    /// staging buffers per input in host memory, each of this size, for the next call. `None`
    /// (the default) picks one for the adapter
    /// ([`plan::default_window_bytes`](crate::plan::default_window_bytes): 32 MiB on GPUs,
    /// 4 MiB on CPU adapters). Far smaller windows cost KL and JS of logits precision on rows
    /// they split: each window adds a rounding of the row's log-sum-exp (README, "Precision").
    pub window_bytes: Option<u64>,
    /// Planner knobs.
    pub tuning: Tuning,
    /// Whether calls take turns on the device. `None` (the default): only on OpenGL, whose one
    /// context wgpu locks with a timeout (six seconds in wgpu-hal 30) (see the README). `Some(true)` makes them
    /// take turns on any backend, one call on the device at a time: the tests check the turns
    /// so on every adapter (a GL run of the suite takes most of an hour on a fresh machine).
    /// `Some(false)`: never (on OpenGL, calls can then meet that timeout).
    pub take_turns: Option<bool>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            subgroups: true,
            window_bytes: None,
            tuning: Tuning::default(),
            take_turns: None,
        }
    }
}

/// Computes KL divergence, cross-entropy, entropy and Jensen–Shannon divergence on a GPU.
///
/// Create one and reuse it: it owns the device and the compiled pipelines. It is
/// `Send + Sync`; concurrent calls from several threads are safe (on OpenGL they take turns:
/// wgpu's GL backend panics when threads contend for its one context).
///
/// ```no_run
/// let engine = klgpu::Engine::new()?;
/// println!("running on {}", engine.adapter_info().name);
/// let kl = engine.kl_divergence(&[0.5, 0.5], &[0.9, 0.1])?;
/// assert!((kl - 0.5 * (0.5f64 / 0.9).ln() - 0.5 * 5f64.ln()).abs() < 1e-6);
/// # Ok::<(), klgpu::Error>(())
/// ```
#[derive(Clone)]
pub struct Engine {
    gpu: Arc<Gpu>,
    info: wgpu::AdapterInfo,
    /// Windows of host uploads: bounded by the binding size and the memory budget.
    limits: PlanLimits,
    /// Windows bound straight from the caller's buffers: bounded by the binding size alone
    /// (less one alignment, since a window's binding starts up to 255 bytes early).
    device_limits: PlanLimits,
    /// Window cap of jobs with a pre-pass, so the main pass reads the window from L2.
    two_pass_window_elems: u64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .field("limits", &self.limits)
            .finish()
    }
}

/// Preference order of adapter types: hardware first, software last.
fn type_rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

/// Backends with full compute support before OpenGL.
fn backend_rank(b: wgpu::Backend) -> u8 {
    match b {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        wgpu::Backend::Gl => 1,
        _ => 2,
    }
}

/// What a device lacks for klgpu's kernels, one line per limit: eight storage buffers and a
/// uniform buffer with a dynamic offset per dispatch, workgroups of 256 invocations with a
/// state each in workgroup memory (48 bytes, `Lse`; 64, `Rel`, with `one_pass_kl`), and
/// bindings of at least 64 KiB (windows are planned within them). A caller's device made with
/// lower limits (wgpu's downlevel or WebGL2 defaults) is refused with this list; left to
/// wgpu, it panicked in its default error handler.
pub(crate) fn unmet_limits(have: &wgpu::Limits, one_pass_kl: bool) -> Vec<String> {
    let wg = crate::plan::WORKGROUP_SIZE as u64;
    let without_rel = crate::kernels::STATE_BYTES_WITHOUT_REL * wg;
    let (state_bytes, state_note) = if one_pass_kl {
        (
            crate::kernels::PARTIAL_BYTES * wg,
            format!(" (Tuning::one_pass_kl's state; without it, {without_rel})"),
        )
    } else {
        (without_rel, String::new())
    };
    let needs = [
        (
            "max_storage_buffers_per_shader_stage",
            have.max_storage_buffers_per_shader_stage as u64,
            8,
            "",
        ),
        (
            "max_uniform_buffers_per_shader_stage",
            have.max_uniform_buffers_per_shader_stage as u64,
            1,
            "",
        ),
        (
            "max_dynamic_uniform_buffers_per_pipeline_layout",
            have.max_dynamic_uniform_buffers_per_pipeline_layout as u64,
            1,
            "",
        ),
        ("max_bind_groups", have.max_bind_groups as u64, 1, ""),
        (
            "max_compute_invocations_per_workgroup",
            have.max_compute_invocations_per_workgroup as u64,
            wg,
            "",
        ),
        (
            "max_compute_workgroup_size_x",
            have.max_compute_workgroup_size_x as u64,
            wg,
            "",
        ),
        (
            "max_compute_workgroup_storage_size",
            have.max_compute_workgroup_storage_size as u64,
            state_bytes,
            state_note.as_str(),
        ),
        (
            "max_compute_workgroups_per_dimension",
            have.max_compute_workgroups_per_dimension as u64,
            1,
            "",
        ),
        (
            "max_storage_buffer_binding_size",
            have.max_storage_buffer_binding_size,
            1 << 16,
            "",
        ),
        ("max_buffer_size", have.max_buffer_size, 1 << 16, ""),
    ];
    needs
        .iter()
        .filter(|(_, have, need, _)| have < need)
        .map(|(name, have, need, note)| format!("{name} is {have}, klgpu needs {need}{note}"))
        .collect()
}

/// Whether host data should go straight into mapped input buffers ([`Tuning::direct_uploads`]).
fn wants_direct_uploads(info: &wgpu::AdapterInfo, tuning: &Tuning) -> bool {
    tuning.direct_uploads.unwrap_or(matches!(
        info.device_type,
        wgpu::DeviceType::Cpu | wgpu::DeviceType::IntegratedGpu
    ))
}

/// Index of the adapter klgpu picks among `infos`: the best by type and backend of those
/// whose name contains `wanted` (`WGPU_ADAPTER_NAME`, case-insensitive), or of all without
/// it. An empty name is [`Error::InvalidArgument`], as an empty `WGPU_BACKEND` is: it would
/// match every adapter, and whoever set it meant one.
pub fn pick_adapter(infos: &[wgpu::AdapterInfo], wanted: Option<&str>) -> Result<usize> {
    let lower = wanted.map(str::to_lowercase);
    if lower.as_deref().is_some_and(|name| name.trim().is_empty()) {
        return Err(Error::InvalidArgument(format!(
            "WGPU_ADAPTER_NAME is set but names no adapter: unset it, or give part of one's \
             name (wgpu sees: {})",
            describe(infos)
        )));
    }
    let named = |i: &usize| {
        lower
            .as_deref()
            .is_none_or(|name| infos[*i].name.to_lowercase().contains(name))
    };
    (0..infos.len())
        .filter(named)
        .min_by_key(|&i| {
            (
                type_rank(infos[i].device_type),
                backend_rank(infos[i].backend),
                i,
            )
        })
        .ok_or_else(|| match wanted {
            Some(name) => Error::AdapterNotFound {
                wanted: name.to_string(),
                available: describe(infos),
            },
            None => Error::NoAdapter {
                details: "wgpu enumerated no adapters".into(),
            },
        })
}

fn describe(infos: &[wgpu::AdapterInfo]) -> String {
    if infos.is_empty() {
        return "none".into();
    }
    infos
        .iter()
        .map(|i| format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The backend names `WGPU_BACKEND` takes, for messages.
const KNOWN_BACKENDS: &str =
    "wgpu knows vulkan, metal, dx12 and gl (and webgpu, noop), comma-separated";

/// What `WGPU_BACKEND` asked for, when it is set: backends where no adapter was found.
fn backend_hint() -> String {
    match std::env::var("WGPU_BACKEND") {
        Ok(v) => format!(" (WGPU_BACKEND={v:?} chose them; {KNOWN_BACKENDS})"),
        Err(_) => String::new(),
    }
}

/// A `WGPU_BACKEND` with names wgpu does not know, or none: wgpu skips them, searching fewer
/// backends or none, and "no adapter" (or, from the command line, a quiet fall back to the
/// CPU) would blame the drivers for a typo. An error, as an unmatched `WGPU_ADAPTER_NAME` is.
fn backend_env_error() -> Option<String> {
    let value = std::env::var("WGPU_BACKEND").ok()?;
    let unknown: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty() && wgpu::Backends::from_comma_list(name).is_empty())
        .map(|name| format!("{name:?}"))
        .collect();
    let problem = if !unknown.is_empty() {
        format!("names {}, which wgpu does not know", unknown.join(", "))
    } else if wgpu::Backends::from_comma_list(&value).is_empty() {
        "names no backend".to_string()
    } else {
        return None;
    };
    Some(format!(
        "WGPU_BACKEND={value:?} {problem} ({KNOWN_BACKENDS})"
    ))
}

/// The adapters every engine klgpu opens comes from, enumerated once per process (when the
/// first engine opens, reading `WGPU_BACKEND` then), with the backends searched.
///
/// One instance: wgpu's resources are handles into their instance's tables, and with an
/// instance per engine a buffer of one engine passed to another was looked up in the wrong
/// table (a panic inside wgpu or, worse, another buffer read silently); within one instance
/// wgpu sees the device mismatch and the call returns its validation error. Except on
/// OpenGL ([`gl_adapter_of_its_own`]).
struct SharedAdapters {
    backends: wgpu::Backends,
    /// What is wrong with `WGPU_BACKEND`, read with it ([`backend_env_error`]).
    backend_error: Option<String>,
    adapters: Vec<wgpu::Adapter>,
    /// Kept for the process's lifetime, like the adapters it made.
    _instance: wgpu::Instance,
}

fn shared_adapters() -> &'static SharedAdapters {
    static SHARED: OnceLock<SharedAdapters> = OnceLock::new();
    SHARED.get_or_init(|| {
        let descriptor = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        let backends = descriptor.backends;
        let instance = wgpu::Instance::new(descriptor);
        // Native enumeration is immediate; the future only wraps it.
        let adapters = pollster::block_on(instance.enumerate_adapters(backends));
        SharedAdapters {
            backends,
            backend_error: backend_env_error(),
            adapters,
            _instance: instance,
        }
    })
}

/// An OpenGL adapter like `info` from an instance of its own. wgpu's GL backend has one
/// context per instance behind a lock with a timeout (six seconds in wgpu-hal 30) (a panic after it): devices
/// of one shared instance would contend for it across engines (opening a device, dropping
/// buffers) outside any engine's turns, and each enumeration wraps it in a lock of its own,
/// so devices of two enumerations made it current on two threads at once (EGL
/// `BadAccess`). An instance per GL engine keeps engines apart, as before the shared
/// instance; the price is that there a buffer passed to the wrong engine is not detected.
async fn gl_adapter_of_its_own(info: &wgpu::AdapterInfo) -> Result<wgpu::Adapter> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        backends: wgpu::Backends::GL,
        ..wgpu::InstanceDescriptor::new_without_display_handle_from_env()
    });
    let adapters = instance.enumerate_adapters(wgpu::Backends::GL).await;
    adapters
        .into_iter()
        .find(|a| a.get_info().name == info.name && a.get_info().device_type == info.device_type)
        .ok_or_else(|| Error::NoAdapter {
            details: format!("the OpenGL adapter {} did not enumerate again", info.name),
        })
}

/// The adapters wgpu sees (honouring `WGPU_BACKEND`), and the index klgpu would pick.
pub fn list_adapters() -> (Vec<wgpu::AdapterInfo>, Result<usize>) {
    let infos: Vec<_> = shared_adapters()
        .adapters
        .iter()
        .map(|a| a.get_info())
        .collect();
    let wanted = std::env::var("WGPU_ADAPTER_NAME").ok();
    let pick = match &shared_adapters().backend_error {
        Some(e) => Err(Error::InvalidArgument(e.clone())),
        None => pick_adapter(&infos, wanted.as_deref()),
    };
    (infos, pick)
}

impl Engine {
    /// Opens the best adapter present (see [`Engine::with_options`]). Blocking.
    pub fn new() -> Result<Engine> {
        pollster::block_on(Engine::new_async())
    }

    /// Async twin of [`Engine::new`].
    pub async fn new_async() -> Result<Engine> {
        Engine::with_options_async(EngineOptions::default()).await
    }

    /// Opens an adapter: the one `WGPU_ADAPTER_NAME` names if set, else hardware GPUs first
    /// (discrete, integrated, virtual), then anything else, then software adapters such as
    /// lavapipe. `WGPU_BACKEND` restricts the backends searched (read once, when the first
    /// engine opens: engines share one wgpu instance, so that a buffer passed to the wrong
    /// engine is an error, not another engine's buffer; on OpenGL each keeps its own); one
    /// with a name wgpu does not know, or none, is [`Error::InvalidArgument`] (wgpu would skip
    /// it). The device is requested with the adapter's own limits. Blocking.
    pub fn with_options(options: EngineOptions) -> Result<Engine> {
        pollster::block_on(Engine::with_options_async(options))
    }

    /// Async twin of [`Engine::with_options`].
    pub async fn with_options_async(options: EngineOptions) -> Result<Engine> {
        let SharedAdapters {
            backends,
            adapters,
            backend_error,
            ..
        } = shared_adapters();
        if let Some(e) = backend_error {
            return Err(Error::InvalidArgument(e.clone()));
        }
        let infos: Vec<_> = adapters.iter().map(|a| a.get_info()).collect();
        if infos.is_empty() {
            return Err(Error::NoAdapter {
                details: format!("wgpu found none on backends {backends:?}{}", backend_hint()),
            });
        }
        let wanted = std::env::var("WGPU_ADAPTER_NAME").ok();
        let picked = &adapters[pick_adapter(&infos, wanted.as_deref())?];
        let own_gl;
        let adapter = if picked.get_info().backend == wgpu::Backend::Gl {
            own_gl = gl_adapter_of_its_own(&picked.get_info()).await?;
            &own_gl
        } else {
            picked
        };
        let mut features = wgpu::Features::empty();
        if options.subgroups && adapter.features().contains(wgpu::Features::SUBGROUP) {
            features |= wgpu::Features::SUBGROUP;
        }
        features |= adapter.features() & wgpu::Features::TIMESTAMP_QUERY;
        if wants_direct_uploads(&adapter.get_info(), &options.tuning) {
            features |= adapter.features() & wgpu::Features::MAPPABLE_PRIMARY_BUFFERS;
        }
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("klgpu.device"),
                required_features: features,
                required_limits: adapter.limits(),
                ..Default::default()
            })
            .await
            .map_err(|e| {
                Error::Gpu(format!(
                    "requesting a device from {}: {e}",
                    adapter.get_info().name
                ))
            })?;
        let engine = Engine::build(device, queue, adapter.get_info(), &options)?;
        // Our own device (a caller's keeps its own handlers): device loss becomes a stored
        // fault that every later call returns; an error nobody scoped (other work on
        // `device()`) is returned by the next call, not wgpu's default panic.
        let lost = engine.gpu.fault.clone();
        engine
            .gpu
            .device
            .set_device_lost_callback(move |reason, message| {
                let mut slot = lost.lock().unwrap_or_else(|p| p.into_inner());
                slot.get_or_insert_with(|| {
                    // A destroyed device's message is empty.
                    let message = if message.is_empty() {
                        String::new()
                    } else {
                        format!(": {message}")
                    };
                    format!("the GPU device was lost ({reason:?}){message}")
                });
            });
        let stray = engine.gpu.stray.clone();
        engine
            .gpu
            .device
            .on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                let mut slot = stray.lock().unwrap_or_else(|p| p.into_inner());
                slot.get_or_insert_with(|| {
                    Stray::new(format!(
                        "an error of other work on the engine's device, outside klgpu's own \
                         calls (the app's own work, or its submit of a recording from \
                         record_rows; reported once, by the klgpu call that saw it first): {e}"
                    ))
                });
            }));
        Ok(engine)
    }

    /// Uses a device and queue the caller already has. Pipelines are compiled on first use;
    /// subgroup operations are used if the device was created with `Features::SUBGROUP`.
    ///
    /// Give the engine only buffers and encoders of this device. A buffer of another device
    /// of the same `wgpu::Instance` is an error; one of another instance (an engine from
    /// [`Engine::new`] has klgpu's) cannot be told apart by wgpu: its number is looked up in
    /// this instance's tables, and may name another buffer, read silently. The queue must be
    /// the device's own: wgpu has no way to ask, and another device's queue fails the first
    /// call in that device's uncaptured-error handler (wgpu's default one panics).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] listing the limits that fall short when the device was made
    /// with less than WebGPU's defaults where the kernels need them (eight storage buffers per
    /// stage, workgroups of 256, 12 KiB of workgroup memory, 16 KiB with
    /// [`Tuning::one_pass_kl`]): wgpu's `Limits::downlevel_defaults()` allow four storage
    /// buffers and 16352 bytes.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Result<Engine> {
        Engine::from_device_with_options(device, queue, EngineOptions::default())
    }

    /// [`Engine::from_device`] with options.
    pub fn from_device_with_options(
        device: wgpu::Device,
        queue: wgpu::Queue,
        options: EngineOptions,
    ) -> Result<Engine> {
        let info = device.adapter_info();
        Engine::build(device, queue, info, &options)
    }

    fn build(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: wgpu::AdapterInfo,
        options: &EngineOptions,
    ) -> Result<Engine> {
        let hw = device.limits();
        let unmet = unmet_limits(&hw, options.tuning.one_pass_kl);
        if !unmet.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "the device's limits are below what klgpu's kernels need: {}; request the \
                 adapter's own limits (adapter.limits()) or wgpu::Limits::default()",
                unmet.join("; ")
            )));
        }
        let cpu_adapter = info.device_type == wgpu::DeviceType::Cpu;
        let binding = hw.max_storage_buffer_binding_size.min(hw.max_buffer_size);
        let window_bytes = options
            .window_bytes
            .unwrap_or_else(|| crate::plan::default_window_bytes(cpu_adapter));
        let limits = PlanLimits::from_bytes(
            binding,
            window_bytes,
            hw.max_compute_workgroups_per_dimension,
        );
        let device_limits = PlanLimits::from_bytes(
            binding.saturating_sub(256).min(4 << 30),
            u64::MAX,
            hw.max_compute_workgroups_per_dimension,
        );
        let host_threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let subgroup_width = info.subgroup_min_size.clamp(1, crate::plan::WORKGROUP_SIZE);
        let small_workgroup = if options.tuning.small_workgroups.unwrap_or(cpu_adapter) {
            subgroup_width
        } else {
            0
        };
        let tune = |l: PlanLimits| {
            let l = l.for_adapter(cpu_adapter, host_threads);
            PlanLimits {
                min_iterations: options.tuning.min_iterations.unwrap_or(l.min_iterations),
                target_workgroups: options
                    .tuning
                    .target_workgroups
                    .unwrap_or(l.target_workgroups),
                blocked_lanes: options.tuning.blocked_lanes.unwrap_or(l.blocked_lanes),
                small_workgroup,
                ..l
            }
        };
        let (limits, device_limits) = (tune(limits), tune(device_limits));
        let subgroups = options.subgroups && device.features().contains(wgpu::Features::SUBGROUP);
        // In an error scope: a caller's device keeps wgpu's default handler, which panics.
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let kernels = Kernels::new(
            &device,
            options.tuning.quick_vec4.unwrap_or(!cpu_adapter) && subgroups,
        );
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Gpu(format!(
                "creating klgpu's bind group layout: {e}"
            )));
        }
        let upload = if wants_direct_uploads(&info, &options.tuning)
            && device
                .features()
                .contains(wgpu::Features::MAPPABLE_PRIMARY_BUFFERS)
        {
            Upload::Direct
        } else {
            Upload::Staged
        };
        let fault: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
        let gpu = Gpu {
            device,
            queue,
            kernels,
            subgroups: AtomicBool::new(subgroups && subgroup_width > 1),
            subgroup_width,
            storage_align: hw.min_storage_buffer_offset_alignment as u64,
            fault,
            stray: Arc::default(),
            scratch: ScratchPool::default(),
            serial: options
                .take_turns
                .unwrap_or(info.backend == wgpu::Backend::Gl)
                .then(Arc::default),
            upload_threads: options
                .tuning
                .upload_threads
                .unwrap_or_else(|| crate::plan::default_upload_threads(cpu_adapter, host_threads)),
            upload,
            one_pass_kl: options.tuning.one_pass_kl,
            one_pass_normalized_kl: options.tuning.one_pass_normalized_kl,
            one_pass_normalized_js: options.tuning.one_pass_normalized_js,
        };
        Ok(Engine {
            gpu: Arc::new(gpu),
            info,
            limits,
            device_limits,
            two_pass_window_elems: (options.tuning.two_pass_window_bytes / 4).max(1 << 20),
        })
    }

    pub(crate) fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Identifies this engine (and its clones) to what it made, such as a workspace.
    pub(crate) fn token(&self) -> std::sync::Weak<Gpu> {
        Arc::downgrade(&self.gpu)
    }

    /// Whether `token` is this engine's ([`Engine::token`]).
    pub(crate) fn made(&self, token: &std::sync::Weak<Gpu>) -> bool {
        std::ptr::eq(token.as_ptr(), Arc::as_ptr(&self.gpu))
    }

    /// Plan limits for a job: over host data (`device == false`) or the caller's buffers.
    pub(crate) fn plan_limits(&self, job: &Job, device: bool) -> PlanLimits {
        let limits = if device {
            self.device_limits
        } else {
            self.limits
        };
        if job.prepass.is_some() {
            limits.with_window_cap(self.two_pass_window_elems)
        } else {
            limits
        }
    }

    pub(crate) fn disable_subgroups(&self) {
        self.gpu.subgroups.store(false, Ordering::Relaxed);
    }

    /// The adapter that runs the work.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// The wgpu device (shared with the caller when built with [`Engine::from_device`]).
    ///
    /// On a device klgpu made ([`Engine::new`]), an error of your own work on it outside an
    /// error scope of yours does not panic, as under wgpu's default handler: the engine's next
    /// call returns it as [`Error::Gpu`], once. A device you made keeps your handlers.
    pub fn device(&self) -> &wgpu::Device {
        &self.gpu.device
    }

    /// The wgpu queue work is submitted to.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.gpu.queue
    }

    /// Whether reductions currently use subgroup operations.
    pub fn uses_subgroups(&self) -> bool {
        self.gpu.subgroups.load(Ordering::Relaxed)
    }

    /// Whether host data is written straight into the kernels' input buffers
    /// ([`Tuning::direct_uploads`]) rather than into staging buffers the GPU copies from.
    pub fn direct_uploads(&self) -> bool {
        self.gpu.upload == Upload::Direct
    }

    /// Most elements of one input processed per window.
    pub fn window_elems(&self) -> u64 {
        self.limits.window_elems
    }

    /// Frees the buffers the engine keeps between calls: host data's windows and upload
    /// buffers (up to 2 × 2 × [`Engine::window_elems`] elements), and per-row state as large as
    /// the largest call so far needed. The next call makes them again, which costs it about as
    /// much as the engine's first call. For apps that made one large call and want the memory
    /// back; sets in use by calls running meanwhile are kept. A [`Workspace`](crate::Workspace) holds its own,
    /// freed with it.
    ///
    /// ```no_run
    /// # fn main() -> klgpu::Result<()> {
    /// let engine = klgpu::Engine::new()?;
    /// let p = vec![1.0f32 / 4_000_000.0; 4_000_000];
    /// let kl = engine.kl_divergence(&p, &p)?;
    /// engine.free_scratch();
    /// # let _ = kl; Ok(()) }
    /// ```
    pub fn free_scratch(&self) {
        self.gpu.drop_in_turn(self.gpu.scratch.drain());
    }

    /// KL(P‖Q) = Σ p·ln(p/q) of two probability vectors, in nats. Blocking.
    ///
    /// 0·ln(0/q) = 0; p > 0 = q gives +∞. Inputs are not renormalized (see
    /// [`Options::normalize`]).
    ///
    /// # Errors
    /// Empty or mismatched input, and NaN, ±∞ or negative elements ([`Error::InvalidValue`]
    /// names the first one); a result beyond f32's range ([`Error::Overflow`]).
    pub fn kl_divergence<T: Element>(&self, p: &[T], q: &[T]) -> Result<f64> {
        self.divergence(Measure::KullbackLeibler, p, Some(q), &Options::default())
    }

    /// Async twin of [`Engine::kl_divergence`].
    pub async fn kl_divergence_async<T: Element>(&self, p: &[T], q: &[T]) -> Result<f64> {
        self.divergence_async(Measure::KullbackLeibler, p, Some(q), &Options::default())
            .await
    }

    /// Cross-entropy H(P,Q) = −Σ p·ln q, in nats. Errors as [`Engine::kl_divergence`].
    pub fn cross_entropy<T: Element>(&self, p: &[T], q: &[T]) -> Result<f64> {
        self.divergence(Measure::CrossEntropy, p, Some(q), &Options::default())
    }

    /// Async twin of [`Engine::cross_entropy`].
    pub async fn cross_entropy_async<T: Element>(&self, p: &[T], q: &[T]) -> Result<f64> {
        self.divergence_async(Measure::CrossEntropy, p, Some(q), &Options::default())
            .await
    }

    /// Entropy H(P) = −Σ p·ln p, in nats. Errors as [`Engine::kl_divergence`].
    pub fn entropy<T: Element>(&self, p: &[T]) -> Result<f64> {
        self.divergence(Measure::Entropy, p, None, &Options::default())
    }

    /// Async twin of [`Engine::entropy`].
    pub async fn entropy_async<T: Element>(&self, p: &[T]) -> Result<f64> {
        self.divergence_async(Measure::Entropy, p, None, &Options::default())
            .await
    }

    /// Jensen–Shannon divergence ½KL(P‖M) + ½KL(Q‖M), M = (P+Q)/2, in nats; in [0, ln 2]
    /// for normalized inputs. Errors as [`Engine::kl_divergence`].
    pub fn js_divergence<T: Element>(&self, p: &[T], q: &[T]) -> Result<f64> {
        self.divergence(Measure::JensenShannon, p, Some(q), &Options::default())
    }

    /// Async twin of [`Engine::js_divergence`].
    pub async fn js_divergence_async<T: Element>(&self, p: &[T], q: &[T]) -> Result<f64> {
        self.divergence_async(Measure::JensenShannon, p, Some(q), &Options::default())
            .await
    }

    /// Any measure of one distribution (pair) with options: input kind, log base,
    /// normalization. `q` is ignored by [`Measure::Entropy`]. Blocking.
    ///
    /// ```no_run
    /// use klgpu::{Base, Measure, Options};
    /// let engine = klgpu::Engine::new()?;
    /// let bits = Options { base: Base::Two, ..Default::default() };
    /// let h = engine.divergence(Measure::Entropy, &[0.25; 4], None, &bits)?;
    /// assert!((h - 2.0).abs() < 1e-6);
    /// # Ok::<(), klgpu::Error>(())
    /// ```
    pub fn divergence<T: Element>(
        &self,
        measure: Measure,
        p: &[T],
        q: Option<&[T]>,
        opts: &Options,
    ) -> Result<f64> {
        pollster::block_on(self.compute(measure, p, q, p.len().max(1), opts, true))
            .map(|r| r.values[0])
    }

    /// Async twin of [`Engine::divergence`].
    pub async fn divergence_async<T: Element>(
        &self,
        measure: Measure,
        p: &[T],
        q: Option<&[T]>,
        opts: &Options,
    ) -> Result<f64> {
        self.compute(measure, p, q, p.len().max(1), opts, false)
            .await
            .map(|r| r.values[0])
    }

    /// Per-row values of any measure over row-major `[rows × cols]` inputs, with top-1
    /// agreement for two-input logits. Blocking.
    ///
    /// ```no_run
    /// use klgpu::{Input, Measure, Options};
    /// let engine = klgpu::Engine::new()?;
    /// let p = [0.0f32, 1.0, 2.0, /* row 2 */ 5.0, 0.0, 0.0];
    /// let q = [0.0f32, 1.0, 2.0, /* row 2 */ 0.0, 5.0, 0.0];
    /// let r = engine.rows(Measure::KullbackLeibler, &p, Some(&q), 3, &Options::input(Input::Logits))?;
    /// assert_eq!(r.values[0], 0.0);
    /// assert_eq!(r.top1_agree, Some(vec![true, false]));
    /// # Ok::<(), klgpu::Error>(())
    /// ```
    pub fn rows<T: Element>(
        &self,
        measure: Measure,
        p: &[T],
        q: Option<&[T]>,
        cols: usize,
        opts: &Options,
    ) -> Result<RowResults> {
        pollster::block_on(self.compute(measure, p, q, cols, opts, true))
    }

    /// Async twin of [`Engine::rows`].
    pub async fn rows_async<T: Element>(
        &self,
        measure: Measure,
        p: &[T],
        q: Option<&[T]>,
        cols: usize,
        opts: &Options,
    ) -> Result<RowResults> {
        self.compute(measure, p, q, cols, opts, false).await
    }

    /// Per-row KL(P‖Q) of `[rows × cols]` inputs read as `input`. Blocking.
    pub fn kl_divergence_rows<T: Element>(
        &self,
        p: &[T],
        q: &[T],
        cols: usize,
        input: Input,
    ) -> Result<Vec<f64>> {
        Ok(self
            .rows(
                Measure::KullbackLeibler,
                p,
                Some(q),
                cols,
                &Options::input(input),
            )?
            .values)
    }

    /// Per-row cross-entropy H(P,Q). Blocking.
    pub fn cross_entropy_rows<T: Element>(
        &self,
        p: &[T],
        q: &[T],
        cols: usize,
        input: Input,
    ) -> Result<Vec<f64>> {
        Ok(self
            .rows(
                Measure::CrossEntropy,
                p,
                Some(q),
                cols,
                &Options::input(input),
            )?
            .values)
    }

    /// Per-row entropy H(P). Blocking.
    pub fn entropy_rows<T: Element>(&self, p: &[T], cols: usize, input: Input) -> Result<Vec<f64>> {
        Ok(self
            .rows(Measure::Entropy, p, None, cols, &Options::input(input))?
            .values)
    }

    /// Per-row Jensen–Shannon divergence. Blocking.
    pub fn js_divergence_rows<T: Element>(
        &self,
        p: &[T],
        q: &[T],
        cols: usize,
        input: Input,
    ) -> Result<Vec<f64>> {
        Ok(self
            .rows(
                Measure::JensenShannon,
                p,
                Some(q),
                cols,
                &Options::input(input),
            )?
            .values)
    }

    /// Async twin of [`Engine::kl_divergence_rows`].
    pub async fn kl_divergence_rows_async<T: Element>(
        &self,
        p: &[T],
        q: &[T],
        cols: usize,
        input: Input,
    ) -> Result<Vec<f64>> {
        Ok(self
            .rows_async(
                Measure::KullbackLeibler,
                p,
                Some(q),
                cols,
                &Options::input(input),
            )
            .await?
            .values)
    }

    /// Async twin of [`Engine::cross_entropy_rows`].
    pub async fn cross_entropy_rows_async<T: Element>(
        &self,
        p: &[T],
        q: &[T],
        cols: usize,
        input: Input,
    ) -> Result<Vec<f64>> {
        Ok(self
            .rows_async(
                Measure::CrossEntropy,
                p,
                Some(q),
                cols,
                &Options::input(input),
            )
            .await?
            .values)
    }

    /// Async twin of [`Engine::entropy_rows`].
    pub async fn entropy_rows_async<T: Element>(
        &self,
        p: &[T],
        cols: usize,
        input: Input,
    ) -> Result<Vec<f64>> {
        Ok(self
            .rows_async(Measure::Entropy, p, None, cols, &Options::input(input))
            .await?
            .values)
    }

    /// Async twin of [`Engine::js_divergence_rows`].
    pub async fn js_divergence_rows_async<T: Element>(
        &self,
        p: &[T],
        q: &[T],
        cols: usize,
        input: Input,
    ) -> Result<Vec<f64>> {
        Ok(self
            .rows_async(
                Measure::JensenShannon,
                p,
                Some(q),
                cols,
                &Options::input(input),
            )
            .await?
            .values)
    }

    /// Validate → plan → launch → check flags → results.
    async fn compute<T: Element>(
        &self,
        measure: Measure,
        p: &[T],
        q: Option<&[T]>,
        cols: usize,
        opts: &Options,
        blocking: bool,
    ) -> Result<RowResults> {
        let q = cpu::check_shapes(measure, p, q, cols)?;
        crate::plan::check_columns(cols as u64)?;
        let job = job_for(Term::Measure(measure), opts)?;
        let _turn = self.gpu.turn_async().await;
        let rows = p.len() / cols;
        // Every row's value (and agreement) comes back in one readback buffer, which the
        // device's max_buffer_size bounds: more rows come back in groups.
        let group = crate::plan::readback_rows(self.gpu.device.limits().max_buffer_size) as usize;
        let mut results = RowResults {
            values: Vec::with_capacity(rows),
            top1_agree: job.agree.then(|| Vec::with_capacity(rows)),
        };
        // A row that overflows is reported only where no value of any group is invalid, as
        // one call over all rows would: the later groups still run.
        let mut overflow = None;
        for first in (0..rows).step_by(group) {
            let elems = first * cols..(first + group).min(rows) * cols;
            let group_q = if q.is_empty() { q } else { &q[elems.clone()] };
            let readback = self
                .run_group(&job, &p[elems.clone()], group_q, cols, blocking)
                .await?;
            let checked = check_status(&readback, job.kind, first, || {
                // Only for an error: the f32 widening of 16-bit inputs costs a copy. Earlier
                // groups raised no invalid value, so the first of all is in this one.
                cpu::locate_invalid(measure, opts, &widened(p), &widened(q), cols)
            });
            match checked {
                Err(e @ Error::Overflow { .. }) => {
                    overflow.get_or_insert(e);
                }
                other => other?,
            }
            results
                .values
                .extend(readback.values.iter().map(|&v| v as f64));
            if let (Some(all), Some(these)) = (&mut results.top1_agree, readback.agree) {
                all.extend(these);
            }
        }
        match overflow {
            Some(e) => Err(e),
            None => Ok(results),
        }
    }

    /// Runs one group of whole rows of host data; falls back from subgroups if the adapter's
    /// layout check fails.
    async fn run_group<T: Element>(
        &self,
        job: &Job,
        p: &[T],
        q: &[T],
        cols: usize,
        blocking: bool,
    ) -> Result<Readback> {
        let plan = Plan::new(
            (p.len() / cols) as u64,
            cols as u64,
            self.plan_limits(job, false),
        );
        let data = HostData {
            p: bytemuck::cast_slice(p),
            q: bytemuck::cast_slice(q),
            dtype: T::DTYPE,
        };
        let readback = self.gpu.run_host(job, &plan, data, blocking).await?;
        if readback.status[0] & kernels::FLAG_SUBGROUP_LAYOUT == 0 {
            return Ok(readback);
        }
        // This adapter's subgroups are not runs of consecutive invocations: fall back.
        self.gpu.subgroups.store(false, Ordering::Relaxed);
        self.gpu.run_host(job, &plan, data, blocking).await
    }
}

/// The kernels a measure with these options needs. This is the one place the GPU paths
/// resolve their options ([`Options::resolved`]); the job's `kind` is what the values are
/// validated and named as.
pub(crate) fn job_for(term: Term, opts: &Options) -> Result<Job> {
    let opts = &opts.resolved();
    let per_nat = opts.base.per_nat()? as f32;
    // Resolved options keep `normalize` for probabilities only.
    let normalize = opts.normalize;
    let prepass = match opts.input {
        Input::Logits if !one_pass(term) => Some(Prepass::Lse),
        Input::Probs if normalize && !one_pass(term) => Some(Prepass::Sums),
        _ => None,
    };
    Ok(Job {
        term,
        kind: opts.input,
        input: InputCode::of(opts.input, normalize),
        prepass,
        per_nat,
        agree: opts.input == Input::Logits && term.uses_q(),
        one_pass_first: match (opts.input, term) {
            (Input::Logits, Term::Measure(Measure::KullbackLeibler)) => Some(OnePass::KlLogits),
            (Input::Probs, Term::Measure(Measure::KullbackLeibler)) if normalize => {
                Some(OnePass::KlNormalized)
            }
            (Input::Probs, Term::Measure(Measure::JensenShannon)) if normalize => {
                Some(OnePass::JsNormalized)
            }
            _ => None,
        },
    })
}

/// Whether a measure of logits, or of probabilities the kernel normalizes, runs in one pass
/// (shaders/kernels_soft.wgsl): cross-entropy and entropy, sums of non-negative parts in any
/// frame. KL and JS need each element's ln p − ln q, which only the row's log-sum-exps (or
/// sums) give without cancellation (docs/ARCHITECTURE.md, "One pass over logits").
fn one_pass(term: Term) -> bool {
    matches!(
        term,
        Term::Measure(Measure::CrossEntropy | Measure::Entropy)
    )
}

/// Turns raised flags into the error the host-side locator finds, or for a row that left f32's
/// range (which no value explains), [`Error::Overflow`] naming the first row that reads NaN
/// (`first_row`: the row the readback's first value belongs to).
fn check_status(
    readback: &Readback,
    input: Input,
    first_row: usize,
    locate: impl FnOnce() -> Option<Error>,
) -> Result<()> {
    let flags = readback.status[0] & !kernels::FLAG_SUBGROUP_LAYOUT;
    if flags == 0 {
        return Ok(());
    }
    if flags == kernels::FLAG_OVERFLOW
        && let Some(row) = first_nan(&readback.values)
    {
        return Err(Error::Overflow {
            row: first_row + row,
            input,
        });
    }
    Err(locate().unwrap_or_else(|| {
        Error::Gpu(format!(
            "the kernel flagged invalid input (flags {flags:#x}) that the host check could not find; \
             the adapter may flush subnormal numbers to zero"
        ))
    }))
}

/// The first row whose value is NaN: the kernels' mark for a row that overflowed f32.
pub(crate) fn first_nan(values: &[f32]) -> Option<usize> {
    values.iter().position(|v| v.is_nan())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_klgpu_needs() {
        for one_pass_kl in [false, true] {
            assert!(unmet_limits(&wgpu::Limits::default(), one_pass_kl).is_empty());
        }
        let downlevel = unmet_limits(&wgpu::Limits::downlevel_defaults(), false);
        assert_eq!(
            downlevel,
            ["max_storage_buffers_per_shader_stage is 4, klgpu needs 8"]
        );
        // The one pass's state takes 64 B of shared memory per invocation: 16 KiB, above the
        // downlevel defaults' 16352 B; the others take 48 B.
        let mut downlevel = wgpu::Limits::downlevel_defaults();
        downlevel.max_storage_buffers_per_shader_stage = 8;
        assert!(unmet_limits(&downlevel, false).is_empty());
        assert_eq!(
            unmet_limits(&downlevel, true),
            [
                "max_compute_workgroup_storage_size is 16352, klgpu needs 16384 \
                 (Tuning::one_pass_kl's state; without it, 12288)"
            ]
        );
        let webgl2 = unmet_limits(&wgpu::Limits::downlevel_webgl2_defaults(), false);
        assert!(
            webgl2
                .iter()
                .any(|l| l.starts_with("max_compute_invocations_per_workgroup is 0")),
            "{webgl2:?}"
        );
        assert!(webgl2.len() >= 4, "{webgl2:?}");
    }

    fn info(
        name: &str,
        device_type: wgpu::DeviceType,
        backend: wgpu::Backend,
    ) -> wgpu::AdapterInfo {
        wgpu::AdapterInfo {
            name: name.into(),
            device_type,
            backend,
            ..wgpu::AdapterInfo::new(wgpu::DeviceType::Other, wgpu::Backend::Noop)
        }
    }

    #[test]
    fn hardware_before_software_and_vulkan_before_gl() {
        let infos = [
            info("llvmpipe", wgpu::DeviceType::Cpu, wgpu::Backend::Vulkan),
            info(
                "H100 (GL)",
                wgpu::DeviceType::DiscreteGpu,
                wgpu::Backend::Gl,
            ),
            info("H100", wgpu::DeviceType::DiscreteGpu, wgpu::Backend::Vulkan),
        ];
        assert_eq!(pick_adapter(&infos, None).unwrap(), 2);
        assert_eq!(pick_adapter(&infos, Some("LLVM")).unwrap(), 0);
        // Of the adapters a name matches, the best: it took the first, GL before Vulkan.
        assert_eq!(pick_adapter(&infos, Some("h100")).unwrap(), 2);
        // An empty name matched every adapter and took the first, the software one.
        for empty in ["", " "] {
            let err = pick_adapter(&infos, Some(empty)).unwrap_err();
            assert!(
                matches!(err, Error::InvalidArgument(_)) && err.to_string().contains("H100"),
                "{err}"
            );
        }
        let err = pick_adapter(&infos, Some("radeon")).unwrap_err();
        assert!(err.to_string().contains("llvmpipe"), "{err}");
        assert!(matches!(
            pick_adapter(&[], None),
            Err(Error::NoAdapter { .. })
        ));
    }
}
