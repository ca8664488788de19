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
// LOOP_VEC4: one vec4 per iteration. The chunk start, the chunk length, the span and
// (shift + local) are multiples of 4 (the host checks); elements past the lane's end are
// masked. The four elements are combined among themselves first, then folded into the running
// state once.
// ELEMENT(x, y, local, c, CTX) gives one element's value, COMBINE joins two values, and
// FOLD(ACC, value) adds one into the running state.

//---- LOOP_SCALAR
        let blocked = prm.lane_span != 0u;
        let lane_begin = c0 + select(lane, lane * prm.lane_span, blocked);
        let lane_end = select(c1, min(c1, lane_begin + prm.lane_span), blocked);
        for (var c = lane_begin; c < lane_end; c = c + select(lanes, 1u, blocked)) {
            let local = base + c;
            let x = in_p[prm.shift_p + local];
            var y = x;
            if (uses_q()) { y = in_q[prm.shift_q + local]; }
            ACC = FOLD(ACC, ELEMENT(x, y, local, c, CTX));
        }
//---- LOOP_VEC4
        let blocked = prm.lane_span != 0u;
        let lane_begin = c0 + select(4u * lane, lane * prm.lane_span, blocked);
        let lane_end = select(c1, min(c1, lane_begin + prm.lane_span), blocked);
        for (var c = lane_begin; c < lane_end; c = c + select(4u * lanes, 4u, blocked)) {
            let local = base + c;
            let x = in_p[(prm.shift_p + local) / 4u];
            var y = x;
            if (uses_q()) { y = in_q[(prm.shift_q + local) / 4u]; }
            var v = ELEMENT(x.x, y.x, local, c, CTX);
            if (c + 1u < lane_end) { v = COMBINE(v, ELEMENT(x.y, y.y, local + 1u, c + 1u, CTX)); }
            if (c + 2u < lane_end) { v = COMBINE(v, ELEMENT(x.z, y.z, local + 2u, c + 2u, CTX)); }
            if (c + 3u < lane_end) { v = COMBINE(v, ELEMENT(x.w, y.w, local + 3u, c + 3u, CTX)); }
            ACC = FOLD(ACC, v);
        }
