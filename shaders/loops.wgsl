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
// go one at a time (load_p, load_q), like LOOP_SCALAR; the whole vec4s between them are
// spread over the lanes like LOOP_SCALAR's elements (span / 4 of them per blocked lane). Each
// lane takes its columns in increasing order, the leading ones first and the trailing ones
// last: the one-pass kernel keeps the first of equal maxima it meets as the arg-max. The
// host checks that P and Q sit at the same offset modulo 4 and that both bindings end on a
// whole vec4.
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
        for (var c = c0 + lane; c < a0; c = c + lanes) {
            let local = base + c;
            let v = load_column(local);
            st = FOLD(st, ELEMENT(v.x, v.y, local, c, CTX));
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
        for (var c = a1 + lane; c < c1; c = c + lanes) {
            let local = base + c;
            let v = load_column(local);
            st = FOLD(st, ELEMENT(v.x, v.y, local, c, CTX));
        }
