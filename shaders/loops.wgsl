// The per-element loops of the terms and log-sum-exp kernels, in two load widths. Each lane of a
// segment walks its chunk with stride `lanes`; `local` is the element's index in the window.
//
// LOOP_SCALAR: one f32 of P (and Q) per iteration.
// LOOP_VEC4: one vec4 per iteration. The chunk start, the chunk length and (shift + local) are
// multiples of 4 (the host checks); lanes past the chunk end are masked. The four elements are
// combined among themselves first, then folded into the running state once.
// ELEMENT(x, y, local, c, CTX) gives one element's value, COMBINE joins two values, and
// FOLD(ACC, value) adds one into the running state.

//---- LOOP_SCALAR
        for (var c = c0 + lane; c < c1; c = c + lanes) {
            let local = base + c;
            let x = in_p[prm.shift_p + local];
            var y = x;
            if (uses_q()) { y = in_q[prm.shift_q + local]; }
            ACC = FOLD(ACC, ELEMENT(x, y, local, c, CTX));
        }
//---- LOOP_VEC4
        for (var c = c0 + 4u * lane; c < c1; c = c + 4u * lanes) {
            let local = base + c;
            let x = in_p[(prm.shift_p + local) / 4u];
            var y = x;
            if (uses_q()) { y = in_q[(prm.shift_q + local) / 4u]; }
            var v = ELEMENT(x.x, y.x, local, c, CTX);
            if (c + 1u < c1) { v = COMBINE(v, ELEMENT(x.y, y.y, local + 1u, c + 1u, CTX)); }
            if (c + 2u < c1) { v = COMBINE(v, ELEMENT(x.z, y.z, local + 2u, c + 2u, CTX)); }
            if (c + 3u < c1) { v = COMBINE(v, ELEMENT(x.w, y.w, local + 3u, c + 3u, CTX)); }
            ACC = FOLD(ACC, v);
        }
