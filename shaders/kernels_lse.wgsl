// The logits pre-pass: per-row log-sum-exp and arg-max of P and Q in one pass, with validation.

@group(0) @binding(3) var<storage, read_write> partials: array<Lse>;

fn side_of(x: f32, col: u32) -> Side {
    if (x == neg_inf()) { return empty_side(); }
    return Side(x, x, 1.0, 0.0, 0.0, col);
}

// One logit pair (column c) as a state of its own. An invalid value is noted; the state it
// gives is never used, as the call fails naming it.
fn lse_element(x: f32, y_in: f32, local: u32, c: u32, unused: u32) -> Lse {
    var y = neg_inf();
    if (uses_q()) { y = y_in; }
    note_bad(local, is_bad(x) || is_bad(y));
    let sp = side_of(x, c);
    let sq = side_of(y, c);
    return lse_of(sp, sq);
}

// Four neighbouring columns of one side as one state: their max, the first column that holds
// it and Σ exp(x − max) over the other three, from four independent exps. Merging them one
// by one took an exp and a data-dependent swap per column, which a GPU's warps diverge on.
fn side4(x: vec4<f32>, c: u32) -> Side {
    let m = max(max(x.x, x.y), max(x.z, x.w));
    let j = first_of(x, m);
    let others = select(vec4<f32>(0.0), exp(x - vec4<f32>(m)), vec4<u32>(0u, 1u, 2u, 3u) != vec4<u32>(j));
    // All four −inf (p = 0): no mass and no arg-max, as side_of gives (x − m is NaN there).
    if (m == neg_inf()) { return empty_side(); }
    return Side(m, m, 1.0, (others.x + others.y) + (others.z + others.w), 0.0, c + j);
}

fn lse_element4(x: vec4<f32>, y_in: vec4<f32>, local: u32, c: u32, unused: u32) -> Lse {
    let y = checked4(x, y_in, local, neg_inf());
    let sp = side4(x, c);
    let sq = side4(y, c);
    return lse_of(sp, sq);
}

fn fold4_lse(st: Lse, x: vec4<f32>, y: vec4<f32>, local: u32, c: u32, unused: u32) -> Lse {
    return combine_Lse(st, lse_element4(x, y, local, c, unused));
}

fn emit_Lse(row: u32, chunk: u32, total: Lse) {
    if ((MODE & MODE_PARTIAL) != 0u) {
        partials[row * prm.chunks + chunk] = total;
        return;
    }
    // A row split across windows carries its whole state from window to window (in its slot
    // past the chunks', as the terms pass does): carried as RowStats, against the max, the
    // running sum was rescaled by 1/a and rounded in every window, and rising rows in 977
    // windows of 4 KiB came out 5e-5 off.
    var t = total;
    if ((MODE & MODE_ACCUMULATE) != 0u) { t = combine_Lse(partials[prm.chunks], t); }
    if ((MODE & MODE_KEEP) != 0u) {
        partials[prm.chunks] = t;
        return;
    }
    row_lse[row] = RowStats(t.p_m, others_at_max(t.p_s, t.p_c, t.p_a), t.p_i, t.q_m,
        others_at_max(t.q_s, t.q_c, t.q_a), t.q_i);
    if (t.p_m == neg_inf()) { report_bad(row * prm.elem_row_len, FLAG_P_EMPTY); }
    if (uses_q()) {
        if (t.q_m == neg_inf()) { report_bad(row * prm.elem_row_len, FLAG_Q_EMPTY); }
        agree[prm.agree_base + row] = select(0u, 1u, t.p_i == t.q_i);
    }
}
