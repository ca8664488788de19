// klgpu: declarations shared by every kernel. The Rust side prepends the FLAG_/MODE_/MEASURE_/
// INPUT_ constants (src/kernels.rs) so both sides read the same numbers.

// WG, the invocations per workgroup, is prepended per module with the constants: 256, or on a
// CPU adapter a smaller power of two that holds all of a dispatch's rows (src/plan.rs,
// `fit_workgroup`).

// Specialized per pipeline (pipeline-overridable constants). MODE (MODE_ flags) says what a
// dispatch does with its rows' results: it is a constant, not a parameter, because llvmpipe
// runs the code of every branch, even one whose condition is uniform and false (its
// branches only mask lanes), and the unused modes' stores and atomics cost a row of 10
// columns more than its loads did (plain sums of 400,000 × 10 on lavapipe: 38 → 20 ms).
override MEASURE: u32 = 0u;
override INPUT: u32 = 0u;
override MODE: u32 = 0u;

// One dispatch's parameters. Element (row, col) of the window sits at
// in_x[shift_x + row * row_len + (col - col_begin)].
struct Params {
    shift_p: u32,
    shift_q: u32,
    row_len: u32,
    rows: u32,
    col_begin: u32,
    col_end: u32,
    chunk_len: u32,
    chunks: u32,
    lanes: u32,
    out_base: u32,
    window_id: u32,
    subgroup_width: u32,
    out_scale: f32,
    agree_base: u32,
    grad_base: u32,
    // Columns per lane when each lane walks a contiguous block of its chunk; 0 when the lanes
    // interleave (see loops.wgsl).
    lane_span: u32,
    // Always 0: see opaque().
    zero: u32,
    // Elements per row of the window's inputs (row_len is the partials' stride in a combine
    // pass): where an empty row's first column is.
    elem_row_len: u32,
    _pad2: u32,
    _pad3: u32,
}

// A compensated sum of the stable main term and of the residual sum (p - q), each as an
// unevaluated (hi, lo) pair, plus flags (FLAG_INF_RESULT). The row sums of normalization
// (MEASURE_SUM) keep their subnormal elements apart, in tiny_p and tiny_q (see sums_term);
// every other sum leaves them 0.
struct Acc {
    main_hi: f32,
    main_lo: f32,
    resid_hi: f32,
    resid_lo: f32,
    flags: u32,
    tiny_p: f32,
    tiny_q: f32,
}

// Per-row statistics. For logits: running max m, s' = sum of exp(x - m) over all but the arg-max
// (so log-sum-exp = m + log1p(s') with no cancellation), and the arg-max index, for P and Q
// (the log-sum-exp pass's state, Lse, rounded). For normalized probabilities: p_m = sum of P,
// q_m = sum of Q.
struct RowStats {
    p_m: f32,
    p_s: f32,
    p_i: u32,
    q_m: f32,
    q_s: f32,
    q_i: u32,
}

@group(0) @binding(0) var<uniform> prm: Params;
// bindings 1 and 2 (P and Q) and their loads: shaders/elements.wgsl.
// binding 3 (partials) is declared by each module with its monoid's type.
// status: flags, the earliest window and index with an invalid element, and RAN_MARK once a
// dispatch ran (Workspace::check tells a recording never submitted from valid input).
@group(0) @binding(4) var<storage, read_write> status: array<atomic<u32>, 4>;
@group(0) @binding(5) var<storage, read_write> row_lse: array<RowStats>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;
@group(0) @binding(7) var<storage, read_write> agree: array<u32>;
// A row the one-pass KL kernel finished (kernels_rel.wgsl) holds ROW_DONE in row_lse[row].p_i
// (an arg-max column, or a row sum's shift, never is); one whose log-sum-exps it wrote holds
// LSE_READY in q_i (and q_s is then ln(Σ e^(y − q_m)) itself, see row_ctx). The passes after
// it leave such rows alone, loop and result: the terms pass (MODE_SKIP_DONE) the finished ones,
// the log-sum-exp pass (MODE_SKIP_READY) both.
const ROW_DONE: u32 = 0xfffffffeu;
const LSE_READY: u32 = 0xfffffffdu;

fn row_done(row: u32) -> bool {
    if ((MODE & (MODE_SKIP_DONE | MODE_SKIP_READY)) == 0u) { return false; }
    let s = row_lse[row];
    return s.p_i == ROW_DONE || ((MODE & MODE_SKIP_READY) != 0u && s.q_i == LSE_READY);
}

// Eight storage bindings at most: WebGPU's default max_storage_buffers_per_shader_stage.
// The running state of a row split across windows lives in partials[chunks], where `chunks`
// is one past the most chunks any window of that row has (Window::partials_stride): one
// slot for every window of the row, which may differ by a chunk.

// a / b where b may be huge. NVIDIA's Vulkan driver divides as a·(1/b), and 1/b is subnormal,
// so flushed to 0, where |b| >= 2^126: JS's (p − q)/(p + q) of values near f32::MAX came out
// 0. There both are scaled by 1/4 first (exact, but for an a so small that a/b is 0 anyway).
fn div_wide(a: f32, b: f32) -> f32 {
    let f = select(1.0, 0.25, abs(b) >= 8.507059173023462e37);
    return (a * f) / (b * f);
}

// f32(n) for 0 <= n < 2^23 by an integer and a float operation, both exact: 2^23 + n is an f32
// (its ulp is 1) made by setting n into 2^23's significand. An int-to-float conversion issues at
// an eighth of a fused multiply-add's rate on NVIDIA's recent GPUs.
fn f32_u23(n: u32) -> f32 { return bitcast<f32>(n | 0x4b000000u) - 8388608.0; }

fn pos_inf() -> f32 { return bitcast<f32>(0x7f800000u); }
fn neg_inf() -> f32 { return bitcast<f32>(0xff800000u); }

// x, hidden from the compiler's algebra. Compilers may rewrite float expressions as if they were
// exact: Mesa's NIR (lavapipe) turned TwoSum's (a + b) − a into b, so every compensated sum
// silently lost its error term. A select on a uniform the compiler cannot know stops that.
fn opaque(x: f32) -> f32 { return select(x, 0.0, prm.zero != 0u); }

// Whether x is neither ±∞ nor NaN, by its bits (immune to a compiler that assumes no NaN).
fn is_finite(x: f32) -> bool { return (bitcast<u32>(x) & 0x7f800000u) != 0x7f800000u; }

// Whether x is ±0, by its bits: an adapter that flushes subnormals compares them equal to 0.
fn is_zero(x: f32) -> bool { return (bitcast<u32>(x) & 0x7fffffffu) == 0u; }

// Whether x is a normal number (neither 0, subnormal, ±∞ nor NaN), by its bits.
fn is_normal(x: f32) -> bool {
    let e = bitcast<u32>(x) & 0x7f800000u;
    return e != 0u && e != 0x7f800000u;
}

fn uses_q() -> bool {
    return MEASURE != MEASURE_ENTROPY && MEASURE != MEASURE_SUM_P && MEASURE != MEASURE_ROOF_P;
}

// Element `local` of the window's P and Q, one at a time (elements.wgsl's loads at the
// bindings' shifts); Q reads as P where the measure has none.
fn load_column(local: u32) -> vec2<f32> {
    let x = load_p(prm.shift_p + local);
    var y = x;
    if (uses_q()) { y = load_q(prm.shift_q + local); }
    return vec2<f32>(x, y);
}

// The roofline's sums: plain f32, no validation.
fn is_roof() -> bool { return MEASURE == MEASURE_ROOF_P || MEASURE == MEASURE_ROOF_PQ; }
// Sums added in plain f32: the rooflines', and the bare KL of the benchmarks (KL's term
// without validation or compensation, which tells the cost of the term's arithmetic alone).
fn plain_sums() -> bool { return is_roof() || MEASURE == MEASURE_KL_BARE; }

// Records a rejected element: which problem (flag bits) and, for the earliest window that has
// one, the lowest window-local index. Windows run in order, so a later window never overrides.
fn report_bad(local: u32, bits: u32) {
    atomicOr(&status[0], bits);
    let first_window = atomicMin(&status[1], prm.window_id);
    if (first_window >= prm.window_id) {
        atomicMin(&status[2], local);
    }
}

// An invocation's earliest rejected element, noted without branches or atomics inside the
// element loop and reported once after it: llvmpipe runs both sides of every divergent branch
// and loops over the lanes of a masked atomic, which together cost as much as the loop itself.
// Only the position is reported; the host reads the value there and says what is wrong with it.
const NONE_SEEN: u32 = 0xffffffffu;
var<private> seen_first: u32 = NONE_SEEN;

fn note_bad(local: u32, bad: bool) {
    seen_first = min(seen_first, select(NONE_SEEN, local, bad));
}

fn report_seen() {
    if (seen_first != NONE_SEEN) { report_bad(seen_first, FLAG_INVALID); }
}

// Whether one input value is invalid, by bit tests (immune to a compiler that assumes no NaN):
// a probability must be finite and >= 0 (−0 included); a log-probability or logit must not be
// NaN or +inf (−inf is p = 0).
fn is_bad_prob(x: f32) -> bool {
    let bits = bitcast<u32>(x);
    return bits >= 0x7f800000u && bits != 0x80000000u;
}

fn is_bad_log(x: f32) -> bool {
    let bits = bitcast<u32>(x);
    return (bits & 0x7fffffffu) > 0x7f800000u || bits == 0x7f800000u;
}

fn is_bad(x: f32) -> bool {
    if (INPUT == INPUT_PROBS || INPUT == INPUT_PROBS_NORM) { return is_bad_prob(x); }
    return is_bad_log(x);
}

// Q's four values (all `none`, no mass, where the measure reads P alone), after noting any
// invalid value of the four pairs from element `local` on.
fn checked4(x: vec4<f32>, y_in: vec4<f32>, local: u32, none: f32) -> vec4<f32> {
    var y = vec4<f32>(none);
    if (uses_q()) { y = y_in; }
    note_bad(local, is_bad(x.x) || is_bad(y.x));
    note_bad(local + 1u, is_bad(x.y) || is_bad(y.y));
    note_bad(local + 2u, is_bad(x.z) || is_bad(y.z));
    note_bad(local + 3u, is_bad(x.w) || is_bad(y.w));
    return y;
}

// The first of four columns that holds their maximum m.
fn first_of(v: vec4<f32>, m: f32) -> u32 {
    return select(select(select(3u, 2u, v.z == m), 1u, v.y == m), 0u, v.x == m);
}
