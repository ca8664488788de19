// The one reduction, instantiated per monoid (MONOID is replaced by the state type), in three
// forms. Each reduces the segments of `lanes` consecutive invocations; every lane gets its
// segment's result.
// TREE: with subgroups, a butterfly of shuffles covers the first `subgroup_width` lanes (the
// adapter's minimum subgroup size, passed as a uniform so that the barrier loop stays uniform),
// and shared memory the rest.
// SUBGROUP_ONLY: segments no wider than a subgroup (the host checks), by the butterfly alone.
// ONE_LANE: one lane per segment, nothing to reduce.
// The last two have no barrier and no shared memory: llvmpipe runs every shader that has a
// barrier as coroutines, taken or not, which for rows of 10 cost as much as the loads, and a
// GPU keeps its shared memory for occupancy.

//---- TREE
var<workgroup> scratch_MONOID: array<MONOID, WG>;

fn segment_reduce_MONOID(value: MONOID, lid: u32, lanes: u32, sg: vec2<u32>) -> MONOID {
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
//---- SUBGROUP_ONLY
fn segment_reduce_MONOID(value: MONOID, lid: u32, lanes: u32, sg: vec2<u32>) -> MONOID {
    var v = value;
    let width = lanes;
    //SUBGROUP_STAGE_MONOID
    return v;
}
//---- ONE_LANE
fn segment_reduce_MONOID(value: MONOID, lid: u32, lanes: u32, sg: vec2<u32>) -> MONOID {
    return value;
}
