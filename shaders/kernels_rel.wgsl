// KL of logits in one pass, where the row lets it be exact enough; the two-pass kernels finish
// the others (../docs/ARCHITECTURE.md, "KL of logits in one pass, with proof";
// Tuning::one_pass_kl).
//
// With d = x − y and any reference c, u = d − c, weights w = e^(x − xb) in a frame xb at most
// REL_FRAME_SPAN below P's running maximum xm, W = Σ w, φ(u) = u + e^(−u) − 1 >= 0:
//   KL = F/W + (log1p(b) − b),   F = Σ w·φ(u),   b = B/W,   B = Σ w·expm1(−u),
// exactly, whatever c is (KL = E_p[d] + ln E_p[e^(−d)]). F/W >= KL, and the second part is <= 0:
// they cancel as far as c misses lse_x − lse_y, the reference that makes b = 0 (and F/W = KL, the
// two-pass kernels' sum). A state moves its reference by Δ = c' − c exactly (to first order in
// Δ's rounding, which TwoSum keeps):
//   F' = F + W·φ(−Δ) + expm1(Δ)·B,   B' = W·expm1(Δ) + e^Δ·B.
// A lane starts at the d of its first maximum, follows a new maximum that outweighs the rest
// (rel_cover), and moves to its own estimate c − log1p(b) where it has drifted (rel_add);
// states merge into the frame and reference of the higher maximum (combine_Rel).
// A finished row bounds its own rounding by what it summed: g >= Σ|each part of F|, and
// ba = Σ w·|expm1(−u)|, which b's rounding scales by |b|/(1 + b). It keeps its value only where
// that bound is within REL_COND times the value (or below REL_FLOOR): the result is then within
// ~2.4·10^-7·REL_COND relative (four roundings' worth per part summed), inside the bar. Other
// rows are marked for the log-sum-exp and terms kernels, which skip the rows finished here
// (MODE_SKIP_DONE, row_done); so are rows with input the pre-pass will reject, with q = 0
// against p > 0 (KL +∞), or with Q's mass where P has none before P's first finite logit in
// a lane (rel_declined). Masks (−∞, or −f32::MAX, in P, or in both) are kept (rel_term).
// scripts/rel_model.py models this file in float32.
//
// Relative weight errors (e^(x − xb) rounded, frames rescaled) move KL by at most 2·KL times
// their size whatever c is: P and the Q it implies (q ∝ w·e^(−d)) move together.

@group(0) @binding(3) var<storage, read_write> partials: array<Rel>;

const REL_NO_COL: u32 = 0xffffffffu;
// A row with a value the kernel cannot take (not finite): left to the two passes.
const REL_DECLINE: u32 = 1u;
// A row's sums may be REL_COND times its value; and any row whose bound is below REL_FLOOR
// (2^-19: its rounding then stays below 1e-12 absolute) is kept.
const REL_COND: f32 = 16.0;
const REL_FLOOR: f32 = 1.9073486328125e-6;
// How far P's maximum may rise above a state's frame before the frame moves to it (rel_cover):
// the log-sum-exp pass's LSE_BASE_SPAN (monoids.wgsl), for the same reason.
const REL_FRAME_SPAN: f32 = LSE_BASE_SPAN;

fn identity_Rel() -> Rel {
    return Rel(neg_inf(), 0.0, REL_NO_COL, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, neg_inf(), REL_NO_COL,
        0u, 0.0, 0.0, 0.0, neg_inf());
}

// expm1(a), φ(−a) = e^a − 1 − a and e^a, each to a few ulp: by φ's series for |a| <= 1 (no
// cancellation), else from exp_acc (WGSL's exp may be off by 2|a| ulp). e^a is not 1 +
// expm1(a), which keeps only 2^-24 of it absolute: for a = −12.5 that is 1.5 % of e^a, and a
// state moved that far lost its B (found by a float32 model of the kernel).
fn expm1_phi(a: f32) -> vec3<f32> {
    let near = abs(a) <= 1.0;
    let ph = phi_series(-a);
    let ea = exp_acc(a);
    let e1 = select(ea - 1.0, a + ph, near);
    return vec3<f32>(e1, select(e1 - a, ph, near), select(ea, 1.0 + e1, near));
}

// The state s, not empty, in the frame fb (s.xm <= fb + REL_FRAME_SPAN) and with reference c.
fn rel_rebase(s: Rel, fb: f32, c: f32) -> Rel {
    let delta = two_sum(c, -s.c);
    let em = expm1_phi(delta.x);
    let e1 = em.x;
    let ed = em.z;
    let f1 = (s.f + s.w * em.y) + e1 * s.b;
    let b1 = s.w * e1 + ed * s.b;
    let ba1 = s.w * abs(e1) + ed * s.ba;
    let g1 = (s.g + s.w * em.y) + abs(e1) * s.ba;
    // Δ's low part, to first order: dF/dΔ = B', dB/dΔ = B' + W, dq/dΔ = q'.
    let lo = delta.y;
    // The factor e^(s.xb − fb) as exp_acc_low's pair (k.x·(sum·k.y)): it may be below f32's
    // normal range while the sums it scales are huge (a logit of −1e36 in Q). Its error tilts
    // the mass before it against the mass after, so it is exp_acc's (WGSL's exp, the same few
    // ulp off for the same step, compounded over a lane's frames: 1.49 times the bar).
    let k = exp_acc_low(s.xb - fb);
    let q1 = ed * s.q;
    // The low parts move as the sums do (the map is linear in W, F and B).
    let f1_lo = (s.f_lo + s.w_lo * em.y) + e1 * s.b_lo;
    let b1_lo = s.w_lo * e1 + ed * s.b_lo;
    return Rel(s.xm, k.x * (s.w * k.y), s.xi, c, k.x * ((f1 + lo * b1) * k.y),
        k.x * ((g1 + abs(lo) * ba1) * k.y), k.x * ((b1 + lo * (b1 + s.w)) * k.y),
        k.x * ((ba1 + abs(lo) * (ba1 + s.w)) * k.y), k.x * ((q1 + lo * q1) * k.y), s.ym, s.yi,
        s.flags, k.x * (s.w_lo * k.y), k.x * (f1_lo * k.y), k.x * (b1_lo * k.y), fb);
}

// s in (fb, c) where it holds mass; an empty state only takes the frame (its sums are 0, and
// its reference could be anything).
fn rel_moved(s: Rel, fb: f32, c: f32) -> Rel {
    if (s.w == 0.0) {
        return Rel(s.xm, 0.0, s.xi, c, 0.0, 0.0, 0.0, 0.0, 0.0, s.ym, s.yi, s.flags, 0.0, 0.0,
            0.0, fb);
    }
    return rel_rebase(s, fb, c);
}

// Whether state a's maximum of x comes first: higher, or equal at a lower column.
fn rel_first(am: f32, ai: u32, bm: f32, bi: u32) -> bool {
    return am > bm || (am == bm && ai <= bi);
}

fn combine_Rel(a: Rel, b: Rel) -> Rel {
    var top = b;
    var other = a;
    if (rel_first(a.xm, a.xi, b.xm, b.xi)) {
        top = a;
        other = b;
    }
    // Into top's frame: other's maximum is at most top's, so within the span above it.
    let low = rel_moved(other, top.xb, top.c);
    let y_a = rel_first(a.ym, a.yi, b.ym, b.yi);
    let sw = pair_add(top.w, top.w_lo, low.w, low.w_lo);
    let sf = pair_add(top.f, top.f_lo, low.f, low.f_lo);
    let sb = pair_add(top.b, top.b_lo, low.b, low.b_lo);
    return Rel(top.xm, sw.x, top.xi, top.c, sf.x, top.g + low.g, sb.x, top.ba + low.ba,
        top.q + low.q, select(b.ym, a.ym, y_a), select(b.yi, a.yi, y_a), a.flags | b.flags, sw.y,
        sf.y, sb.y, top.xb);
}

// One element's parts (or four's): its weight w, w·φ(u), g's part, w·expm1(−u) and its size,
// and Q's weight v = w·e^(−u).
struct RelTerm { w: f32, f: f32, g: f32, e: f32, ea: f32, v: f32 }

fn rel_sum(a: RelTerm, b: RelTerm) -> RelTerm {
    return RelTerm(a.w + b.w, a.f + b.f, a.g + b.g, a.e + b.e, a.ea + b.ea, a.v + b.v);
}

// One element's parts with u = (x − y) − c, x − y taken
// exactly as a TwoSum pair (two models' logits may sit a constant apart, c ≈ that constant,
// while u is 1e-3). Near u = 0 by φ's series; elsewhere w·(u − 1) + v, v = w·e^(−u), whose
// parts g counts by size. w is exp_low's pair: w below f32's normal range (an adapter may flush
// it) against a huge u is a term like 1e-8 (u = 1e36, w = 1e-44). v is Q's weight, so an error
// in it moves KL by as much, relative, whatever KL is: it takes w's own rounding (which moves P
// and Q alike, harmless) and e^(−u) to an ulp (exp_acc). WGSL's exp, which may be off by
// 3 + 2|u| ulp, would do for the value if the bound counted it, but not for Q's log-sum-exp
// (q, for rows not kept): a row of one column, logits 64.7 against −2.5e37, came out 2.9e-11
// for 0 (the edge fuzz). A u below −80 (a Q weight e^80 times P's) is left to the two passes,
// as v = ∞.
// A masked element (x = −∞, or x − xb < −170, as a mask of −f32::MAX makes it, where w is 0
// in f32 even as exp_low's pair) holds only Q's mass, v = e^(y − xb + c), and adds it to F, B
// and q (its term is p·φ(u) = q there). v is taken as the v of a stand-in x' = y + c, whose u
// is x' − y − c, that sum's rounding, exactly (as any u): e^(x' − xb) then carries the
// rounding of x' − xb and WGSL exp's error (3 + 2|a| ulp) into v alone, not into P's mass too,
// so g counts v by (2 + |a|) (a unit of g stands for four roundings). Where Q is masked too
// (y = −∞) the element holds nothing.
fn rel_term(x: f32, y: f32, s: Rel) -> RelTerm {
    let masked = x - s.xb < -170.0 || x == neg_inf();
    let xs = select(x, y + s.c, masked);
    let a = xs - s.xb;
    let ws = exp_low(a);
    let w = ws.x * ws.y;
    let xy = two_sum(xs, -y);
    let u = (xy.x - s.c) + xy.y;
    let v = select(ws.x * (exp_acc(-u) * ws.y), pos_inf(), u < -80.0);
    let near = abs(u) <= 1.0;
    let ph = phi_series(u);
    let f = select(ws.x * ((u - 1.0) * ws.y) + v, w * ph, near);
    let g = select(ws.x * (abs(u - 1.0) * ws.y) + v, w * ph, near);
    let e = select(v - w, w * (ph - u), near);
    let q_none = y == neg_inf();
    let vq = select(v, 0.0, q_none);
    let t = RelTerm(w, f, g, e, abs(e), v);
    let q_only = RelTerm(0.0, vq, select(v * (2.0 + abs(a)), 0.0, q_none), vq, vq, vq);
    return RelTerm(select(t.w, q_only.w, masked), select(t.f, q_only.f, masked),
        select(t.g, q_only.g, masked), select(t.e, q_only.e, masked),
        select(t.ea, q_only.ea, masked), select(t.v, q_only.v, masked));
}

// Adds one element's (or four's) parts. Where the reference has drifted from the state's own
// lse_x − lse_y, c − log1p(b), so far that b² > F/W (the cancellation it costs is as large as
// the sum), the state moves there: every later term is then taken near u's centre.
fn rel_add(s: Rel, t: RelTerm) -> Rel {
    let w = two_sum(s.w, t.w);
    let f = two_sum(s.f, t.f);
    let b = two_sum(s.b, t.e);
    let r = Rel(s.xm, w.x, s.xi, s.c, f.x, s.g + t.g, b.x, s.ba + t.ea, s.q + t.v, s.ym, s.yi,
        s.flags, s.w_lo + w.y, s.f_lo + f.y, s.b_lo + b.y, s.xb);
    if (r.b * r.b > r.w * r.f) {
        // Opaque: a compiler that rewrote rel_rebase's c' − c as −log1p(b), exactly, would
        // shift the sums by other than the reference moved (its rounding near a logit offset
        // of 100 is 4e-6: close rows' KL came out 1 % off).
        return rel_rebase(r, r.xb, opaque(r.c - log1p_acc(r.b / r.w)));
    }
    return r;
}

// s in a frame that covers a new maximum mx of x at column jx, whose d is cx, and a maximum my
// of y at column jy: rare after a lane's first elements, so a branch. An equal maximum keeps
// the first column (a lane meets its columns in increasing order). The frame moves to mx only
// where mx passes it by more than REL_FRAME_SPAN: a move rescales every sum, and a row whose
// maximum rose at every vec4 compounded the rescales' roundings (1.49 times the bar); now the
// mass before a move weighs at most e^-SPAN of the mass after it, so old roundings fade.
fn rel_cover(s: Rel, mx: f32, jx: u32, cx: f32, my: f32, jy: u32) -> Rel {
    var r = s;
    if (mx > s.xm) {
        // The reference follows the mass: to the new maximum's d where it outweighs the rest.
        let dominant = s.w * exp(s.xb - mx) < 1.0;
        let moves = mx - s.xb > REL_FRAME_SPAN;
        if (dominant || moves) {
            r = rel_moved(s, select(s.xb, mx, moves), select(s.c, cx, dominant));
        }
        r.xm = mx;
        r.xi = jx;
    }
    if (my > s.ym) {
        r.ym = my;
        r.yi = jy;
    }
    return r;
}

// Whether an element leaves its row to the two passes: a value they reject (NaN, +∞), q = 0
// against p > 0 (KL +∞), or Q's mass where P has none before the state has a frame for it
// (v = e^(y − xb + c) needs P's frame xb).
fn rel_declined(x: f32, y: f32, framed: bool) -> u32 {
    let ninf = neg_inf();
    let valid = (is_finite(x) || x == ninf) && (is_finite(y) || y == ninf);
    let q_zero = y == ninf && x != ninf;
    let unframed = x == ninf && y != ninf && !framed;
    return select(0u, REL_DECLINE, !valid || q_zero || unframed);
}

// The scalar loop's element (see soft_element).
struct RelIn { x: f32, y: f32, col: u32 }

fn rel_element(x: f32, y: f32, local: u32, col: u32, unused: u32) -> RelIn {
    return RelIn(x, y, col);
}

fn rel_fold(st: Rel, e: RelIn) -> Rel {
    var s = rel_cover(st, e.x, e.col, e.x - e.y, e.y, e.col);
    s.flags = s.flags | rel_declined(e.x, e.y, s.xm != neg_inf());
    if (s.flags != 0u) { return s; }
    return rel_add(s, rel_term(e.x, e.y, s));
}

fn rel_fold4(st: Rel, x: vec4<f32>, y: vec4<f32>, local: u32, c: u32, unused: u32) -> Rel {
    let mx = max(max(x.x, x.y), max(x.z, x.w));
    let jx = first_of(x, mx);
    let my = max(max(y.x, y.y), max(y.z, y.w));
    let d = x - y;
    var s = rel_cover(st, mx, c + jx, d[jx], my, c + first_of(y, my));
    let framed = s.xm != neg_inf();
    s.flags = s.flags | rel_declined(x.x, y.x, framed) | rel_declined(x.y, y.y, framed)
        | rel_declined(x.z, y.z, framed) | rel_declined(x.w, y.w, framed);
    if (s.flags != 0u) { return s; }
    let t01 = rel_sum(rel_term(x.x, y.x, s), rel_term(x.y, y.y, s));
    let t23 = rel_sum(rel_term(x.z, y.z, s), rel_term(x.w, y.w, s));
    return rel_add(s, rel_sum(t01, t23));
}

// log1p(b) − b, to a few ulp relative: its series for |b| <= 1/4 (to b^14, ~1e-8 relative at
// 1/4), else from log1p.
fn log1p_minus(b: f32) -> f32 {
    let series = -b * b * (1.0 / 2.0 - b * (1.0 / 3.0 - b * (1.0 / 4.0 - b * (1.0 / 5.0
        - b * (1.0 / 6.0 - b * (1.0 / 7.0 - b * (1.0 / 8.0 - b * (1.0 / 9.0 - b * (1.0 / 10.0
        - b * (1.0 / 11.0 - b * (1.0 / 12.0 - b * (1.0 / 13.0 - b * (1.0 / 14.0)))))))))))));
    return select(log1p_acc(b) - b, series, abs(b) <= 0.25);
}

fn emit_Rel(row: u32, chunk: u32, total: Rel) {
    if ((MODE & MODE_PARTIAL) != 0u) {
        partials[row * prm.chunks + chunk] = total;
        return;
    }
    let s = total;
    // W, F and B, each rounded once from its pair.
    let w = s.w + s.w_lo;
    let b = (s.b + s.b_lo) / w;
    let kl = (s.f + s.f_lo) / w + log1p_minus(b);
    // g's parts over W; Q's weights (v) err relative to Q's total, W·(1 + b). b's rounding
    // (B's, over ba; the division's) moves log1p(b) − b by |b|/(1 + b) times as much, and
    // log1p_minus errs by a few ulp of b²/2 (of 2|b| beyond its series).
    let ab = abs(b);
    let bound = (s.g / w) / min(1.0, 1.0 + b) + ab / (1.0 + b) * (s.ba / w + ab)
        + select(ab * ab, 2.0 * ab, ab > 0.25);
    let v = max(kl, 0.0) * prm.out_scale;
    // W >= 1 where the row has mass (its arg-max weighs e^(xm − xb) >= 1); not finite, or
    // b <= −1, where a shift overflowed.
    let kept = s.flags == 0u && w >= 1.0 && b > -1.0 && is_finite(bound) && is_finite(v)
        && bound <= REL_COND * max(kl, 0.0) + REL_FLOOR;
    if (kept) {
        out[prm.out_base + row] = v;
        agree[prm.agree_base + row] = select(0u, 1u, s.xi == s.yi);
        row_lse[row] = RowStats(0.0, 0.0, ROW_DONE, 0.0, 0.0, 0u);
        return;
    }
    // Else the row's log-sum-exps, for the terms pass, where these sums give them as well as the
    // log-sum-exp pass would: lse_x = xb + log1p(W − 1) and lse_y = ym + ql, with
    // ql = ln q + (xb − ym − c) (q = Σ e^(y − xb + c)). The terms feel an error δ in ql only as
    // δ²/2 (docs/ARCHITECTURE.md), and ln q and the bracket may be large where ql is not (c far
    // from lse_x − lse_y, in rows of unrelated models): so the bracket is exact as TwoSums and
    // ln q comes in ln_parts' parts, the exact ones added first, leaving ql to a few of its own
    // ulp, as the log-sum-exp pass's. That pass then skips the row (MODE_SKIP_READY): it takes
    // two reads, as without this kernel.
    let z1 = two_sum(s.xb, -s.ym);
    let z2 = two_sum(z1.x, -s.c);
    let lq = ln_parts(split(s.q));
    let ql = ((lq.x + z2.x) + lq.y) + (lq.z + (z2.y + z1.y));
    let ready = s.flags == 0u && w >= 1.0 && is_normal(s.q) && is_finite(ql)
        && is_finite(w);
    if (ready) {
        agree[prm.agree_base + row] = select(0u, 1u, s.xi == s.yi);
        // Against the frame: the terms pass takes xb + log1p(W − 1), which is lse_x whatever
        // the frame (W >= 1 there, as the maximum weighs e^(xm − xb) >= 1).
        row_lse[row] = RowStats(s.xb, (s.w - 1.0) + s.w_lo, s.xi, s.ym, ql, LSE_READY);
        return;
    }
    row_lse[row] = RowStats(0.0, 0.0, 0u, 0.0, 0.0, 0u);
}
