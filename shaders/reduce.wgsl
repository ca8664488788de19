// The one reduction, instantiated per monoid (MONOID is replaced by Acc or Lse), in two forms:
// the tree below, and (ONE_LANE, for dispatches with one lane per segment) none at all, so
// that such a module has no barrier: llvmpipe runs every shader that has one as coroutines,
// which cost as much as the loads for rows of 10, and a GPU keeps the shared memory free.
// Reduces each segment of `lanes` consecutive invocations; every lane gets its segment's result.
// With subgroups, a butterfly of shuffles covers the first `subgroup_width` lanes (the adapter's
// minimum subgroup size, passed as a uniform so that the barrier loop stays uniform), and
// shared memory the rest.

var<workgroup> scratch_MONOID: array<MONOID, WG>;

fn segment_reduce_MONOID(value: MONOID, lid: u32, lanes: u32, sg: vec2<u32>) -> MONOID {
    // One lane per segment: nothing to reduce (lanes is uniform, so no barrier is skipped by
    // some invocations and not others).
    if (lanes == 1u) { return value; }
    var v = value;
    let width = min(lanes, prm.subgroup_width);
    //SUBGROUP_STAGE_MONOID
    scratch_MONOID[lid] = v;
    workgroupBarrier();
    let lane = lid % lanes;
    for (var stride = width; stride < lanes; stride = stride * 2u) {
        if (lane % (stride * 2u) == 0u) {
            scratch_MONOID[lid] = combine_MONOID(scratch_MONOID[lid], scratch_MONOID[lid + stride]);
        }
        workgroupBarrier();
    }
    let first = lid - lane;
    let result = scratch_MONOID[first];
    workgroupBarrier();
    return result;
}
//---- ONE_LANE
fn segment_reduce_MONOID(value: MONOID, lid: u32, lanes: u32, sg: vec2<u32>) -> MONOID {
    return value;
}
