    // Subgroup butterfly. It assumes subgroups are runs of consecutive local invocation
    // indices; the check below flags any adapter where that fails, and the host then falls
    // back to the shared-memory pipelines.
    if (width > 1u && (sg.x < width || sg.y != lid % sg.x)) {
        atomicOr(&status[0], FLAG_SUBGROUP_LAYOUT);
    }
    for (var mask = 1u; mask < width; mask = mask * 2u) {
        v = combine_MONOID(v, shuffle_xor_MONOID(v, mask));
    }
