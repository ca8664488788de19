// One pass over logits, or over probabilities the kernel normalizes: cross-entropy and entropy
// of P = softmax(x) against Q = softmax(y) (or P = x/Σx, Q = y/Σy) from a single read of each
// row, the softmax or normalization fused and never formed (../docs/ARCHITECTURE.md, "One pass
// over logits"). KL, JS and the loss with its gradient keep their pre-pass.
//
// A state holds sums in the frame of its running maxima xm and ym, where every weight is
// w(x) = e^(x − xm) <= 1 (x/xm for probabilities; likewise for Q), and every distance
// dist(xm, x) = xm − x >= 0 (ln(xm/x)). With S = Σ w(x) and S_y = Σ w(y):
//   entropy       = ln S   + Σ w(x)·dist(xm, x) / S,
//   cross-entropy = ln S_y + Σ w(x)·dist(ym, y) / S,
// each a sum of two non-negative parts, so nothing cancels; t is the second sum. S is kept as
// 1 + the weights of all but the arg-max (whose weight is exactly 1), so that ln S = log1p of
// them keeps a peaked row's entropy; likewise S_y.
//
// t is kept in units of 2^40 nats (every distance times DIST_SCALE, exactly): logits ±3.4e38
// apart are 6.8e38 apart, beyond f32, and a lane's frame, below the row's maxima, can weigh
// many such distances by weights near 1, while the value, a weighted mean of distances, may be
// well within f32 (rows at 1e38 read Overflow or not by how their lanes were grouped). Scaled,
// t stays below 2^32 weights times 6.8e38·2^-40 = 2.7e36; what the scaling rounds away (terms
// below 1e-26 nats) is far below the results' bar.
const DIST_SCALE: f32 = 9.094947017729282e-13;
const DIST_UNSCALE: f32 = 1099511627776.0;

@group(0) @binding(3) var<storage, read_write> partials: array<Soft>;

const NO_COL: u32 = 0xffffffffu;

fn identity_Soft() -> Soft {
    return Soft(soft_none(), 0.0, NO_COL, soft_none(), 0.0, NO_COL, 0.0, 0u);
}

fn soft_probs() -> bool { return INPUT == INPUT_PROBS_NORM; }

// The value of no mass: a logit of −∞, a probability of 0 (which is also an empty frame's
// maximum).
fn soft_none() -> f32 { return select(neg_inf(), 0.0, soft_probs()); }

// Whether x holds no mass. Probabilities by their bits: an adapter that flushes subnormals
// compares them equal to 0.
fn soft_zero(x: f32) -> bool {
    if (soft_probs()) { return is_zero(x); }
    return x == neg_inf();
}

// An order on values that subnormal probabilities keep (their bits, sign dropped: a valid
// probability is >= 0 or −0).
fn soft_key(x: f32) -> f32 {
    if (soft_probs()) { return bitcast<f32>(bitcast<u32>(x) & 0x7fffffffu); }
    return x;
}

fn soft_above(a: f32, b: f32) -> bool {
    if (soft_probs()) {
        return (bitcast<u32>(a) & 0x7fffffffu) > (bitcast<u32>(b) & 0x7fffffffu);
    }
    return a > b;
}

fn soft_higher(a: f32, b: f32) -> f32 { return select(b, a, soft_above(a, b)); }

// x's place in a frame whose maximum is m >= x: its weight w(x) (e^(x − m), or x/m) and m's
// distance above it, dist(m, x) >= 0 (m − x, or ln(m/x)), scaled by DIST_SCALE (m − x as the
// difference of the scaled logits, which never overflows), as (w', dist, c) with w = w'·c.
// c is 1 but for P's logits in cross-entropy (`low`), where w may be subnormal while the
// distance it weighs on Q's side is huge (a logit near −f32::MAX): there (w', c) is exp_low's
// pair and w·dist is taken as w'·(dist·c). Probabilities take both from one split of each (no
// float operation sees a subnormal, which an adapter may flush; ln_ratio is relative even
// where m/x is within an ulp of 1; their distances stay below 200). No mass weighs 0, at a
// finite distance.
fn soft_place(x: f32, m: f32, low: bool) -> vec3<f32> {
    if (soft_probs()) { return soft_place_prob(split(x), split(m), is_zero(x)); }
    let no_mass = x == neg_inf();
    var w = vec2<f32>(exp(x - m), 1.0);
    if (low) { w = exp_low(x - m); }
    let dist = DIST_SCALE * m - DIST_SCALE * x;
    return vec3<f32>(select(w.x, 0.0, no_mass), select(dist, 0.0, no_mass), w.y);
}

// soft_place for probabilities, from the splits of x and m (x_zero: x holds no mass).
fn soft_place_prob(sx: Split, sm: Split, x_zero: bool) -> vec3<f32> {
    let r = split_div(sx, sm);
    return vec3<f32>(select(ldexp(r.m, r.e), 0.0, x_zero), DIST_SCALE * ln_ratio(sm, sx), 1.0);
}

// Whether P's weights come scaled from soft_place (MEASURE is a constant: folded).
fn soft_low() -> bool { return MEASURE == MEASURE_CE && !soft_probs(); }

// The maximum of four values and the first column that holds it.
fn soft_max4(v: vec4<f32>) -> vec2<f32> {
    let m = soft_higher(soft_higher(v.x, v.y), soft_higher(v.z, v.w));
    let k = soft_key(m);
    let j = select(select(select(3u, 2u, soft_key(v.z) == k), 1u, soft_key(v.y) == k), 0u,
        soft_key(v.x) == k);
    return vec2<f32>(m, f32(j));
}

// The state s in the frame (mx, my) >= (s.xm, s.ym): x's weights scale by f = w(xm) in the
// new frame (e^(xm − mx), or xm/mx), y's by h = w(ym), and t's distances grow by
// dist(mx, xm) (entropy) or dist(my, ym) (cross-entropy). Where mx is above s.xm, s's arg-max
// joins its other weights (the caller names the new arg-max); likewise for y. An empty side
// (no mass yet) stays empty and weightless.
fn soft_rebase(s: Soft, mx: f32, my: f32) -> Soft {
    let x_empty = soft_zero(s.xm);
    let y_empty = soft_zero(s.ym);
    let x_up = soft_above(mx, s.xm);
    let y_up = soft_above(my, s.ym);
    // The old maxima's places in the new frame: the factor their weights scale by, and how
    // far the maximum moved.
    let px = select(vec3<f32>(1.0, 0.0, 1.0), soft_place(s.xm, mx, soft_low()), x_up);
    let py = select(vec3<f32>(1.0, 0.0, 1.0), soft_place(s.ym, my, false), y_up);
    let dx = select(px.y, 0.0, x_empty);
    let dy = select(py.y, 0.0, y_empty);
    // t scales by f = f'·c, as t + dt·w may be huge where f is subnormal.
    let fs = select(px.x, 0.0, x_empty);
    let f = fs * px.z;
    let h = select(py.x, 0.0, y_empty);
    let w = select(1.0 + s.xs, 0.0, x_empty);
    let wy = select(1.0 + s.ys, 0.0, y_empty);
    let dt = select(dx, dy, MEASURE == MEASURE_CE);
    // (Scaled, dt·w stays finite even for runs of logits masked with −f32::MAX, as models mask
    // them, 3.4e38 below a row's maximum: a factor that underflowed leaves nothing.)
    let t = fs * ((s.t + dt * w) * px.z);
    return Soft(mx, select(s.xs, f * w, x_up), s.xi, my, select(s.ys, h * wy, y_up), s.yi, t,
        s.flags);
}

// Which of two states' arg-max columns the merged state keeps: the one whose maximum is the
// merged one, the lower column on a tie (the first arg-max, as the CPU reference takes it).
// Also 1 where both hold the maximum: the loser's arg-max then joins the other weights.
fn soft_argmax(am: f32, ai: u32, bm: f32, bi: u32, m: f32) -> vec2<u32> {
    let a_top = soft_key(am) == soft_key(m) && !soft_zero(m);
    let b_top = soft_key(bm) == soft_key(m) && !soft_zero(m);
    return vec2<u32>(select(bi, ai, a_top && (!b_top || ai < bi)), select(0u, 1u, a_top && b_top));
}

fn combine_Soft(a: Soft, b: Soft) -> Soft {
    let mx = soft_higher(a.xm, b.xm);
    let my = soft_higher(a.ym, b.ym);
    let ra = soft_rebase(a, mx, my);
    let rb = soft_rebase(b, mx, my);
    let xi = soft_argmax(a.xm, a.xi, b.xm, b.xi, mx);
    let yi = soft_argmax(a.ym, a.yi, b.ym, b.yi, my);
    return Soft(mx, (ra.xs + rb.xs) + f32(xi.y), xi.x, my, (ra.ys + rb.ys) + f32(yi.y), yi.x,
        ra.t + rb.t, a.flags | b.flags);
}

// The state in a frame that also covers a new maximum of x (mx at column jx) or of y: rare
// after a lane's first elements, so a branch. An equal maximum keeps the arg-max: a lane meets
// its columns in increasing order (loops.wgsl), so the first column that holds the maximum
// stays, as in the reference (states of different lanes merge by soft_argmax).
fn soft_cover(s: Soft, mx: f32, jx: u32, my: f32, jy: u32) -> Soft {
    let x_up = soft_above(mx, s.xm);
    let y_up = soft_above(my, s.ym);
    if (!x_up && !y_up) { return s; }
    var r = soft_rebase(s, soft_higher(mx, s.xm), soft_higher(my, s.ym));
    if (x_up) { r.xi = jx; }
    if (y_up) { r.yi = jy; }
    return r;
}

// One element's parts in s's frame: its weights (0 at the arg-max, whose 1 is S's), its part
// of t, and ACC_INF where p > 0 and q = 0 (cross-entropy +∞).
struct SoftTerm { xs: f32, ys: f32, t: f32, flags: u32 }

fn soft_term(x: f32, y: f32, col: u32, s: Soft) -> SoftTerm {
    let p_zero = soft_zero(x);
    let px = soft_place(x, s.xm, soft_low());
    let xs = select(px.x * px.z, 0.0, col == s.xi);
    if (MEASURE == MEASURE_ENTROPY) {
        return SoftTerm(xs, 0.0, px.x * px.y, 0u);
    }
    let q_zero = soft_zero(y);
    let py = soft_place(y, s.ym, false);
    return SoftTerm(xs, select(py.x, 0.0, col == s.yi),
        select(px.x * (py.y * px.z), 0.0, p_zero || q_zero),
        select(0u, ACC_INF, !p_zero && q_zero));
}

// soft_term for positive normal x and y (probabilities; the quick path, soft_fold4): the same
// formulas with no zero case. The frame's maxima are then positive normal numbers too.
fn soft_quick_term(x: f32, y: f32, col: u32, s: Soft) -> SoftTerm {
    let px = soft_place_prob(split_normal(x), split_normal(s.xm), false);
    let xs = select(px.x, 0.0, col == s.xi);
    if (MEASURE == MEASURE_ENTROPY) {
        return SoftTerm(xs, 0.0, px.x * px.y, 0u);
    }
    let py = soft_place_prob(split_normal(y), split_normal(s.ym), false);
    return SoftTerm(xs, select(py.x, 0.0, col == s.yi), px.x * py.y, 0u);
}

fn soft_add(s: Soft, t: SoftTerm) -> Soft {
    return Soft(s.xm, s.xs + t.xs, s.xi, s.ym, s.ys + t.ys, s.yi, s.t + t.t, s.flags | t.flags);
}

// The scalar loop's element (the columns of a row that share a vec4 with a neighbour, and
// inputs that cannot be read as vec4s).
struct SoftIn { x: f32, y: f32, local: u32, col: u32 }

fn soft_element(x: f32, y: f32, local: u32, col: u32, unused: u32) -> SoftIn {
    return SoftIn(x, y, local, col);
}

fn soft_fold(st: Soft, e: SoftIn) -> Soft {
    var y = soft_none();
    if (uses_q()) { y = e.y; }
    note_bad(e.local, is_bad(e.x) || is_bad(y));
    let s = soft_cover(st, e.x, e.col, y, e.col);
    return soft_add(s, soft_term(e.x, y, e.col, s));
}

// Probabilities take the terms kernel's quick path on GPUs (QUICK, kernels_sum.wgsl's
// quick_vec4): a subgroup whose values are all positive normal numbers skips the validation,
// the subnormal splits and the zero cases.
fn soft_fold4(st: Soft, x: vec4<f32>, y_in: vec4<f32>, local: u32, c: u32, unused: u32) -> Soft {
    let quick = QUICK && soft_probs() && all_positive_normal4(x, y_in);
    var y = vec4<f32>(soft_none());
    if (!quick) {
        y = checked4(x, y_in, local, soft_none());
    } else if (uses_q()) {
        y = y_in;
    }
    let mx = soft_max4(x);
    let my = soft_max4(y);
    let s = soft_cover(st, mx.x, c + u32(mx.y), my.x, c + u32(my.y));
    var t0: SoftTerm;
    var t1: SoftTerm;
    var t2: SoftTerm;
    var t3: SoftTerm;
    if (quick) {
        t0 = soft_quick_term(x.x, y.x, c, s);
        t1 = soft_quick_term(x.y, y.y, c + 1u, s);
        t2 = soft_quick_term(x.z, y.z, c + 2u, s);
        t3 = soft_quick_term(x.w, y.w, c + 3u, s);
    } else {
        t0 = soft_term(x.x, y.x, c, s);
        t1 = soft_term(x.y, y.y, c + 1u, s);
        t2 = soft_term(x.z, y.z, c + 2u, s);
        t3 = soft_term(x.w, y.w, c + 3u, s);
    }
    return soft_add(s, SoftTerm((t0.xs + t1.xs) + (t2.xs + t3.xs), (t0.ys + t1.ys) + (t2.ys + t3.ys),
        (t0.t + t1.t) + (t2.t + t3.t), t0.flags | t1.flags | t2.flags | t3.flags));
}

// The measure of a finished row, in nats.
fn soft_value(s: Soft) -> f32 {
    let w = 1.0 + s.xs;
    if (MEASURE == MEASURE_ENTROPY) { return log1p_acc(s.xs) + (s.t / w) * DIST_UNSCALE; }
    if ((s.flags & ACC_INF) != 0u) { return pos_inf(); }
    return log1p_acc(s.ys) + (s.t / w) * DIST_UNSCALE;
}

fn emit_Soft(row: u32, chunk: u32, total: Soft) {
    if ((MODE & MODE_PARTIAL) != 0u) {
        partials[row * prm.chunks + chunk] = total;
        return;
    }
    var s = total;
    if ((MODE & MODE_ACCUMULATE) != 0u) { s = combine_Soft(partials[prm.chunks], s); }
    if ((MODE & MODE_KEEP) != 0u) {
        partials[prm.chunks] = s;
        return;
    }
    if (soft_zero(s.xm)) { report_bad(row * prm.elem_row_len, FLAG_P_EMPTY); }
    if (uses_q()) {
        if (soft_zero(s.ym)) { report_bad(row * prm.elem_row_len, FLAG_Q_EMPTY); }
        agree[prm.agree_base + row] = select(0u, 1u, s.xi == s.yi);
    }
    var v = soft_value(s) * prm.out_scale;
    // As emit_Acc: a non-finite value no q = 0 explains overflowed; the row reads NaN.
    if ((s.flags & ACC_INF) == 0u && !is_finite(v)) {
        atomicOr(&status[0], FLAG_OVERFLOW);
        v = bitcast<f32>(0x7fc00000u);
    }
    out[prm.out_base + row] = v;
}
