//! Data that already lives on the GPU: the caller's buffers, recording into the caller's
//! command encoder, the KL loss with its gradient, and a readback helper.
//!
//! Inputs are `wgpu::BufferSlice`s of storage buffers holding f32 (or, with
//! [`Options::dtype`], f16 or bf16): their offset and length give the elements. Nothing is copied to the host; only status words and results come back.

use crate::engine::{Engine, job_for};
use crate::error::{Error, Problem, Result, Side};
use crate::kernels::{self, InputCode, Term};
use crate::launch::{Gpu, GpuSlice, Job, Prepass, Readback, Scratch, Stray, encode_read_back};
use crate::plan::Plan;
use crate::types::{Dtype, Element, Input, Measure, Options};

/// What [`Engine::create_f32_buffer`] and [`Engine::create_f32_buffer_init`] make: usable as
/// input, output or gradient, and copyable both ways.
const F32_BUFFER_USAGES: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

/// Checks that a slice can be bound as storage of `dtype` elements and describes it.
fn gpu_slice<'a>(
    name: &'static str,
    slice: &wgpu::BufferSlice<'a>,
    dtype: Dtype,
) -> Result<GpuSlice<'a>> {
    let invalid = |reason: String| Error::InvalidBuffer { name, reason };
    let buffer = slice.buffer();
    if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
        return Err(invalid(format!(
            "the buffer was created without BufferUsages::STORAGE (usage: {:?})",
            buffer.usage()
        )));
    }
    let es = dtype.size();
    if slice.offset() % es != 0 {
        return Err(invalid(format!(
            "offset {} is not a multiple of {es} bytes ({})",
            slice.offset(),
            dtype.name()
        )));
    }
    if slice.size() % es != 0 {
        return Err(invalid(format!(
            "size {} bytes is not a whole number of {}",
            slice.size(),
            dtype.name()
        )));
    }
    // The kernels bind, and copies move, whole 4-byte words.
    let end = slice.offset() + slice.size();
    if end.div_ceil(4) * 4 > buffer.size() {
        return Err(invalid(format!(
            "the slice ends {end} bytes in, inside the buffer's last 4-byte word, which the \
             buffer ({} bytes) does not hold whole: pad it to a multiple of 4 bytes",
            buffer.size()
        )));
    }
    Ok(GpuSlice {
        buffer,
        offset: slice.offset(),
        elems: slice.size() / es,
        dtype,
    })
}

/// A mapped buffer fails the submission that uses it (wgpu's submit error otherwise), in the
/// calls that submit their work themselves. Not for a recording's buffers: those need to be
/// unmapped only when the caller submits.
/// wgpu 30 has no map state to ask; a view of the whole buffer is had only while it is mapped
/// (and not while views of it are out, nor while a map is pending, so this misses some
/// mapped buffers, never takes an unmapped one for mapped).
fn refuse_mapped(name: &'static str, buffer: &wgpu::Buffer) -> Result<()> {
    if buffer.slice(..).get_mapped_range().is_ok() {
        return Err(Error::InvalidBuffer {
            name,
            reason: "the buffer is mapped: unmap it before klgpu uses it".into(),
        });
    }
    Ok(())
}

/// An error of other work taken aside by a check, put back when the check ends or is dropped.
struct StrayAside<'a> {
    gpu: &'a Gpu,
    stray: Option<Stray>,
}

impl Drop for StrayAside<'_> {
    fn drop(&mut self) {
        if let Some(stray) = self.stray.take() {
            self.gpu.keep_stray(stray);
        }
    }
}

/// An owned copy of a [`GpuSlice`], kept by a [`Workspace`] until its recording is checked.
#[derive(Clone, Debug)]
struct OwnedSlice {
    buffer: wgpu::Buffer,
    offset: u64,
    elems: u64,
    dtype: Dtype,
}

impl OwnedSlice {
    fn of(s: &GpuSlice<'_>) -> Self {
        OwnedSlice {
            buffer: s.buffer.clone(),
            offset: s.offset,
            elems: s.elems,
            dtype: s.dtype,
        }
    }

    fn view(&self) -> GpuSlice<'_> {
        GpuSlice {
            buffer: &self.buffer,
            offset: self.offset,
            elems: self.elems,
            dtype: self.dtype,
        }
    }
}

/// What is needed to turn raised flags into an error naming the element.
#[derive(Clone, Debug)]
struct Locator {
    plan: Plan,
    cols: u64,
    /// The slices bound as P and Q, and how each is validated.
    p: (OwnedSlice, Input),
    q: (OwnedSlice, Input),
    uses_q: bool,
    /// Whether the kernels normalize probabilities (an all-zero row is then empty).
    normalized: bool,
    /// The loss kernel binds the logits as P and the target as Q; users call the target P.
    swap_sides: bool,
    /// The caller's output slice (recordings), where a row that overflowed f32 reads NaN.
    out: Option<OwnedSlice>,
}

impl Locator {
    /// The argument names of the slices bound as P and Q.
    fn bound_names(&self) -> (&'static str, &'static str) {
        if self.swap_sides {
            ("logits", "target")
        } else {
            ("p", "q")
        }
    }
}

/// Reusable scratch buffers for recording work into your own command encoders.
///
/// One recording at a time: record, submit the encoder, then [`Workspace::check`] (which
/// reports bad input found by the kernels) before recording into it again. Keep one workspace
/// per concurrent stream of work.
pub struct Workspace {
    /// Made by the first recording, so that making a workspace touches no device.
    scratch: Option<Scratch>,
    pending: Option<Locator>,
    /// The engine that made it: its buffers live on that engine's device.
    engine: std::sync::Weak<crate::launch::Gpu>,
}

/// On OpenGL, destroying a buffer takes wgpu's one GL context, which a running call can hold
/// for longer than wgpu waits before it panics (six seconds on EGL, one on WGL; a workspace dropped while another
/// thread's call ran did, in the GL test suite). So the buffers go inside a turn, as calls
/// do; without waiting for one, which could wait forever on a call that this thread polls.
impl Drop for Workspace {
    fn drop(&mut self) {
        if let Some(gpu) = self.engine.upgrade() {
            gpu.drop_in_turn((self.scratch.take(), self.pending.take()));
        }
    }
}

impl std::fmt::Debug for Workspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workspace")
            .field("pending", &self.pending.is_some())
            .finish()
    }
}

impl Workspace {
    /// Refuses an engine other than the one that made this workspace.
    fn belongs_to(&self, engine: &Engine) -> Result<()> {
        if engine.made(&self.engine) {
            return Ok(());
        }
        Err(Error::InvalidArgument(
            "this workspace was made by another engine (its buffers and record are that \
             engine's, even on the same device): use one \
             from this engine's Engine::workspace"
                .into(),
        ))
    }

    /// Waits for the recorded work and reports whether its inputs were valid. Call after
    /// submitting the encoder. Blocking.
    ///
    /// # Errors
    /// What the recorded call would return on the same inputs; [`Error::InvalidArgument`] if
    /// the work has not run; and [`Error::Gpu`] if the adapter's subgroups turned out not to
    /// be runs of consecutive invocations, so the recorded reductions wrote wrong values
    /// (the engine reduces without subgroups from then on: record the work again).
    pub fn check(&mut self, engine: &Engine) -> Result<()> {
        pollster::block_on(self.check_inner(engine, true))
    }

    /// Async twin of [`Workspace::check`].
    pub async fn check_async(&mut self, engine: &Engine) -> Result<()> {
        self.check_inner(engine, false).await
    }

    async fn check_inner(&mut self, engine: &Engine, blocking: bool) -> Result<()> {
        self.belongs_to(engine)?;
        if self.pending.is_none() {
            return Ok(());
        }
        let checked = self.check_pending(engine, blocking).await;
        // The recording is checked once the check returns, whatever it returns. A check whose
        // future is dropped before leaves it to the next one (which returned Ok over it
        // unchecked when the recording went at the start).
        self.pending = None;
        checked
    }

    async fn check_pending(&mut self, engine: &Engine, blocking: bool) -> Result<()> {
        let gpu = engine.gpu();
        let _turn = gpu.turn_async().await;
        // An error of other work on the device is not the recording's verdict: taken aside
        // while the status is read and the verdict located (whose reads leave any that comes
        // meanwhile), and left to the next call (also when this future is dropped); unless
        // the recording did not run, which it may explain (its submit failed).
        let mut aside = StrayAside {
            gpu,
            stray: gpu.take_stray(),
        };
        self.verdict(engine, blocking, &mut aside.stray).await
    }

    async fn verdict(
        &mut self,
        engine: &Engine,
        blocking: bool,
        stray: &mut Option<Stray>,
    ) -> Result<()> {
        let gpu = engine.gpu();
        let scratch = self
            .scratch
            .get_or_insert_with(|| Scratch::new(&gpu.device));
        let readback = gpu.read_back(scratch, 0, false, blocking).await?;
        let Some(locator) = &self.pending else {
            return Ok(());
        };
        if readback.status[3] != kernels::RAN_MARK {
            if let Some(stray) = stray.take() {
                return Err(Error::Gpu(format!(
                    "Workspace::check found that the recorded work has not run, and the \
                     engine's device reported an error meanwhile (the submit of the recording \
                     may have failed; the recording is dropped): {}",
                    stray.message
                )));
            }
            return Err(Error::InvalidArgument(
                "Workspace::check found that the recorded work has not run: submit the encoder \
                 on this engine's queue before checking (if it was submitted, the submit \
                 failed, and an earlier call reported why; the recording is dropped: record it \
                 again)"
                    .into(),
            ));
        }
        if readback.status[0] & kernels::FLAG_SUBGROUP_LAYOUT != 0 && engine.uses_subgroups() {
            // The calls that run their own work fall back and run it again; a recording's
            // results are in the caller's buffers already, wrong, and only the caller can
            // record it again.
            engine.disable_subgroups();
            return Err(Error::Gpu(
                "this adapter's subgroups are not runs of consecutive invocations, so the \
                 recording's subgroup reductions wrote wrong values; klgpu now reduces without \
                 subgroups on this engine: record the work again"
                    .into(),
            ));
        }
        engine.raise(&readback, locator, blocking).await
    }
}

impl Engine {
    /// KL(P‖Q) of two f32 storage-buffer slices of probabilities. Blocking; the data stays on
    /// the GPU.
    ///
    /// # Errors
    /// As [`Engine::kl_divergence`], plus [`Error::InvalidBuffer`] for a slice that is not
    /// whole f32s at a 4-byte offset or whose buffer lacks `BufferUsages::STORAGE`.
    pub fn kl_divergence_buffers(
        &self,
        p: wgpu::BufferSlice<'_>,
        q: wgpu::BufferSlice<'_>,
    ) -> Result<f64> {
        self.divergence_buffers(Measure::KullbackLeibler, p, Some(q), &Options::default())
    }

    /// Async twin of [`Engine::kl_divergence_buffers`].
    pub async fn kl_divergence_buffers_async(
        &self,
        p: wgpu::BufferSlice<'_>,
        q: wgpu::BufferSlice<'_>,
    ) -> Result<f64> {
        self.divergence_buffers_async(Measure::KullbackLeibler, p, Some(q), &Options::default())
            .await
    }

    /// Cross-entropy of two GPU slices. Blocking.
    pub fn cross_entropy_buffers(
        &self,
        p: wgpu::BufferSlice<'_>,
        q: wgpu::BufferSlice<'_>,
    ) -> Result<f64> {
        self.divergence_buffers(Measure::CrossEntropy, p, Some(q), &Options::default())
    }

    /// Async twin of [`Engine::cross_entropy_buffers`].
    pub async fn cross_entropy_buffers_async(
        &self,
        p: wgpu::BufferSlice<'_>,
        q: wgpu::BufferSlice<'_>,
    ) -> Result<f64> {
        self.divergence_buffers_async(Measure::CrossEntropy, p, Some(q), &Options::default())
            .await
    }

    /// Entropy of a GPU slice. Blocking.
    pub fn entropy_buffers(&self, p: wgpu::BufferSlice<'_>) -> Result<f64> {
        self.divergence_buffers(Measure::Entropy, p, None, &Options::default())
    }

    /// Async twin of [`Engine::entropy_buffers`].
    pub async fn entropy_buffers_async(&self, p: wgpu::BufferSlice<'_>) -> Result<f64> {
        self.divergence_buffers_async(Measure::Entropy, p, None, &Options::default())
            .await
    }

    /// Jensen–Shannon divergence of two GPU slices. Blocking.
    pub fn js_divergence_buffers(
        &self,
        p: wgpu::BufferSlice<'_>,
        q: wgpu::BufferSlice<'_>,
    ) -> Result<f64> {
        self.divergence_buffers(Measure::JensenShannon, p, Some(q), &Options::default())
    }

    /// Async twin of [`Engine::js_divergence_buffers`].
    pub async fn js_divergence_buffers_async(
        &self,
        p: wgpu::BufferSlice<'_>,
        q: wgpu::BufferSlice<'_>,
    ) -> Result<f64> {
        self.divergence_buffers_async(Measure::JensenShannon, p, Some(q), &Options::default())
            .await
    }

    /// Any measure of one distribution (pair) held in GPU slices, with options. Blocking.
    pub fn divergence_buffers(
        &self,
        measure: Measure,
        p: wgpu::BufferSlice<'_>,
        q: Option<wgpu::BufferSlice<'_>>,
        opts: &Options,
    ) -> Result<f64> {
        pollster::block_on(self.divergence_buffers_inner(measure, p, q, opts, true))
    }

    /// Async twin of [`Engine::divergence_buffers`].
    pub async fn divergence_buffers_async(
        &self,
        measure: Measure,
        p: wgpu::BufferSlice<'_>,
        q: Option<wgpu::BufferSlice<'_>>,
        opts: &Options,
    ) -> Result<f64> {
        self.divergence_buffers_inner(measure, p, q, opts, false)
            .await
    }

    async fn divergence_buffers_inner(
        &self,
        measure: Measure,
        p: wgpu::BufferSlice<'_>,
        q: Option<wgpu::BufferSlice<'_>>,
        opts: &Options,
        blocking: bool,
    ) -> Result<f64> {
        let (p, q) = self.inputs(measure, &p, q.as_ref(), opts.dtype)?;
        let cols = p.elems.max(1);
        crate::plan::check_columns(cols)?;
        let job = job_for(Term::Measure(measure), opts)?;
        let readback = self
            .run_buffers(&job, &p, &q, cols, None, None, blocking)
            .await?;
        Ok(readback.values[0] as f64)
    }

    /// Per-row values of `[rows × cols]` GPU inputs written as f32 into `out` (one per row,
    /// in the requested base). Blocking until the results are in `out`, which must not lie in
    /// P's or Q's buffer ([`Error::InvalidBuffer`]).
    ///
    /// When a call fails on the inputs' values, the kernels have still run to the end and
    /// written every row of `out` (a row that overflowed f32 reads NaN): take none of them.
    /// Nothing outside `out` is written.
    pub fn rows_buffers(
        &self,
        measure: Measure,
        p: wgpu::BufferSlice<'_>,
        q: Option<wgpu::BufferSlice<'_>>,
        cols: usize,
        opts: &Options,
        out: wgpu::BufferSlice<'_>,
    ) -> Result<()> {
        pollster::block_on(self.rows_buffers_inner(measure, p, q, cols, opts, out, true))
    }

    /// Async twin of [`Engine::rows_buffers`].
    pub async fn rows_buffers_async(
        &self,
        measure: Measure,
        p: wgpu::BufferSlice<'_>,
        q: Option<wgpu::BufferSlice<'_>>,
        cols: usize,
        opts: &Options,
        out: wgpu::BufferSlice<'_>,
    ) -> Result<()> {
        self.rows_buffers_inner(measure, p, q, cols, opts, out, false)
            .await
    }

    /// Per-row KL(P‖Q) of GPU inputs into `out`. Blocking.
    pub fn kl_divergence_rows_buffers(
        &self,
        p: wgpu::BufferSlice<'_>,
        q: wgpu::BufferSlice<'_>,
        cols: usize,
        input: Input,
        out: wgpu::BufferSlice<'_>,
    ) -> Result<()> {
        self.rows_buffers(
            Measure::KullbackLeibler,
            p,
            Some(q),
            cols,
            &Options::input(input),
            out,
        )
    }

    /// Per-row cross-entropy of GPU inputs into `out`. Blocking.
    pub fn cross_entropy_rows_buffers(
        &self,
        p: wgpu::BufferSlice<'_>,
        q: wgpu::BufferSlice<'_>,
        cols: usize,
        input: Input,
        out: wgpu::BufferSlice<'_>,
    ) -> Result<()> {
        self.rows_buffers(
            Measure::CrossEntropy,
            p,
            Some(q),
            cols,
            &Options::input(input),
            out,
        )
    }

    /// Per-row entropy of a GPU input into `out`. Blocking.
    pub fn entropy_rows_buffers(
        &self,
        p: wgpu::BufferSlice<'_>,
        cols: usize,
        input: Input,
        out: wgpu::BufferSlice<'_>,
    ) -> Result<()> {
        self.rows_buffers(Measure::Entropy, p, None, cols, &Options::input(input), out)
    }

    /// Per-row Jensen–Shannon divergence of GPU inputs into `out`. Blocking.
    pub fn js_divergence_rows_buffers(
        &self,
        p: wgpu::BufferSlice<'_>,
        q: wgpu::BufferSlice<'_>,
        cols: usize,
        input: Input,
        out: wgpu::BufferSlice<'_>,
    ) -> Result<()> {
        self.rows_buffers(
            Measure::JensenShannon,
            p,
            Some(q),
            cols,
            &Options::input(input),
            out,
        )
    }

    #[allow(clippy::too_many_arguments)]
    async fn rows_buffers_inner(
        &self,
        measure: Measure,
        p: wgpu::BufferSlice<'_>,
        q: Option<wgpu::BufferSlice<'_>>,
        cols: usize,
        opts: &Options,
        out: wgpu::BufferSlice<'_>,
        blocking: bool,
    ) -> Result<()> {
        let (p, q) = self.inputs(measure, &p, q.as_ref(), opts.dtype)?;
        let rows = shape(&p, cols)?;
        let out = output("out", &out, rows)?;
        let job = job_for(Term::Measure(measure), opts)?;
        self.run_buffers(&job, &p, &q, cols as u64, Some(&out), None, blocking)
            .await?;
        Ok(())
    }

    /// A workspace for recording into your own command encoders (see [`Engine::record_rows`]).
    pub fn workspace(&self) -> Workspace {
        Workspace {
            scratch: None,
            pending: None,
            engine: self.token(),
        }
    }

    /// Records a per-row computation into `encoder`, writing one f32 per row into `out` (a
    /// buffer apart from P's and Q's, else [`Error::InvalidBuffer`]); no submission, no wait.
    /// Submit the encoder when you like (on this engine's queue), read `out` when you want it
    /// ([`Engine::read_f32`]), and call [`Workspace::check`] to learn whether the inputs were
    /// valid (and that the work ran): if not, `out` holds no values to take, as with
    /// [`Engine::rows_buffers`].
    ///
    /// Parameters are staged with `Queue::write_buffer`, so they reach the GPU with the next
    /// submission on this engine's queue. On OpenGL it first waits for its turn among this
    /// engine's calls, blocking the thread (see the README).
    #[allow(clippy::too_many_arguments)]
    pub fn record_rows(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        workspace: &mut Workspace,
        measure: Measure,
        p: wgpu::BufferSlice<'_>,
        q: Option<wgpu::BufferSlice<'_>>,
        cols: usize,
        opts: &Options,
        out: wgpu::BufferSlice<'_>,
    ) -> Result<()> {
        let (p, q) = self.inputs(measure, &p, q.as_ref(), opts.dtype)?;
        let rows = shape(&p, cols)?;
        let out = output("out", &out, rows)?;
        let job = job_for(Term::Measure(measure), opts)?;
        let locator = self.locator(&job, &p, &q, cols as u64);
        self.record(encoder, workspace, &job, &p, &q, &out, None, locator)
    }

    /// KL(P‖softmax(z)) per row, with its gradient with respect to the logits,
    /// ∂/∂z KL(P‖softmax(z)) = softmax(z) − p, in one fused pass (after the log-sum-exp pass
    /// over z). `target` holds probabilities P, `logits` the scores z, both `[rows × cols]`;
    /// the gradient (f32, same shape) goes to `grad`. Returns the per-row losses. Blocking.
    /// The losses come back in one readback buffer of 8 bytes a row: more rows than the
    /// device's `max_buffer_size` holds that way are refused ([`Error::InvalidArgument`]);
    /// [`Engine::record_kl_loss_and_grad`] writes any number to a buffer of yours.
    /// When the call fails on the inputs' values, `grad` has been written all the same: take
    /// none of it. Errors name the target P and the logits Q, as in KL(P‖Q = softmax(z)).
    ///
    /// Minimizing this is minimizing the cross-entropy H(P, softmax(z)): the two differ by
    /// H(P), which does not depend on z.
    ///
    /// Each gradient element is within (1 + |ln q|)·2^-21·(q + p) of the exact q − p
    /// (q = softmax(z)), as an f32 softmax computed from z − max can be, or within 2^-126
    /// where that bound is smaller: a q below f32's normal range may come out 0 (adapters that
    /// flush subnormals write 0 there anyway).
    ///
    /// The loss meets the library's bar for target rows that are distributions (sum to 1), as
    /// training targets are: the fused pass adds Q's mass where P has none through Σ q = 1. For
    /// a row that is not (a top-k teacher left unnormalized, say) it is Σ p·ln(p/q) within
    /// 1e-6 relative plus about 2^-20·|1 − Σ p| + 2^-22 absolute: the rounded q's sum to 1
    /// only as well as the row's log-sum-exp is rounded (an ulp of ln Σ e^(z − max), 1e-6 on
    /// rows of 262,144 columns), and a target's mass away from 1 weighs that. Measured: 2.4e-7
    /// on rows of 3 with almost no target mass, 1.1e-6 for targets summing to 2 and 1.2e-5
    /// for 10 (loss ~30) on rows of 262,144 columns.
    pub fn kl_loss_and_grad_buffers(
        &self,
        target: wgpu::BufferSlice<'_>,
        logits: wgpu::BufferSlice<'_>,
        cols: usize,
        grad: wgpu::BufferSlice<'_>,
    ) -> Result<Vec<f64>> {
        pollster::block_on(self.loss_and_grad_inner(target, logits, cols, grad, true))
    }

    /// Async twin of [`Engine::kl_loss_and_grad_buffers`].
    pub async fn kl_loss_and_grad_buffers_async(
        &self,
        target: wgpu::BufferSlice<'_>,
        logits: wgpu::BufferSlice<'_>,
        cols: usize,
        grad: wgpu::BufferSlice<'_>,
    ) -> Result<Vec<f64>> {
        self.loss_and_grad_inner(target, logits, cols, grad, false)
            .await
    }

    async fn loss_and_grad_inner(
        &self,
        target: wgpu::BufferSlice<'_>,
        logits: wgpu::BufferSlice<'_>,
        cols: usize,
        grad: wgpu::BufferSlice<'_>,
        blocking: bool,
    ) -> Result<Vec<f64>> {
        let (z, t, grad, cols) = self.loss_inputs(&target, &logits, cols, &grad)?;
        let (rows, most) = (
            z.elems / cols,
            crate::plan::readback_rows(self.device().limits().max_buffer_size),
        );
        if rows > most {
            return Err(Error::InvalidArgument(format!(
                "{rows} rows' losses are more than one readback holds on this device ({most}); \
                 Engine::record_kl_loss_and_grad writes them into a buffer of yours"
            )));
        }
        let readback = self
            .run_buffers(&loss_job(), &z, &t, cols, None, Some(&grad), blocking)
            .await?;
        Ok(readback.values.iter().map(|&v| v as f64).collect())
    }

    /// Records [`Engine::kl_loss_and_grad_buffers`] into `encoder`: per-row losses into `loss`
    /// (f32), the gradient into `grad`. See [`Engine::record_rows`] for the protocol.
    #[allow(clippy::too_many_arguments)]
    pub fn record_kl_loss_and_grad(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        workspace: &mut Workspace,
        target: wgpu::BufferSlice<'_>,
        logits: wgpu::BufferSlice<'_>,
        cols: usize,
        loss: wgpu::BufferSlice<'_>,
        grad: wgpu::BufferSlice<'_>,
    ) -> Result<()> {
        let (z, t, grad, cols) = self.loss_inputs(&target, &logits, cols, &grad)?;
        let loss = output("loss", &loss, z.elems / cols)?;
        let job = loss_job();
        let locator = self.locator(&job, &z, &t, cols);
        self.record(
            encoder,
            workspace,
            &job,
            &z,
            &t,
            &loss,
            Some(&grad),
            locator,
        )
    }

    /// Copies an f32 slice of a GPU buffer (with `BufferUsages::COPY_SRC`) to the host.
    /// Blocking.
    pub fn read_f32(&self, slice: wgpu::BufferSlice<'_>) -> Result<Vec<f32>> {
        pollster::block_on(self.read_f32_async(slice))
    }

    /// Async twin of [`Engine::read_f32`].
    pub async fn read_f32_async(&self, slice: wgpu::BufferSlice<'_>) -> Result<Vec<f32>> {
        let buffer = slice.buffer();
        if !buffer.usage().contains(wgpu::BufferUsages::COPY_SRC) {
            return Err(Error::InvalidBuffer {
                name: "slice",
                reason: "the buffer was created without BufferUsages::COPY_SRC".into(),
            });
        }
        if slice.offset() % 4 != 0 || slice.size() % 4 != 0 {
            return Err(Error::InvalidBuffer {
                name: "slice",
                reason: "offset and size must be multiples of 4 bytes".into(),
            });
        }
        refuse_mapped("slice", buffer)?;
        let view = GpuSlice {
            buffer,
            offset: slice.offset(),
            elems: slice.size() / 4,
            dtype: Dtype::F32,
        };
        let _turn = self.gpu().turn_async().await;
        self.gpu().check_faults()?;
        self.gpu().read_elements(&view, 0, view.elems, false).await
    }

    /// Σx of an f32 GPU slice, compensated (TwoSum pairs, as the measures sum their terms),
    /// through the kernel, loads and workgroup plan of the measures. Values are not
    /// validated.
    pub fn sum_buffers(&self, p: wgpu::BufferSlice<'_>) -> Result<f64> {
        let (p, q) = self.inputs(Measure::Entropy, &p, None, Dtype::F32)?;
        crate::plan::check_columns(p.elems)?;
        let job = job_for(Term::SumP, &Options::default())?;
        let rb = pollster::block_on(self.run_buffers(&job, &p, &q, p.elems, None, None, true))?;
        Ok(rb.values[0] as f64)
    }

    /// Records per-row plain sums Σp (+ Σq) of `[rows × cols]` f32 into `out`: the roofline
    /// of a kernel over the same inputs, shape and workgroup plan, minus its math. Each
    /// invocation adds in plain f32 (no compensation, which costs a CPU adapter 6–10 %), so
    /// the roof is what a plain streaming reduction reads. Values are not validated.
    #[allow(clippy::too_many_arguments)]
    pub fn record_sum_rows(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        workspace: &mut Workspace,
        p: wgpu::BufferSlice<'_>,
        q: Option<wgpu::BufferSlice<'_>>,
        cols: usize,
        out: wgpu::BufferSlice<'_>,
    ) -> Result<()> {
        self.record_sum_rows_of(Dtype::F32, encoder, workspace, p, q, cols, out)
    }

    /// [`Engine::record_sum_rows`] over inputs stored as `dtype`: the roofline of the
    /// kernels over 16-bit inputs, which read half the bytes per element.
    #[allow(clippy::too_many_arguments)]
    pub fn record_sum_rows_of(
        &self,
        dtype: Dtype,
        encoder: &mut wgpu::CommandEncoder,
        workspace: &mut Workspace,
        p: wgpu::BufferSlice<'_>,
        q: Option<wgpu::BufferSlice<'_>>,
        cols: usize,
        out: wgpu::BufferSlice<'_>,
    ) -> Result<()> {
        let term = if q.is_some() {
            Term::RoofPQ
        } else {
            Term::RoofP
        };
        self.record_unchecked_rows(term, dtype, encoder, workspace, p, q, cols, out)
    }

    /// Records per-row KL of plain probabilities `[rows × cols]` into `out` with KL's
    /// per-element term but without validation and with plain f32 sums: a benchmark
    /// diagnostic between [`Engine::record_sum_rows`] (no term) and [`Engine::record_rows`]
    /// (validation and compensated sums too), which tells how much of KL's time its term's
    /// arithmetic takes (`examples/roof_ratios`, case `KLbare`). Invalid values go unreported
    /// and sums lose the compensation's digits: not for results.
    #[doc(hidden)]
    #[allow(clippy::too_many_arguments)]
    pub fn record_kl_bare_rows(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        workspace: &mut Workspace,
        p: wgpu::BufferSlice<'_>,
        q: wgpu::BufferSlice<'_>,
        cols: usize,
        out: wgpu::BufferSlice<'_>,
    ) -> Result<()> {
        let (term, dtype) = (Term::KlBare, Dtype::F32);
        self.record_unchecked_rows(term, dtype, encoder, workspace, p, Some(q), cols, out)
    }

    /// Records a benchmark term (which validates nothing) over plain rows.
    #[allow(clippy::too_many_arguments)]
    fn record_unchecked_rows(
        &self,
        term: Term,
        dtype: Dtype,
        encoder: &mut wgpu::CommandEncoder,
        workspace: &mut Workspace,
        p: wgpu::BufferSlice<'_>,
        q: Option<wgpu::BufferSlice<'_>>,
        cols: usize,
        out: wgpu::BufferSlice<'_>,
    ) -> Result<()> {
        let measure = if q.is_some() {
            Measure::KullbackLeibler
        } else {
            Measure::Entropy
        };
        let (p, q) = self.inputs(measure, &p, q.as_ref(), dtype)?;
        let rows = shape(&p, cols)?;
        let out = output("out", &out, rows)?;
        let job = job_for(term, &Options::default())?;
        let locator = self.locator(&job, &p, &q, cols as u64);
        self.record(encoder, workspace, &job, &p, &q, &out, None, locator)
    }

    /// A storage buffer of `len` f32 elements, usable as input, output or gradient, and
    /// copyable both ways.
    ///
    /// # Errors
    /// [`Error::Gpu`] when the device cannot allocate it (too large, out of memory).
    pub fn create_f32_buffer(&self, label: &str, len: u64) -> Result<wgpu::Buffer> {
        let gpu = self.gpu();
        let _turn = gpu.turn();
        gpu.scoped(|| {
            gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: len.saturating_mul(4),
                usage: F32_BUFFER_USAGES,
                mapped_at_creation: false,
            })
        })
    }

    /// A storage buffer holding `data`, with the usages of [`Engine::create_f32_buffer`]: the
    /// shortest way to put host values where the `*_buffers` and `record_*` calls read them.
    ///
    /// ```no_run
    /// let engine = klgpu::Engine::new()?;
    /// let p = engine.create_f32_buffer_init("p", &[0.25, 0.75])?;
    /// let q = engine.create_f32_buffer_init("q", &[0.5, 0.5])?;
    /// let kl = engine.kl_divergence_buffers(p.slice(..), q.slice(..))?;
    /// # Ok::<(), klgpu::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Gpu`] when the device cannot allocate it.
    pub fn create_f32_buffer_init(&self, label: &str, data: &[f32]) -> Result<wgpu::Buffer> {
        self.create_buffer_init(label, data)
    }

    /// A storage buffer holding `data` of any [`Element`] type, padded to whole 4-byte words
    /// (what the kernels bind), with the usages of [`Engine::create_f32_buffer`]. Pass its
    /// slices with [`Options::dtype`] set to `T::DTYPE`. An odd number of 16-bit elements
    /// is padded with a NaN: slice such a buffer to its `2 * data.len()` bytes, as below; a
    /// `slice(..)` takes the pad in and fails on it (at index `data.len()`), where a zero pad
    /// read as a logit or log-probability changed the answer silently.
    ///
    /// ```no_run
    /// use klgpu::half::f16;
    /// use klgpu::{Measure, Options};
    /// let engine = klgpu::Engine::new()?;
    /// let p: Vec<f16> = [0.25f32, 0.25, 0.5].iter().map(|&x| f16::from_f32(x)).collect();
    /// let buffer = engine.create_buffer_init("p", &p)?;
    /// let f16s = Options { dtype: klgpu::Dtype::F16, ..Options::default() };
    /// let h = engine.divergence_buffers(Measure::Entropy, buffer.slice(..6), None, &f16s)?;
    /// # Ok::<(), klgpu::Error>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Gpu`] when the device cannot allocate it.
    pub fn create_buffer_init<T: Element>(&self, label: &str, data: &[T]) -> Result<wgpu::Buffer> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let mut padded;
        let contents = if bytes.len().is_multiple_of(4) {
            bytes
        } else {
            // One 16-bit element short of a word: a NaN of its type, which every input kind
            // refuses, rather than a value.
            let nan: u16 = match T::DTYPE {
                Dtype::BF16 => 0x7FC0,
                _ => 0x7E00,
            };
            padded = bytes.to_vec();
            padded.extend_from_slice(&nan.to_le_bytes());
            &padded[..]
        };
        let gpu = self.gpu();
        let _turn = gpu.turn();
        // Not wgpu's create_buffer_init, which panics where the buffer cannot be made (larger
        // than the device's max_buffer_size, out of memory): the buffer is made in an error
        // scope first, and filled only once it exists.
        let buffer = gpu.scoped(|| {
            gpu.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: contents.len() as u64,
                usage: F32_BUFFER_USAGES,
                mapped_at_creation: !contents.is_empty(),
            })
        })?;
        if !contents.is_empty() {
            buffer
                .get_mapped_range_mut(..)
                .map_err(|e| Error::Gpu(format!("filling the new buffer {label:?}: {e}")))?
                .slice(..)
                .copy_from_slice(contents);
            buffer.unmap();
        }
        Ok(buffer)
    }

    fn inputs<'a>(
        &self,
        measure: Measure,
        p: &wgpu::BufferSlice<'a>,
        q: Option<&wgpu::BufferSlice<'a>>,
        dtype: Dtype,
    ) -> Result<(GpuSlice<'a>, GpuSlice<'a>)> {
        let p = gpu_slice("p", p, dtype)?;
        let q = match (measure.uses_q(), q) {
            (true, Some(q)) => gpu_slice("q", q, dtype)?,
            (true, None) => {
                return Err(Error::InvalidArgument(format!(
                    "{} needs a second distribution Q",
                    measure.name()
                )));
            }
            (false, _) => p,
        };
        if p.elems == 0 || q.elems == 0 {
            return Err(Error::EmptyInput);
        }
        if p.elems != q.elems {
            return Err(Error::LengthMismatch {
                p_len: p.elems as usize,
                q_len: q.elems as usize,
            });
        }
        Ok((p, q))
    }

    fn loss_inputs<'a>(
        &self,
        target: &wgpu::BufferSlice<'a>,
        logits: &wgpu::BufferSlice<'a>,
        cols: usize,
        grad: &wgpu::BufferSlice<'a>,
    ) -> Result<(GpuSlice<'a>, GpuSlice<'a>, GpuSlice<'a>, u64)> {
        let t = gpu_slice("target", target, Dtype::F32)?;
        let z = gpu_slice("logits", logits, Dtype::F32)?;
        if t.elems == 0 {
            return Err(Error::EmptyInput);
        }
        if t.elems != z.elems {
            return Err(Error::LengthMismatch {
                p_len: t.elems as usize,
                q_len: z.elems as usize,
            });
        }
        shape(&t, cols)?;
        let grad = gpu_slice("grad", grad, Dtype::F32)?;
        if grad.elems < t.elems {
            return Err(Error::InvalidBuffer {
                name: "grad",
                reason: format!("holds {} f32, the gradient needs {}", grad.elems, t.elems),
            });
        }
        Ok((z, t, grad, cols as u64))
    }

    fn locator(&self, job: &Job, p: &GpuSlice<'_>, q: &GpuSlice<'_>, cols: u64) -> Locator {
        let plan = Plan::new(p.elems / cols, cols, self.plan_limits(job, true));
        let loss = job.term == Term::KlGrad;
        let (p_input, q_input) = if loss {
            (Input::Logits, Input::Probs)
        } else {
            (job.kind, job.kind)
        };
        Locator {
            plan,
            cols,
            p: (OwnedSlice::of(p), p_input),
            q: (OwnedSlice::of(q), q_input),
            uses_q: job.term.uses_q(),
            normalized: job.input == InputCode::ProbsNormalized,
            swap_sides: loss,
            out: None,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        workspace: &mut Workspace,
        job: &Job,
        p: &GpuSlice<'_>,
        q: &GpuSlice<'_>,
        out: &GpuSlice<'_>,
        grad: Option<&GpuSlice<'_>>,
        locator: Locator,
    ) -> Result<()> {
        workspace.belongs_to(self)?;
        if workspace.pending.is_some() {
            return Err(Error::InvalidArgument(
                "this workspace holds a recording that was not checked yet: call Workspace::check \
                 after submitting it, or use another workspace"
                    .into(),
            ));
        }
        outputs_apart(job, p, q, Some(out), grad, locator.plan.rows)?;
        let gpu = self.gpu();
        let _turn = gpu.turn();
        let recorded = gpu
            .scoped(|| {
                gpu.encode_device(
                    encoder,
                    workspace
                        .scratch
                        .get_or_insert_with(|| Scratch::new(&gpu.device)),
                    job,
                    &locator.plan,
                    p,
                    q,
                    Some(out),
                    grad,
                )
            })
            .and_then(|recorded| recorded);
        if recorded.is_err() {
            // A buffer that failed to be made (beyond the device's limits, out of memory)
            // still reports the size asked for, so later recordings would reuse it and fail
            // too: the scratch goes, as the other calls' does (the turn is held).
            workspace.scratch = None;
        }
        recorded?;
        workspace.pending = Some(Locator {
            out: Some(OwnedSlice::of(out)),
            ..locator
        });
        Ok(())
    }

    /// Encodes, submits and reads back a job over GPU inputs; falls back from subgroups if the
    /// adapter's layout check fails; turns raised flags into errors.
    #[allow(clippy::too_many_arguments)]
    async fn run_buffers(
        &self,
        job: &Job,
        p: &GpuSlice<'_>,
        q: &GpuSlice<'_>,
        cols: u64,
        out: Option<&GpuSlice<'_>>,
        grad: Option<&GpuSlice<'_>>,
        blocking: bool,
    ) -> Result<Readback> {
        let locator = Locator {
            out: out.map(OwnedSlice::of),
            ..self.locator(job, p, q, cols)
        };
        outputs_apart(job, p, q, out, grad, locator.plan.rows)?;
        // These calls submit the work themselves: a mapped buffer would fail their submit.
        let (p_name, q_name) = locator.bound_names();
        refuse_mapped(p_name, p.buffer)?;
        refuse_mapped(q_name, q.buffer)?;
        for (name, slice) in [("out", out), ("grad", grad)] {
            if let Some(slice) = slice {
                refuse_mapped(name, slice.buffer)?;
            }
        }
        let gpu = self.gpu();
        let _turn = gpu.turn_async().await;
        let mut scratch = gpu.scratch.take(&gpu.device);
        let mut readback;
        // One submission: the work and the copies of its results, then one wait.
        let rows = if out.is_some() { 0 } else { locator.plan.rows };
        loop {
            let index = gpu.scoped(|| {
                let mut encoder =
                    gpu.device
                        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                            label: Some("klgpu.buffers"),
                        });
                gpu.encode_device(
                    &mut encoder,
                    &mut scratch,
                    job,
                    &locator.plan,
                    p,
                    q,
                    out,
                    grad,
                )?;
                encode_read_back(&mut encoder, &scratch, rows, false);
                Ok(gpu.queue.submit([encoder.finish()]))
            })??;
            readback = gpu
                .finish_read_back(&scratch, rows, false, index, blocking)
                .await?;
            if readback.status[0] & kernels::FLAG_SUBGROUP_LAYOUT == 0 || !self.uses_subgroups() {
                break;
            }
            self.disable_subgroups();
        }
        scratch.note_status(&readback);
        gpu.scratch.put(scratch);
        self.raise(&readback, &locator, blocking).await?;
        Ok(readback)
    }

    /// Ok, or the error for the element the kernel flagged, read back from the GPU.
    async fn raise(&self, readback: &Readback, loc: &Locator, blocking: bool) -> Result<()> {
        let flags = readback.status[0] & !kernels::FLAG_SUBGROUP_LAYOUT;
        if flags == 0 {
            return Ok(());
        }
        if flags == kernels::FLAG_OVERFLOW {
            // No element is to blame: the row is the first whose result reads NaN.
            let read;
            let values = match &loc.out {
                Some(out) if !copyable(&out.buffer) => {
                    return Err(unreadable(
                        "out",
                        "a row's result overflowed f32 (klgpu::Error::Overflow)".into(),
                    ));
                }
                Some(out) => {
                    read = self
                        .gpu()
                        .read_elements(&out.view(), 0, loc.plan.rows, blocking)
                        .await?;
                    &read
                }
                None => &readback.values,
            };
            if let Some(row) = crate::engine::first_nan(values) {
                return Err(Error::Overflow {
                    row,
                    input: loc.p.1,
                });
            }
        }
        let lost = || {
            Error::Gpu(format!(
                "the kernel flagged invalid input (flags {flags:#x}) at an unknown position"
            ))
        };
        let window = loc
            .plan
            .windows
            .get(readback.status[1] as usize)
            .ok_or_else(lost)?;
        let index = window.elem_start + readback.status[2] as u64;
        if index >= loc.p.0.elems {
            return Err(lost());
        }
        let row = (index / loc.cols) as usize;
        let (bound_p, bound_q) = loc.bound_names();
        for (slice, name) in [(&loc.p.0, bound_p), (&loc.q.0, bound_q)] {
            if !copyable(&slice.buffer) {
                return Err(unreadable(
                    name,
                    format!(
                        "the kernels flagged an invalid value or an empty row at element {index} \
                         (row {row}, column {})",
                        index % loc.cols
                    ),
                ));
            }
        }
        let gpu = self.gpu();
        let pv = gpu
            .read_elements(&loc.p.0.view(), index, 1, blocking)
            .await?[0];
        let qv = gpu
            .read_elements(&loc.q.0.view(), index, 1, blocking)
            .await?[0];
        let side = |s: Side| match (s, loc.swap_sides) {
            (Side::P, true) => Side::Q,
            (Side::Q, true) => Side::P,
            (s, false) => s,
        };
        // The error for the values at `index`, if either is invalid: the user's P before Q.
        let invalid = |index: u64, pv: f32, qv: f32| {
            let element = |s: Side, value: f32, problem: Problem| Error::InvalidValue {
                side: side(s),
                index: index as usize,
                row: (index / loc.cols) as usize,
                col: (index % loc.cols) as usize,
                value,
                problem,
            };
            let mut found = vec![];
            if let Some(problem) = loc.p.1.problem(pv) {
                found.push(element(Side::P, pv, problem));
            }
            if let Some(problem) = loc.q.1.problem(qv).filter(|_| loc.uses_q) {
                found.push(element(Side::Q, qv, problem));
            }
            if loc.swap_sides {
                found.reverse();
            }
            found.into_iter().next()
        };
        if let Some(err) = invalid(index, pv, qv) {
            return Err(err);
        }
        // An empty row is flagged at its first column, ahead of an invalid value further in,
        // whose NaN may or may not have become the row's maximum (max(−∞, NaN) is either, by
        // order and adapter): the row's first invalid value is the first offender then.
        let start = row as u64 * loc.cols;
        let ps = gpu
            .read_elements(&loc.p.0.view(), start, loc.cols, blocking)
            .await?;
        let qs = if loc.uses_q {
            gpu.read_elements(&loc.q.0.view(), start, loc.cols, blocking)
                .await?
        } else {
            ps.clone()
        };
        let first_invalid = (0..loc.cols)
            .zip(ps.iter().zip(&qs))
            .find_map(|(c, (&pv, &qv))| invalid(start + c, pv, qv));
        if let Some(err) = first_invalid {
            return Err(err);
        }
        // The flags say that some row of P or Q is empty, not that this row's is P's: the
        // row's values do (each flagged row had one of its sides empty).
        let empty =
            |input: Input, row: &[f32]| crate::cpu::row_is_empty(input, loc.normalized, row);
        let (empty_side, value) = if empty(loc.p.1, &ps) {
            (Side::P, ps[0])
        } else if loc.uses_q && empty(loc.q.1, &qs) {
            (Side::Q, qs[0])
        } else {
            return Err(lost());
        };
        Err(Error::InvalidValue {
            side: side(empty_side),
            index: row * loc.cols as usize,
            row,
            col: 0,
            value,
            problem: Problem::EmptyRow,
        })
    }
}

/// Whether klgpu can read `buffer` back: naming a flagged element needs its value, and a
/// row that overflowed its result, read by a copy, which wgpu refuses (as a GPU error) from a
/// buffer made without `COPY_SRC`.
fn copyable(buffer: &wgpu::Buffer) -> bool {
    buffer.usage().contains(wgpu::BufferUsages::COPY_SRC)
}

/// The error for what the kernels found in, or wrote to, a buffer klgpu cannot read: where,
/// and why not what.
fn unreadable(name: &'static str, found: String) -> Error {
    Error::InvalidBuffer {
        name,
        reason: format!(
            "{found}, and klgpu cannot read the buffer back to say more: it was created \
             without BufferUsages::COPY_SRC"
        ),
    }
}

/// The job of the loss kernel.
fn loss_job() -> Job {
    Job {
        term: Term::KlGrad,
        // The logits, bound as P (the locator names the target, bound as Q, for what it is).
        kind: Input::Logits,
        input: InputCode::Logits,
        prepass: Some(Prepass::Lse),
        per_nat: 1.0,
        agree: false,
        one_pass_first: None,
    }
}

/// Rows of a slice with `cols` columns.
fn shape(p: &GpuSlice<'_>, cols: usize) -> Result<u64> {
    if cols == 0 {
        return Err(Error::ZeroColumns);
    }
    if !p.elems.is_multiple_of(cols as u64) {
        return Err(Error::RaggedRows {
            side: Side::P,
            len: p.elems as usize,
            cols,
        });
    }
    crate::plan::check_columns(cols as u64)?;
    Ok(p.elems / cols as u64)
}

/// Refuses an output in the same buffer as an input, or one that overlaps the other output
/// where they are written (the first `rows` values of `out`, the gradient's `p.elems`).
/// A dispatch binds inputs read-only and outputs read-write, which one buffer cannot be at
/// once: wgpu would refuse the work only when it is submitted, and on a device klgpu created
/// that error would fail every later call. Overlapping outputs would overwrite each other.
fn outputs_apart(
    job: &Job,
    p: &GpuSlice<'_>,
    q: &GpuSlice<'_>,
    out: Option<&GpuSlice<'_>>,
    grad: Option<&GpuSlice<'_>>,
    rows: u64,
) -> Result<()> {
    let loss = job.term == Term::KlGrad;
    let inputs = [
        (if loss { "logits" } else { "p" }, p),
        (if loss { "target" } else { "q" }, q),
    ];
    let out = out.map(|o| (if loss { "loss" } else { "out" }, o, rows));
    let grad = grad.map(|g| ("grad", g, p.elems));
    for (name, o, _) in out.iter().chain(grad.iter()) {
        if let Some((input, _)) = inputs.iter().find(|(_, i)| i.buffer == o.buffer) {
            return Err(Error::InvalidBuffer {
                name,
                reason: format!(
                    "it lies in the same buffer as {input}, which the kernels read while they \
                     write {name}: give {name} a buffer of its own"
                ),
            });
        }
    }
    if let (Some((a_name, a, a_len)), Some((b_name, b, b_len))) = (out, grad) {
        let written = |s: &GpuSlice<'_>, len: u64| s.offset..s.offset + len * s.dtype.size();
        let (ra, rb) = (written(a, a_len), written(b, b_len));
        if a.buffer == b.buffer && ra.start < rb.end && rb.start < ra.end {
            return Err(Error::InvalidBuffer {
                name: b_name,
                reason: format!("it overlaps {a_name} (bytes {ra:?} and {rb:?} of one buffer)"),
            });
        }
    }
    Ok(())
}

/// Checks an output slice that must hold `rows` f32.
fn output<'a>(name: &'static str, out: &wgpu::BufferSlice<'a>, rows: u64) -> Result<GpuSlice<'a>> {
    let out = gpu_slice(name, out, Dtype::F32)?;
    if out.elems < rows {
        return Err(Error::InvalidBuffer {
            name,
            reason: format!("holds {} f32, the result needs {rows}", out.elems),
        });
    }
    Ok(out)
}
