// The per-element loops of the terms and log-sum-exp kernels, in two load widths. `local` is
// the element's index in the window.
//
// A segment's lanes share its chunk [c0, c1) in one of two ways. Interleaved (lane_span = 0,
// GPUs): lane k takes every lanes-th element from c0 + k, so a warp's loads coalesce. Blocked
// (CPU adapters): lane k takes the contiguous block [c0 + k·span, c0 + (k+1)·span), because
// llvmpipe runs invocations as the SIMD lanes of one thread, and interleaved lanes there make
// every load of a lane touch a new page with no stream for the prefetcher to follow.
//
// LOOP_SCALAR: one f32 of P (and Q) per iteration.
// LOOP_VEC4: one vec4 per iteration, for rows of any length and start. The segment's columns
// that share a vec4 of the input with a neighbouring row or chunk (at most three at each end)
// come as that vec4 with the neighbour's columns read as empty (load4_edge): the first lane
// takes the leading one, the last lane the trailing one. One at a time they took up to six
// iterations of every row, and llvmpipe runs each load once per lane; a row of 10 columns
// now takes three or four. The whole vec4s between them are spread over the lanes like
// LOOP_SCALAR's elements (span / 4 of them per blocked lane). Each lane takes its columns in
// increasing order, the leading ones first and the trailing ones last: the one-pass kernel
// keeps the first of equal maxima it meets as the arg-max. The host checks that P and Q sit
// at the same offset modulo 4 and that both bindings end on a whole vec4.
// load_column(local) reads one column of P and Q (common.wgsl); ELEMENT(x, y, local, c, CTX)
// gives one element's value and FOLD(st, value) adds it into the running state st;
// FOLD4(st, x, y, local, c, CTX) adds the four elements of a vec4 from column c on.

//---- LOOP_SCALAR
        let blocked = prm.lane_span != 0u;
        let lane_begin = c0 + select(lane, lane * prm.lane_span, blocked);
        let lane_end = select(c1, min(c1, lane_begin + prm.lane_span), blocked);
        for (var c = lane_begin; c < lane_end; c = c + select(lanes, 1u, blocked)) {
            let local = base + c;
            let v = load_column(local);
            st = FOLD(st, ELEMENT(v.x, v.y, local, c, CTX));
        }
//---- LOOP_VEC4
        // [a0, a1): the columns of whole vec4s; [c0, a0) and [a1, c1) share theirs.
        let a0 = min(c0 + (4u - (prm.shift_p + base + c0) % 4u) % 4u, c1);
        let a1 = a0 + (c1 - a0) / 4u * 4u;
        if (lane == 0u && a0 > c0) {
            // Column c0 is element k0 of its vec4 (c0 − k0 may wrap; only differences count).
            let k0 = (prm.shift_p + base + c0) % 4u;
            let v = load4_edge(base + c0 - k0, k0, k0 + (a0 - c0));
            st = FOLD4(st, v.x, v.y, base + c0 - k0, c0 - k0, CTX);
        }
        let whole = (a1 - a0) / 4u;
        let blocked = prm.lane_span != 0u;
        let span4 = prm.lane_span / 4u;
        let first = select(lane, lane * span4, blocked);
        let end = select(whole, min(whole, first + span4), blocked);
        for (var i = first; i < end; i = i + select(lanes, 1u, blocked)) {
            let c = a0 + 4u * i;
            let local = base + c;
            let x = load4_p((prm.shift_p + local) / 4u);
            var y = x;
            if (uses_q()) { y = load4_q((prm.shift_q + local) / 4u); }
            st = FOLD4(st, x, y, local, c, CTX);
        }
        if (lane == lanes - 1u && c1 > a1) {
            let v = load4_edge(base + a1, 0u, c1 - a1);
            st = FOLD4(st, v.x, v.y, base + a1, a1, CTX);
        }
