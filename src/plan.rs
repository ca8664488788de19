//! Pure dispatch planning: from a shape and the device's limits to windows and workgroup
//! layouts. No wgpu types here, so all of it is unit-tested without an adapter.
//!
//! Public so that its arithmetic can be read and tests and benchmarks can name its constants,
//! but not a stable interface: its items may change in any release ([`crate::Tuning`] is the
//! supported way to steer plans).
//!
//! Vocabulary:
//! - a *window* is the part of the input bound to the kernels at once (whole rows, or for rows
//!   longer than a window, a column range of one row);
//! - a *segment* is the group of `lanes` consecutive invocations that reduce one row's chunk;
//!   a 256-invocation workgroup holds `256 / lanes` segments (on a CPU adapter, a dispatch
//!   whose rows all fit in fewer invocations gets a workgroup just that large);
//! - a *chunk* is the column range one segment covers; with more than one chunk per row the
//!   kernel writes per-chunk partials and a combine dispatch reduces them.

/// Invocations per workgroup of the kernels, but where [`PlanLimits::small_workgroup`] fits a
/// smaller one (the shaders take the size of each layout as the constant `WG`).
pub const WORKGROUP_SIZE: u32 = 256;
/// Most columns a row may have on the GPU. The kernels index columns in u32, from the row's
/// start (a split row's windows keep their place in it, for the arg-max of top-1 agreement),
/// and a chunk's end is its start plus its length: 2^31 leaves room for both. Longer rows are
/// refused ([`check_columns`]) rather than read with wrapped indices.
pub const MAX_COLUMNS: u64 = 1 << 31;

/// Refuses rows longer than [`MAX_COLUMNS`] (the f64 CPU reference takes them).
pub fn check_columns(cols: u64) -> crate::Result<()> {
    if cols > MAX_COLUMNS {
        return Err(crate::Error::InvalidArgument(format!(
            "rows of {cols} columns are longer than the GPU kernels index (at most {MAX_COLUMNS}); \
             for probabilities and log-probabilities that are not normalized, the sum of the \
             per-row values of the same data in shorter rows is the same value \
             (Reduction::Sum); or use the f64 CPU reference (klgpu::cpu)"
        )));
    }
    Ok(())
}

/// Most rows whose results one readback buffer of at most `max_buffer_size` bytes holds: 16
/// status bytes, then an f32 value and an agreement word a row (buffers are made in whole
/// 16-byte units). Host calls over more rows come back in groups of this many.
pub fn readback_rows(max_buffer_size: u64) -> u64 {
    ((max_buffer_size / 16 * 16).saturating_sub(16) / 8).max(1)
}

/// Upper bound on one invocation's main-loop iterations. llvmpipe silently truncates an
/// invocation after 65535 loop iterations in total; we stay a factor of 64 below.
pub const MAX_ITERATIONS: u32 = 1024;
/// The loop cap of Mesa's llvmpipe (lavapipe), shared by all loops of one invocation.
pub const LLVMPIPE_LOOP_CAP: u64 = 65535;
/// Default fewest iterations worth giving an invocation on a GPU before splitting further:
/// below this, the workgroup's reduction costs more than its loads.
pub const MIN_ITERATIONS: u32 = 16;
/// Default workgroup count to aim for on a GPU: enough to fill a large GPU several times over
/// (4096 measured best of 1024..16384 on an H200).
pub const TARGET_WORKGROUPS: u32 = 4096;
/// Default workgroups per host thread on a CPU adapter (lavapipe), which also gives each
/// invocation as many iterations as the loop bound allows (`MAX_ITERATIONS`): every workgroup
/// ends in a reduction whose barriers llvmpipe runs as coroutine switches, so a CPU wants few,
/// long workgroups and short reductions: enough for each thread to get several (balance), no
/// more. Measured on lavapipe against the GPU defaults: KL over 4·10^6 1.9× faster, 1000 rows
/// of 1000 5×, 64 rows of 32,000 logits 4×.
pub const CPU_WORKGROUPS_PER_THREAD: u32 = 8;
/// Default most bytes of one input uploaded per window from host memory on a GPU. Host data
/// goes through two such windows per input on the device and two staging buffers of the same
/// size in host memory, all kept between calls, so this bounds what a call holds. On the H200
/// (runs 6 and 9, `write_buffer` uploads) 16–32 MiB windows ran KL over 10^7 at 11.5–12 GB/s
/// and 4096 × 32,000 logits at 7.7–9 GB/s, against 8–9 and 3.6–4.5 GB/s with 128 MiB.
pub const WINDOW_BYTES: u64 = 32 << 20;
/// The same on a CPU adapter, whose windows are host memory written directly (no staging):
/// there 4, 16 and 32 MiB are within noise of each other from 10^6 to 10^8 elements
/// (lavapipe, `examples/host_windows`), and 32 MiB windows cost the command line 98 MB more
/// peak memory, so the smallest wins.
pub const CPU_WINDOW_BYTES: u64 = 4 << 20;

/// The default window for host data on an adapter kind.
pub fn default_window_bytes(cpu_adapter: bool) -> u64 {
    if cpu_adapter {
        CPU_WINDOW_BYTES
    } else {
        WINDOW_BYTES
    }
}

/// Smallest share of a host window that one thread copies into staging: below it a thread
/// costs more than it saves.
pub const COPY_PIECE_BYTES: u64 = 4 << 20;

/// Default number of threads that copy a host window into staging. One on a CPU adapter,
/// whose kernels run on the same cores and are the bottleneck (lavapipe, KL over 10^7 and
/// 10^8 from host slices: two threads within noise of one, `examples/host_windows`). On a GPU
/// one per core, at most eight: one core copies at about 10 GB/s (this VM; the H200's host
/// uploaded at 12 GB/s), far below what memory and PCIe take, and on a discrete GPU the copy
/// is most of a call over host data.
pub fn default_upload_threads(cpu_adapter: bool, host_threads: u32) -> u32 {
    if cpu_adapter {
        1
    } else {
        host_threads.clamp(1, 8)
    }
}

/// Threads worth copying a window of `total` bytes (all its inputs) with at most `threads`:
/// one per `COPY_PIECE_BYTES`, at least one.
pub fn copy_threads(total: u64, threads: u32) -> u32 {
    (total / COPY_PIECE_BYTES).clamp(1, threads.max(1) as u64) as u32
}

/// Byte ranges of an input of `len` bytes for separate copying threads, where the window
/// holds `total` bytes over all its inputs and `pieces` threads ([`copy_threads`]) copy it,
/// each input getting threads in proportion to its size. Each range but the last starts and
/// ends at a multiple of 8 bytes (wgpu maps ranges from such offsets).
pub fn copy_ranges(len: u64, total: u64, pieces: u32) -> Vec<std::ops::Range<u64>> {
    let share = (pieces.max(1) as u128 * len as u128).div_ceil(total.max(1) as u128);
    let share = share.clamp(1, u64::MAX as u128) as u64;
    let piece = len.div_ceil(share).div_ceil(8).saturating_mul(8).max(8);
    (0..len.div_ceil(piece))
        .map(|k| k * piece..(k * piece).saturating_add(piece).min(len))
        .collect()
}

/// Window lengths are multiples of this many elements (256 bytes: every adapter's storage
/// offset alignment is at most 256).
pub const WINDOW_GRANULE: u64 = 64;

/// The device limits a plan must respect, and the planner's tuning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanLimits {
    /// Most elements of one input bound at once (binding size, buffer size and memory budget).
    pub window_elems: u64,
    /// Most rows of one window: the kernels keep state per row of the window (log-sum-exps,
    /// row sums: `MONOID_BYTES` each) in a buffer bound whole, so the binding size over that.
    /// Short rows reached it before their elements filled a window (6M rows of 2 on a 128 MiB
    /// binding: 144 MB of state, and wgpu refused the bind group).
    pub window_rows: u64,
    /// `max_compute_workgroups_per_dimension`.
    pub max_workgroups: u32,
    /// Columns each invocation aims to take ([`Tuning::min_iterations`](crate::Tuning)): the
    /// most per lane before a row gets more lanes, the fewest per invocation a split row's
    /// chunks leave.
    pub min_iterations: u32,
    /// Workgroups to aim for per dispatch.
    pub target_workgroups: u32,
    /// Whether each lane of a segment walks a contiguous block of its chunk rather than every
    /// `lanes`-th element ([`Layout::lane_span`]).
    pub blocked_lanes: bool,
    /// The smallest workgroup, for dispatches whose rows, `lanes` each, all fit in fewer than
    /// [`WORKGROUP_SIZE`] invocations (a power of two below it; 0: always the full size). On
    /// CPU adapters it is the SIMD width: llvmpipe runs every invocation of a workgroup, also
    /// those without a row, so one row of 1000 columns ran its kernel 32 times over for one
    /// live lane. Such a dispatch gets a workgroup just large enough for its rows, at least
    /// this; within this many, the lanes widen to fill it (`fit_workgroup`).
    pub small_workgroup: u32,
}

impl PlanLimits {
    /// Limits from byte sizes with the default tuning; the window is a whole number of
    /// granules.
    pub fn from_bytes(max_binding_bytes: u64, budget_bytes: u64, max_workgroups: u32) -> Self {
        let elems = (max_binding_bytes.min(budget_bytes) / 4).min(longest_window(max_workgroups));
        PlanLimits {
            window_elems: (elems / WINDOW_GRANULE * WINDOW_GRANULE).max(WINDOW_GRANULE),
            // Buffers are made in whole 16-byte units: the state of this many rows, rounded
            // up to one, still fits a binding that is not a multiple of 16 bytes.
            window_rows: (max_binding_bytes / 16 * 16 / crate::kernels::MONOID_BYTES).max(1),
            max_workgroups,
            min_iterations: MIN_ITERATIONS,
            target_workgroups: TARGET_WORKGROUPS,
            blocked_lanes: false,
            small_workgroup: 0,
        }
    }

    /// The same limits with the planner's defaults for the adapter kind: on GPUs
    /// [`MIN_ITERATIONS`], [`TARGET_WORKGROUPS`] and interleaved lanes (coalesced loads); on a
    /// CPU adapter, whose workgroups run on the host's `host_threads` threads,
    /// [`MAX_ITERATIONS`], [`CPU_WORKGROUPS_PER_THREAD`] per thread and blocked lanes (one
    /// stream per SIMD lane: on lavapipe KL over 4·10^6 2.5× and the streaming sum 3× faster
    /// than interleaved).
    pub fn for_adapter(self, cpu_adapter: bool, host_threads: u32) -> Self {
        let (min_iterations, target_workgroups) = if cpu_adapter {
            (
                MAX_ITERATIONS,
                CPU_WORKGROUPS_PER_THREAD.saturating_mul(host_threads.max(1)),
            )
        } else {
            (MIN_ITERATIONS, TARGET_WORKGROUPS)
        };
        PlanLimits {
            min_iterations,
            target_workgroups,
            blocked_lanes: cpu_adapter,
            ..self
        }
    }

    /// The same limits with windows of at most `elems` elements.
    pub fn with_window_cap(self, elems: u64) -> Self {
        let cap = (elems / WINDOW_GRANULE * WINDOW_GRANULE).max(WINDOW_GRANULE);
        PlanLimits {
            window_elems: self.window_elems.min(cap),
            ..self
        }
    }
}

/// The shapes a [`Layout`] can be made for: its chunk lengths are u32.
fn check_layout_shape(rows: u32, cols: u64) {
    assert!(
        rows > 0 && (1..=MAX_COLUMNS).contains(&cols),
        "a layout of {rows} rows of {cols} columns: rows must be at least 1 and columns 1..=2^31"
    );
}

/// How one dispatch maps `[rows × cols]` elements onto invocations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Invocations per row segment (a power of two, 1..=256).
    pub lanes: u32,
    /// Invocations per workgroup: [`WORKGROUP_SIZE`], or a smaller power of two that holds all
    /// the rows ([`PlanLimits::small_workgroup`]).
    pub workgroup_size: u32,
    /// Columns per chunk; a multiple of `lanes`.
    pub chunk_len: u32,
    /// Chunks per row: the x dimension of the dispatch.
    pub chunks: u32,
    /// Workgroups along the rows: the y dimension of the dispatch.
    pub row_groups: u32,
    /// Whether each lane walks a contiguous block of `lane_span()` columns of its chunk
    /// (CPU adapters) instead of every `lanes`-th one from its own offset (GPUs).
    pub blocked: bool,
}

impl Layout {
    /// Layout for `rows` rows of `cols` columns, splitting rows into chunks when that is needed
    /// to fill the GPU or to keep the loop short.
    ///
    /// # Panics
    /// Without rows, or with `cols` outside 1..=[`MAX_COLUMNS`] (chunk lengths are u32).
    pub fn new(rows: u32, cols: u64, limits: &PlanLimits) -> Layout {
        check_layout_shape(rows, cols);
        let min_iterations = limits.min_iterations.clamp(1, MAX_ITERATIONS) as u64;
        let (lanes, workgroup_size) = fit_workgroup(
            rows,
            lanes_for(cols, min_iterations),
            limits.small_workgroup,
        );
        let per_invocation = cols.div_ceil(lanes as u64);
        let row_groups = rows.div_ceil(workgroup_size / lanes).max(1);
        let wanted = (limits.target_workgroups.max(1) as u64).div_ceil(row_groups as u64);
        let chunks = wanted
            .min(per_invocation.div_ceil(min_iterations))
            .max(per_invocation.div_ceil(MAX_ITERATIONS as u64))
            .clamp(1, limits.max_workgroups.max(1) as u64);
        // A multiple of 4: in rows that start on a vec4 every chunk does too, and the wide-load
        // kernels take none of its columns one at a time.
        let iterations = per_invocation.div_ceil(chunks).next_multiple_of(4);
        let chunk_len = iterations * lanes as u64;
        Layout {
            lanes,
            workgroup_size,
            chunk_len: chunk_len as u32,
            chunks: cols.div_ceil(chunk_len) as u32,
            row_groups,
            blocked: limits.blocked_lanes,
        }
    }

    /// Layout that covers each row in a single chunk (for the combine dispatch); `small` is
    /// [`PlanLimits::small_workgroup`].
    ///
    /// # Panics
    /// As [`Layout::new`].
    pub fn single_chunk(rows: u32, cols: u64, small: u32) -> Layout {
        check_layout_shape(rows, cols);
        let (lanes, workgroup_size) =
            fit_workgroup(rows, lanes_for(cols, MIN_ITERATIONS as u64), small);
        Layout {
            lanes,
            workgroup_size,
            chunk_len: (cols.div_ceil(lanes as u64) * lanes as u64) as u32,
            chunks: 1,
            row_groups: rows.div_ceil(workgroup_size / lanes).max(1),
            blocked: false,
        }
    }

    /// Rows handled by one workgroup.
    pub fn rows_per_workgroup(&self) -> u32 {
        self.workgroup_size / self.lanes
    }

    /// Main-loop iterations of one invocation.
    pub fn iterations(&self) -> u32 {
        self.chunk_len / self.lanes
    }

    /// Columns of one lane's block when lanes are blocked (a multiple of 4: the wide-load loop
    /// gives each lane span / 4 whole vec4s), 0 when they interleave: what the kernels' loops
    /// read from their parameters.
    pub fn lane_span(&self) -> u32 {
        if self.blocked { self.iterations() } else { 0 }
    }

    /// The dispatch size.
    pub fn workgroups(&self) -> [u32; 3] {
        [self.chunks, self.row_groups, 1]
    }
}

/// Lanes per row and the workgroup size for `rows` rows of `lanes` lanes, where `small` is
/// [`PlanLimits::small_workgroup`]: the full [`WORKGROUP_SIZE`], unless all the rows fit in
/// fewer invocations; then a power of two that holds them, at least `small`. Within `small`
/// the lanes widen to fill it (every lane gets columns; rows·lanes <= small keeps them at
/// least `lanes`).
fn fit_workgroup(rows: u32, lanes: u32, small: u32) -> (u32, u32) {
    let rows = (rows as u64).next_power_of_two();
    let needed = rows * lanes as u64;
    if !small.is_power_of_two() || small >= WORKGROUP_SIZE || needed >= WORKGROUP_SIZE as u64 {
        (lanes, WORKGROUP_SIZE)
    } else if needed <= small as u64 {
        ((small as u64 / rows) as u32, small)
    } else {
        (lanes, needed as u32)
    }
}

/// The most elements a window may hold: a row segment takes at most `max_workgroups` chunks of
/// a workgroup's lanes, each lane at most [`MAX_ITERATIONS`] columns. A caller's device may
/// allow few workgroups, and llvmpipe silently cuts a longer loop (one workgroup of 256 lanes
/// over 17M elements returned entropy 0.25 for 16.5). A multiple of [`WINDOW_GRANULE`].
pub fn longest_window(max_workgroups: u32) -> u64 {
    max_workgroups.max(1) as u64 * WORKGROUP_SIZE as u64 * MAX_ITERATIONS as u64
}

/// Lanes per row: the fewest (a power of two, at most a workgroup) that leave each at most
/// `min_iterations` columns.
fn lanes_for(cols: u64, min_iterations: u64) -> u32 {
    cols.div_ceil(min_iterations)
        .next_power_of_two()
        .clamp(1, WORKGROUP_SIZE as u64) as u32
}

/// Where a window sits in a row that is split across windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitPart {
    /// The first window of the row: nothing to accumulate into yet.
    pub first: bool,
    /// The last window of the row: the row's result can be finished.
    pub last: bool,
}

/// One window: a range of whole rows, or a column range of one row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// First row.
    pub row_begin: u64,
    /// Rows in the window (1 when split).
    pub rows: u32,
    /// First column (0 for whole rows).
    pub col_begin: u64,
    /// One past the last column.
    pub col_end: u64,
    /// Flat index of the window's first element.
    pub elem_start: u64,
    /// Elements in the window.
    pub elem_len: u64,
    /// `Some` when the row is longer than a window.
    pub split: Option<SplitPart>,
    /// Layout of the per-element (terms) dispatch.
    pub terms: Layout,
    /// Layout of the dispatch that combines per-chunk partials, if there is more than one chunk.
    pub combine: Option<Layout>,
    /// The row stride of the terms dispatch's partials, and the slot just past a row's
    /// partials where a split row's running state lives (`prm.chunks` in the shaders). For a
    /// split row (one row per window) it is the most chunks any window of that row has, not
    /// the window's own count: the windows of a row can differ by a chunk, and each must find
    /// the state where the one before left it.
    pub partials_stride: u32,
}

impl Window {
    /// Elements per row in the window's own indexing (the row stride).
    pub fn row_len(&self) -> u64 {
        self.col_end - self.col_begin
    }

    /// Number of partial results the terms dispatch writes (0 when it finishes rows directly).
    pub fn partials(&self) -> u64 {
        if self.combine.is_some() {
            self.rows as u64 * self.terms.chunks as u64
        } else {
            0
        }
    }
}

/// All windows of one computation, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Rows of the input.
    pub rows: u64,
    /// Columns of the input.
    pub cols: u64,
    /// The windows, in element order.
    pub windows: Vec<Window>,
}

impl Plan {
    /// Plans a `[rows × cols]` computation.
    ///
    /// # Panics
    /// Without rows, with `cols` outside 1..=[`MAX_COLUMNS`], or if rows × cols overflows u64:
    /// the engine validates shapes first ([`check_columns`]).
    pub fn new(rows: u64, cols: u64, limits: PlanLimits) -> Plan {
        assert!(
            rows > 0 && (1..=MAX_COLUMNS).contains(&cols) && rows.checked_mul(cols).is_some(),
            "Plan::new({rows}, {cols}): the caller validates shapes first"
        );
        // No window longer than a dispatch's loops cover (from_bytes's limits hold to it; these
        // may be made up).
        let cap = limits
            .window_elems
            .max(WINDOW_GRANULE)
            .min(longest_window(limits.max_workgroups));
        let mut windows = Vec::new();
        let window = |row_begin: u64, rows: u32, col_begin: u64, col_end: u64, split| {
            let row_len = col_end - col_begin;
            let terms = Layout::new(rows, row_len, &limits);
            let small = limits.small_workgroup;
            let combine =
                (terms.chunks > 1).then(|| Layout::single_chunk(rows, terms.chunks as u64, small));
            Window {
                row_begin,
                rows,
                col_begin,
                col_end,
                elem_start: row_begin * cols + col_begin,
                elem_len: rows as u64 * row_len,
                split,
                partials_stride: terms.chunks,
                terms,
                combine,
            }
        };
        if cols <= cap {
            let lanes = lanes_for(cols, limits.min_iterations.clamp(1, MAX_ITERATIONS) as u64);
            let row_limit = (limits.max_workgroups.max(1) as u64) * (WORKGROUP_SIZE / lanes) as u64;
            let per_window = (cap / cols)
                .min(row_limit)
                .min(limits.window_rows)
                .min(u32::MAX as u64)
                .max(1);
            let mut row = 0;
            while row < rows {
                let n = per_window.min(rows - row);
                windows.push(window(row, n as u32, 0, cols, None));
                row += n;
            }
        } else {
            let parts = cols.div_ceil(cap);
            let part_len = cols.div_ceil(parts).div_ceil(WINDOW_GRANULE) * WINDOW_GRANULE;
            for row in 0..rows {
                let first_window = windows.len();
                let mut col = 0;
                while col < cols {
                    let end = (col + part_len).min(cols);
                    let split = SplitPart {
                        first: col == 0,
                        last: end == cols,
                    };
                    windows.push(window(row, 1, col, end, Some(split)));
                    col = end;
                }
                let row_windows = &mut windows[first_window..];
                let stride = row_windows.iter().map(|w| w.terms.chunks).max();
                for w in row_windows {
                    w.partials_stride = stride.unwrap_or(1);
                }
            }
        }
        Plan {
            rows,
            cols,
            windows,
        }
    }

    /// Largest number of partials any window writes.
    pub fn max_partials(&self) -> u64 {
        self.windows.iter().map(Window::partials).max().unwrap_or(0)
    }

    /// Largest number of rows in any window.
    pub fn max_window_rows(&self) -> u32 {
        self.windows.iter().map(|w| w.rows).max().unwrap_or(1)
    }

    /// Largest window, in elements.
    pub fn max_window_elems(&self) -> u64 {
        self.windows.iter().map(|w| w.elem_len).max().unwrap_or(0)
    }

    /// The most loop iterations any invocation runs, counting the main loop and the reduction
    /// tree, in any dispatch of the plan: what llvmpipe's cap applies to.
    pub fn max_invocation_iterations(&self) -> u64 {
        let tree = WORKGROUP_SIZE.ilog2() as u64;
        self.windows
            .iter()
            .flat_map(|w| std::iter::once(w.terms).chain(w.combine))
            .map(|l| l.iterations() as u64 + tree)
            .max()
            .unwrap_or(0)
    }
}

/// Loop iterations per invocation of the simplest design: one workgroup looping over all `n`
/// elements. This is what crosses llvmpipe's cap for large inputs.
pub fn naive_iterations(n: u64) -> u64 {
    n.div_ceil(WORKGROUP_SIZE as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LAVAPIPE: PlanLimits = PlanLimits {
        window_elems: 33_554_432,
        window_rows: (128 << 20) / 24,
        max_workgroups: 65535,
        min_iterations: MIN_ITERATIONS,
        target_workgroups: TARGET_WORKGROUPS,
        blocked_lanes: false,
        small_workgroup: 0,
    };

    fn covered(plan: &Plan) -> u64 {
        plan.windows.iter().map(|w| w.elem_len).sum()
    }

    #[test]
    fn extreme_arguments_are_no_overflow() {
        // Public pure functions: overflowed or divided by zero at the ends of their types.
        let r = copy_ranges(u64::MAX - 3, u64::MAX, 64);
        assert_eq!((r[0].start, r.last().unwrap().end), (0, u64::MAX - 3));
        assert!(r.windows(2).all(|w| w[0].end == w[1].start));
        assert_eq!(copy_ranges(u64::MAX, u64::MAX, 1), vec![0..u64::MAX]);
        let l = LAVAPIPE.for_adapter(true, u32::MAX);
        assert_eq!(l.target_workgroups, u32::MAX);
        let none = PlanLimits {
            max_workgroups: 0,
            ..LAVAPIPE
        };
        let layout = Layout::new(1, 10_000, &none);
        assert!(
            layout.chunks == 1 && layout.chunk_len >= 10_000,
            "{layout:?}"
        );
        assert_eq!(covered(&Plan::new(3, 10, none)), 30);
        // The longest row a layout takes is covered whole, even in one workgroup.
        let one = PlanLimits {
            max_workgroups: 1,
            ..LAVAPIPE
        };
        let layout = Layout::new(1, MAX_COLUMNS, &one);
        assert!(layout.chunks as u64 * layout.chunk_len as u64 >= MAX_COLUMNS);
        // A plan keeps every loop within the cap, however few workgroups: its windows shrink
        // (one workgroup over a window of 17M elements looped 66,000 times).
        let big_windows = PlanLimits {
            window_elems: 32 << 20,
            ..one
        };
        assert_eq!(
            PlanLimits::from_bytes(1 << 30, 1 << 30, 1).window_elems,
            longest_window(1)
        );
        for (rows, cols) in [(1, 17_000_000), (1000, 17_000), (3, 5_000_000)] {
            let plan = Plan::new(rows, cols, big_windows);
            assert_eq!(covered(&plan), rows * cols);
            assert!(plan.max_invocation_iterations() <= (MAX_ITERATIONS + 8) as u64);
        }
    }

    #[test]
    #[should_panic(expected = "columns 1..=2^31")]
    fn layouts_of_rows_longer_than_the_kernels_index_are_refused() {
        // chunk_len is u32: 2^40 columns came out chunk_len 0, a row left uncovered.
        Layout::new(1, 1 << 40, &LAVAPIPE);
    }

    #[test]
    #[should_panic(expected = "the caller validates shapes first")]
    fn plans_without_rows_are_refused() {
        Plan::new(0, 10, LAVAPIPE);
    }

    #[test]
    fn readback_groups_fit_the_largest_buffer() {
        // wgpu's default 256 MiB: 33,554,430 rows of 8 bytes after the 16 status bytes.
        assert_eq!(readback_rows(256 << 20), ((256 << 20) - 16) / 8);
        for max in [1 << 20, (1 << 20) + 15, 1000, 33, 32] {
            let rows = readback_rows(max);
            assert!(16 + rows * 8 <= max / 16 * 16, "{max}: {rows}");
            assert!(16 + (rows + 1) * 8 > max / 16 * 16, "{max}: {rows}");
        }
    }

    #[test]
    fn short_rows_use_one_invocation_per_row() {
        let plan = Plan::new(1_000_000, 10, LAVAPIPE);
        assert_eq!(plan.windows.len(), 1);
        let w = plan.windows[0];
        assert_eq!(w.terms.lanes, 1);
        assert_eq!(w.terms.chunks, 1);
        assert_eq!(w.terms.row_groups, 1_000_000u32.div_ceil(256));
        assert!(w.combine.is_none());
    }

    #[test]
    fn rows_past_the_kernels_column_index_are_refused() {
        assert!(check_columns(MAX_COLUMNS).is_ok());
        let err = check_columns(MAX_COLUMNS + 1).unwrap_err().to_string();
        assert!(err.contains("2147483649 columns"), "{err}");
        assert!(check_columns(5_000_000_000).is_err());
    }

    #[test]
    fn a_split_rows_windows_keep_its_state_in_one_slot() {
        // 16,384-element windows on a GPU's plan: a row of 16,385 splits into windows of
        // 8,256 and 8,129 columns, of 3 and 2 chunks. The state the first leaves past its
        // partials must be where the second looks (it looked in its own slot 2, the first's
        // last chunk: KL over 1,048,577 elements on lavapipe came out a third low).
        let plan = Plan::new(1, 16_385, LAVAPIPE.with_window_cap(16_384));
        let chunks: Vec<u32> = plan.windows.iter().map(|w| w.terms.chunks).collect();
        assert_eq!(chunks, [3, 2]);
        assert!(plan.windows.iter().all(|w| w.partials_stride == 3));
        // Whole rows keep their own chunk count: it is the row stride of their partials.
        let whole = Plan::new(8, 1000, LAVAPIPE.with_window_cap(16_384));
        assert!(
            whole
                .windows
                .iter()
                .all(|w| w.partials_stride == w.terms.chunks)
        );
    }

    #[test]
    fn long_rows_are_split_across_workgroups() {
        let plan = Plan::new(16, 262_144, LAVAPIPE);
        let w = plan.windows[0];
        assert_eq!(w.terms.lanes, 256);
        assert!(w.terms.chunks >= 16, "{w:?}");
        assert!(w.combine.is_some());
        assert!(w.terms.iterations() >= MIN_ITERATIONS);
    }

    #[test]
    fn inputs_beyond_one_binding_stream_in_windows() {
        let n = 40_000_000;
        let plan = Plan::new(1, n, LAVAPIPE);
        assert_eq!(plan.windows.len(), 2);
        assert_eq!(covered(&plan), n);
        assert!(
            plan.windows
                .iter()
                .all(|w| w.elem_len <= LAVAPIPE.window_elems)
        );
        assert_eq!(
            plan.windows[0].split,
            Some(SplitPart {
                first: true,
                last: false
            })
        );
        assert_eq!(
            plan.windows[1].split,
            Some(SplitPart {
                first: false,
                last: true
            })
        );
        assert_eq!(plan.windows[1].col_begin % WINDOW_GRANULE, 0);
    }

    #[test]
    fn the_naive_plan_would_cross_llvmpipes_loop_cap_and_ours_does_not() {
        let n = 40_000_000;
        assert!(naive_iterations(n) > LLVMPIPE_LOOP_CAP);
        let plan = Plan::new(1, n, LAVAPIPE);
        assert!(plan.max_invocation_iterations() <= (MAX_ITERATIONS + 8) as u64);
    }

    #[test]
    fn a_few_short_rows_take_one_small_workgroup() {
        let cpu = PlanLimits {
            small_workgroup: 8,
            ..LAVAPIPE.for_adapter(true, 2)
        };
        // One row of 1000: eight lanes of 125 columns in one workgroup of eight, not one lane
        // in a workgroup of 256.
        let one = Layout::new(1, 1000, &cpu);
        assert_eq!(
            (one.workgroup_size, one.lanes, one.chunks, one.row_groups),
            (8, 8, 1, 1)
        );
        assert_eq!(one.iterations(), 128);
        // Three rows: two lanes each, the fourth segment idle.
        let three = Layout::new(3, 100, &cpu);
        assert_eq!(
            (three.workgroup_size, three.lanes, three.row_groups),
            (8, 2, 1)
        );
        // Rows of 8192 still fit (8 lanes of the loop's 1024 columns). Longer rows and more
        // rows take a workgroup just large enough: a row of 10,000 its 16 lanes, nine rows
        // of 10 sixteen one-lane segments (nine of them used).
        assert_eq!(Layout::new(1, 8192, &cpu).workgroup_size, 8);
        let longer = Layout::new(1, 10_000, &cpu);
        assert_eq!((longer.workgroup_size, longer.lanes), (16, 16));
        let nine = Layout::new(9, 10, &cpu);
        assert_eq!(
            (nine.workgroup_size, nine.lanes, nine.row_groups),
            (16, 1, 1)
        );
        // Rows that fill a workgroup, and GPUs, keep the full one.
        assert_eq!(Layout::new(300, 10, &cpu).workgroup_size, WORKGROUP_SIZE);
        assert_eq!(Layout::new(1, 200_000, &cpu).workgroup_size, WORKGROUP_SIZE);
        assert_eq!(
            Layout::new(1, 1000, &LAVAPIPE).workgroup_size,
            WORKGROUP_SIZE
        );
        // The combine dispatch of a split row: one lane in a workgroup of 256 on GPUs; on a
        // CPU adapter the lanes widen to fill one SIMD batch.
        let combine = Layout::single_chunk(1, 16, 0);
        assert_eq!((combine.workgroup_size, combine.lanes), (WORKGROUP_SIZE, 1));
        let combine = Layout::single_chunk(1, 16, 8);
        assert_eq!((combine.workgroup_size, combine.lanes), (8, 8));
    }

    #[test]
    fn cpu_adapters_get_few_long_workgroups() {
        assert_eq!(LAVAPIPE.for_adapter(false, 2), LAVAPIPE);
        let cpu = LAVAPIPE.for_adapter(true, 2);
        assert_eq!(cpu.target_workgroups, 16);
        assert_eq!(LAVAPIPE.for_adapter(true, 0).target_workgroups, 8);
        // One long row: 16 chunks of 256 lanes instead of 4096 chunks, within the loop bound.
        let one_row = Layout::new(1, 4_000_000, &cpu);
        assert_eq!((one_row.lanes, one_row.chunks), (256, 16));
        assert!(one_row.iterations() <= MAX_ITERATIONS);
        // Rows of 1000: one invocation each (no reduction) instead of 64 lanes.
        assert_eq!(Layout::new(1000, 1000, &cpu).lanes, 1);
        assert_eq!(Layout::new(1000, 1000, &LAVAPIPE).lanes, 64);
        // Rows of 32,000 logits: 32 lanes of 1000 columns.
        let logits = Layout::new(4096, 32_000, &cpu);
        assert_eq!(
            (logits.lanes, logits.chunks, logits.row_groups),
            (32, 1, 512)
        );
        // Host data streams through 32 MiB windows (8 Mi elements), on CPU adapters 4 MiB.
        let windows = |cpu_adapter| {
            let limits = PlanLimits::from_bytes(1 << 30, default_window_bytes(cpu_adapter), 65535);
            Plan::new(1, 10_000_000, limits).windows.len()
        };
        assert_eq!((windows(false), windows(true)), (2, 10));
    }

    #[test]
    fn copy_ranges_split_large_windows_into_aligned_shares() {
        let mib = 1u64 << 20;
        let check = |len: u64, total: u64, threads: u32| {
            let ranges = copy_ranges(len, total, copy_threads(total, threads));
            assert_eq!(ranges.first().map(|r| r.start), Some(0));
            assert_eq!(ranges.last().map(|r| r.end), Some(len));
            for pair in ranges.windows(2) {
                assert_eq!(pair[0].end, pair[1].start);
                assert_eq!(pair[1].start % 8, 0);
            }
            ranges.len()
        };
        // Small windows, or one thread: one copy per input.
        assert_eq!(check(4 * mib, 8 * mib, 8), 1);
        assert_eq!(check(32 * mib, 64 * mib, 1), 1);
        assert_eq!(check(1000, 2000, 8), 1);
        // Two 32 MiB inputs on 8 threads: four shares each.
        assert_eq!(check(32 * mib, 64 * mib, 8), 4);
        // One input of 32 MiB + 4 bytes: eight shares, the last one short.
        assert_eq!(check(32 * mib + 4, 32 * mib + 4, 8), 8);
        // Shares never go below COPY_PIECE_BYTES' worth of the window.
        assert_eq!(check(6 * mib, 12 * mib, 8), 2);
        assert_eq!(copy_threads(8 * mib - 1, 8), 1);
        assert_eq!(copy_threads(64 * mib, 8), 8);
        assert_eq!(copy_threads(64 * mib, 3), 3);
        assert_eq!(default_upload_threads(true, 16), 1);
        assert_eq!(default_upload_threads(false, 16), 8);
        assert_eq!(default_upload_threads(false, 2), 2);
    }

    proptest! {
        #[test]
        fn copy_ranges_cover_each_input_once_at_aligned_offsets(
            p_elems in 1u64..20_000_000, q_elems in 0u64..20_000_000, threads in 0u32..20,
        ) {
            // The inputs of one window (Q absent or as long as P in practice; any length here).
            let total = 4 * (p_elems + q_elems);
            let pieces = copy_threads(total, threads);
            prop_assert!(pieces >= 1 && pieces <= threads.max(1));
            let mut jobs = 0;
            for len in [4 * p_elems, 4 * q_elems].into_iter().filter(|&l| l > 0) {
                let ranges = copy_ranges(len, total, pieces);
                let mut next = 0;
                for r in &ranges {
                    prop_assert_eq!(r.start, next);
                    prop_assert!(r.start % 8 == 0 && r.end > r.start);
                    next = r.end;
                }
                prop_assert_eq!(next, len);
                jobs += ranges.len();
            }
            // Each input's share is rounded up: at most one job more per input than threads.
            prop_assert!(jobs <= pieces as usize + 2);
        }

        #[test]
        fn plans_cover_everything_within_limits(
            rows in 1u64..5000, cols in 1u64..300_000,
            window_elems in 64u64..40_000_000,
            max_workgroups in prop_oneof![1u32..4, 64u32..65536],
            min_iterations in 1u32..2000, target_workgroups in 1u32..100_000,
            blocked_lanes in any::<bool>(),
            small_workgroup in prop::sample::select(vec![0u32, 4, 8, 16]),
            window_rows in 1u64..2_000_000,
        ) {
            let limits = PlanLimits {
                window_elems: window_elems / 64 * 64 + 64,
                window_rows,
                max_workgroups,
                min_iterations,
                target_workgroups,
                blocked_lanes,
                small_workgroup,
            };
            let plan = Plan::new(rows, cols, limits);
            prop_assert_eq!(covered(&plan), rows * cols);
            let mut next = 0;
            for w in &plan.windows {
                prop_assert_eq!(w.elem_start, next);
                next += w.elem_len;
                prop_assert!(w.elem_len <= limits.window_elems);
                prop_assert!(w.rows as u64 <= window_rows);
                for l in std::iter::once(w.terms).chain(w.combine) {
                    prop_assert!(l.chunks >= 1 && l.chunks <= max_workgroups);
                    prop_assert!(l.row_groups <= max_workgroups);
                    prop_assert!(l.iterations() <= MAX_ITERATIONS);
                    prop_assert!(l.lanes.is_power_of_two() && l.lanes <= l.workgroup_size);
                    // The full workgroup, or one at least small_workgroup that holds every
                    // row.
                    let fitted = l.workgroup_size < WORKGROUP_SIZE;
                    prop_assert!(l.workgroup_size.is_power_of_two());
                    prop_assert!(!fitted || (l.workgroup_size >= small_workgroup && l.row_groups == 1));
                    prop_assert!(fitted || l.workgroup_size == WORKGROUP_SIZE);
                }
                prop_assert!(w.terms.chunks as u64 * w.terms.chunk_len as u64 >= w.row_len());
                prop_assert_eq!(w.terms.chunk_len % (4 * w.terms.lanes), 0);
                // Blocked lanes tile the chunk with vec4-aligned blocks; interleaved ones say 0.
                let span = w.terms.lane_span();
                if blocked_lanes {
                    prop_assert_eq!(span % 4, 0);
                    prop_assert_eq!(span * w.terms.lanes, w.terms.chunk_len);
                } else {
                    prop_assert_eq!(span, 0);
                }
                prop_assert!((w.terms.chunks as u64 - 1) * (w.terms.chunk_len as u64) < w.row_len());
                prop_assert!(w.terms.row_groups as u64 * w.terms.rows_per_workgroup() as u64 >= w.rows as u64);
                if let Some(c) = w.combine {
                    prop_assert_eq!(c.chunks, 1);
                    prop_assert!(c.chunk_len >= w.terms.chunks);
                }
                // The state slot is past the window's partials, within the scratch buffer's
                // max_partials() + 2 slots, and the same in every window of a split row.
                prop_assert!(w.partials_stride >= w.terms.chunks);
                prop_assert!((w.partials_stride as u64) < plan.max_partials() + 2);
                if w.split.is_none() {
                    prop_assert_eq!(w.partials_stride, w.terms.chunks);
                }
            }
            for pair in plan.windows.windows(2) {
                if pair[0].split.is_some() && pair[0].row_begin == pair[1].row_begin {
                    prop_assert_eq!(pair[0].partials_stride, pair[1].partials_stride);
                }
            }
        }
    }
}
