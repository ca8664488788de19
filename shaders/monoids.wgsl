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

// RowStats' logits fields (max, Σ e^(x − max) over the other columns, arg-max) with what each
// sum's f32 leaves out (c): an invocation adds up to 1024 columns in a row (CPU adapters'
// plans), and the roundings of equal terms all go one way. Plain, the sum of 1023 equal
// logits came out 32 ulp off, the loss's gradient (softmax(z) − t) 9.5 times its bound.
struct Lse {
    p_m: f32, p_s: f32, p_c: f32, p_i: u32,
    q_m: f32, q_s: f32, q_c: f32, q_i: u32,
}

struct Side { m: f32, s: f32, c: f32, i: u32 }

fn merge_side(a: Side, b: Side) -> Side {
    var hi = a;
    var lo = b;
    if (b.m > a.m || (b.m == a.m && b.i < a.i)) {
        hi = b;
        lo = a;
    }
    if (lo.m == neg_inf()) {
        return Side(hi.m, hi.s + lo.s, hi.c + lo.c, hi.i);
    }
    let f = exp(lo.m - hi.m);
    let s = two_sum(hi.s, (1.0 + lo.s) * f);
    return Side(hi.m, s.x, hi.c + (lo.c * f + s.y), hi.i);
}

fn identity_Lse() -> Lse {
    return Lse(neg_inf(), 0.0, 0.0, 0xffffffffu, neg_inf(), 0.0, 0.0, 0xffffffffu);
}

fn combine_Lse(a: Lse, b: Lse) -> Lse {
    let p = merge_side(Side(a.p_m, a.p_s, a.p_c, a.p_i), Side(b.p_m, b.p_s, b.p_c, b.p_i));
    let q = merge_side(Side(a.q_m, a.q_s, a.q_c, a.q_i), Side(b.q_m, b.q_s, b.q_c, b.q_i));
    return Lse(p.m, p.s, p.c, p.i, q.m, q.s, q.c, q.i);
}

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

// A row's sums for KL in the frame of P's running maximum xm (first column xi) and the
// reference c: W = Σ e^(x − xm), F = Σ w·φ(u), g >= F's parts by size, B = Σ w·expm1(−u), ba =
// Σ w·|expm1(−u)|, q = Σ w·e^(−u) (= W + B, summed without cancellation: Q's log-sum-exp),
// u = (x − y) − c; Q's maximum ym at column yi (top-1 agreement); flags.
struct Rel {
    xm: f32, w: f32, xi: u32, c: f32,
    f: f32, g: f32, b: f32, ba: f32,
    q: f32, ym: f32, yi: u32, flags: u32,
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
