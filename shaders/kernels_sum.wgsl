// The term kernel (one fused pass: validate, per-element term, reduce) and the combine kernel
// for compensated sums. MEASURE and INPUT select the term function.

@group(0) @binding(3) var<storage, read_write> partials: array<Acc>;

fn is_prob_input() -> bool { return INPUT == INPUT_PROBS || INPUT == INPUT_PROBS_NORM; }

// Per-row constants: for logits the log-sum-exp parts of P and Q; for normalized
// probabilities the splits of the row sums (p_sum, q_sum), which each element divides by, and
// what the sums' f32 values leave out, relative to them (p_sum_lo, q_sum_lo: ln p takes it
// off, so a p within 2^-24 of 1 keeps its −p·ln p), and the split of Σp/Σq (sum_ratio, for
// ratio_norm).
// For logits also the shift lse_p − lse_q as shift_hi + shift_lo + shift_ls: p_m − q_m exactly
// as shift_hi + shift_lo (TwoSum), and pl − ql (see logit_diff).
struct RowCtx {
    pm: f32, pl: f32, qm: f32, ql: f32, shift_hi: f32, shift_lo: f32, shift_ls: f32,
    p_sum: Split, q_sum: Split, p_sum_lo: f32, q_sum_lo: f32, sum_ratio: Split,
}

fn row_ctx(row: u32) -> RowCtx {
    if (INPUT == INPUT_LOGITS) {
        let s = row_lse[row];
        let pl = log1p_acc(s.p_s);
        // The one-pass KL kernel leaves ln(Σ e^(y − q_m)) itself (LSE_READY).
        let ql = select(log1p_acc(s.q_s), s.q_s, s.q_i == LSE_READY);
        let m = two_sum(s.p_m, -s.q_m);
        return RowCtx(s.p_m, pl, s.q_m, ql, m.x, m.y, pl - ql, ONE, ONE, 0.0, 0.0, ONE);
    }
    if (INPUT == INPUT_PROBS_NORM) {
        // The sums' pairs (hi, lo) as the pre-pass left them in (p_m, p_s), (q_m, q_s), times
        // 2^p_i and 2^q_i (row_sum).
        let s = row_lse[row];
        // Only over a normal sum: an adapter that flushes subnormals would divide by 0.
        let p_lo = select(0.0, div_wide(s.p_s, s.p_m), is_normal(s.p_m));
        let q_lo = select(0.0, div_wide(s.q_s, s.q_m), is_normal(s.q_m));
        var p_sum = split(s.p_m);
        var q_sum = split(s.q_m);
        p_sum.e = p_sum.e - i32(s.p_i);
        q_sum.e = q_sum.e - i32(s.q_i);
        return RowCtx(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, p_sum, q_sum, p_lo, q_lo,
            split_div(p_sum, q_sum));
    }
    return RowCtx(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, ONE, ONE, 0.0, 0.0, ONE);
}

// d = ln p − ln q of logits x, y: (x − y) − (lse_p − lse_q). Two models' logits may differ by
// a common offset (lse_p − lse_q = 100, say) while d is 1e-3: then x − y rounds by
// 2^-24·100, a thousandth of d, and the terms carry it. So x − y is taken exactly as s + e
// (TwoSum), and the offset as shift_hi + shift_lo + shift_ls: s − shift_hi cancels exactly,
// and only the small parts e − shift_lo − shift_ls are left to round. e and shift_lo go first:
// they are as large as the logits' ulp (1e29 for logits near 1e37, whose e and shift_lo then
// cancel), and the log-sums' pl − ql (ln 2 for two equal maxima in Q) added to shift_lo
// beforehand vanished there (JS of such a row 0.173 for 0.216). A rounding of the log-sum-exps
// themselves moves every d of the row alike, which KL does not feel to first order.
// A −∞ logit (p or q = 0) makes d ±∞, which the terms select on; TwoSum's error term would be
// NaN there.
fn logit_diff(x: f32, y: f32, ctx: RowCtx) -> f32 {
    let xy = two_sum(x, -y);
    let d = xy.x - ctx.shift_hi;
    return select(d + ((xy.y - ctx.shift_lo) - ctx.shift_ls), d, !is_finite(xy.x));
}

// One element's contribution: the stable main term, the residual (p − q) and flags. The
// measures differ only in these pure term functions; accumulation is shared.
struct Term { main: f32, resid: f32, flags: u32, tiny: vec2<f32> }

const NO_TINY: vec2<f32> = vec2<f32>(0.0, 0.0);

fn term(main: f32, resid: f32) -> Term { return Term(main, resid, 0u, NO_TINY); }

// The row sums' term (MEASURE_SUM, normalization's pre-pass): each value's normal part and
// its subnormal significand apart (normal_or_tiny), the latter in tiny.
fn sums_term(x: f32, y: f32) -> Term {
    let a = normal_or_tiny(x);
    let b = normal_or_tiny(y);
    return Term(a.x, b.x, 0u, vec2<f32>(a.y, b.y));
}

// Whether the residual Σ(p − q) enters the result. CE, entropy and JS have none; nor has KL of
// inputs the kernel normalizes (logits, normalized probabilities): both sides sum to 1, so the
// residual is 0, and summing the f32 roundings of p and q instead would leave ~1e-8 of noise
// (negative KL for equal rows). These skip its compensated add (MEASURE and INPUT are
// constants: the branch is folded when the pipeline is created).
fn has_resid() -> bool {
    return MEASURE == MEASURE_SUM || MEASURE == MEASURE_ROOF_PQ || MEASURE == MEASURE_KL_GRAD
        || (MEASURE == MEASURE_KL && INPUT != INPUT_LOGITS && INPUT != INPUT_PROBS_NORM);
}

fn fold_term(acc: Acc, t: Term) -> Acc {
    // The roofline reads what a plain streaming sum reads: no compensation to slow it down.
    if (plain_sums()) {
        return Acc(acc.main_hi + t.main, 0.0, acc.resid_hi + t.resid, 0.0, 0u, 0.0, 0.0);
    }
    var a = add_main(acc, t.main);
    if (has_resid()) { a = add_resid(a, t.resid); }
    return Acc(a.main_hi, a.main_lo, a.resid_hi, a.resid_lo, a.flags | t.flags,
        a.tiny_p + t.tiny.x, a.tiny_q + t.tiny.y);
}

// Without branches on the values (llvmpipe runs both sides of every divergent branch; GPUs
// lose nothing): each case is computed and the right one selected. The log of 0's split is
// finite, so 0·ln 0 comes out 0 by itself. Which entries are 0 is read from the inputs' bits
// before any scaling: an adapter that flushes subnormals compares them (and any product that
// lands among them) equal to 0, and a subnormal q must not make KL or CE infinite. For the
// same reason the logarithms come from splits taken before scaling: sx and sy are the inputs'
// (x = p and y = q, unless the row is normalized: then c is the split of Σp/Σq), ln_p and
// ln_q are ln p and ln q (for normalized rows from the inputs and the row sums, not from the
// rounded p and q).
fn prob_term(p: f32, q: f32, p_zero: bool, q_zero: bool, sx: Split, sy: Split, c: Split,
        ln_p: f32, ln_q: f32) -> Term {
    if (MEASURE == MEASURE_JS) {
        // Divisions, not one reciprocal: 1/t overflows where t is subnormal.
        var r = div_wide(abs(p - q), p + q);
        if (INPUT == INPUT_PROBS_NORM) {
            // The rounded quotients' p − q cancels where p/q is within √2 of 1: r comes from
            // the exact ratio there. (Plain probabilities' p − q is exact there.)
            let ratio = ratio_norm(sx, sy, c);
            r = select(r, abs(ratio.s), ratio.k == 0);
        }
        return term(js_prob(p, q, r), 0.0);
    }
    if (MEASURE == MEASURE_ENTROPY) { return term(-p * ln_p, 0.0); }
    let inf = !p_zero && q_zero;
    let flags = select(0u, ACC_INF, inf);
    if (MEASURE == MEASURE_CE) { return Term(select(-p * ln_q, 0.0, inf), 0.0, flags, NO_TINY); }
    let live = !p_zero && !q_zero;
    // The ratio is formed here, per input kind: handed in ready-made, it cost plain KL 10 % on
    // lavapipe.
    if (INPUT == INPUT_PROBS_NORM) {
        // No residual sum (both sides sum to 1): every term is p·ln(p/q) − p + q, and p = 0
        // gives q, as with logits.
        return Term(kl_whole(p, q, ratio_norm(sx, sy, c), p_zero, q_zero), 0.0, flags, NO_TINY);
    }
    // Near p = q the series leaves p − q to the residual; elsewhere p·ln(p/q) is whole. p = 0
    // adds nothing.
    let kl = kl_parts(p, q, ratio_of(sx, sy));
    let main = select(kl.plogr, kl.series, kl.near);
    return Term(select(0.0, main, live), select(0.0, p - q, live && kl.near), flags, NO_TINY);
}

// KL, cross-entropy and entropy from log-space values (JS takes js_log_term, which needs only
// the larger side's probability): a = ln p, b = ln q, d = a − b computed so that a common
// shift (logits: the difference of the rows' log-sum-exps) never enters the cancelling part.
// p comes as exp_low's pair ps, p = ps.x·ps.y: its products with d or b keep their digits
// where p is subnormal and d or b huge. x_none and y_none say whether p and q are 0 as given
// (an input of −∞): a logit's a or b is −∞ also where x − max overflows (logits ±3e38), and
// such a p, or q, is positive however small (against q = 0: +∞).
fn log_term(a: f32, b: f32, ps: vec2<f32>, q: f32, d: f32, x_none: bool, y_none: bool) -> Term {
    let p = ps.x * ps.y;
    let ninf = neg_inf();
    // A p that vanishes even scaled (below e^-168, where ln p may be −3.4e38 and less) adds
    // nothing, also where b or d overflowed (a −f32::MAX mask of Q under a maximum above 1e31:
    // 0·∞ read as Overflow); it still meets q = 0 as p > 0 (`inf`).
    let p_zero = a == ninf || ps.x == 0.0;
    if (MEASURE == MEASURE_ENTROPY) { return term(select(-p * a, 0.0, p_zero), 0.0); }
    let inf = !x_none && y_none;
    let flags = select(0u, ACC_INF, inf);
    if (MEASURE == MEASURE_CE) {
        return Term(select(ps.x * (-b * ps.y), 0.0, p_zero || inf), 0.0, flags, NO_TINY);
    }
    if (INPUT == INPUT_LOGITS) {
        // No residual: Σ(p − q) is 0 over the row, so every term is p·φ(d) = p·ln(p/q) − p + q,
        // and p = 0 carries Q's mass, q.
        return Term(select(select(phi_term(ps, d, q), q, p_zero), 0.0, inf), 0.0, flags, NO_TINY);
    }
    // Log-probabilities need not sum to 1: near p = q (|d| <= 1) the non-negative p·φ(d) with
    // p − q to the residual; elsewhere p·d whole, so a q far above p puts no ±q into two sums
    // that cancel (q = 3.9 against p = 1.4e-3 lost 1e-5 of KL that way). p = 0 adds nothing.
    // The residual is p·(d − φ(d)) = p·(1 − e^(−d)), not p − q: p and q are rounded exps, and
    // p − q would carry their roundings, ~1e-7·p each, into a sum that for close rows is far
    // smaller than that (KL 2.5e-5 over 1000 columns came out 4e-4 off); this carries only
    // p's, scaled by |p − q|.
    let near = abs(d) <= 1.0;
    let phi = phi_series(d);
    let main = select(ps.x * (d * ps.y), p * phi, near);
    let live = !p_zero && !inf;
    return Term(select(0.0, main, live), select(0.0, p * (d - phi), live && near), flags, NO_TINY);
}

fn element(x: f32, y: f32, local: u32, col: u32, ctx: RowCtx) -> Term {
    if (MEASURE == MEASURE_KL_GRAD) { return grad_term(x, y, local, col, ctx); }
    if (INPUT == INPUT_LOGITS) {
        // Validated by the log-sum-exp pass. a = x − lse(x) = (x − m) − log1p(s').
        let a = (x - ctx.pm) - ctx.pl;
        let b = (y - ctx.qm) - ctx.ql;
        // (Cross-entropy and entropy of logits take the one-pass kernel, kernels_soft.wgsl.)
        if (MEASURE == MEASURE_JS) {
            let both_zero = x == neg_inf() && y == neg_inf();
            return term(select(js_log_term(exp(max(a, b)), logit_diff(x, y, ctx)), 0.0, both_zero), 0.0);
        }
        return log_term(a, b, exp_low(a), exp(b), logit_diff(x, y, ctx), x == neg_inf(),
            y == neg_inf());
    }
    if (MEASURE == MEASURE_SUM_P || MEASURE == MEASURE_ROOF_P) { return term(x, 0.0); }
    if (MEASURE == MEASURE_ROOF_PQ) { return term(x, y); }
    // An invalid element's term is never used: the call fails, naming the element.
    if (MEASURE != MEASURE_KL_BARE) { note_bad(local, is_bad(x) || (uses_q() && is_bad(y))); }
    if (MEASURE == MEASURE_SUM) { return sums_term(x, y); }
    if (INPUT == INPUT_LOGPROBS) {
        if (MEASURE == MEASURE_JS) {
            let both_zero = x == neg_inf() && y == neg_inf();
            return term(select(js_log_term(exp_acc(max(x, y)), x - y), 0.0, both_zero), 0.0);
        }
        return log_term(x, y, exp_acc_low(x), exp_acc(y), x - y, x == neg_inf(), y == neg_inf());
    }
    if (INPUT == INPUT_PROBS_NORM) {
        return normalized_term(split(x), split(y), is_zero(x), is_zero(y), ctx);
    }
    let sx = split(x);
    let sy = split(y);
    return prob_term(x, y, is_zero(x), is_zero(y), sx, sy, ONE, ln_split(sx), ln_split(sy));
}

// The term of probabilities the kernel normalizes, from the splits of x and y.
// p = x/Σp from the splits alone: no float operation sees a subnormal x or 1/Σp.
// ln p = ln(x/Σp) from x and Σp themselves: p's rounding would make a p within 2^-24 of 1
// exactly 1 and drop its −p·ln p (entropy of a peaked row 5 % off).
fn normalized_term(sx: Split, sy: Split, p_zero: bool, q_zero: bool, ctx: RowCtx) -> Term {
    let sp = split_div(sx, ctx.p_sum);
    let sq = split_div(sy, ctx.q_sum);
    return prob_term(ldexp(sp.m, sp.e), ldexp(sq.m, sq.e), p_zero, q_zero, sx, sy,
        ctx.sum_ratio, ln_ratio(sx, ctx.p_sum) - ctx.p_sum_lo,
        ln_ratio(sy, ctx.q_sum) - ctx.q_sum_lo);
}

// The quick path (QUICK: on by default for GPUs, Tuning::quick_vec4; KL, cross-entropy and
// entropy, JS gained nothing on an H200): a vec4 of probabilities, plain or normalized, whose
// values are all positive normal numbers, in every lane of the subgroup, needs no validation,
// no subnormal splits and no zero cases. Its terms are those of `element` (the same formulas;
// only the compiler's fusing of a multiply and an add may differ); it only skips work that the
// values make moot. The whole subgroup votes, so that a lane with a zero never makes the
// others run both paths (a GPU's warp would); on mixed data the vote sends everyone down the
// general path, at the cost of the vote. Lanes that have left the loop do not vote, and each
// voter checks its own values, so any subgroup layout is safe. llvmpipe runs both sides of
// every branch, so CPU adapters leave it off.
fn quick_vec4(x: vec4<f32>, y: vec4<f32>) -> bool {
    if (!QUICK || !is_prob_input() || MEASURE >= MEASURE_JS) { return false; }
    return all_positive_normal4(x, y);
}

fn quick_element(x: f32, y: f32, ctx: RowCtx) -> Term {
    let sx = split_normal(x);
    let sy = split_normal(y);
    if (INPUT == INPUT_PROBS_NORM) { return normalized_term(sx, sy, false, false, ctx); }
    return prob_term(x, y, false, false, sx, sy, ONE, ln_split(sx), ln_split(sy));
}

// Folds the four elements of a vec4 into the running state. Their main terms are added
// plainly before one compensated add: each already carries a rounding of its own size, and
// three more of the same order change nothing. Their residuals p − q are exact and cancel
// across a row (for close rows Σ(p − q) is far below any one of them), so they are added
// exactly: added plainly, a row of 33 with KL 2.7e-6 came out 2e-5 off. So are the row sums
// of the normalization pre-pass, whose terms are exact too: ln(x/Σ) needs Σ to ~2^-48, or a
// p within 2^-24 of 1 reads 1 and drops its −p·ln p.
fn fold4_term(acc: Acc, x: vec4<f32>, y: vec4<f32>, local: u32, c: u32, ctx: RowCtx) -> Acc {
    var t0: Term;
    var t1: Term;
    var t2: Term;
    var t3: Term;
    if (quick_vec4(x, y)) {
        t0 = quick_element(x.x, y.x, ctx);
        t1 = quick_element(x.y, y.y, ctx);
        t2 = quick_element(x.z, y.z, ctx);
        t3 = quick_element(x.w, y.w, ctx);
    } else {
        t0 = element(x.x, y.x, local, c, ctx);
        t1 = element(x.y, y.y, local + 1u, c + 1u, ctx);
        t2 = element(x.z, y.z, local + 2u, c + 2u, ctx);
        t3 = element(x.w, y.w, local + 3u, c + 3u, ctx);
    }
    let flags = t0.flags | t1.flags | t2.flags | t3.flags;
    if (!has_resid() || plain_sums()) {
        let main = (t0.main + t1.main) + (t2.main + t3.main);
        return fold_term(acc, Term(main, (t0.resid + t1.resid) + (t2.resid + t3.resid), flags,
            NO_TINY));
    }
    var a = acc;
    if (MEASURE == MEASURE_SUM) {
        let m = sum4_exact(t0.main, t1.main, t2.main, t3.main);
        a = add_main(a, m.x);
        a.main_lo = a.main_lo + m.y;
        let tiny = (t0.tiny + t1.tiny) + (t2.tiny + t3.tiny);
        a.tiny_p = a.tiny_p + tiny.x;
        a.tiny_q = a.tiny_q + tiny.y;
    } else {
        a = add_main(a, (t0.main + t1.main) + (t2.main + t3.main));
    }
    let r = sum4_exact(t0.resid, t1.resid, t2.resid, t3.resid);
    a = add_resid(a, r.x);
    a.resid_lo = a.resid_lo + r.y;
    a.flags = a.flags | flags;
    return a;
}

fn finish_acc(a: Acc) -> f32 {
    // Scaled like a finite result: a log base below 1 makes the scale, so +∞, negative.
    if ((a.flags & ACC_INF) != 0u) { return pos_inf() * prm.out_scale; }
    return ((a.main_hi + a.resid_hi) + (a.main_lo + a.resid_lo)) * prm.out_scale;
}

// Writes a segment's result: a partial, the running state of a split row, row sums, or the
// finished value.
fn emit_Acc(row: u32, chunk: u32, total: Acc) {
    if ((MODE & MODE_PARTIAL) != 0u) {
        partials[row * prm.chunks + chunk] = total;
        return;
    }
    var t = total;
    if ((MODE & MODE_ACCUMULATE) != 0u) { t = combine_Acc(partials[prm.chunks], t); }
    if ((MODE & MODE_KEEP) != 0u) {
        partials[prm.chunks] = t;
        return;
    }
    if ((MODE & MODE_MINUS_ONE) != 0u) {
        let r = pair_add(t.resid_hi, t.resid_lo, -1.0, 0.0);
        t = Acc(t.main_hi, t.main_lo, r.x, r.y, t.flags, 0.0, 0.0);
    }
    if ((MODE & MODE_STATS) != 0u) {
        row_lse[row] = row_sums_stats(row, t.main_hi, t.main_lo, t.tiny_p, t.resid_hi,
            t.resid_lo, t.tiny_q);
        return;
    }
    // A non-finite result that no p > 0, q = 0 explains, or a row sum that normalization could
    // not form, overflowed f32 (values near f32::MAX): the row reads NaN, never a number, and
    // the call fails; the host finds the row by that NaN (an invalid element elsewhere keeps
    // its recorded position).
    var v = finish_acc(t);
    var overflow = (t.flags & ACC_INF) == 0u && !is_finite(v);
    if (INPUT == INPUT_PROBS_NORM && MEASURE != MEASURE_SUM && MEASURE != MEASURE_SUM_P
        && !is_roof()) {
        let sums = row_lse[row];
        overflow = overflow || !is_finite(sums.p_m) || (uses_q() && !is_finite(sums.q_m));
    }
    if (overflow) {
        atomicOr(&status[0], FLAG_OVERFLOW);
        v = bitcast<f32>(0x7fc00000u);
    }
    out[prm.out_base + row] = v;
}

// The loss term of KL(P‖softmax(z)), with its gradient softmax(z) − p written as a side
// effect: one pass after the log-sum-exp pass over z. Bindings: in_p holds z (so the
// log-sum-exp pass reads it as P and ctx carries its statistics), in_q the target p.
@group(0) @binding(8) var<storage, read_write> grad: array<f32>;

// The columns [c0, c1) of the segment this invocation reduces. The wide loop's edge vec4s
// (loops.wgsl) also hold neighbours' columns, read as empty, whose gradient is theirs to write.
var<private> own_cols: vec2<u32>;

fn grad_term(z: f32, t: f32, local: u32, col: u32, ctx: RowCtx) -> Term {
    note_bad(local, is_bad_prob(t));
    let lq = (z - ctx.pm) - ctx.pl;
    let q = exp(lq);
    if (col - own_cols.x < own_cols.y - own_cols.x) {
        grad[prm.grad_base + local] = (q - t) * prm.out_scale;
    }
    // KL = Σ_{t>0} t·φ(r) + Σ_{t>0} t + Σ_{t=0} q − 1 with r = ln t − ln q (since Σ q = 1);
    // the −1 is added when the row is finished (MODE_MINUS_ONE).
    // Selected, not branched on: one-hot and sparse targets mix both cases in every warp.
    let t_zero = is_zero(t);
    let inf = !t_zero && z == neg_inf();
    // r = ln t − ln q = ln t + pl − (z − pm), added so that its large parts cancel exactly: for
    // a target close to softmax(z), r is small while ln t and z − pm are not, and rounding
    // either (~1e-7·|ln t|) moved the loss by 2e-5 of itself. Only ln t's small rest (to
    // ~2^-30, see ln_parts) and the row's pl (a shift common to the row, which KL does not
    // feel to first order) are left to round.
    let zm = two_sum(z, -ctx.pm);
    let st = split(t);
    let lt = ln_parts(st);
    let a = two_sum(lt.x, ctx.pl);
    let b = two_sum(a.x, -zm.x);
    let c = two_sum(b.x, lt.y);
    let r = c.x + (((a.y + b.y) + c.y) + (lt.z - zm.y));
    // r is huge where a logit is near −f32::MAX: then a subnormal t still counts.
    let main = select(select(phi_term(prob_low(t, st), r, q), 0.0, inf), q, t_zero);
    return Term(main, select(t, 0.0, t_zero || inf), select(0u, ACC_INF, inf), NO_TINY);
}
