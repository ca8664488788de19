// The two entry points of each kernel family, instantiated per monoid (MONOID is replaced by
// Acc, Lse, Soft, Rel or Norm): the element pass, in which each segment of `lanes`
// invocations reduces one row's chunk of the window, and the combine pass over those chunks'
// partials. What differs between the families is the monoid, its element loop
// (shaders/loops.wgsl) and its emit_MONOID.

@compute @workgroup_size(WG)
fn element_pass_MONOID(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>/*SG_PARAMS*/) {
    let lanes = prm.lanes;
    let row = wg.y * (WG / lanes) + lid / lanes;
    let lane = lid % lanes;
    var st = identity_MONOID();
    let live = row < prm.rows && !row_done(row);
    if (live) {
        let c0 = prm.col_begin + wg.x * prm.chunk_len;
        let c1 = min(c0 + prm.chunk_len, prm.col_end);
        let base = row * prm.row_len - prm.col_begin;
        //ROW_CTX
        //LOOP
    }
    report_seen();
    if (lid == 0u && wg.x == 0u && wg.y == 0u) { atomicStore(&status[3], RAN_MARK); }
    let total = segment_reduce_MONOID(st, lid, lanes, SG_VALUE);
    if (lane == 0u && live) {
        emit_MONOID(row, wg.x, total);
    }
}

@compute @workgroup_size(WG)
fn combine_pass_MONOID(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wg: vec3<u32>/*SG_PARAMS*/) {
    let lanes = prm.lanes;
    let row = wg.y * (WG / lanes) + lid / lanes;
    let lane = lid % lanes;
    var st = identity_MONOID();
    let live = row < prm.rows && !row_done(row);
    if (live) {
        let base = row * prm.row_len;
        for (var c = lane; c < prm.col_end; c = c + lanes) {
            st = combine_MONOID(st, partials[base + c]);
        }
    }
    let total = segment_reduce_MONOID(st, lid, lanes, SG_VALUE);
    if (lane == 0u && live) {
        emit_MONOID(row, 0u, total);
    }
}
