// One pass over logits: KL, cross-entropy and entropy of P = softmax(x) against Q = softmax(y)
// from a single read of each row, the softmax fused and never formed (../docs/ARCHITECTURE.md,
// "One pass over logits"). JS and the loss with its gradient keep the log-sum-exp pre-pass.
//
// A state holds sums over its elements in a frame: the running maxima xm and ym, where every
// weight is e^(x − xm) (at most 1) and every r = ln(p/q) minus the frame's shift
// c = xm − ym. With S = Σ e^(x − xm) and u = (Σ e^(y − ym) − S)/S:
//   KL = Σ_{p,q>0} e^(x−xm)·φ(r)/S + Σ_{p=0} e^(y−ym)/S + ln(1 + u) − u,   φ(r) = r + e^(−r) − 1,
// an identity for any frame: the first two sums are non-negative, and ln(1 + u) − u is second
// order in u, which is small when the frames' maxima sit on close columns of close models. The
// difference Σ e^(y−ym) − S is kept as a sum of its terms e^(x−xm)·(e^(−r) − 1), each accurate
// (from φ's series near r = 0), so close rows keep their digits without a second pass.
// Entropy = ln S + Σ e^(x−xm)·(xm − x)/S and cross-entropy = ln S_y + Σ e^(x−xm)·(ym − y)/S,
// S_y = Σ e^(y − ym): sums of non-negative parts, with t the second one's sum.

@group(0) @binding(3) var<storage, read_write> partials: array<Soft>;

const NO_COL: u32 = 0xffffffffu;

fn identity_Soft() -> Soft {
    return Soft(neg_inf(), 0.0, NO_COL, neg_inf(), 0.0, NO_COL, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0u);
}

// e^x − 1 for |x| <= 0.5 by its series (expm1_acc without the exp, which may overflow where
// the caller selects the other form).
fn expm1_near(x: f32) -> f32 {
    return x * (1.0 + x * (1.0 / 2.0 + x * (1.0 / 6.0 + x * (1.0 / 24.0 + x * (1.0 / 120.0
        + x * (1.0 / 720.0 + x * (1.0 / 5040.0 + x * (1.0 / 40320.0 + x * (1.0 / 362880.0)))))))));
}

// The state s in the frame (mx, my) >= (s.xm, s.ym). x's weights scale by f = e^(xm − mx) and
// y's by h = e^(ym − my); the shift c moves by Δ = (mx − xm) − (my − ym), and every term
// follows exactly: φ(r − Δ) = φ(r) + φ(−Δ) + (e^(−r) − 1)·(e^Δ − 1). The two factors
// f·φ(−Δ) and f·(e^Δ − 1) = h − f come from series where Δ is small, so nothing cancels, and
// from h and f elsewhere, so nothing overflows. Where mx is above s.xm, s's arg-max joins its
// other weights (the caller names the new arg-max); likewise for y. An empty side (max −∞)
// stays empty and weightless.
fn soft_rebase(s: Soft, mx: f32, my: f32) -> Soft {
    let x_empty = s.xm == neg_inf();
    let y_empty = s.ym == neg_inf();
    let dx = select(mx - s.xm, 0.0, x_empty);
    let dy = select(my - s.ym, 0.0, y_empty);
    let f = select(exp(-dx), 0.0, x_empty);
    let h = select(exp(-dy), 0.0, y_empty);
    let w = select(1.0 + s.xs, 0.0, x_empty);
    let wy = select(1.0 + s.ys, 0.0, y_empty);
    let delta = dx - dy;
    let b = select(h - f, f * expm1_near(delta), abs(delta) <= 0.5);
    let a = select(b - f * delta, f * phi_series(-delta), abs(delta) <= 1.0);
    let phi = pair_add(f * s.phi_hi, f * s.phi_lo, w * a, b * s.u_hi + b * s.u_lo);
    let u = pair_add(h * s.u_hi, h * s.u_lo, w * b, 0.0);
    // t's distances are to xm (entropy) or ym (cross-entropy), and grow with them.
    let dt = select(dx, dy, MEASURE == MEASURE_CE);
    return Soft(mx, select(s.xs, f * w, dx > 0.0), s.xi, my, select(s.ys, h * wy, dy > 0.0), s.yi,
        f * (s.t + dt * w), phi.x, phi.y, u.x, u.y, h * s.z, s.flags);
}

// Which of two states' arg-max columns the merged state keeps: the one whose maximum is the
// merged one, the lower column on a tie (the first arg-max, as the CPU reference takes it).
fn soft_argmax(am: f32, ai: u32, bm: f32, bi: u32, m: f32) -> vec2<u32> {
    let a_top = am == m && m != neg_inf();
    let b_top = bm == m && m != neg_inf();
    // (column, 1 if both hold the maximum: the loser's arg-max then joins the other weights)
    return vec2<u32>(select(bi, ai, a_top && (!b_top || ai < bi)), select(0u, 1u, a_top && b_top));
}

fn combine_Soft(a: Soft, b: Soft) -> Soft {
    let mx = max(a.xm, b.xm);
    let my = max(a.ym, b.ym);
    let ra = soft_rebase(a, mx, my);
    let rb = soft_rebase(b, mx, my);
    let xi = soft_argmax(a.xm, a.xi, b.xm, b.xi, mx);
    let yi = soft_argmax(a.ym, a.yi, b.ym, b.yi, my);
    let phi = pair_add(ra.phi_hi, ra.phi_lo, rb.phi_hi, rb.phi_lo);
    let u = pair_add(ra.u_hi, ra.u_lo, rb.u_hi, rb.u_lo);
    return Soft(mx, (ra.xs + rb.xs) + f32(xi.y), xi.x, my, (ra.ys + rb.ys) + f32(yi.y), yi.x,
        ra.t + rb.t, phi.x, phi.y, u.x, u.y, ra.z + rb.z, a.flags | b.flags);
}

// The state in a frame that also covers a new maximum of x (mx at column jx) or of y: rare
// after a lane's first elements, so a branch.
fn soft_cover(s: Soft, mx: f32, jx: u32, my: f32, jy: u32) -> Soft {
    if (mx <= s.xm && my <= s.ym) { return s; }
    var r = soft_rebase(s, max(s.xm, mx), max(s.ym, my));
    if (mx > s.xm) { r.xi = jx; }
    if (my > s.ym) { r.yi = jy; }
    return r;
}

// One element's parts in s's frame; c is the frame's shift xm − ym as an exact pair.
struct SoftTerm { xs: f32, ys: f32, t: f32, phi: f32, u: f32, z: f32, flags: u32 }

fn soft_term(x: f32, y: f32, col: u32, s: Soft, c: vec2<f32>) -> SoftTerm {
    let p_zero = x == neg_inf();
    let ex = select(exp(x - s.xm), 0.0, p_zero);
    // The arg-max's weight, exactly 1, is the 1 of S = 1 + xs: ln S = log1p(xs) keeps a
    // peaked row's entropy.
    let xs = select(ex, 0.0, col == s.xi);
    if (MEASURE == MEASURE_ENTROPY) {
        return SoftTerm(xs, 0.0, select(ex * (s.xm - x), 0.0, p_zero), 0.0, 0.0, 0.0, 0u);
    }
    let q_zero = y == neg_inf();
    let ey = select(exp(y - s.ym), 0.0, q_zero);
    let ys = select(ey, 0.0, col == s.yi);
    let inf = select(0u, ACC_INF, !p_zero && q_zero);
    if (MEASURE == MEASURE_CE) {
        return SoftTerm(xs, ys, select(ex * (s.ym - y), 0.0, p_zero || q_zero), 0.0, 0.0, 0.0, inf);
    }
    // r = (x − y) − c with x − y exact (TwoSum): two models' logits that differ by a common
    // offset cancel it exactly, as in logit_diff.
    let d = two_sum(x, -y);
    let r = (d.x - c.x) + (d.y - c.y);
    let near = abs(r) <= 1.0;
    let ph = phi_series(r);
    // e^(x−xm)·e^(−r) is e^(y−ym): far from r = 0 the two weights give φ and e^(−r) − 1
    // without cancelling; near it the series does.
    let phi = select(ex * (r - 1.0) + ey, ex * ph, near);
    let u = select(ey - ex, ex * (ph - r), near);
    let live = !p_zero && !q_zero;
    return SoftTerm(xs, ys, 0.0, select(0.0, phi, live), select(0.0, u, live),
        select(0.0, ey, p_zero), inf);
}

fn soft_add(s: Soft, t: SoftTerm) -> Soft {
    let phi = two_sum(s.phi_hi, t.phi);
    let u = two_sum(s.u_hi, t.u);
    return Soft(s.xm, s.xs + t.xs, s.xi, s.ym, s.ys + t.ys, s.yi, s.t + t.t, phi.x,
        s.phi_lo + phi.y, u.x, s.u_lo + u.y, s.z + t.z, s.flags | t.flags);
}

fn soft_sum4(a: SoftTerm, b: SoftTerm, c: SoftTerm, d: SoftTerm) -> SoftTerm {
    return SoftTerm((a.xs + b.xs) + (c.xs + d.xs), (a.ys + b.ys) + (c.ys + d.ys),
        (a.t + b.t) + (c.t + d.t), (a.phi + b.phi) + (c.phi + d.phi), (a.u + b.u) + (c.u + d.u),
        (a.z + b.z) + (c.z + d.z), a.flags | b.flags | c.flags | d.flags);
}

// The scalar loop's element (the columns of a row that share a vec4 with a neighbour, and
// inputs that cannot be read as vec4s).
struct SoftIn { x: f32, y: f32, local: u32, col: u32 }

fn soft_element(x: f32, y: f32, local: u32, col: u32, unused: u32) -> SoftIn {
    return SoftIn(x, y, local, col);
}

fn soft_fold(st: Soft, e: SoftIn) -> Soft {
    var y = neg_inf();
    if (uses_q()) { y = e.y; }
    note_bad(e.local, is_bad(e.x) || is_bad(y));
    let s = soft_cover(st, e.x, e.col, y, e.col);
    return soft_add(s, soft_term(e.x, y, e.col, s, two_sum(s.xm, -s.ym)));
}

fn soft_fold4(st: Soft, x: vec4<f32>, y_in: vec4<f32>, local: u32, c: u32, unused: u32) -> Soft {
    let y = checked_logits4(x, y_in, local);
    let mx = max(max(x.x, x.y), max(x.z, x.w));
    let my = max(max(y.x, y.y), max(y.z, y.w));
    let s = soft_cover(st, mx, c + first_of(x, mx), my, c + first_of(y, my));
    let cs = two_sum(s.xm, -s.ym);
    return soft_add(s, soft_sum4(soft_term(x.x, y.x, c, s, cs), soft_term(x.y, y.y, c + 1u, s, cs),
        soft_term(x.z, y.z, c + 2u, s, cs), soft_term(x.w, y.w, c + 3u, s, cs)));
}

// ln(1 + u) − u for |u| <= 1/4 without cancellation: −u²/(2 + u) + 2·s³·T(s²), s = u/(2 + u)
// (|s| <= 1/7), the atanh series of log1p_near less its first term, u − u²/(2 + u).
fn log1p_minus_near(u: f32) -> f32 {
    let s = u / (2.0 + u);
    let z = s * s;
    return -u * u / (2.0 + u) + 2.0 * s * z * atanh_tail(z);
}

// The measure of a finished row, in nats.
fn soft_value(s: Soft) -> f32 {
    let w = 1.0 + s.xs;
    if (MEASURE == MEASURE_ENTROPY) { return log1p_acc(s.xs) + s.t / w; }
    if ((s.flags & ACC_INF) != 0u) { return pos_inf(); }
    if (MEASURE == MEASURE_CE) { return log1p_acc(s.ys) + s.t / w; }
    let u = ((s.u_hi + s.u_lo) + s.z) / w;
    // Where u is not small, ln(1 + u) comes from the sums themselves: 1 + u is their ratio,
    // which u = (S_y − S)/S would lose where S_y is far below S.
    let g = select((log1p_acc(s.ys) - log1p_acc(s.xs)) - u, log1p_minus_near(u), abs(u) <= 0.25);
    // Rounding can leave the parts' sum a few ulps below 0; KL is not.
    return max(((s.phi_hi + s.phi_lo) + s.z) / w + g, 0.0);
}

fn emit_Soft(row: u32, chunk: u32, total: Soft) {
    if ((prm.mode & MODE_PARTIAL) != 0u) {
        partials[row * prm.chunks + chunk] = total;
        return;
    }
    var s = total;
    if ((prm.mode & MODE_ACCUMULATE) != 0u) { s = combine_Soft(partials[prm.chunks], s); }
    if ((prm.mode & MODE_KEEP) != 0u) {
        partials[prm.chunks] = s;
        return;
    }
    if (s.xm == neg_inf()) { report_bad(row * prm.row_len, FLAG_P_EMPTY); }
    if (uses_q()) {
        if (s.ym == neg_inf()) { report_bad(row * prm.row_len, FLAG_Q_EMPTY); }
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
