// The reductions, each a monoid: identity, combine, and a subgroup shuffle (generated from its
// struct: shuffle_xor_source in src/kernels.rs).

// ---- compensated sums (Acc) ----

// Knuth's TwoSum: s + e == a + b exactly.
fn two_sum(a: f32, b: f32) -> vec2<f32> {
    let s = opaque(a + b);
    let bb = opaque(s - a);
    let e = (a - (s - bb)) + (b - bb);
    return vec2<f32>(s, e);
}

// (ah, al) + (bh, bl) as a renormalized pair.
fn pair_add(ah: f32, al: f32, bh: f32, bl: f32) -> vec2<f32> {
    let s = two_sum(ah, bh);
    let lo = s.y + (al + bl);
    let hi = opaque(s.x + lo);
    return vec2<f32>(hi, lo - (hi - s.x));
}

// a + b + c + d as hi + lo, by a tree of TwoSums.
fn sum4_exact(a: f32, b: f32, c: f32, d: f32) -> vec2<f32> {
    let ab = two_sum(a, b);
    let cd = two_sum(c, d);
    let s = two_sum(ab.x, cd.x);
    return vec2<f32>(s.x, (ab.y + cd.y) + s.y);
}

fn identity_Acc() -> Acc { return Acc(0.0, 0.0, 0.0, 0.0, 0u, 0.0, 0.0); }

fn combine_Acc(a: Acc, b: Acc) -> Acc {
    let m = pair_add(a.main_hi, a.main_lo, b.main_hi, b.main_lo);
    let r = pair_add(a.resid_hi, a.resid_lo, b.resid_hi, b.resid_lo);
    return Acc(m.x, m.y, r.x, r.y, a.flags | b.flags, a.tiny_p + b.tiny_p, a.tiny_q + b.tiny_q);
}

// Adds one element's main term, or its residual.
fn add_main(a: Acc, main: f32) -> Acc {
    let m = two_sum(a.main_hi, main);
    return Acc(m.x, a.main_lo + m.y, a.resid_hi, a.resid_lo, a.flags, a.tiny_p, a.tiny_q);
}

fn add_resid(a: Acc, resid: f32) -> Acc {
    let r = two_sum(a.resid_hi, resid);
    return Acc(a.main_hi, a.main_lo, r.x, a.resid_lo + r.y, a.flags, a.tiny_p, a.tiny_q);
}

// ---- log-sum-exp with arg-max (Lse) ----

// One side (P's or Q's logits) of the log-sum-exp pass's state: the max m, its first column i,
// and the other columns' Σ e^(x − b) as s + c (c what s's f32 leaves out), against a base b
// that stays put while the max rises by up to LSE_BASE_SPAN above it (a = e^(m − b), the
// max's own term, in [1, e^LSE_BASE_SPAN]); RowStats takes (s + c)/a, the sum against m. An
// invocation adds up to 1024 columns in a run (CPU adapters' plans): summed plainly, the
// roundings of 1023 equal terms all went one way (32 ulp), and rescaled to each new max, a
// rising row compounded a rounding per column (29 ulp); the loss's gradient broke its bound
// 9.5 and 7.4 times. Now the running sum is rescaled only when the max passes b + SPAN, by
// e^(−SPAN) or less, so old roundings fade; a positive exponent is at most SPAN, where exp
// and the difference are good to an ulp or two.
struct Lse {
    p_m: f32, p_b: f32, p_a: f32, p_s: f32, p_c: f32, p_i: u32,
    q_m: f32, q_b: f32, q_a: f32, q_s: f32, q_c: f32, q_i: u32,
}

struct Side { m: f32, b: f32, a: f32, s: f32, c: f32, i: u32 }

// (Also the one-pass KL kernel's REL_FRAME_SPAN.)
const LSE_BASE_SPAN: f32 = 1.0;

// No logit: no mass, no arg-max.
fn empty_side() -> Side { return Side(neg_inf(), neg_inf(), 0.0, 0.0, 0.0, 0xffffffffu); }

// The merge in `first`'s base (the running state, in a loop), or where the larger max is more
// than LSE_BASE_SPAN above it, in that max's side's base.
fn merge_side(first: Side, second: Side) -> Side {
    var hi = first;
    var lo = second;
    if (second.m > first.m || (second.m == first.m && second.i < first.i)) {
        hi = second;
        lo = first;
    }
    if (lo.m == neg_inf()) { return hi; }
    let base = select(hi.b, first.b, hi.m - first.b <= LSE_BASE_SPAN);
    // The side not in `base` scales by e^(its b − base); the other's factor is 1. By exp_acc:
    // WGSL's exp is off by the same few ulp for the same argument, and a running sum scaled
    // through the trees' levels by steps just over the span gathered them (a gradient 1.13
    // times its bound on a row of 2^22 logits; 0.03 with exp_acc).
    let hi_in_base = hi.b == base;
    let f = exp_acc(select(hi.b, lo.b, hi_in_base) - base);
    let fh = select(f, 1.0, hi_in_base);
    let fl = select(1.0, f, hi_in_base);
    // lo's max is one of the others now. Either sum may be the large running one: both adds
    // are TwoSums.
    let u = two_sum(hi.s * fh, lo.s * fl);
    let v = two_sum(u.x, lo.a * fl);
    return Side(hi.m, base, hi.a * fh, v.x, (hi.c * fh + lo.c * fl) + (u.y + v.y), hi.i);
}

fn identity_Lse() -> Lse {
    let e = empty_side();
    return Lse(e.m, e.b, e.a, e.s, e.c, e.i, e.m, e.b, e.a, e.s, e.c, e.i);
}

fn lse_of(p: Side, q: Side) -> Lse { return Lse(p.m, p.b, p.a, p.s, p.c, p.i, q.m, q.b, q.a, q.s, q.c, q.i); }

fn combine_Lse(x: Lse, y: Lse) -> Lse {
    let p = merge_side(Side(x.p_m, x.p_b, x.p_a, x.p_s, x.p_c, x.p_i),
        Side(y.p_m, y.p_b, y.p_a, y.p_s, y.p_c, y.p_i));
    let q = merge_side(Side(x.q_m, x.q_b, x.q_a, x.q_s, x.q_c, x.q_i),
        Side(y.q_m, y.q_b, y.q_a, y.q_s, y.q_c, y.q_i));
    return lse_of(p, q);
}

// The sum of the others against the max, (s + c)/a (0 where there is no logit).
fn others_at_max(s: f32, c: f32, a: f32) -> f32 { return select((s + c) / a, 0.0, a == 0.0); }

// ---- one pass over logits (Soft; combine in kernels_soft.wgsl) ----

// A row's softmax sums in the frame of its running maxima (see kernels_soft.wgsl): for x, the
// maximum xm, its first column xi and Σ e^(x − xm) over the other columns; the same for y;
// t = Σ e^(x − xm)·(xm − x) (entropy) or ·(ym − y) (cross-entropy); flags (ACC_INF).
struct Soft {
    xm: f32, xs: f32, xi: u32,
    ym: f32, ys: f32, yi: u32,
    t: f32, flags: u32,
}

// ---- KL of logits in one pass (Rel; combine in kernels_rel.wgsl) ----

// A row's sums for KL in a frame xb (within REL_FRAME_SPAN below P's running maximum xm, first
// column xi) and the reference c: W = Σ e^(x − xb), F = Σ w·φ(u), g >= F's parts by size, B = Σ w·expm1(−u), ba =
// Σ w·|expm1(−u)|, q = Σ w·e^(−u) (= W + B, summed without cancellation: Q's log-sum-exp),
// u = (x − y) − c; Q's maximum ym at column yi (top-1 agreement); flags; and what W, F and B's
// f32 leave out (w_lo, f_lo, b_lo): a lane adds up to 1024 columns in a run, and plain sums of a
// row that repeats itself rounded the same way at every add (1.47 times the bar, past the
// row's bound, which counts each part's rounding, not the adds').
struct Rel {
    xm: f32, w: f32, xi: u32, c: f32,
    f: f32, g: f32, b: f32, ba: f32,
    q: f32, ym: f32, yi: u32, flags: u32,
    w_lo: f32, f_lo: f32, b_lo: f32, xb: f32,
}

// ---- KL or JS of normalized probabilities in one pass (Norm; kernels_norm.wgsl) ----

// A row's sums Σx and Σy as the normalization pre-pass keeps them (normal parts as
// compensated pairs, subnormal significands in tiny_p, tiny_q); the unnormalized terms' sum t
// (KL: Σ (x·ln(x/y) − x + y); JS: J = Σ of JS's terms) and JS's odd sum w (W = Σ m·o(r); 0 for
// KL), each a compensated pair; flags (ACC_INF).
struct Norm {
    sp_hi: f32, sp_lo: f32, sq_hi: f32, sq_lo: f32,
    t_hi: f32, t_lo: f32, w_hi: f32, w_lo: f32, tiny_p: f32, tiny_q: f32, flags: u32,
}

fn identity_Norm() -> Norm { return Norm(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0u); }

fn combine_Norm(a: Norm, b: Norm) -> Norm {
    let sp = pair_add(a.sp_hi, a.sp_lo, b.sp_hi, b.sp_lo);
    let sq = pair_add(a.sq_hi, a.sq_lo, b.sq_hi, b.sq_lo);
    let t = pair_add(a.t_hi, a.t_lo, b.t_hi, b.t_lo);
    let w = pair_add(a.w_hi, a.w_lo, b.w_hi, b.w_lo);
    return Norm(sp.x, sp.y, sq.x, sq.y, t.x, t.y, w.x, w.y, a.tiny_p + b.tiny_p,
        a.tiny_q + b.tiny_q, a.flags | b.flags);
}
