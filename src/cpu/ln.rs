//! A natural logarithm the compiler can vectorize: no branches, no calls, no float↔int
//! conversions that x86-64's baseline (SSE2) lacks for f64 lanes. `f64::ln` is a libm call per
//! element, and it was most of the reference's time.
//!
//! The core is fdlibm's `__ieee754_log` (error below 1 ulp): x = 2^k·(1+f) with 1+f in
//! [√½, √2), s = f/(2+f), ln(1+f) = 2s + s·R(s²). What it adds is the ratio form: near 1,
//! f comes from the exact difference a − b rather than from the rounded quotient, so
//! ln(a/b) keeps its relative accuracy when a ≈ b — the near-identical distributions that
//! KL is most often asked about.

// fdlibm's constants, as bit patterns so nothing is lost to decimal.
const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000); // trailing zeros: k·LN2_HI is exact
const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
const LG1: f64 = f64::from_bits(0x3fe5_5555_5555_5593);
const LG2: f64 = f64::from_bits(0x3fd9_9999_9997_fa04);
const LG3: f64 = f64::from_bits(0x3fd2_4924_9422_9359);
const LG4: f64 = f64::from_bits(0x3fcc_71c5_1d8e_78af);
const LG5: f64 = f64::from_bits(0x3fc7_4664_96cb_03de);
const LG6: f64 = f64::from_bits(0x3fc3_9a09_d078_c69f);
const LG7: f64 = f64::from_bits(0x3fc2_f112_df3e_5244);

const MANTISSA: u64 = (1 << 52) - 1;
const ONE: u64 = 0x3ff0_0000_0000_0000;
/// 2^52 as bits: OR-ing an integer below 2^52 into its mantissa and subtracting 2^52 converts
/// it to f64 with plain bit operations.
const TWO_52: u64 = 0x4330_0000_0000_0000;

/// ln(r) for a positive normal r, where `r_minus_one` is r − 1 computed more accurately than
/// `r - 1.0` would be (it is used only when r lies in [√½, √2)).
#[inline(always)]
fn ln_with(r: f64, r_minus_one: f64) -> f64 {
    let bits = r.to_bits();
    let biased_exponent = f64::from_bits((bits >> 52) | TWO_52) - f64::from_bits(TWO_52);
    let mantissa = f64::from_bits((bits & MANTISSA) | ONE); // [1, 2)
    let high = mantissa > std::f64::consts::SQRT_2;
    let m = if high { 0.5 * mantissa } else { mantissa };
    let k = biased_exponent - 1023.0 + if high { 1.0 } else { 0.0 };
    let f = if k == 0.0 { r_minus_one } else { m - 1.0 }; // m − 1 is exact (Sterbenz)

    let s = f / (2.0 + f);
    let z = s * s;
    let w = z * z;
    let r_odd = z * (LG1 + w * (LG3 + w * (LG5 + w * LG7)));
    let r_even = w * (LG2 + w * (LG4 + w * LG6));
    let half_f_squared = 0.5 * f * f;
    k * LN2_HI - ((half_f_squared - (s * (half_f_squared + r_odd + r_even) + k * LN2_LO)) - f)
}

/// ln(x) for a positive normal x (every positive f32 widened to f64 is one).
#[inline(always)]
pub(crate) fn ln(x: f64) -> f64 {
    ln_with(x, x - 1.0) // exact near 1 (Sterbenz)
}

/// ln(a/b) for positive a, b whose ratio is normal (true for any two positive f32 values).
/// Near 1, a − b is exact (Sterbenz), so the result has the relative accuracy of a plain
/// logarithm even when a and b agree in all but their last bits.
#[inline(always)]
pub(crate) fn ln_ratio(a: f64, b: f64) -> f64 {
    let inverse = 1.0 / b;
    ln_with(a * inverse, (a - b) * inverse)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place between two finite f64 of the same sign.
    fn ulps(x: f64, y: f64) -> u64 {
        (x.to_bits() as i64 - y.to_bits() as i64).unsigned_abs()
    }

    /// Every input class: exact powers of two, both sides of √2 and √½, around 1, subnormal
    /// f32 values, the extremes of f32, and a dense sweep of random f32 values.
    fn samples() -> Vec<f32> {
        let mut v = vec![
            1.0,
            2.0,
            0.5,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::MAX,
            std::f32::consts::SQRT_2,
            std::f32::consts::FRAC_1_SQRT_2,
            1.0 + f32::EPSILON,
            1.0 - f32::EPSILON / 2.0,
        ];
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let x = f32::from_bits((state >> 33) as u32 & 0x7f7f_ffff);
            if x > 0.0 {
                v.push(x);
            }
        }
        v
    }

    #[test]
    fn ln_is_within_one_ulp_of_std() {
        for x in samples() {
            let x = x as f64;
            let (ours, std) = (ln(x), x.ln());
            if std == 0.0 {
                assert_eq!(ours, 0.0);
            } else {
                assert!(ulps(ours, std) <= 1, "ln({x:e}): {ours:e} vs {std:e}");
            }
        }
    }

    #[test]
    fn ln_ratio_keeps_relative_accuracy_near_one() {
        // Against ln_1p of the exact difference: what the naive ln(a/b) loses near 1.
        let values = samples();
        for pair in values.windows(2) {
            let a = pair[0] as f64;
            let next = f32::from_bits(pair[0].to_bits() + 1);
            let neighbours = [pair[1], next].into_iter().filter(|x| x.is_finite());
            for b in neighbours.map(f64::from).chain([a * 0.75, a * 1.25]) {
                let exact = if (0.5..=2.0).contains(&(a / b)) {
                    ((a - b) / b).ln_1p()
                } else {
                    (a / b).ln()
                };
                let ours = ln_ratio(a, b);
                if exact == 0.0 {
                    assert_eq!(ours, 0.0);
                } else {
                    assert!(
                        ulps(ours, exact) <= 4,
                        "ln({a:e}/{b:e}): {ours:e} vs {exact:e}"
                    );
                }
            }
        }
    }
}
