//! ln, ln(a/b), ln(1+x), e^x and e^x − 1 in f64 that the compiler can vectorize: no branches,
//! no calls, no float↔int conversions (integers are moved through the mantissa with a
//! shifter constant instead). `f64::ln` and `f64::exp` are libm calls per element, and they
//! were most of the reference's time.
//!
//! The logarithm's core is fdlibm's `__ieee754_log` (error below 1 ulp): x = 2^k·(1+f) with 1+f in
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

/// ln(1 + x) for x > −1, exact x used where 1 + x would round.
#[inline(always)]
pub(crate) fn ln_1p(x: f64) -> f64 {
    ln_with(1.0 + x, x)
}

/// 1.5·2^52: adding it to a float below 2^51 in magnitude rounds that to an integer, held in
/// the low mantissa bits of the sum.
const SHIFTER: f64 = 6_755_399_441_055_744.0;

/// 2^k for an integer-valued k in [−1022, 1023], built from its bits.
#[inline(always)]
fn two_to(k: f64) -> f64 {
    let k_bits = (k + SHIFTER).to_bits().wrapping_sub(SHIFTER.to_bits());
    f64::from_bits(k_bits.wrapping_add(1023) << 52)
}

/// e^x within about 1 ulp: x = k·ln 2 + r (Cody–Waite, |r| <= ln2/2), e^r by its Taylor
/// series to r^13 (the next term is below 2^-56), times 2^k applied in two halves so that
/// each stays a normal number (results down to the subnormal range are right).
#[inline(always)]
pub(crate) fn exp(x: f64) -> f64 {
    let xc = x.clamp(-746.0, 710.0);
    let k = (xc * std::f64::consts::LOG2_E + SHIFTER) - SHIFTER;
    let r = (xc - k * LN2_HI) - k * LN2_LO;
    const INV_FACT: [f64; 14] = {
        let mut c = [1.0; 14];
        let mut n = 1;
        while n < 14 {
            c[n] = c[n - 1] / n as f64;
            n += 1;
        }
        c
    };
    let mut e_r = INV_FACT[13];
    for &c in INV_FACT[..13].iter().rev() {
        e_r = e_r * r + c;
    }
    let half = (k * 0.5 + SHIFTER) - SHIFTER;
    let y = e_r * two_to(half) * two_to(k - half);
    if x < -746.0 {
        0.0
    } else if x > 710.0 {
        f64::INFINITY
    } else {
        y // NaN stays NaN
    }
}

/// 1/n for n = 1..22 (index 0 unused): the series of [`exp_m1`] and [`phi_near_zero`].
const INV_N: [f64; 23] = {
    let mut c = [1.0; 23];
    let mut n = 1;
    while n < 23 {
        c[n] = 1.0 / n as f64;
        n += 1;
    }
    c
};

/// e^x − 1 without cancellation near 0: its Taylor series where |x| < 1.1 (to x^22, the next
/// term below 2^-60 relative), e^x − 1 elsewhere (where e^x − 1 >= 2 or <= −2/3, so the
/// subtraction costs at most one ulp).
#[inline(always)]
pub(crate) fn exp_m1(x: f64) -> f64 {
    let mut series = 0.0;
    for &inv_n in INV_N[1..].iter().rev() {
        series = (series + 1.0) * (x * inv_n);
    }
    if x.abs() < 1.1 { series } else { exp(x) - 1.0 }
}

/// φ(u) = u + e^(−u) − 1 (≥ 0) for |u| < 1.1, where its parts cancel (φ ≈ u²/2 near 0): by
/// its series x²/2·(1 + x/3·(1 + x/4·…)), x = −u, to x^22 (the next term below 2^-60
/// relative). KL's term over p for rows that sum to 1 ([`super::kl_logits_term`] takes φ's
/// parts where |u| >= 1.1).
#[inline(always)]
pub(crate) fn phi_near_zero(u: f64) -> f64 {
    let x = -u;
    let mut series = 0.0;
    for &inv_n in INV_N[3..].iter().rev() {
        series = (series + 1.0) * (x * inv_n);
    }
    0.5 * x * x * (1.0 + series)
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

    #[test]
    fn phi_keeps_relative_accuracy_near_zero() {
        // Against its series summed term by term, compensated.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut us = vec![0.0, 1e-300, -1e-300, 1.0999999, -1.0999999];
        for _ in 0..100_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let v = (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
            us.extend([2.2 * v, 1e-5 * v]);
        }
        for u in us {
            let (mut term, mut terms) = (1.0f64, vec![]);
            for n in 1..40 {
                term *= -u / n as f64;
                if n >= 2 {
                    terms.push(term);
                }
            }
            let exact = crate::cpu::compensated_sum(terms);
            let ours = phi_near_zero(u);
            if exact == 0.0 {
                assert_eq!(ours, 0.0, "phi({u:e})");
            } else {
                assert!(ulps(ours, exact) <= 4, "phi({u:e}): {ours:e} vs {exact:e}");
            }
        }
    }

    #[test]
    fn exp_and_friends_are_within_two_ulp_of_std() {
        let mut xs: Vec<f64> = vec![0.0, -0.0, 1e-300, -1e-300, 0.34, -0.34, 0.35, 1.0, -1.0];
        xs.extend([
            709.7,
            709.78,
            -708.0,
            -740.0,
            -745.0,
            0.5 * std::f64::consts::LN_2,
        ]);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..200_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 11) as f64 / (1u64 << 53) as f64;
            xs.push(1500.0 * (u - 0.5)); // the whole range, both overflows included
            xs.push(2.0 * (u - 0.5)); // near 0, where exp_m1 and ln_1p matter
            xs.push(1e-6 * (u - 0.5));
        }
        let close = |ours: f64, std: f64, what: &str, x: f64| {
            let ok = if std.is_finite() && std.abs() > f64::MIN_POSITIVE {
                ulps(ours, std) <= 2
            } else {
                ours == std || (ours - std).abs() <= 2.0 * f64::MIN_POSITIVE
            };
            assert!(ok, "{what}({x:e}): {ours:e} vs {std:e}");
        };
        for &x in &xs {
            close(exp(x), x.exp(), "exp", x);
            close(exp_m1(x), x.exp_m1(), "exp_m1", x);
            if x > -1.0 {
                close(ln_1p(x), x.ln_1p(), "ln_1p", x);
            }
        }
        assert_eq!(exp(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp(f64::INFINITY), f64::INFINITY);
        assert_eq!(exp_m1(f64::NEG_INFINITY), -1.0);
        assert!(exp(f64::NAN).is_nan());
    }
}
