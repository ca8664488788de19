// Per-element terms of the four measures, written so that f32 stays accurate where the naive
// formulas cancel (../docs/ARCHITECTURE.md, "Numerics"). No loops: llvmpipe counts them.

const LN2: f32 = 0.6931471805599453;
const SQRT2: f32 = 1.4142135623730951;

// ln(1 + x) for x in [−0.5, 1], to a few ulp: 2·atanh(s), s = x / (2 + x), |s| <= 1/3 (WGSL's
// log is only good to 2^-21 absolute on [0.5, 2]).
fn log1p_near(x: f32) -> f32 {
    let s = x / (2.0 + x);
    let s2 = s * s;
    let poly = 1.0 + s2 * (1.0 / 3.0 + s2 * (1.0 / 5.0 + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0
        + s2 * (1.0 / 11.0 + s2 * (1.0 / 13.0 + s2 * (1.0 / 15.0 + s2 * (1.0 / 17.0))))))));
    return 2.0 * s * poly;
}

// ln(1 + x), accurate to a few ulp.
fn log1p_acc(x: f32) -> f32 {
    if (x >= -0.5 && x <= 1.0) { return log1p_near(x); }
    return log(1.0 + x);
}

// e^x to about 1 ulp: x = k·ln 2 + r with ln 2 in two parts (Cody–Waite, k·LN2_HI exact),
// |r| <= ln(2)/2, and e^r by its Taylor series to r^8. WGSL's exp may be off by 3 + 2|x| ulp
// (it scales x by log2(e) first).
fn exp_acc(x: f32) -> f32 {
    let k = round(x * 1.4426950408889634);
    let r = (x - k * LN2_HI) - k * LN2_LO;
    let er = 1.0 + r * (1.0 + r * (1.0 / 2.0 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0
        + r * (1.0 / 720.0 + r * (1.0 / 5040.0 + r * (1.0 / 40320.0))))))));
    // Below −104, e^x is 0 in f32 (and −∞ would make r NaN).
    return select(ldexp(er, i32(clamp(k, -300.0, 300.0))), 0.0, x < -104.0);
}

// e^a as e^(a + s)·c: a term e^a·v with e^a below f32's normal range (a < −87.3; an adapter
// that flushes subnormals reads it as 0) can still be large, when v is a difference of logs
// with a logit like −3e38 in it, and takes its digits from (e^(a + s), c) as e^(a + s)·(v·c).
// s = 64 and c = e^-64 where a < −64 (a + 64 is exact there: 64 is a multiple of a's ulp and
// the sum is smaller than a), else s = 0 and c = 1. low_exp_shift gives (s, c).
const E_M64: f32 = 1.6038108905486378e-28;

fn low_exp_shift(a: f32) -> vec2<f32> {
    // Entropy's −p·ln p never meets a huge factor (MEASURE is a constant: folded).
    let low = a < -64.0 && MEASURE != MEASURE_ENTROPY;
    return vec2<f32>(select(0.0, 64.0, low), select(1.0, E_M64, low));
}

// (e^(a + s), c) of low_exp_shift, by WGSL's exp.
fn exp_low(a: f32) -> vec2<f32> {
    let sc = low_exp_shift(a);
    return vec2<f32>(exp(a + sc.x), sc.y);
}

// (e^(a + s), c) of low_exp_shift, by exp_acc.
fn exp_acc_low(a: f32) -> vec2<f32> {
    let sc = low_exp_shift(a);
    return vec2<f32>(exp_acc(a + sc.x), sc.y);
}

// A probability x > 0 as (x·2^s, 2^-s), s = 64 where x is subnormal (from its split, so an
// adapter that flushes subnormals keeps it), else (x, 1): the same use as exp_low's.
fn prob_low(x: f32, sx: Split) -> vec2<f32> {
    let low = sx.e < -126;
    return vec2<f32>(select(x, ldexp(sx.m, sx.e + 64), low), select(1.0, 5.421010862427522e-20, low));
}

// x = m·2^e with m in [1, 2), for x > 0 finite (sign ignored), by bit operations. A
// subnormal's bits are its significand n, x = n·2^-149, and f32(n) is exact and normal: no
// float operation touches x itself, so adapters that flush subnormals to zero (NVIDIA's
// Vulkan driver does) still see its true value. ±0 gives e = −276: a finite ln 0.
struct Split { m: f32, e: i32 }

fn split(x: f32) -> Split {
    let bits = bitcast<u32>(x) & 0x7fffffffu;
    let tiny = bits < 0x00800000u;
    let b = select(bits, bitcast<u32>(f32(bits)), tiny);
    let e = i32(b >> 23u) - select(127, 276, tiny);
    return Split(bitcast<f32>((b & 0x007fffffu) | 0x3f800000u), e);
}

const ONE: Split = Split(1.0, 0);

// x's split for a positive normal x: its exponent and mantissa fields as they are.
fn split_normal(x: f32) -> Split {
    let b = bitcast<u32>(x);
    return Split(bitcast<f32>((b & 0x007fffffu) | 0x3f800000u), i32(b >> 23u) - 127);
}

// The quick paths' vote (QUICK, Tuning::quick_vec4: fold4_term's and norm_fold4's): whether
// the vec4s of P (and Q) hold only positive normal numbers in every voting lane of the
// subgroup. Lanes that have left the loop do not vote, and each voter checks its own values.
fn all_positive_normal4(x: vec4<f32>, y: vec4<f32>) -> bool {
    // Positive normal: bits in [2^23, 0x7f800000), i.e. bits − 2^23 below 0x7f000000.
    let lo = vec4<u32>(0x00800000u);
    var top = bitcast<vec4<u32>>(x) - lo;
    if (uses_q()) { top = max(top, bitcast<vec4<u32>>(y) - lo); }
    return quick_all(max(max(top.x, top.y), max(top.z, top.w)) < 0x7f000000u);
}

// The split of a/b from the splits of a and b, without forming the quotient: an adapter
// that flushes subnormals reads a quotient below 2^-126 as 0, and a normalized probability
// q = y/Σq must keep its logarithm however small it is (and Σ may itself be subnormal, or
// so small that 1/Σ overflows). One rounding: y/y is exactly 1.
fn split_div(a: Split, b: Split) -> Split {
    let m = a.m / b.m;
    let small = m < 1.0;
    return Split(select(m, 2.0 * m, small), a.e - b.e - select(0, 1, small));
}

// T(z) with atanh(s) = s·(1 + z·T(z)), z = s², to f32 precision for |s| <= 0.172: the first
// term left out, z⁵/11 relative, is below 2^-28.
fn atanh_tail(z: f32) -> f32 {
    return 1.0 / 3.0 + z * (1.0 / 5.0 + z * (1.0 / 7.0 + z * (1.0 / 9.0)));
}

// 2·atanh(s) = ln((1 + s)/(1 − s)) for |s| <= 0.172.
fn atanh2(s: f32) -> f32 { return 2.0 * s * (1.0 + s * s * atanh_tail(s * s)); }

// ln(u) for u > 0 finite, to a few ulp everywhere (relative near 1, subnormals included) and
// without branches, from u's split: u = 2^k·a with a in [√½, √2) and ln u = k·ln 2 +
// 2·atanh(s), s = (a − 1)/(a + 1), a − 1 exact. WGSL's log is only good to 2^-21 absolute
// near 1, llvmpipe's reads a subnormal as if its exponent were −126, and NVIDIA's flushes it.
fn ln_split(su: Split) -> f32 {
    let high = su.m > SQRT2;
    let a = select(su.m, 0.5 * su.m, high);
    let k = su.e + select(0, 1, high);
    let s = (a - 1.0) / (a + 1.0);
    return f32(k) * LN2 + atanh2(s);
}

// ln 2 in two parts: LN2_HI has 15 significant bits, so k·LN2_HI is exact for every exponent k
// of an f32 (|k| <= 276 even for the split of 0) and every k of exp_acc.
const LN2_HI: f32 = 0.693145751953125;
const LN2_LO: f32 = 1.4286068203094172e-6;

// ln u for u > 0 finite in three parts, k·LN2_HI + 2·s_hi + rest: the first two exact and
// the rest below ~1e-3 + |k|·1.5e-6, so that a caller which cancels them against other exact
// parts (the loss term's ln t − ln q) is left with ln u to ~2^-30 absolute rather than
// ln_split's 2^-24·|2s|. u's mantissa a (in [√½, √2)) gives s = (a − 1)/(a + 1) as
// s_hi + s_lo: a − 1 is exact, 2 + (a − 1) exact as a TwoSum pair, and s_hi times it exact
// (exact_product), so the remainder s_lo carries what the division rounded away. Rows of
// 2–33 columns with a target close to the model (loss ~1e-6) came out up to 3.5e-5 off when
// only s was kept.
fn ln_parts(su: Split) -> vec3<f32> {
    let high = su.m > SQRT2;
    let a = select(su.m, 0.5 * su.m, high);
    let k = f32(su.e + select(0, 1, high));
    let u = a - 1.0;
    let d = two_sum(2.0, u);
    let s_hi = u / d.x;
    let p = exact_product(s_hi, d.x);
    let rem = (opaque(u - p.x) - p.y) - s_hi * d.y;
    let s_lo = rem / d.x;
    let z = s_hi * s_hi;
    let rest = k * LN2_LO + (2.0 * s_lo + 2.0 * s_hi * z * atanh_tail(z));
    return vec3<f32>(k * LN2_HI, 2.0 * s_hi, rest);
}

fn ln_acc(u: f32) -> f32 { return ln_split(split(u)); }

// a/b = 2^k·(a'/b') with a'/b' in [√½, √2), from the splits of a and b: ln(a/b) =
// k·ln 2 + 2·atanh(s), s = (a' − b')/(a' + b'), |s| <= 0.172, a' − b' exact.
struct Ratio { s: f32, k: i32 }

fn ratio_of(sa: Split, sb: Split) -> Ratio {
    let high = sa.m > SQRT2 * sb.m;
    let low = SQRT2 * sa.m < sb.m;
    let a = select(sa.m, 2.0 * sa.m, low);
    let b = select(sb.m, 2.0 * sb.m, high);
    return Ratio((a - b) / (a + b), (sa.e - sb.e) + select(0, 1, high) - select(0, 1, low));
}

// ln(a/b) without forming a/b, accurate relative to itself even where a/b is within an ulp of
// 1 (a normalized p = x/Σp near 1, whose rounded quotient would read exactly 1).
fn ln_ratio(sa: Split, sb: Split) -> f32 {
    let r = ratio_of(sa, sb);
    return f32(r.k) * LN2 + atanh2(r.s);
}

// m's first 12 significant bits and the rest, for a normal m or 0: both exact, and so is the
// product of any two such halves.
fn halves(m: f32) -> vec2<f32> {
    let hi = bitcast<f32>(bitcast<u32>(m) & 0xfffff000u);
    return vec2<f32>(hi, m - hi);
}

// a·b as big + rest, big exact and rest its remainder to ~2^-35·|a·b| (for normal a, b whose
// product stays normal): Dekker's product from `halves`, without a fused multiply-add (which
// WGSL does not promise) and without Veltkamp's split, whose c − (c − m) a compiler may fold
// to m. A caller that cancels big against a close value gets the difference exactly.
fn exact_product(a: f32, b: f32) -> vec2<f32> {
    let ha = halves(a);
    let hb = halves(b);
    return vec2<f32>(ha.x * hb.x, (ha.x * hb.y + ha.y * hb.x) + ha.y * hb.y);
}

// The Ratio of p/q for normalized p = x/Σp and q = y/Σq, from the splits of x and y and of
// c = Σp/Σq (a row constant): p/q = x/(y·c), with y'·c' as an exact_product, so a − b has
// one rounding however close p is to q. From the rounded quotients p and q
// instead, a − b carries their roundings, 2^-24 of p each: KL and JS are second order in
// p − q, and a row of 3 with KL 1.4e-7 came out 1.2e-4 off. c's own rounding scales every
// ratio of the row alike, which the terms (from s and p + q) do not feel to first order.
// b = y'·c' lies in [1, 4): it is halved into [1, 2) before a or b is doubled (all exact), so
// that they end within a factor of √2 and so do a and b's big part: a − b_big is exact
// (Sterbenz). Aligned by one doubling only, b could stay twice a, and a close pair took the
// far form, whose p·ln(p/q) − (p − q) cancels (6 % off for the term). The big difference is
// opaque, so no compiler regroups d into a − b with b rounded: Mesa's NIR did that to an
// earlier form of this function, with two products.
fn ratio_norm(sx: Split, sy: Split, c: Split) -> Ratio {
    let yc = exact_product(sy.m, c.m);
    let yc_sum = yc.x + yc.y;
    let b_wide = yc_sum >= 2.0;
    let a = sx.m;
    let b = select(1.0, 0.5, b_wide) * yc_sum;
    let high = a > SQRT2 * b;
    let low = SQRT2 * a < b;
    let fa = select(1.0, 2.0, low);
    let fb = select(1.0, 0.5, b_wide) * select(1.0, 2.0, high);
    let d = opaque(fa * a - fb * yc.x) - fb * yc.y;
    let k = (sx.e - sy.e - c.e) - select(0, 1, b_wide) + select(0, 1, high) - select(0, 1, low);
    return Ratio(d / (fa * a + fb * yc_sum), k);
}

// The KL term of p, q > 0 in two forms, without branches (random data would take both sides
// of one in most warps). With p/q = 2^k·(a/b), a/b in [√½, √2), a and b exact, and
// s = (a − b)/(a + b) (|s| <= 0.172, a − b exact): ln(p/q) = k·ln 2 + 2·atanh(s). Near p = q
// (k = 0) s = (p − q)/(p + q) and p·ln(p/q) − p + q = (p + q)·s²·h(s), h(s) = 1 + (s + s²)·T(s²),
// a sum of non-negative parts (`series`; the caller adds p − q to the residual). Elsewhere
// |ln(p/q)| >= ln √2 and `plogr` = p·ln(p/q) needs nothing added: no −p + q that a q far above
// p (1e38 against 1e-20) would make the sum cancel. s never divides p − q by p + q, which an
// adapter that flushes subnormals makes 0/0 where both are subnormal. `ratio` is p/q's
// (ratio_of, or ratio_norm for normalized rows).
struct KlParts { series: f32, plogr: f32, near: bool }

fn kl_parts(p: f32, q: f32, ratio: Ratio) -> KlParts {
    let s = ratio.s;
    let k = ratio.k;
    let z = s * s;
    let t = atanh_tail(z);
    let series = (p + q) * z * (1.0 + (s + z) * t);
    return KlParts(series, p * (f32(k) * LN2 + 2.0 * s * (1.0 + z * t)), k == 0);
}

// p·ln(p/q) − p + q >= 0 whole, for p, q >= 0 (p/q's ratio as kl_parts takes it): the term of
// rows whose sides both sum to 1 (no residual sum) and of the one pass for them. p = 0 gives
// q; q = 0 against p > 0 gives 0 (the caller flags KL +∞).
fn kl_whole(p: f32, q: f32, ratio: Ratio, p_zero: bool, q_zero: bool) -> f32 {
    let kl = kl_parts(p, q, ratio);
    let main = select(kl.plogr - (p - q), kl.series, kl.near);
    return select(select(main, 0.0, q_zero), q, p_zero);
}

// The JS term of probabilities p and q. With t = p + q and r = (p − q)/t in [−1, 1],
// p = (t/2)(1 + r), q = (t/2)(1 − r) and m = t/2, so
//   ½·(p·ln(p/m) + q·ln(q/m)) = (t/4)·h(r),  h(r) = (1 + r)·ln(1 + r) + (1 − r)·ln(1 − r),
// even and >= 0. Near p = q (|r| <= ½: p − q does not cancel) h is its series
// Σ r^2k / (k(2k − 1)), no cancellation; elsewhere the logs, the larger side's from log1p(|r|)
// and the smaller's from ln(2·min(p, q)/t) (relative, so nothing is lost as it goes to 0),
// which cancel at most 2 bits. Two logs instead of the three ratio logs of two KL(·‖m)
// halves. r = |p − q|/t is the caller's: normalized rows take it from the exact ratio
// (ratio_norm) where it cancels.
fn js_prob(p: f32, q: f32, r: f32) -> f32 { return js_prob_parts(p, q, r).x; }

// js_prob's term, and m·o(r) for the one pass of normalized rows (kernels_norm.wgsl), where
// o(r) = r − ((1 + r)·ln(1 + r) − (1 − r)·ln(1 − r))/2 = Σ r^(2k+1) / ((2k + 1)·2k) is h's
// odd companion: q·ln(q/m) − q + m = m·(h(r)/2 + o(r)) for the signed r (the caller signs it).
// From the same series variable and logs; a caller that takes only the term leaves the rest
// to dead-code elimination.
fn js_prob_parts(p: f32, q: f32, r: f32) -> vec2<f32> {
    let t = p + q;
    let z = r * r;
    // Terms to z^10: the first left out, z^11/231 with z <= 1/4, is below 2^-27 of h.
    let series = z * (1.0 + z * (1.0 / 6.0 + z * (1.0 / 15.0 + z * (1.0 / 28.0 + z * (1.0 / 45.0
        + z * (1.0 / 66.0 + z * (1.0 / 91.0 + z * (1.0 / 120.0 + z * (1.0 / 153.0
        + z * (1.0 / 190.0))))))))));
    let small = div_wide(2.0 * min(p, q), t);
    // ln(1 + r) for r in [½, 1] (where the logs are used): 1 + r = 2·a with a in [¾, 1], so
    // ln(1 + r) = ln 2 + 2·atanh(s), s = (a − 1)/(a + 1) = (r − 1)/(r + 3), |s| <= 1/7, r − 1
    // exact.
    let s = (r - 1.0) / (r + 3.0);
    let plus = (1.0 + r) * (LN2 + atanh2(s));
    let minus = small * ln_acc(small);
    // o's terms to r^15: the first left out, r^17/272 with r <= ½, is below 2^-19 of o(r).
    let odd_series = r * z * (1.0 / 6.0 + z * (1.0 / 20.0 + z * (1.0 / 42.0 + z * (1.0 / 72.0
        + z * (1.0 / 110.0 + z * (1.0 / 156.0 + z * (1.0 / 210.0)))))));
    let near = r <= 0.5;
    let term = 0.25 * t * select(plus + minus, series, near);
    let odd = 0.5 * t * select(r - 0.5 * (plus - minus), odd_series, near);
    // t = 0 (p = q = 0, or both subnormal on an adapter that flushes them): no mass, 0.
    return select(vec2<f32>(term, odd), vec2<f32>(0.0, 0.0), t == 0.0);
}

// φ(r) = r + e^(−r) − 1 >= 0 for |r| <= 1, by its Taylor series (no cancellation).
fn phi_series(r: f32) -> f32 {
    let t = 1.0 / 2.0 - r * (1.0 / 6.0 - r * (1.0 / 24.0 - r * (1.0 / 120.0 - r * (1.0 / 720.0
        - r * (1.0 / 5040.0 - r * (1.0 / 40320.0 - r * (1.0 / 362880.0 - r * (1.0 / 3628800.0
        - r * (1.0 / 39916800.0 - r * (1.0 / 479001600.0))))))))));
    return r * r * t;
}

// x·φ(r) where r = ln(x/y) and y = x·e^(−r): x·ln(x/y) − x + y, for x > 0 given as xs with
// x = xs.x·xs.y (exp_low's form: r may be huge where x is subnormal).
fn phi_term(xs: vec2<f32>, r: f32, y: f32) -> f32 {
    return select(xs.x * ((r - 1.0) * xs.y) + y, (xs.x * xs.y) * phi_series(r), abs(r) <= 1.0);
}

// JS term from log-space values: big = max(p, q) (P's and Q's probabilities) and
// d = ln p − ln q, exact (either may be ±∞). With m = (p + q)/2 = big·(1 + e^(−|d|))/2 and
// r = tanh(d/2) (p/m = 1 + r, q/m = 1 − r), the term ½(p·ln(p/m) + q·ln(q/m)) is ½·m·f(|d|),
// f(d) = (1 + r)·ln(1 + r) + (1 − r)·ln(1 − r) >= 0:
// - for |d| <= 1, f's even Taylor series in d (its terms fall ~d²/π²-fold: to d^16 it is good
//   to 2e-8 at |d| = 1), with no cancellation;
// - beyond, 2·(ln 2 − ln(1 + e^(−|d|))) − 2|d|·e^(−|d|)/(1 + e^(−|d|)), which cancels at most
//   3.4-fold (at |d| = 1) and tends to 2 ln 2 (the last part is 0 once e^(−|d|) is).
// One exp for the larger side (the caller's) and one for e^(−|d|), and log1p_near's series
// (e^(−|d|) <= e^-1 is in its range): no log, no division of p by q.
fn js_log_term(big: f32, d: f32) -> f32 {
    let ad = abs(d);
    let e = exp(-ad);
    let d2 = d * d;
    let series = d2 * (1.0 / 4.0 - d2 * (1.0 / 32.0 - d2 * (1.0 / 288.0 - d2 * (17.0 / 46080.0
        - d2 * (31.0 / 806400.0 - d2 * (691.0 / 174182400.0 - d2 * (5461.0 / 13412044800.0
        - d2 * (929569.0 / 22317642547200.0))))))));
    let tail = select(2.0 * ad * e / (1.0 + e), 0.0, e == 0.0);
    let far = 2.0 * (LN2 - log1p_near(e)) - tail;
    return 0.25 * big * (1.0 + e) * select(far, series, ad <= 1.0);
}

// A probability's parts for exact row sums: (x, 0) where x is normal, else (0, its
// significand x·2^149), an integer that f32 holds exactly. An adapter that flushes subnormals
// (NVIDIA's) would add them as 0, and a row of subnormal values would read as empty. Integers
// add exactly up to 2^24; row_sum puts the parts together.
fn normal_or_tiny(x: f32) -> vec2<f32> {
    let b = bitcast<u32>(x) & 0x7fffffffu;
    let sub = b < 0x00800000u;
    return vec2<f32>(select(x, 0.0, sub), select(0.0, f32_u23(b), sub));
}

// A row sum from its normal part (hi, lo) and its subnormal part tiny·2^-149, as (m, s, shift):
// the sum is (m + s)·2^-shift. Where the normal part is below 2^-60 the sum is taken times 2^64
// (where every part is normal: 2^-149·2^64 = 2^-85), so that no subnormal is formed; above,
// the subnormal part (at most n·2^-126) is below 2^-48 of it for rows up to 2^18 columns and
// is left out.
fn row_sum(hi: f32, lo: f32, tiny: f32) -> vec4<f32> {
    if (tiny == 0.0 || hi >= 8.673617379884035e-19) {
        let s = two_sum(hi, lo);
        return vec4<f32>(s.x, s.y, 0.0, 0.0);
    }
    let a = two_sum(hi * 1.8446744073709552e19, tiny * 2.5849394142282115e-26);
    let s = two_sum(a.x, a.y + lo * 1.8446744073709552e19);
    return vec4<f32>(s.x, s.y, 64.0, 0.0);
}

// A row's statistics for the terms pass from its sums' parts (row_sum of each side: the sum as
// an f32, what it leaves out, and the power of 2 it is scaled by; see RowCtx), its empty sides
// reported. Empty by its bits (a flushing adapter compares a subnormal equal to 0).
fn row_sums_stats(row: u32, p_hi: f32, p_lo: f32, tiny_p: f32, q_hi: f32, q_lo: f32,
        tiny_q: f32) -> RowStats {
    let sp = row_sum(p_hi, p_lo, tiny_p);
    let sq = row_sum(q_hi, q_lo, tiny_q);
    if (is_zero(sp.x)) { report_bad(row * prm.elem_row_len, FLAG_P_EMPTY); }
    if (uses_q() && is_zero(sq.x)) { report_bad(row * prm.elem_row_len, FLAG_Q_EMPTY); }
    return RowStats(sp.x, sp.y, u32(sp.z), sq.x, sq.y, u32(sq.z));
}
