// The term kernel (one fused pass: validate, per-element term, reduce) and the combine kernel
// for compensated sums. MEASURE and INPUT select the term function.

@group(0) @binding(3) var<storage, read_write> partials: array<Acc>;

fn is_prob_input() -> bool { return INPUT == INPUT_PROBS || INPUT == INPUT_PROBS_NORM; }

// Per-row constants: for logits the log-sum-exp parts of P and Q, for normalized
// probabilities the reciprocal row sums.
struct RowCtx { pm: f32, pl: f32, qm: f32, ql: f32, shift: f32 }

fn row_ctx(row: u32) -> RowCtx {
    if (INPUT == INPUT_LOGITS) {
        let s = row_lse[row];
        let pl = log1p_acc(s.p_s);
        let ql = log1p_acc(s.q_s);
        return RowCtx(s.p_m, pl, s.q_m, ql, (s.p_m - s.q_m) + (pl - ql));
    }
    if (INPUT == INPUT_PROBS_NORM) {
        let s = row_lse[row];
        return RowCtx(1.0 / s.p_m, 0.0, 1.0 / s.q_m, 0.0, 0.0);
    }
    return RowCtx(1.0, 0.0, 1.0, 0.0, 0.0);
}

fn with_inf(a: Acc) -> Acc { return Acc(a.main_hi, a.main_lo, a.resid_hi, a.resid_lo, a.flags | ACC_INF, 0u); }

fn prob_term(acc: Acc, p: f32, q: f32) -> Acc {
    if (MEASURE == MEASURE_SUM) { return add_term(acc, p, q); }
    if (MEASURE == MEASURE_SUM_P) { return add_term(acc, p, 0.0); }
    if (MEASURE == MEASURE_JS) { return add_term(acc, 0.5 * (js_half(p, q) + js_half(q, p)), 0.0); }
    if (p == 0.0) { return acc; }
    if (MEASURE == MEASURE_ENTROPY) { return add_term(acc, -p * ln_acc(p), 0.0); }
    if (q == 0.0) { return with_inf(acc); }
    if (MEASURE == MEASURE_CE) { return add_term(acc, -p * ln_acc(q), 0.0); }
    return add_term(acc, kl_main(p, q), p - q);
}

// a = ln p, b = ln q; `shift` is subtracted from a − b (logits: the difference of the rows'
// log-sum-exps, so that the common shift never enters the cancelling part).
fn log_term(acc: Acc, a: f32, b: f32, p: f32, q: f32, d: f32) -> Acc {
    let ninf = neg_inf();
    if (MEASURE == MEASURE_JS) {
        if (a == ninf && b == ninf) { return acc; }
        return add_term(acc, js_log_term(p, q, d), 0.0);
    }
    if (a == ninf) {
        // p = 0. With logits the residual Σ(p − q) is 0 over the whole row, so the KL of the
        // entries with p > 0 carries Q's mass here: kl_main(0, q) = q.
        if (MEASURE == MEASURE_KL && INPUT == INPUT_LOGITS) { return add_term(acc, q, 0.0); }
        return acc;
    }
    if (MEASURE == MEASURE_ENTROPY) { return add_term(acc, -p * a, 0.0); }
    if (b == ninf) { return with_inf(acc); }
    if (MEASURE == MEASURE_CE) { return add_term(acc, -p * b, 0.0); }
    return add_term(acc, phi_term(p, d, q), select(p - q, 0.0, INPUT == INPUT_LOGITS));
}

fn element(acc: Acc, x: f32, y: f32, local: u32, col: u32, ctx: RowCtx) -> Acc {
    if (INPUT == INPUT_LOGITS) {
        // Validated by the log-sum-exp pass. a = x − lse(x) = (x − m) − log1p(s').
        let a = (x - ctx.pm) - ctx.pl;
        let b = (y - ctx.qm) - ctx.ql;
        if (MEASURE == MEASURE_CE) {
            if (x == neg_inf()) { return acc; }
            if (y == neg_inf()) { return with_inf(acc); }
            return add_term(acc, exp(a) * ((ctx.qm - y) + ctx.ql), 0.0);
        }
        if (MEASURE == MEASURE_ENTROPY) {
            if (x == neg_inf()) { return acc; }
            return add_term(acc, exp(a) * ((ctx.pm - x) + ctx.pl), 0.0);
        }
        return log_term(acc, a, b, exp(a), exp(b), (x - y) - ctx.shift);
    }
    if (MEASURE == MEASURE_SUM_P) { return add_term(acc, x, 0.0); }
    var bad = element_flags(x, 0u);
    if (uses_q()) { bad = bad | element_flags(y, 3u); }
    if (bad != 0u) {
        report_bad(local, bad);
        return acc;
    }
    if (INPUT == INPUT_LOGPROBS) {
        return log_term(acc, x, y, exp(x), exp(y), x - y);
    }
    return prob_term(acc, x * ctx.pm, y * ctx.qm);
}

fn finish_acc(a: Acc) -> f32 {
    if ((a.flags & ACC_INF) != 0u) { return pos_inf(); }
    return ((a.main_hi + a.resid_hi) + (a.main_lo + a.resid_lo)) * prm.out_scale;
}

// Writes a segment's result: a partial, the running state of a split row, row sums, or the
// finished value.
fn emit_acc(row: u32, chunk: u32, total: Acc) {
    if ((prm.mode & MODE_PARTIAL) != 0u) {
        partials[row * prm.chunks + chunk] = total;
        return;
    }
    var t = total;
    if ((prm.mode & MODE_ACCUMULATE) != 0u) { t = combine_Acc(partials[prm.chunks], t); }
    if ((prm.mode & MODE_KEEP) != 0u) {
        partials[prm.chunks] = t;
        return;
    }
    if ((prm.mode & MODE_MINUS_ONE) != 0u) {
        let r = pair_add(t.resid_hi, t.resid_lo, -1.0, 0.0);
        t = Acc(t.main_hi, t.main_lo, r.x, r.y, t.flags, 0u);
    }
    if ((prm.mode & MODE_STATS) != 0u) {
        let sp = t.main_hi + t.main_lo;
        let sq = t.resid_hi + t.resid_lo;
        row_lse[row] = Lse(sp, 0.0, 0u, sq, 0.0, 0u);
        if (sp == 0.0) { report_bad(row * prm.row_len, FLAG_P_EMPTY); }
        if (uses_q() && sq == 0.0) { report_bad(row * prm.row_len, FLAG_Q_EMPTY); }
        return;
    }
    out[prm.out_base + row] = finish_acc(t);
}

@compute @workgroup_size(256)
fn terms(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>/*SG_PARAMS*/) {
    let lanes = prm.lanes;
    let row = wg.y * (WG / lanes) + lid / lanes;
    let lane = lid % lanes;
    var acc = identity_Acc();
    if (row < prm.rows) {
        let ctx = row_ctx(row);
        let c0 = prm.col_begin + wg.x * prm.chunk_len;
        let c1 = min(c0 + prm.chunk_len, prm.col_end);
        let base = row * prm.row_len - prm.col_begin;
        //LOOP_TERMS
    }
    let total = segment_reduce_Acc(acc, lid, lanes, SG_VALUE);
    if (lane == 0u && row < prm.rows) {
        emit_acc(row, wg.x, total);
    }
}

@compute @workgroup_size(256)
fn combine(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>/*SG_PARAMS*/) {
    let lanes = prm.lanes;
    let row = wg.y * (WG / lanes) + lid / lanes;
    let lane = lid % lanes;
    var acc = identity_Acc();
    if (row < prm.rows) {
        let base = row * prm.row_len;
        for (var c = lane; c < prm.col_end; c = c + lanes) {
            acc = combine_Acc(acc, partials[base + c]);
        }
    }
    let total = segment_reduce_Acc(acc, lid, lanes, SG_VALUE);
    if (lane == 0u && row < prm.rows) {
        emit_acc(row, 0u, total);
    }
}

// The loss kernel of KL(P‖softmax(z)): per-row KL and its gradient softmax(z) − p with
// respect to the logits z, in one pass (after the log-sum-exp pass over z). Bindings: in_p
// holds z (so the log-sum-exp pass reads it as P), in_q the target probabilities p.
@group(0) @binding(8) var<storage, read_write> grad: array<f32>;

@compute @workgroup_size(256)
fn kl_grad(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>/*SG_PARAMS*/) {
    let lanes = prm.lanes;
    let row = wg.y * (WG / lanes) + lid / lanes;
    let lane = lid % lanes;
    var acc = identity_Acc();
    if (row < prm.rows) {
        let s = row_lse[row];
        let zm = s.p_m;
        let zl = log1p_acc(s.p_s);
        let c0 = prm.col_begin + wg.x * prm.chunk_len;
        let c1 = min(c0 + prm.chunk_len, prm.col_end);
        let base = row * prm.row_len - prm.col_begin;
        for (var c = c0 + lane; c < c1; c = c + lanes) {
            let local = base + c;
            let z = load_p(prm.shift_p + local);
            let t = load_q(prm.shift_q + local);
            let bad = prob_flags(t, 3u);
            if (bad != 0u) {
                report_bad(local, bad);
                continue;
            }
            let lq = (z - zm) - zl;
            let q = exp(lq);
            grad[prm.grad_base + local] = (q - t) * prm.out_scale;
            // KL = Σ_{t>0} t·φ(r) + Σ_{t>0} t + Σ_{t=0} q − 1 with r = ln t − ln q (since
            // Σ q = 1); the −1 is added when the row is finished.
            if (t == 0.0) {
                acc = add_term(acc, q, 0.0);
            } else if (z == neg_inf()) {
                acc = with_inf(acc);
            } else {
                acc = add_term(acc, phi_term(t, ln_acc(t) - lq, q), t);
            }
        }
    }
    let total = segment_reduce_Acc(acc, lid, lanes, SG_VALUE);
    if (lane == 0u && row < prm.rows) {
        emit_acc(row, wg.x, total);
    }
}
