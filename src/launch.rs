//! GPU plumbing: scratch buffers, bind groups, encoding one window's dispatches, uploads and
//! readback. Everything here assumes a valid [`Plan`] and validated shapes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::error::{Error, Result};
use crate::kernels::{
    self, InputCode, Kernels, Loads, MONOID_BYTES, PARTIAL_BYTES, Params, SegmentReduce, Stage,
    Term,
};
use crate::plan::{self, Layout, Plan, Window};
use crate::types::{Dtype, Measure, widened};

/// Bytes per uniform slot: one dispatch's Params at a dynamic offset (every adapter's
/// `min_uniform_buffer_offset_alignment` is at most 256).
const PARAM_SLOT: u64 = 256;
/// Dispatches per window at most: the one-pass KL of logits and its combine, the pre-pass and
/// its combine, terms and their combine.
const SLOTS_PER_WINDOW: u64 = 6;
/// Status words: flags, first bad window, first bad local index, spare.
const STATUS_INIT: [u32; 4] = [0, u32::MAX, u32::MAX, 0];

/// A pass over a window that needs per-row statistics first: logits (log-sum-exp) or
/// normalized probabilities (row sums).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Prepass {
    Lse,
    Sums,
}

/// Everything that defines one computation's kernels, independent of the data.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Job {
    pub term: Term,
    /// How the values are read, after [`Options::resolved`](crate::Options::resolved): what
    /// they are validated as, and what an error names.
    pub kind: crate::Input,
    pub input: InputCode,
    pub prepass: Option<Prepass>,
    /// Factor from nats to the requested base.
    pub per_nat: f32,
    /// Whether to write top-1 agreement (two-input logits).
    pub agree: bool,
    /// A one-pass kernel that first finishes the rows it can, exactly enough, leaving the two
    /// passes only the others.
    pub one_pass_first: Option<OnePass>,
}

/// The one-pass kernels that run before a two-pass job's passes, each for the rows it can
/// prove at the bar (the rest get what the pre-pass would give them, where it can).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OnePass {
    /// KL of logits (shaders/kernels_rel.wgsl, [`Tuning::one_pass_kl`](crate::Tuning)): most
    /// rows it does not finish get their log-sum-exps, and the log-sum-exp pass skips them.
    KlLogits,
    /// KL of probabilities the kernel normalizes (shaders/kernels_norm.wgsl,
    /// [`Tuning::one_pass_normalized_kl`](crate::Tuning)): every row it does not finish gets
    /// its sums, so the sums pass does not run.
    KlNormalized,
    /// JS of probabilities the kernel normalizes, in the same kernel and with the same
    /// hand-over ([`Tuning::one_pass_normalized_js`](crate::Tuning)).
    JsNormalized,
}

impl OnePass {
    /// Whether the rows it leaves get their sums from it, so that the sums pass does not run.
    fn replaces_sums_pass(self) -> bool {
        matches!(self, OnePass::KlNormalized | OnePass::JsNormalized)
    }

    /// Its element and combine stages.
    fn stages(self) -> (Stage, Stage) {
        match self {
            OnePass::KlLogits => (Stage::Rel, Stage::CombineRel),
            OnePass::KlNormalized | OnePass::JsNormalized => (Stage::Norm, Stage::CombineNorm),
        }
    }

    /// The skip modes of the passes after it, (pre-pass, main pass): the terms pass skips the
    /// rows it finished, and the log-sum-exp pass also those whose log-sum-exps it wrote.
    fn skip_modes(self) -> (u32, u32) {
        match self {
            OnePass::KlLogits => (kernels::MODE_SKIP_READY, kernels::MODE_SKIP_DONE),
            OnePass::KlNormalized | OnePass::JsNormalized => (0, kernels::MODE_SKIP_DONE),
        }
    }
}

impl Job {
    /// The main pass's terms and combine stages. Inputs the kernel normalizes (logits,
    /// normalized probabilities) that `engine::job_for` gave no pre-pass are the one-pass
    /// measures: they take the one-pass kernels.
    pub(crate) fn main_stages(&self) -> (Stage, Stage) {
        let normalized_in_kernel =
            matches!(self.input, InputCode::Logits | InputCode::ProbsNormalized);
        if normalized_in_kernel && self.prepass.is_none() {
            (Stage::Soft, Stage::CombineSoft)
        } else {
            (Stage::Terms, Stage::Combine)
        }
    }
}

/// Which passes a visit of a window runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Passes {
    Both,
    Pre,
    Main,
}

/// The order windows are visited in. A two-pass job over rows split across windows visits
/// each row's windows twice: all for the pre-pass, then all for the main pass.
pub(crate) fn visits(plan: &Plan, job: &Job) -> Vec<(usize, Passes)> {
    let mut out = Vec::with_capacity(plan.windows.len());
    let mut i = 0;
    while i < plan.windows.len() {
        let w = &plan.windows[i];
        if job.prepass.is_some() && w.split.is_some() {
            let end = i
                + plan.windows[i..]
                    .iter()
                    .position(|w| w.split.is_some_and(|s| s.last))
                    .unwrap_or(0)
                + 1;
            out.extend((i..end).map(|k| (k, Passes::Pre)));
            out.extend((i..end).map(|k| (k, Passes::Main)));
            i = end;
        } else {
            out.push((i, Passes::Both));
            i += 1;
        }
    }
    out
}

/// Reusable buffers of one in-flight computation. Grown on demand, kept in a pool.
pub(crate) struct Scratch {
    params: wgpu::Buffer,
    /// The bytes written into `params` so far (a fresh buffer reads 0), so that a call whose
    /// parameters match the last one's skips the write: each `write_buffer` adds a transfer
    /// and a barrier before the dispatches, on lavapipe a tenth of a small call.
    params_written: Vec<u8>,
    /// Whether `status` holds STATUS_INIT's flags and first-error words: true after a call of
    /// the engine's own read them back so (a call that flags nothing leaves them untouched), so
    /// the next call skips the reset. Never set for a [`Workspace`](crate::Workspace)'s
    /// scratch, whose check also needs the last word reset.
    status_reset: bool,
    /// Host data's windows on the device: [side][slot], two slots so one window is computed
    /// while the next is written.
    windows: [[Option<wgpu::Buffer>; 2]; 2],
    /// Where host data's windows are written before the copy into `windows`, slot for slot
    /// (with direct uploads, the windows themselves).
    staging: [[Option<Staging>; 2]; 2],
    partials: wgpu::Buffer,
    status: wgpu::Buffer,
    row_lse: wgpu::Buffer,
    out: wgpu::Buffer,
    agree: wgpu::Buffer,
    /// Bound where no gradient is written.
    no_grad: wgpu::Buffer,
    readback: wgpu::Buffer,
}

fn buffer(
    device: &wgpu::Device,
    label: &str,
    size: u64,
    usage: wgpu::BufferUsages,
) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: size.max(16).div_ceil(16) * 16,
        usage,
        mapped_at_creation: false,
    })
}

/// Most bytes of a GPU slice read back in one piece (`Engine::read_f32`, error messages).
const READ_PIECE_BYTES: u64 = 64 << 20;

const STORAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

/// Makes sure `slot` holds a buffer of at least `size` bytes.
fn ensure(
    device: &wgpu::Device,
    slot: &mut wgpu::Buffer,
    label: &str,
    size: u64,
    usage: wgpu::BufferUsages,
) {
    if slot.size() < size {
        *slot = buffer(device, label, size, usage);
    }
}

impl Scratch {
    /// Writes `bytes` at `offset` of the params buffer, unless it holds them already.
    fn write_params(&mut self, queue: &wgpu::Queue, offset: u64, bytes: &[u8]) {
        let range = offset as usize..offset as usize + bytes.len();
        if self.params_written.get(range.clone()) == Some(bytes) {
            return;
        }
        queue.write_buffer(&self.params, offset, bytes);
        if self.params_written.len() < range.end {
            self.params_written.resize(range.end, 0);
        }
        self.params_written[range].copy_from_slice(bytes);
    }

    /// Makes sure the params buffer has room for `slots` dispatches.
    fn ensure_params(&mut self, device: &wgpu::Device, slots: u64) {
        let size = slots * PARAM_SLOT;
        if self.params.size() < size {
            self.params = buffer(
                device,
                "klgpu.params",
                size,
                wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            );
            self.params_written.clear();
        }
    }

    /// Resets the status words for a new job, unless the last one left them reset.
    fn reset_status(&mut self, queue: &wgpu::Queue) {
        if !std::mem::take(&mut self.status_reset) {
            queue.write_buffer(&self.status, 0, bytemuck::cast_slice(&STATUS_INIT));
        }
    }

    /// Notes whether the job just read back left the status words as a reset leaves them.
    pub(crate) fn note_status(&mut self, readback: &Readback) {
        self.status_reset = readback.status[..3] == STATUS_INIT[..3];
    }

    pub(crate) fn new(device: &wgpu::Device) -> Scratch {
        let small = |label| buffer(device, label, 256, STORAGE);
        Scratch {
            params: buffer(
                device,
                "klgpu.params",
                PARAM_SLOT * SLOTS_PER_WINDOW * 2,
                wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            ),
            params_written: Vec::new(),
            status_reset: false,
            windows: [[None, None], [None, None]],
            staging: [[None, None], [None, None]],
            partials: small("klgpu.partials"),
            status: small("klgpu.status"),
            row_lse: small("klgpu.row_lse"),
            out: small("klgpu.out"),
            agree: small("klgpu.agree"),
            no_grad: small("klgpu.no_grad"),
            readback: buffer(
                device,
                "klgpu.readback",
                256,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            ),
        }
    }

    /// Grows every buffer to what `plan` needs; `host` names how host data is uploaded, if
    /// the job has host data. `result_rows` is how many rows' values land in the scratch's own
    /// output and come back (0 when they go to the caller's buffer): what the output, the
    /// agreement and the readback hold, beyond one window's rows.
    fn prepare(
        &mut self,
        device: &wgpu::Device,
        plan: &Plan,
        host: Option<(Upload, Dtype)>,
        uses_q: bool,
        result_rows: u64,
    ) {
        let rows = result_rows.max(plan.max_window_rows() as u64);
        ensure(
            device,
            &mut self.partials,
            "klgpu.partials",
            (plan.max_partials() + 2) * PARTIAL_BYTES,
            STORAGE,
        );
        ensure(
            device,
            &mut self.row_lse,
            "klgpu.row_lse",
            plan.max_window_rows() as u64 * MONOID_BYTES,
            STORAGE,
        );
        ensure(device, &mut self.out, "klgpu.out", rows * 4, STORAGE);
        ensure(device, &mut self.agree, "klgpu.agree", rows * 4, STORAGE);
        ensure(
            device,
            &mut self.readback,
            "klgpu.readback",
            16 + result_rows * 8,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        );
        let Some((upload, dtype)) = host else { return };
        let bytes = plan.max_window_elems() * dtype.size();
        for side in 0..if uses_q { 2 } else { 1 } {
            for (window, staging) in self.windows[side].iter_mut().zip(&mut self.staging[side]) {
                if staging.as_ref().is_some_and(|s| s.buffer.size() >= bytes) {
                    continue;
                }
                let fresh = Staging::new(device, bytes, upload);
                *window = Some(match upload {
                    Upload::Staged => buffer(device, "klgpu.window", bytes, STORAGE),
                    Upload::Direct => fresh.buffer.clone(),
                });
                *staging = Some(fresh);
            }
        }
    }
}

/// Unmaps a buffer whose mapping was asked for, when the reading ends, also by an error or a
/// dropped future: a buffer left mapped, or with its mapping pending, made every later
/// submission that copies into it fail (a workspace's readback, after a dropped
/// `check_async`). Unmapping aborts a pending mapping; one that failed left nothing to unmap.
struct UnmapOnDrop<'a> {
    buffer: &'a wgpu::Buffer,
    /// `MAP_PENDING` until the map's callback says `MAP_DONE` or `MAP_FAILED`.
    state: Arc<AtomicU8>,
    /// The device, and the submission the map waits for: a pending map settles before the unmap.
    device: &'a wgpu::Device,
    index: wgpu::SubmissionIndex,
}

const MAP_PENDING: u8 = 0;
const MAP_DONE: u8 = 1;
const MAP_FAILED: u8 = 2;

impl Drop for UnmapOnDrop<'_> {
    fn drop(&mut self) {
        // A dropped future's unmap of a pending map met another thread's poll finishing it
        // (on OpenGL the polling thread; on Vulkan any thread's klgpu call): wgpu-core marks
        // the buffer idle while it maps, so the unmap failed ("Buffer is not mapped", an
        // uncaptured error: a panic on a caller's device with wgpu's default handler) and the
        // map then completed with no one to unmap it, failing that readback's every later
        // use. So the drop waits for the submission and the callback first.
        if self.state.load(Ordering::Acquire) == MAP_PENDING {
            let _ = self.device.poll(wgpu::PollType::Wait {
                submission_index: Some(self.index.clone()),
                timeout: None,
            });
            // The callback runs on the thread whose poll retired the submission: soon.
            let start = std::time::Instant::now();
            while self.state.load(Ordering::Acquire) == MAP_PENDING
                && start.elapsed() < std::time::Duration::from_secs(2)
            {
                std::thread::yield_now();
            }
        }
        if self.state.load(Ordering::Acquire) != MAP_FAILED {
            self.buffer.unmap();
        }
    }
}

/// How host data reaches the kernels' window buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Upload {
    /// Written into staging buffers, which the GPU copies into the windows.
    Staged,
    /// Written into the windows themselves, mapped (`Features::MAPPABLE_PRIMARY_BUFFERS`):
    /// for adapters whose memory is the host's, where a copy would only copy host memory.
    Direct,
}

/// A host-visible buffer that host windows are written into, reused call after call: a
/// staging buffer the GPU copies from, or with direct uploads the window itself. It is mapped
/// again as soon as the window's submission is made, and is ready when the window after next
/// needs it. `Queue::write_buffer` instead stages every write in a fresh allocation, and
/// wgpu's allocator frees all but one block of those as soon as they are done: windows of
/// 128 MiB paid for new host memory (pinned by the driver, page-faulted by the first write)
/// on every call.
struct Staging {
    buffer: wgpu::Buffer,
    /// The map requested after the buffer's last use, and the submission that uses it;
    /// `None` while the buffer is mapped and ready.
    pending: Option<(MapReceiver, wgpu::SubmissionIndex)>,
}

type MapReceiver = futures_channel::oneshot::Receiver<Result<(), wgpu::BufferAsyncError>>;

impl Staging {
    fn new(device: &wgpu::Device, size: u64, upload: Upload) -> Staging {
        let (label, usage) = match upload {
            Upload::Staged => ("klgpu.staging", wgpu::BufferUsages::COPY_SRC),
            Upload::Direct => ("klgpu.window", wgpu::BufferUsages::STORAGE),
        };
        let buffer = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: size.max(16).div_ceil(16) * 16,
            usage: wgpu::BufferUsages::MAP_WRITE | usage,
            mapped_at_creation: true,
        });
        Staging {
            buffer,
            pending: None,
        }
    }

    /// Asks for the buffer to be mapped again once `index` (which reads it) is done.
    fn remap_after(&mut self, index: wgpu::SubmissionIndex) {
        let (tx, rx) = futures_channel::oneshot::channel();
        self.buffer
            .slice(..)
            .map_async(wgpu::MapMode::Write, move |r| {
                let _ = tx.send(r);
            });
        self.pending = Some((rx, index));
    }
}

/// A pool of scratch sets, so that concurrent calls never share one and sequential calls
/// reuse them.
#[derive(Default)]
pub(crate) struct ScratchPool(std::sync::Mutex<Vec<Scratch>>);

impl ScratchPool {
    pub(crate) fn take(&self, device: &wgpu::Device) -> Scratch {
        let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        pool.pop().unwrap_or_else(|| Scratch::new(device))
    }

    /// Takes every set out of the pool (to be dropped: [`Gpu::drop_in_turn`]).
    pub(crate) fn drain(&self) -> Vec<Scratch> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub(crate) fn put(&self, scratch: Scratch) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(scratch);
    }
}

/// An error of other work on klgpu's own device, numbered in the order errors came, so that
/// one put back by a check ([`Gpu::keep_stray`]) goes ahead of any that came after it.
pub(crate) struct Stray {
    order: u64,
    pub message: String,
}

impl Stray {
    pub(crate) fn new(message: String) -> Stray {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        Stray {
            order: NEXT.fetch_add(1, Ordering::Relaxed),
            message,
        }
    }
}

/// The device side of an engine: what launching needs.
pub(crate) struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub kernels: Kernels,
    pub subgroups: std::sync::atomic::AtomicBool,
    pub subgroup_width: u32,
    /// `min_storage_buffer_offset_alignment` of the device.
    pub storage_align: u64,
    /// Set by the device-lost callback: every later call fails with it instead of hanging.
    pub fault: Arc<std::sync::Mutex<Option<String>>>,
    /// For devices klgpu created, set by the uncaptured-error handler (klgpu's own work runs
    /// in error scopes, so this is other work on `Engine::device()`): the next call fails with
    /// it, once, instead of wgpu's default panic.
    pub stray: Arc<std::sync::Mutex<Option<Stray>>>,
    pub scratch: ScratchPool,
    /// On OpenGL only: calls take turns (see [`Serial`]).
    pub serial: Option<Arc<Serial>>,
    /// Most threads that copy one host window into staging.
    pub upload_threads: u32,
    /// How host data reaches the kernels.
    pub upload: Upload,
    /// Whether jobs that offer it ([`Job::one_pass_first`]) take the one-pass KL kernel of
    /// logits ([`Tuning::one_pass_kl`](crate::Tuning)).
    pub one_pass_kl: bool,
    /// The same for KL of normalized probabilities
    /// ([`Tuning::one_pass_normalized_kl`](crate::Tuning)).
    pub one_pass_normalized_kl: bool,
    /// And for JS of normalized probabilities
    /// ([`Tuning::one_pass_normalized_js`](crate::Tuning)).
    pub one_pass_normalized_js: bool,
}

/// Calls take turns on an OpenGL device. wgpu's GL backend has one context, and a thread
/// that waits more than six seconds for it (wgpu-hal 30) panics ("Could not lock adapter
/// context"), while one GPU wait, or a shader compile on a software GL, can hold it longer:
/// eight threads calling one engine on Mesa's llvmpipe GL did. Vulkan, Metal and DX12
/// devices run calls concurrently and have none.
///
/// Blocking calls wait for a turn on a condition variable; async calls wait as futures, so
/// that two async calls joined on one thread never block the thread the holder needs to
/// finish. What must be destroyed inside a turn but may not wait for one (a dropped
/// workspace's buffers) is buried, and dropped when the turn that is out ends.
#[derive(Default)]
pub(crate) struct Serial {
    state: std::sync::Mutex<SerialState>,
    free: std::sync::Condvar,
}

#[derive(Default)]
struct SerialState {
    busy: bool,
    /// Async calls waiting for a turn.
    wakers: Vec<std::task::Waker>,
    /// Dropped when the turn that is out ends.
    buried: Vec<Box<dyn Send>>,
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serial").finish_non_exhaustive()
    }
}

impl Serial {
    fn state(&self) -> std::sync::MutexGuard<'_, SerialState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until no other turn is out, and takes one.
    fn take(self: &Arc<Self>) -> Turn {
        let mut state = self.state();
        while state.busy {
            state = self.free.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.busy = true;
        Turn(Some(self.clone()))
    }

    /// Takes a turn as a future: pending, not blocking, while another is out.
    async fn take_async(self: &Arc<Self>) -> Turn {
        std::future::poll_fn(|cx| {
            let mut state = self.state();
            if state.busy {
                if !state.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    state.wakers.push(cx.waker().clone());
                }
                return std::task::Poll::Pending;
            }
            state.busy = true;
            std::task::Poll::Ready(Turn(Some(self.clone())))
        })
        .await
    }

    /// Drops `item` inside a turn: at once if none is out, else when the one out ends.
    fn drop_in_turn(self: &Arc<Self>, item: Box<dyn Send>) {
        let mut state = self.state();
        if state.busy {
            state.buried.push(item);
            return;
        }
        state.busy = true;
        drop(state);
        // Taken before the drop, so that it ends even if the drop panics.
        let turn = Turn(Some(self.clone()));
        drop(item);
        drop(turn);
    }

    /// Ends the turn that is out: drops what was buried during it, then wakes every waiter
    /// (one gets the turn, the others wait again). The turn ends even if a buried drop
    /// panics, so that no later call waits forever.
    fn give_back(&self) {
        /// Ends the turn when dropped while a buried drop unwinds.
        struct EndOnUnwind<'a>(&'a Serial);
        impl Drop for EndOnUnwind<'_> {
            fn drop(&mut self) {
                self.0.end(self.0.state());
            }
        }
        loop {
            let mut state = self.state();
            if state.buried.is_empty() {
                return self.end(state);
            }
            let buried = std::mem::take(&mut state.buried);
            drop(state);
            let guard = EndOnUnwind(self);
            drop(buried);
            std::mem::forget(guard);
        }
    }

    fn end(&self, mut state: std::sync::MutexGuard<'_, SerialState>) {
        state.busy = false;
        let wakers = std::mem::take(&mut state.wakers);
        drop(state);
        self.free.notify_all();
        wakers.into_iter().for_each(std::task::Waker::wake);
    }
}

/// A call's turn on the device (nothing where calls need none), given back when dropped. It
/// holds no lock guard, so an async call can keep it across its awaits.
pub(crate) struct Turn(Option<Arc<Serial>>);

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(serial) = &self.0 {
            serial.give_back();
        }
    }
}

/// What a finished computation read back.
pub(crate) struct Readback {
    pub status: [u32; 4],
    pub values: Vec<f32>,
    pub agree: Option<Vec<bool>>,
}

/// Records the copies of status, per-row values and agreement into the readback buffer, so
/// that they can ride in the same submission as the work.
pub(crate) fn encode_read_back(
    encoder: &mut wgpu::CommandEncoder,
    scratch: &Scratch,
    rows: u64,
    agree: bool,
) {
    let bytes = rows * 4;
    encoder.copy_buffer_to_buffer(&scratch.status, 0, &scratch.readback, 0, 16);
    if bytes > 0 {
        encoder.copy_buffer_to_buffer(&scratch.out, 0, &scratch.readback, 16, bytes);
    }
    if agree && bytes > 0 {
        encoder.copy_buffer_to_buffer(&scratch.agree, 0, &scratch.readback, 16 + bytes, bytes);
    }
}

/// Host slices of one job as bytes: P and Q (P again for one-input measures), and their
/// storage type.
#[derive(Clone, Copy, Debug)]
pub(crate) struct HostData<'a> {
    pub p: &'a [u8],
    pub q: &'a [u8],
    pub dtype: Dtype,
}

/// A range of elements in a GPU buffer, already validated.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GpuSlice<'a> {
    pub buffer: &'a wgpu::Buffer,
    /// Byte offset of element 0 (a multiple of the element size).
    pub offset: u64,
    /// Number of elements.
    pub elems: u64,
    /// How they are stored.
    pub dtype: Dtype,
}

/// Where the kernels of one window find their inputs and write their rows.
pub(crate) struct WindowBindings<'a> {
    pub p: wgpu::BufferBinding<'a>,
    pub q: wgpu::BufferBinding<'a>,
    /// Elements between each input binding's start and the window's first element.
    pub shifts: (u32, u32),
    pub out: wgpu::BufferBinding<'a>,
    pub agree: wgpu::BufferBinding<'a>,
    /// Index in `out` of the window's first row.
    pub out_base: u32,
    /// Index in `agree` of the window's first row.
    pub agree_base: u32,
    /// The gradient output of the loss kernel, and the shift of the window's first element.
    pub grad: Option<(wgpu::BufferBinding<'a>, u32)>,
    /// Loads of four elements at once (see `wide_loads`).
    pub vec4: bool,
    /// How P and Q are stored.
    pub dtype: Dtype,
}

/// A binding of `len` elements of `dtype` starting at element `first` of `buffer` (at
/// `base_bytes`), with the offset rounded down to `align`: returns the binding and the shift
/// in elements. The size is whole 4-byte words (the callers check that the buffer has them).
pub(crate) fn aligned_binding(
    buffer: &wgpu::Buffer,
    base_bytes: u64,
    first: u64,
    len: u64,
    align: u64,
    dtype: Dtype,
) -> (wgpu::BufferBinding<'_>, u32) {
    let es = dtype.size();
    let start = base_bytes + first * es;
    let offset = start / align * align;
    let size = (start - offset + len * es).div_ceil(4) * 4;
    // Whole groups of four when the buffer has room: the wide-load kernels read the last one
    // entire.
    let group = 4 * es;
    let whole = size.div_ceil(group) * group;
    let size = if offset + whole <= buffer.size() {
        whole
    } else {
        size
    };
    (
        wgpu::BufferBinding {
            buffer,
            offset,
            size: wgpu::BufferSize::new(size.max(4)),
        },
        ((start - offset) / es) as u32,
    )
}

/// Whether a window can load four elements at once (16 bytes of f32, 8 of 16-bit elements):
/// P and Q sit at the same offset modulo 4 (so one group index holds the same columns of
/// both) and both bindings end on a whole group. Rows may have any length and start: the
/// kernels take the columns that share a group with a neighbour one at a time.
fn wide_loads(
    p: &wgpu::BufferBinding<'_>,
    q: &wgpu::BufferBinding<'_>,
    shifts: (u32, u32),
    dtype: Dtype,
) -> bool {
    let whole = |b: &wgpu::BufferBinding<'_>| {
        b.size
            .map_or(b.buffer.size() - b.offset, |s| s.get())
            .is_multiple_of(4 * dtype.size())
    };
    shifts.0 % 4 == shifts.1 % 4 && whole(p) && whole(q)
}

impl Gpu {
    fn subgroups(&self) -> bool {
        self.subgroups.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Waits for this call's turn on the device: at once unless the device is OpenGL and
    /// another call is running. Taken once per public call, where it enters the GPU path;
    /// async functions take [`Gpu::turn_async`] instead (blocking calls run them too).
    pub(crate) fn turn(&self) -> Turn {
        self.serial.as_ref().map_or(Turn(None), Serial::take)
    }

    /// [`Gpu::turn`] for async calls: waits as a future, so that a call holding the turn and
    /// polled by the same thread can finish.
    pub(crate) async fn turn_async(&self) -> Turn {
        match &self.serial {
            Some(serial) => serial.take_async().await,
            None => Turn(None),
        }
    }

    /// Drops `item` (which destroys buffers) inside a turn without waiting for one: at once
    /// where calls take no turns or none is out, else when the call holding it ends.
    pub(crate) fn drop_in_turn(&self, item: impl Send + 'static) {
        match &self.serial {
            Some(serial) => serial.drop_in_turn(Box::new(item)),
            None => drop(item),
        }
    }

    /// The device's loss, if it was lost.
    fn lost(&self) -> Result<()> {
        match self.fault.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            Some(lost) => Err(Error::Gpu(lost)),
            None => Ok(()),
        }
    }

    /// A lost device (for good), or an error of other work on klgpu's own device (once).
    pub(crate) fn check_faults(&self) -> Result<()> {
        self.lost()?;
        match self.take_stray() {
            Some(stray) => Err(Error::Gpu(stray.message)),
            None => Ok(()),
        }
    }

    /// Takes the error of other work that the next check would report, if any.
    pub(crate) fn take_stray(&self) -> Option<Stray> {
        self.stray.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Puts back an error taken by [`Gpu::take_stray`] that was not this call's to report,
    /// unless an earlier one is there (two checks overlapped): the first error is the one
    /// reported, as the handler keeps it (later ones are often its consequences).
    pub(crate) fn keep_stray(&self, stray: Stray) {
        let mut slot = self.stray.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_none_or(|there| there.order > stray.order) {
            *slot = Some(stray);
        }
    }

    /// `error`, or the device's loss where that is what it comes from: a destroyed or lost
    /// device first fails with errors about invalid buffers, submissions, maps or views, and
    /// its lost callback runs only on a later poll.
    fn or_lost(&self, error: Error) -> Error {
        let _ = self.device.poll(wgpu::PollType::Poll);
        if let Err(lost) = self.lost() {
            return lost;
        }
        // The callback runs only once the queue has drained (a submission made just before
        // the loss keeps it waiting), and a caller's device has none of ours.
        if self.device_is_invalid() {
            let mut slot = self.fault.lock().unwrap_or_else(|e| e.into_inner());
            return Error::Gpu(
                slot.get_or_insert_with(|| {
                    "the GPU device was lost (destroyed, or lost by its driver)".into()
                })
                .clone(),
            );
        }
        error
    }

    /// Whether the device is destroyed or lost. wgpu drops the errors of a lost device's own
    /// calls (its lost callback reports the loss), but a buffer made on it is invalid, and
    /// writing to that buffer is a validation error. Only error paths ask.
    fn device_is_invalid(&self) -> bool {
        // Out of memory, a canary would be invalid on a healthy device too.
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let canary = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("klgpu.canary"),
            size: 4,
            usage: wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        // Dropped, not destroyed: the write waits in the queue until the next submit.
        self.queue.write_buffer(&canary, 0, &[0; 4]);
        let invalid = pollster::block_on(validation.pop()).is_some();
        pollster::block_on(oom.pop()).is_none() && invalid
    }

    /// `Error::Gpu(message)`, or the device's loss where that is its cause ([`Gpu::or_lost`]).
    fn gpu_error(&self, message: impl Into<String>) -> Error {
        self.or_lost(Error::Gpu(message.into()))
    }

    /// Runs `f` inside out-of-memory and validation error scopes, turning either into an Err.
    pub(crate) fn scoped<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        self.check_faults()?;
        self.in_scopes(f)
    }

    /// [`Gpu::scoped`] without its check of earlier faults: for a step that must know only
    /// whether it failed itself.
    fn in_scopes<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = f();
        // A lost device fails the call; an error of other work that came meanwhile is left
        // to the next check (a later step of this call, or the next call): not this step's,
        // whose own errors are in its scopes (a recording that had been made said Err).
        self.lost()?;
        let errors = [
            pollster::block_on(validation.pop()),
            pollster::block_on(oom.pop()),
        ];
        match errors.into_iter().flatten().next() {
            Some(e) => Err(self.gpu_error(e.to_string())),
            None => Ok(value),
        }
    }

    /// Waits until `index` has finished: inline when `blocking`, else on a helper thread that
    /// polls the device, so that an async caller's executor is never blocked.
    ///
    /// Without a timeout: a timed wait that ran out while another thread's poll retired the
    /// submission trips an assertion inside wgpu-core 30 ("the current submission index ...
    /// should be at least the wait submission index"), which waits cut into 100 ms slices did
    /// in the batch tests on a loaded machine.
    pub(crate) async fn wait(&self, index: wgpu::SubmissionIndex, blocking: bool) -> Result<()> {
        let poll = move |device: &wgpu::Device| {
            device
                .poll(wgpu::PollType::Wait {
                    submission_index: Some(index),
                    timeout: None,
                })
                .map(|_| ())
                .map_err(|e| Error::Gpu(format!("waiting for the GPU failed: {e}")))
        };
        let waited = if blocking {
            poll(&self.device)
        } else {
            let device = self.device.clone();
            let (tx, rx) = futures_channel::oneshot::channel();
            std::thread::spawn(move || {
                let _ = tx.send(poll(&device));
            });
            rx.await
                .map_err(|_| Error::Gpu("the GPU polling thread ended early".into()))
                .and_then(|waited| waited)
        };
        waited.map_err(|e| self.or_lost(e))
    }

    fn params_for(
        &self,
        window: &Window,
        window_id: usize,
        layout: &Layout,
        combine_stride: Option<u32>,
        per_nat: f32,
    ) -> Params {
        let (row_len, col_begin, col_end, chunks) = match combine_stride {
            // The combine kernel's "row" is the window row's partials; `chunks` keeps pointing
            // where a split row's running state lives.
            Some(stride) => (stride, 0, stride, window.partials_stride),
            None => (
                window.row_len() as u32,
                window.col_begin as u32,
                window.col_end as u32,
                window.partials_stride,
            ),
        };
        Params {
            shift_p: 0,
            shift_q: 0,
            row_len,
            rows: window.rows,
            col_begin,
            col_end,
            chunk_len: layout.chunk_len,
            chunks,
            lanes: layout.lanes,
            out_base: 0,
            window_id: window_id as u32,
            subgroup_width: if self.subgroups() {
                self.subgroup_width
            } else {
                1
            },
            out_scale: per_nat,
            agree_base: 0,
            grad_base: 0,
            lane_span: layout.lane_span(),
            zero: 0,
            elem_row_len: window.row_len() as u32,
            _pad: [0; 2],
        }
    }

    pub(crate) fn bind_group(&self, scratch: &Scratch, b: &WindowBindings<'_>) -> wgpu::BindGroup {
        fn whole(buffer: &wgpu::Buffer) -> wgpu::BindingResource<'_> {
            wgpu::BindingResource::Buffer(buffer.as_entire_buffer_binding())
        }
        let params = wgpu::BufferBinding {
            buffer: &scratch.params,
            offset: 0,
            size: wgpu::BufferSize::new(std::mem::size_of::<Params>() as u64),
        };
        let resources = [
            wgpu::BindingResource::Buffer(params),
            wgpu::BindingResource::Buffer(b.p.clone()),
            wgpu::BindingResource::Buffer(b.q.clone()),
            whole(&scratch.partials),
            whole(&scratch.status),
            whole(&scratch.row_lse),
            wgpu::BindingResource::Buffer(b.out.clone()),
            wgpu::BindingResource::Buffer(b.agree.clone()),
            match &b.grad {
                Some((binding, _)) => wgpu::BindingResource::Buffer(binding.clone()),
                None => whole(&scratch.no_grad),
            },
        ];
        let entries: Vec<_> = resources
            .into_iter()
            .enumerate()
            .map(|(i, resource)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource,
            })
            .collect();
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("klgpu.bind_group"),
            layout: &self.kernels.layout,
            entries: &entries,
        })
    }

    /// Records one visit of a window: its pre-pass and/or main pass, each a terms dispatch
    /// plus, when rows are chunked, a combine dispatch. `slot_base` is the byte offset of the
    /// visit's params slots; the params themselves are returned, for the caller to write there
    /// ([`Scratch::write_params`]) before it submits.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn encode_window(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        job: &Job,
        window: &Window,
        window_id: usize,
        passes: Passes,
        bindings: &WindowBindings<'_>,
        bind_group: &wgpu::BindGroup,
        slot_base: u64,
    ) -> Vec<u8> {
        let subgroups = self.subgroups();
        let final_mode = |stats: bool| match window.split {
            None if stats => kernels::MODE_STATS,
            None => 0,
            Some(s) => {
                let mut m = 0;
                if !s.first {
                    m |= kernels::MODE_ACCUMULATE;
                }
                if !s.last {
                    m |= kernels::MODE_KEEP;
                } else if stats {
                    m |= kernels::MODE_STATS;
                }
                m
            }
        };
        // The one-pass KL kernels run over whole rows only: a row split across windows would
        // need its first windows again for the rows they could not finish.
        let one_pass = job.one_pass_first.filter(|kind| {
            passes == Passes::Both
                && match kind {
                    OnePass::KlLogits => self.one_pass_kl,
                    OnePass::KlNormalized => self.one_pass_normalized_kl,
                    OnePass::JsNormalized => self.one_pass_normalized_js,
                }
        });
        let (skip_pre, skip_main) = one_pass.map_or((0, 0), OnePass::skip_modes);
        // (stage, term, input, mode, is_combine)
        let mut dispatches: Vec<(Stage, Term, InputCode, u32, bool)> = Vec::new();
        if let Some(kind) = one_pass {
            // Without MODE_SKIP_DONE: it marks every row, finished or not, over what an
            // earlier call left there.
            let (term, input) = (job.term, job.input);
            let (first, combine) = kind.stages();
            if window.combine.is_some() {
                dispatches.push((first, term, input, kernels::MODE_PARTIAL, false));
                dispatches.push((combine, term, input, 0, true));
            } else {
                dispatches.push((first, term, input, 0, false));
            }
        }
        let mut add = |terms: Stage, combine: Stage, term: Term, input: InputCode, mode: u32| {
            let skip = if terms == Stage::Lse {
                skip_pre
            } else {
                skip_main
            };
            if window.combine.is_some() {
                dispatches.push((terms, term, input, kernels::MODE_PARTIAL | skip, false));
                dispatches.push((combine, term, input, mode | skip, true));
            } else {
                dispatches.push((terms, term, input, mode | skip, false));
            }
        };
        if passes != Passes::Main {
            match job.prepass {
                Some(Prepass::Lse) => {
                    // The loss kernel's pre-pass reads only the logits (bound as P).
                    let term = if job.term == Term::KlGrad {
                        Term::Measure(Measure::Entropy)
                    } else {
                        job.term
                    };
                    add(
                        Stage::Lse,
                        Stage::CombineLse,
                        term,
                        InputCode::Logits,
                        final_mode(false),
                    )
                }
                // The one pass for normalized rows wrote the sums of the rows it left.
                Some(Prepass::Sums) if !one_pass.is_some_and(OnePass::replaces_sums_pass) => add(
                    Stage::Terms,
                    Stage::Combine,
                    Term::Sums,
                    InputCode::Probs,
                    final_mode(true),
                ),
                Some(Prepass::Sums) | None => {}
            }
        }
        if passes != Passes::Pre {
            let mut mode = final_mode(false);
            if job.term == Term::KlGrad && mode & kernels::MODE_KEEP == 0 {
                mode |= kernels::MODE_MINUS_ONE;
            }
            let (terms, combine) = job.main_stages();
            add(terms, combine, job.term, job.input, mode);
        }
        let layout_of = |is_combine: bool| {
            if is_combine {
                (
                    window.combine.unwrap_or(window.terms),
                    Some(window.terms.chunks),
                )
            } else {
                (window.terms, None)
            }
        };
        let mut bytes = Vec::new();
        for (k, &(_, _, _, _, is_combine)) in dispatches.iter().enumerate() {
            let (layout, stride) = layout_of(is_combine);
            let mut p = self.params_for(window, window_id, &layout, stride, job.per_nat);
            p.shift_p = bindings.shifts.0;
            p.shift_q = bindings.shifts.1;
            p.out_base = bindings.out_base;
            p.agree_base = bindings.agree_base;
            p.grad_base = bindings.grad.as_ref().map_or(0, |g| g.1);
            bytes.resize(k * PARAM_SLOT as usize, 0);
            bytes.extend_from_slice(bytemuck::bytes_of(&p));
        }
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("klgpu.window"),
            timestamp_writes: None,
        });
        let loads = Loads {
            dtype: bindings.dtype,
            wide: bindings.vec4,
        };
        for (k, &(stage, term, input, mode, is_combine)) in dispatches.iter().enumerate() {
            let (layout, _) = layout_of(is_combine);
            let reduce =
                SegmentReduce::for_lanes(layout.lanes, subgroups.then_some(self.subgroup_width));
            let pipeline = (self.kernels).pipeline(
                &self.device,
                stage,
                term,
                input,
                mode,
                reduce,
                loads,
                layout.workgroup_size,
            );
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, bind_group, &[(slot_base + k as u64 * PARAM_SLOT) as u32]);
            let [x, y, z] = layout.workgroups();
            pass.dispatch_workgroups(x, y, z);
        }
        bytes
    }

    /// Waits until `staging`'s last copy is done and it is mapped again.
    async fn ready(&self, staging: &mut Staging, blocking: bool) -> Result<()> {
        let Some((mut mapped, index)) = staging.pending.take() else {
            return Ok(());
        };
        let cancelled = |_| self.gpu_error("an upload buffer's map was cancelled (device lost?)");
        // Usually done already: waiting for the window before this one polled the device.
        let result = match mapped.try_recv().map_err(cancelled)? {
            Some(result) => result,
            None => {
                self.wait(index, blocking).await?;
                mapped.await.map_err(cancelled)?
            }
        };
        result.map_err(|e| self.gpu_error(format!("mapping an upload buffer failed: {e}")))
    }

    /// Copies each slice to the start of its (mapped) staging buffer, and unmaps them. A large
    /// window is copied on several threads: one core's copy is slower than the memory, and on
    /// a discrete GPU this copy is most of what a call over host data costs.
    fn write_staged(&self, targets: &mut [(&mut Staging, &[u8])]) -> Result<()> {
        self.scoped(|| {
            let total: u64 = targets.iter().map(|(_, d)| d.len() as u64).sum();
            let threads = plan::copy_threads(total, self.upload_threads);
            // Disjoint views of each buffer, one per share (one per input when one thread
            // copies): (view, what goes in it).
            let mut jobs = Vec::new();
            for (staging, src) in targets.iter() {
                for range in plan::copy_ranges(src.len() as u64, total, threads) {
                    let part = &src[range.start as usize..range.end as usize];
                    // Mapped views are whole words: an odd count of 16-bit elements leaves
                    // two bytes of the last word unwritten, which no kernel reads.
                    let view = staging
                        .buffer
                        .slice(range.start..range.end.div_ceil(4) * 4)
                        .get_mapped_range_mut()
                        .map_err(|e| {
                            self.gpu_error(format!("writing an upload buffer failed: {e}"))
                        })?;
                    jobs.push((view, part));
                }
            }
            // Workers take jobs until none are left, this thread among them (alone when one
            // thread copies: nothing is spawned). A thread the system cannot start leaves its
            // share to the others rather than panicking.
            let queue = std::sync::Mutex::new(jobs);
            let work = || {
                loop {
                    // The lock is released before the copy, so workers copy side by side.
                    let job = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                    let Some((mut view, src)) = job else { break };
                    view.slice(..src.len()).copy_from_slice(src);
                }
            };
            std::thread::scope(|scope| {
                for _ in 1..threads {
                    let _ = std::thread::Builder::new().spawn_scoped(scope, work);
                }
                work();
            });
            for (staging, _) in targets.iter() {
                staging.buffer.unmap();
            }
            Ok(())
        })?
    }

    /// Runs a job over host slices: windows are uploaded into two alternating buffers while
    /// at most two windows are in flight, then status and per-row values are read back.
    pub(crate) async fn run_host(
        self: &Arc<Self>,
        job: &Job,
        plan: &Plan,
        data: HostData<'_>,
        blocking: bool,
    ) -> Result<Readback> {
        let mut scratch = self.scratch.take(&self.device);
        let result = self
            .run_host_with(&mut scratch, job, plan, data, blocking)
            .await;
        if let Ok(readback) = &result {
            scratch.note_status(readback);
            self.scratch.put(scratch);
        }
        result
    }

    async fn run_host_with(
        &self,
        scratch: &mut Scratch,
        job: &Job,
        plan: &Plan,
        data: HostData<'_>,
        blocking: bool,
    ) -> Result<Readback> {
        let uses_q = job.term.uses_q();
        let HostData { p, q, dtype } = data;
        let es = dtype.size() as usize;
        self.scoped(|| {
            let host = Some((self.upload, dtype));
            scratch.prepare(&self.device, plan, host, uses_q, plan.rows);
            scratch.reset_status(&self.queue);
        })?;
        let mut previous: Option<wgpu::SubmissionIndex> = None;
        let visits = visits(plan, job);
        for (k, &(wi, passes)) in visits.iter().enumerate() {
            let window = &plan.windows[wi];
            let last = k + 1 == visits.len();
            let slot = k % 2;
            let range = window.elem_start as usize * es
                ..(window.elem_start + window.elem_len) as usize * es;
            let sides: &[&[u8]] = if uses_q { &[p, q] } else { &[p] };
            let [p_staging, q_staging] = &mut scratch.staging;
            let mut targets = Vec::with_capacity(2);
            for (staging, data) in [p_staging, q_staging].into_iter().zip(sides) {
                let staging = staging[slot].as_mut().expect("prepared staging");
                self.ready(staging, blocking).await?;
                targets.push((staging, &data[range.clone()]));
            }
            self.write_staged(&mut targets)?;
            let submitted = self.scoped(|| {
                let mut encoder =
                    self.device
                        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                            label: Some("klgpu.host_window"),
                        });
                let upload = |encoder: &mut wgpu::CommandEncoder, side: usize| {
                    let buffer = scratch.windows[side][slot]
                        .as_ref()
                        .expect("prepared window");
                    let staging = &scratch.staging[side][slot]
                        .as_ref()
                        .expect("prepared staging")
                        .buffer;
                    if self.upload == Upload::Staged {
                        let bytes = (window.elem_len * es as u64).div_ceil(4) * 4;
                        encoder.copy_buffer_to_buffer(staging, 0, buffer, 0, bytes);
                    }
                    buffer
                };
                let wp = upload(&mut encoder, 0);
                let wq = if uses_q { upload(&mut encoder, 1) } else { wp };
                let rows = window.rows as u64;
                let (out, out_base) =
                    aligned_binding(&scratch.out, 0, window.row_begin, rows, 256, Dtype::F32);
                let (agree, agree_base) =
                    aligned_binding(&scratch.agree, 0, window.row_begin, rows, 256, Dtype::F32);
                let bindings = WindowBindings {
                    p: wp.as_entire_buffer_binding(),
                    q: wq.as_entire_buffer_binding(),
                    shifts: (0, 0),
                    out,
                    agree,
                    out_base,
                    agree_base,
                    grad: None,
                    vec4: false,
                    dtype,
                };
                let bindings = WindowBindings {
                    vec4: wide_loads(&bindings.p, &bindings.q, bindings.shifts, dtype),
                    ..bindings
                };
                let slot_base = slot as u64 * SLOTS_PER_WINDOW * PARAM_SLOT;
                let bind_group = self.bind_group(scratch, &bindings);
                let params = self.encode_window(
                    &mut encoder,
                    job,
                    window,
                    wi,
                    passes,
                    &bindings,
                    &bind_group,
                    slot_base,
                );
                scratch.write_params(&self.queue, slot_base, &params);
                if last {
                    // The results ride in the last window's submission.
                    encode_read_back(&mut encoder, scratch, plan.rows, job.agree);
                }
                self.queue.submit([encoder.finish()])
            })?;
            for side in 0..sides.len() {
                if let Some(staging) = scratch.staging[side][slot].as_mut() {
                    staging.remap_after(submitted.clone());
                }
            }
            if last {
                return self
                    .finish_read_back(scratch, plan.rows, job.agree, submitted, blocking)
                    .await;
            }
            if let Some(index) = previous.replace(submitted) {
                self.wait(index, blocking).await?;
            }
        }
        Err(Error::Gpu("a plan without windows".into()))
    }

    /// Records a whole job over inputs that already live on the GPU into `encoder`: every
    /// window is a binding range of the caller's buffers, so nothing is copied. Per-row values
    /// go to `out` (or the scratch's own output).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn encode_device(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        scratch: &mut Scratch,
        job: &Job,
        plan: &Plan,
        p: &GpuSlice<'_>,
        q: &GpuSlice<'_>,
        out: Option<&GpuSlice<'_>>,
        grad: Option<&GpuSlice<'_>>,
    ) -> Result<()> {
        let visits = visits(plan, job);
        // Rows the caller's `out` takes are not the scratch's to hold, nor is agreement,
        // which no buffer call reads back: each window writes its own at the start.
        let result_rows = if out.is_some() { 0 } else { plan.rows };
        scratch.prepare(&self.device, plan, None, job.term.uses_q(), result_rows);
        scratch.ensure_params(&self.device, visits.len() as u64 * SLOTS_PER_WINDOW);
        scratch.reset_status(&self.queue);
        let align = self.storage_align;
        let dtype = p.dtype;
        // Every window's bind group first, in a scope of its own: a buffer wgpu cannot bind
        // (destroyed, of another device) is an error before anything is recorded, where a
        // pass recorded with an invalid bind group made the caller's `encoder.finish()` panic.
        let bind_scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut windows = Vec::with_capacity(visits.len());
        for &(wi, passes) in &visits {
            let w = &plan.windows[wi];
            let (pb, shift_p) =
                aligned_binding(p.buffer, p.offset, w.elem_start, w.elem_len, align, dtype);
            let (qb, shift_q) =
                aligned_binding(q.buffer, q.offset, w.elem_start, w.elem_len, align, dtype);
            let (out_buffer, out_offset) = match out {
                Some(o) => (o.buffer, o.offset),
                None => (&scratch.out, 0),
            };
            let rows = w.rows as u64;
            let (ob, out_base) =
                aligned_binding(out_buffer, out_offset, w.row_begin, rows, align, Dtype::F32);
            let (ab, agree_base) = aligned_binding(&scratch.agree, 0, 0, rows, 256, Dtype::F32);
            let bindings = WindowBindings {
                p: pb,
                q: qb,
                shifts: (shift_p, shift_q),
                out: ob,
                agree: ab,
                out_base,
                agree_base,
                grad: grad.map(|g| {
                    aligned_binding(g.buffer, g.offset, w.elem_start, w.elem_len, align, g.dtype)
                }),
                vec4: false,
                dtype,
            };
            let bindings = WindowBindings {
                vec4: wide_loads(&bindings.p, &bindings.q, bindings.shifts, dtype),
                ..bindings
            };
            let bind_group = self.bind_group(scratch, &bindings);
            windows.push((wi, passes, bindings, bind_group));
        }
        if let Some(e) = pollster::block_on(bind_scope.pop()) {
            return Err(Error::Gpu(format!(
                "the buffers cannot be bound (nothing was recorded): {e}"
            )));
        }
        let mut params = Vec::with_capacity(windows.len());
        for (k, (wi, passes, bindings, bind_group)) in windows.iter().enumerate() {
            let w = &plan.windows[*wi];
            let slot_base = k as u64 * SLOTS_PER_WINDOW * PARAM_SLOT;
            let bytes = self.encode_window(
                encoder, job, w, *wi, *passes, bindings, bind_group, slot_base,
            );
            params.push((slot_base, bytes));
        }
        drop(windows);
        for (slot_base, bytes) in params {
            scratch.write_params(&self.queue, slot_base, &bytes);
        }
        Ok(())
    }

    /// Reads `len` values at element `first` of a GPU slice, widened to f32 (for error
    /// messages and [`Engine::read_f32`](crate::Engine::read_f32)), in pieces that a staging
    /// buffer of this device can hold.
    pub(crate) async fn read_elements(
        &self,
        slice: &GpuSlice<'_>,
        first: u64,
        len: u64,
        blocking: bool,
    ) -> Result<Vec<f32>> {
        let es = slice.dtype.size();
        // A piece's copy spans at most 3 bytes before its first element and 3 after its last
        // (whole words); staging buffers are rounded up to 16 bytes.
        let cap = (self.device.limits().max_buffer_size / 16 * 16).min(READ_PIECE_BYTES);
        let piece = (cap.saturating_sub(8) / es).max(1);
        let mut values = Vec::with_capacity(len as usize);
        let mut done = 0;
        while done < len {
            let n = piece.min(len - done);
            values.extend(self.read_piece(slice, first + done, n, blocking).await?);
            done += n;
        }
        Ok(values)
    }

    async fn read_piece(
        &self,
        slice: &GpuSlice<'_>,
        first: u64,
        len: u64,
        blocking: bool,
    ) -> Result<Vec<f32>> {
        // Copies move whole words: from the word that holds the first element to the one
        // that holds the last (the slice's checks make sure the buffer has it).
        let es = slice.dtype.size();
        let start = slice.offset + first * es;
        let word_start = start / 4 * 4;
        let bytes = (start + len * es).div_ceil(4) * 4 - word_start;
        let skip = (start - word_start) as usize;
        let dtype = slice.dtype;
        // In the scope too: on a caller's device an error here (a lost device) would go to
        // its uncaptured-error handler, wgpu's default one panics. Without taking an error
        // of other work: a read is a step of a call that checked for one as it began, or of
        // a check, which leaves such errors to the next call.
        self.lost()?;
        let (staging, index) = self.in_scopes(|| {
            let staging = buffer(
                &self.device,
                "klgpu.read_elements",
                bytes,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            );
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("klgpu.read_elements"),
                });
            encoder.copy_buffer_to_buffer(slice.buffer, word_start, &staging, 0, bytes);
            let index = self.queue.submit([encoder.finish()]);
            (staging, index)
        })?;
        self.map_read(&staging, bytes, index, blocking, |bytes| {
            let bytes = &bytes[skip..skip + (len * es) as usize];
            // The mapped bytes need not be aligned for T: collected into a Vec of T first.
            use bytemuck::pod_collect_to_vec as collect;
            match dtype {
                Dtype::F32 => collect(bytes),
                Dtype::F16 => widened(&collect::<u8, half::f16>(bytes)).into_owned(),
                Dtype::BF16 => widened(&collect::<u8, half::bf16>(bytes)).into_owned(),
            }
        })
        .await
    }

    /// Maps `buffer[..bytes]` once `index` is done and hands the bytes to `read`.
    async fn map_read<T>(
        &self,
        buffer: &wgpu::Buffer,
        bytes: u64,
        index: wgpu::SubmissionIndex,
        blocking: bool,
        read: impl FnOnce(&[u8]) -> T,
    ) -> Result<T> {
        let slice = buffer.slice(0..bytes);
        let (tx, rx) = futures_channel::oneshot::channel();
        let unmap = UnmapOnDrop {
            buffer,
            state: Arc::new(AtomicU8::new(MAP_PENDING)),
            device: &self.device,
            index: index.clone(),
        };
        let state = unmap.state.clone();
        // In scopes: on a caller's device a failed map (a lost device) would go to its
        // uncaptured-error handler, and wgpu's default one panics. A map that failed is not
        // unmapped.
        if let Err(e) = self.in_scopes(|| {
            slice.map_async(wgpu::MapMode::Read, move |r| {
                let settled = if r.is_ok() { MAP_DONE } else { MAP_FAILED };
                state.store(settled, Ordering::Release);
                let _ = tx.send(r);
            })
        }) {
            unmap.state.store(MAP_FAILED, Ordering::Release);
            return Err(e);
        }
        self.wait(index, blocking).await?;
        rx.await
            .map_err(|_| self.gpu_error("a readback was cancelled (device lost?)"))?
            .map_err(|e| self.gpu_error(format!("mapping a readback buffer failed: {e}")))?;
        let value = {
            let view = slice
                .get_mapped_range()
                .map_err(|e| self.gpu_error(format!("reading a readback buffer failed: {e}")))?;
            read(&view)
        };
        drop(unmap);
        Ok(value)
    }

    /// Copies status, values and agreement into the readback buffer and maps it.
    pub(crate) async fn read_back(
        &self,
        scratch: &Scratch,
        rows: u64,
        agree: bool,
        blocking: bool,
    ) -> Result<Readback> {
        // For Workspace::check, which leaves an error of other work to the next call.
        self.lost()?;
        let index = self.in_scopes(|| {
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("klgpu.readback"),
                });
            encode_read_back(&mut encoder, scratch, rows, agree);
            self.queue.submit([encoder.finish()])
        })?;
        self.finish_read_back(scratch, rows, agree, index, blocking)
            .await
    }

    /// Maps the readback buffer once submission `index` (which holds `encode_read_back`'s
    /// copies) is done, and decodes it.
    pub(crate) async fn finish_read_back(
        &self,
        scratch: &Scratch,
        rows: u64,
        agree: bool,
        index: wgpu::SubmissionIndex,
        blocking: bool,
    ) -> Result<Readback> {
        let bytes = rows * 4;
        let total = 16 + if agree { 2 * bytes } else { bytes };
        let n = rows as usize;
        self.map_read(&scratch.readback, total, index, blocking, |raw| {
            let words: &[u32] = bytemuck::cast_slice(raw);
            Readback {
                status: [words[0], words[1], words[2], words[3]],
                values: bytemuck::cast_slice(&words[4..4 + n]).to_vec(),
                agree: agree.then(|| words[4 + n..4 + 2 * n].iter().map(|&w| w != 0).collect()),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn turns_never_overlap_and_all_come_back() {
        let serial = Arc::new(Serial::default());
        let (inside, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..200 {
                        let _turn = serial.take();
                        most.fetch_max(inside.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                });
            }
        });
        assert_eq!(most.load(Ordering::SeqCst), 1);
        assert!(!serial.state().busy, "every turn was given back");
    }

    /// Counts its wakes.
    struct Wakes(AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn an_async_turn_waits_as_a_future_and_is_woken_when_the_turn_ends() {
        let serial = Arc::new(Serial::default());
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        let held = serial.take();
        let mut waiting = Box::pin(serial.take_async());
        for _ in 0..3 {
            assert!(
                waiting.as_mut().poll(&mut cx).is_pending(),
                "no turn while one is out"
            );
        }
        assert_eq!(
            serial.state().wakers.len(),
            1,
            "one waker, however often polled"
        );
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
        drop(held);
        assert_eq!(
            wakes.0.load(Ordering::SeqCst),
            1,
            "woken when the turn ended"
        );
        let std::task::Poll::Ready(turn) = waiting.as_mut().poll(&mut cx) else {
            panic!("the turn is free");
        };
        assert!(serial.state().busy);
        drop(turn);
        assert!(!serial.state().busy);
    }

    /// Counts its drops.
    struct Dropped(Arc<AtomicUsize>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn what_is_dropped_in_a_turn_waits_for_the_turn_out_but_never_blocks() {
        let serial = Arc::new(Serial::default());
        let drops = Arc::new(AtomicUsize::new(0));
        serial.drop_in_turn(Box::new(Dropped(drops.clone())));
        assert_eq!(
            drops.load(Ordering::SeqCst),
            1,
            "no turn out: dropped at once"
        );
        assert!(!serial.state().busy, "and its turn given back");
        let held = serial.take();
        serial.drop_in_turn(Box::new(Dropped(drops.clone())));
        serial.drop_in_turn(Box::new(Dropped(drops.clone())));
        assert_eq!(
            drops.load(Ordering::SeqCst),
            1,
            "buried while a turn is out"
        );
        drop(held);
        assert_eq!(
            drops.load(Ordering::SeqCst),
            3,
            "dropped as that turn ended"
        );
        assert!(!serial.state().busy);
    }

    /// Panics when dropped.
    struct Bomb;

    impl Drop for Bomb {
        fn drop(&mut self) {
            panic!("a buried drop panics");
        }
    }

    #[test]
    fn a_buried_drop_that_panics_still_ends_the_turn() {
        let serial = Arc::new(Serial::default());
        let held = serial.take();
        serial.drop_in_turn(Box::new(Bomb));
        let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(held)));
        assert!(unwound.is_err(), "the panic reaches the turn's holder");
        assert!(
            !serial.state().busy,
            "and the turn is free for the next call"
        );
        let unwound = std::panic::catch_unwind(|| serial.drop_in_turn(Box::new(Bomb)));
        assert!(unwound.is_err(), "no turn out: it panics at once");
        assert!(!serial.state().busy, "and gives its turn back");
        drop(serial.take());
    }
}
