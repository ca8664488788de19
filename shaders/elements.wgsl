// The input bindings and element loads, one form per storage type and load width (src/kernels.rs
// picks the sections). Every form reads element i of P or Q as the f32 it widens to, exactly;
// the wide forms also give load4_p(j), the j-th group of four (16-byte loads of f32, 8-byte
// loads of 16-bit elements: what it takes to keep enough bytes in flight for HBM; used when
// P and Q sit at the same offset modulo 4 and their bindings end on a whole group).
// binding 3 (partials) is declared by each module with its monoid's type.

//---- F32_SCALAR
@group(0) @binding(1) var<storage, read> in_p: array<f32>;
@group(0) @binding(2) var<storage, read> in_q: array<f32>;
fn load_p(i: u32) -> f32 { return in_p[i]; }
fn load_q(i: u32) -> f32 { return in_q[i]; }
//---- F32_WIDE
@group(0) @binding(1) var<storage, read> in_p: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> in_q: array<vec4<f32>>;
fn load_p(i: u32) -> f32 { return in_p[i / 4u][i % 4u]; }
fn load_q(i: u32) -> f32 { return in_q[i / 4u][i % 4u]; }
fn load4_p(j: u32) -> vec4<f32> { return in_p[j]; }
fn load4_q(j: u32) -> vec4<f32> { return in_q[j]; }
//---- HALF_SCALAR
// Two 16-bit elements per word, the first in the low half (little-endian storage).
@group(0) @binding(1) var<storage, read> in_p: array<u32>;
@group(0) @binding(2) var<storage, read> in_q: array<u32>;
fn load_p(i: u32) -> f32 { return widen(in_p[i / 2u], i % 2u); }
fn load_q(i: u32) -> f32 { return widen(in_q[i / 2u], i % 2u); }
//---- HALF_WIDE
@group(0) @binding(1) var<storage, read> in_p: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read> in_q: array<vec2<u32>>;
fn load_p(i: u32) -> f32 { return widen(in_p[i / 4u][(i / 2u) % 2u], i % 2u); }
fn load_q(i: u32) -> f32 { return widen(in_q[i / 4u][(i / 2u) % 2u], i % 2u); }
fn widen4(w: vec2<u32>) -> vec4<f32> {
    return vec4<f32>(widen(w.x, 0u), widen(w.x, 1u), widen(w.y, 0u), widen(w.y, 1u));
}
fn load4_p(j: u32) -> vec4<f32> { return widen4(in_p[j]); }
fn load4_q(j: u32) -> vec4<f32> { return widen4(in_q[j]); }
//---- F16
// Half k of w as binary16, by bit operations: normal values rebias the exponent, ±∞ and NaN
// keep theirs, and subnormals are m·2^-24, a normal f32 (exact), so an adapter that flushes
// subnormals still reads them.
fn widen(w: u32, k: u32) -> f32 {
    let h = (w >> (16u * k)) & 0xffffu;
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let m = h & 0x3ffu;
    let normal = sign | ((e + 112u) << 23u) | (m << 13u);
    let special = sign | 0x7f800000u | (m << 13u);
    let small = sign | bitcast<u32>(f32(m) * 5.9604644775390625e-8);
    return bitcast<f32>(select(select(normal, special, e == 31u), small, e == 0u));
}
//---- BF16
// Half k of w as bfloat16: the top half of an f32.
fn widen(w: u32, k: u32) -> f32 { return bitcast<f32>(select(w << 16u, w & 0xffff0000u, k == 1u)); }
//---- EDGE4
// The vec4 of P and Q from window element `local` on (a multiple of 4 past the bindings'
// shifts), with its elements outside [lo, hi) read as empty: a probability of 0, or −∞ in log
// space, which every measure counts as nothing and none rejects (the gradient kernel's
// targets are probabilities). Those elements belong to a neighbouring row or chunk, or lie
// outside the caller's slice, and may hold anything.
struct Pair4 { x: vec4<f32>, y: vec4<f32> }

fn load4_edge(local: u32, lo: u32, hi: u32) -> Pair4 {
    let k = vec4<u32>(0u, 1u, 2u, 3u);
    let own = k >= vec4<u32>(lo) & k < vec4<u32>(hi);
    let log_space = INPUT == INPUT_LOGPROBS || INPUT == INPUT_LOGITS;
    let x = select(vec4<f32>(select(0.0, neg_inf(), log_space)),
        load4_p((prm.shift_p + local) / 4u), own);
    var y = x;
    if (uses_q()) {
        let q_log = log_space && MEASURE != MEASURE_KL_GRAD;
        y = select(vec4<f32>(select(0.0, neg_inf(), q_log)), load4_q((prm.shift_q + local) / 4u),
            own);
    }
    return Pair4(x, y);
}
