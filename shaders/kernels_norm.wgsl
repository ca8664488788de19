// KL or JS of probabilities the kernel normalizes, in one pass, for the rows it can prove
// exact enough; the terms pass finishes the others with the row sums this pass leaves them
// (../docs/ARCHITECTURE.md, "KL and JS of normalized probabilities in one pass";
// Tuning::one_pass_normalized_kl and ::one_pass_normalized_js).
//
// Both read each row once: the row sums Sp = Σx and Sq = Σy, summed as the sums pre-pass sums
// them (so a row this pass leaves gets them from here, and the sums pass does not run), and
// terms of the values alone, with no row constant and the arithmetic of the unnormalized
// measure.
//
// KL. With T = Σ (x·ln(x/y) − x + y) >= 0,
//   KL(x/Sp ‖ y/Sq) = T/Sp − g(ρ),   ρ = Sq/Sp,   g(ρ) = ρ − 1 − ln ρ >= 0,
// exactly (Σ (x/Sp)·ln(x/y) = (T + Sp − Sq)/Sp, less ln(Sp/Sq)). T/Sp = KL + g and g's part
// cancels: the result carries T's rounding (each term good to a few ulp, at most ~2^-18
// relative together, as the terms pass's) scaled by 1 + g/KL. A row is finished where
// g <= KL/2 (at most 1.5 times the rounding the two passes have), or where T/Sp + g is below
// 2^-22 (every error below 1e-12 absolute).
//
// JS. Its term φ(u, v) is homogeneous of degree 1, so with c = Sp/Sq = 1 + ε,
// JS·Sp = F(c) = Σ φ(x, c·y). At c = 1, with m = (x + y)/2, r = (x − y)/(x + y), δ = Sp − Sq:
//   F(1) = J = Σ φ(x, y),
//   F'(1) = ½ Σ y·ln(y/m) = ½ (J + W − δ/2),  W = Σ m·o(r) (js_prob_parts),
//   F''(1) = ¼ Σ m·(1 − r²) = ¼ ((Sp + Sq)/2 − Σ m·r²),  Σ m·r² within [J/ln 2, 2J]
//   (r² <= h(r) <= 2 ln 2·r²),
//   |F'''(ξ)| <= 2F''(ξ)/ξ <= (Sp + Sq)/(4 ξ²·min(1, ξ)).
// So JS·Sp = J + ε·F'(1) + ½ε²·F''(1), with Σ m·r² taken at the middle of its range, is off by
// at most ε²·J/28 + |ε|³·(Sp + Sq)/16 for |ε| <= 1/16. A row is finished where that bound is
// below 2^-22 of the value and the ε terms, which cancel against J, are at most half of it (J
// rounds as KL's T above), or where value, ε terms and bound are all below the absolute floor.
// Rows whose sums differ by a rounding (f16 or bf16 values: |ε| up to ~1e-4) finish at any JS,
// rows 1e-3 apart where JS is above 5e-4, rows a few percent apart not at all.
//
// Both only where nothing else can be off: no subnormal value (its sum needs the integer parts
// and its term may underflow on an adapter that flushes them), no q = 0 against p > 0 (KL +∞:
// the terms pass says so), the term sums finite, and both row sums normal within
// [2^-60, 2^100] (no term that matters underflows, none overflows). Rows of counts whose
// totals differ severalfold mostly do not finish.

@group(0) @binding(3) var<storage, read_write> partials: array<Norm>;

// 2^-60 and 2^100: the row sums a finished row may have; 2^-22: the floor below which a value
// rounds by less than 1e-12, and JS's truncation bound relative to the value; 2^-40: that
// bound below the floor.
const NORM_SUM_MIN: f32 = 8.673617379884035e-19;
const NORM_SUM_MAX: f32 = 1.2676506002282294e30;
const NORM_FLOOR: f32 = 2.384185791015625e-7;
const NORM_ABS_BOUND: f32 = 9.094947017729282e-13;
// (1/ln 2 + 2)/2: the middle of Σ m·r²'s range, in units of J.
const JS_MR2_MID: f32 = 1.7213475204444817;

// One element's parts: its term (KL: T's; JS: J's), JS's m·o(r) (0 for KL), its values'
// normal parts and subnormal significands (normal_or_tiny), and ACC_INF where KL's p > 0 meets
// q = 0.
struct NormTerm { t: f32, w: f32, p: f32, q: f32, tiny: vec2<f32>, flags: u32 }

fn norm_term(x: f32, y: f32) -> NormTerm {
    let a = normal_or_tiny(x);
    let b = normal_or_tiny(y);
    let tiny = vec2<f32>(a.y, b.y);
    if (MEASURE == MEASURE_JS) {
        // r as the unnormalized JS term takes it (x − y is exact where it cancels), o signed.
        let js = js_prob_parts(x, y, div_wide(abs(x - y), x + y));
        return NormTerm(js.x, select(-js.y, js.y, x >= y), a.x, b.x, tiny, 0u);
    }
    let p_zero = is_zero(x);
    let q_zero = is_zero(y);
    return NormTerm(kl_whole(x, y, ratio_of(split(x), split(y)), p_zero, q_zero), 0.0, a.x, b.x,
        tiny, select(0u, ACC_INF, !p_zero && q_zero));
}

// JS's w plus a term as a compensated pair; KL has no w (MEASURE is a constant: folded).
fn norm_add_w(s: Norm, w: f32) -> vec2<f32> {
    if (MEASURE != MEASURE_JS) { return vec2<f32>(0.0, 0.0); }
    let a = two_sum(s.w_hi, w);
    return vec2<f32>(a.x, s.w_lo + a.y);
}

// The scalar loop's element and fold (columns that cannot be read as vec4s).
fn norm_element(x: f32, y: f32, local: u32, col: u32, unused: u32) -> NormTerm {
    note_bad(local, is_bad(x) || is_bad(y));
    return norm_term(x, y);
}

fn norm_fold(s: Norm, e: NormTerm) -> Norm {
    let sp = two_sum(s.sp_hi, e.p);
    let sq = two_sum(s.sq_hi, e.q);
    let t = two_sum(s.t_hi, e.t);
    let w = norm_add_w(s, e.w);
    return Norm(sp.x, s.sp_lo + sp.y, sq.x, s.sq_lo + sq.y, t.x, s.t_lo + t.y, w.x, w.y,
        s.tiny_p + e.tiny.x, s.tiny_q + e.tiny.y, s.flags | e.flags);
}

// KL's term for positive normal x and y (the quick path, norm_fold4): norm_term's formulas
// with nothing to validate, no subnormal part and no zero case.
fn norm_quick_term(x: f32, y: f32) -> NormTerm {
    return NormTerm(kl_whole(x, y, ratio_of(split_normal(x), split_normal(y)), false, false),
        0.0, x, y, vec2<f32>(0.0, 0.0), 0u);
}

// Four elements: the values added exactly (sum4_exact), as the sums pre-pass adds them; the
// four non-negative terms plainly before one compensated add, as fold4_term's main terms, and
// so JS's w terms. KL takes fold4_term's quick path on GPUs (QUICK): a subgroup whose values
// are all positive normal numbers skips the validation and the subnormal and zero cases
// (kernels_sum.wgsl, quick_vec4; JS's term gained nothing from it there).
fn norm_fold4(s: Norm, x: vec4<f32>, y_in: vec4<f32>, local: u32, c: u32, unused: u32)
        -> Norm {
    var e0: NormTerm;
    var e1: NormTerm;
    var e2: NormTerm;
    var e3: NormTerm;
    if (QUICK && MEASURE == MEASURE_KL && all_positive_normal4(x, y_in)) {
        e0 = norm_quick_term(x.x, y_in.x);
        e1 = norm_quick_term(x.y, y_in.y);
        e2 = norm_quick_term(x.z, y_in.z);
        e3 = norm_quick_term(x.w, y_in.w);
    } else {
        let y = checked4(x, y_in, local, 0.0);
        e0 = norm_term(x.x, y.x);
        e1 = norm_term(x.y, y.y);
        e2 = norm_term(x.z, y.z);
        e3 = norm_term(x.w, y.w);
    }
    let p4 = sum4_exact(e0.p, e1.p, e2.p, e3.p);
    let q4 = sum4_exact(e0.q, e1.q, e2.q, e3.q);
    let tiny = (e0.tiny + e1.tiny) + (e2.tiny + e3.tiny);
    let sp = two_sum(s.sp_hi, p4.x);
    let sq = two_sum(s.sq_hi, q4.x);
    let t = two_sum(s.t_hi, (e0.t + e1.t) + (e2.t + e3.t));
    let w = norm_add_w(s, (e0.w + e1.w) + (e2.w + e3.w));
    return Norm(sp.x, (s.sp_lo + sp.y) + p4.y, sq.x, (s.sq_lo + sq.y) + q4.y, t.x,
        s.t_lo + t.y, w.x, w.y, s.tiny_p + tiny.x, s.tiny_q + tiny.y,
        s.flags | e0.flags | e1.flags | e2.flags | e3.flags);
}

// The measure of the normalized row, in nats, from its finished state and its sums as the
// terms pass would take them (row_sums_stats: (p_m, p_s) = Sp, (q_m, q_s) = Sq, p_i and q_i
// their shifts), and whether the row is proven (see the top of this file).
struct NormValue { value: f32, proven: bool }

fn norm_value(s: Norm, sums: RowStats) -> NormValue {
    let sp = vec2<f32>(sums.p_m, sums.p_s);
    let sq = vec2<f32>(sums.q_m, sums.q_s);
    let clean = s.flags == 0u && s.tiny_p == 0.0 && s.tiny_q == 0.0 && is_finite(s.t_hi)
        && is_finite(s.t_lo) && is_finite(s.w_hi) && is_finite(s.w_lo)
        && sp.x >= NORM_SUM_MIN && sp.x <= NORM_SUM_MAX
        && sq.x >= NORM_SUM_MIN && sq.x <= NORM_SUM_MAX;
    if (MEASURE == MEASURE_JS) {
        // ε = δ/Sq, δ = Sp − Sq from the pairs (exact but for the low parts' sum).
        let d = two_sum(sp.x, -sq.x);
        let delta = d.x + (d.y + (sp.y - sq.y));
        let eps = delta / sq.x;
        let j = s.t_hi + s.t_lo;
        let c1 = 0.5 * eps * (j + (s.w_hi + s.w_lo));
        let c2 = -0.25 * eps * delta;
        let c3 = 0.125 * eps * eps * (0.5 * (sp.x + sq.x) - JS_MR2_MID * j);
        let v = j + (c1 + (c2 + c3));
        let moved = abs(c1) + abs(c2) + abs(c3);
        let ae = abs(eps);
        let bound = ae * ae * (j * (1.0 / 28.0) + ae * (sp.x + sq.x) * (1.0 / 16.0));
        let proven = clean && ae <= 0.0625
            && ((bound <= NORM_FLOOR * v && moved <= 0.5 * v)
                || ((v + moved) / sp.x <= NORM_FLOOR && bound / sp.x <= NORM_ABS_BOUND));
        return NormValue((max(v, 0.0) / sp.x) * (1.0 - sp.y / sp.x), proven);
    }
    // v = ln(Sp/Sq) = −ln ρ: the high parts' ratio from their splits (relative to itself even
    // within an ulp of 1), the low parts to first order (each below 2^-24 of its sum).
    let v = ln_ratio(split(sp.x), split(sq.x)) + (sp.y / sp.x - sq.y / sq.x);
    // g(ρ) = φ(v) = v + e^(−v) − 1: its series near 0, else whole (it cancels at most 3 bits
    // there; a v below −88 makes it +∞, and the row is left).
    let g = select(v + exp_acc(-v) - 1.0, phi_series(v), abs(v) <= 1.0);
    let a = ((s.t_hi + s.t_lo) / sp.x) * (1.0 - sp.y / sp.x);
    let kl = a - g;
    let proven = clean && (g <= 0.5 * kl || a + g <= NORM_FLOOR);
    return NormValue(max(kl, 0.0), proven);
}

// Writes a segment's result: a partial, or for a finished row its value (and ROW_DONE), for
// any other row the sums the terms pass normalizes by (as emit_Acc's MODE_STATS writes them).
fn emit_Norm(row: u32, chunk: u32, total: Norm) {
    if ((MODE & MODE_PARTIAL) != 0u) {
        partials[row * prm.chunks + chunk] = total;
        return;
    }
    let sums = row_sums_stats(row, total.sp_hi, total.sp_lo, total.tiny_p, total.sq_hi,
        total.sq_lo, total.tiny_q);
    let v = norm_value(total, sums);
    if (v.proven) {
        out[prm.out_base + row] = v.value * prm.out_scale;
        row_lse[row] = RowStats(0.0, 0.0, ROW_DONE, 0.0, 0.0, 0u);
        return;
    }
    row_lse[row] = sums;
}
