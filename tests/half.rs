//! Half-precision inputs (f16, bf16): the kernels read 2 bytes per element and widen each to
//! the f32 it stands for, so every result must equal the reference over the f32 widening, on
//! every path, from host slices and from GPU buffers, with errors that name the element.

mod common;

use common::*;
use klgpu::half::{bf16, f16};
use klgpu::{Dtype, Element, Error, Input, Measure, Options, Problem, Side, cpu, wgpu};
use rand::prelude::*;

fn widen<T: Element>(x: &[T]) -> Vec<f32> {
    x.iter().map(|&v| v.to_f32()).collect()
}

/// Probabilities, log-probabilities or logits of `rows × cols`, P and a Q near or far from it.
fn pair(
    rng: &mut StdRng,
    rows: usize,
    cols: usize,
    input: Input,
    close: bool,
) -> (Vec<f32>, Vec<f32>) {
    let p = dirichlet(rng, rows, cols, 0.5);
    let q = if close {
        perturbed(rng, &p, 0.05)
    } else {
        dirichlet(rng, rows, cols, 0.5)
    };
    let as_input = |v: Vec<f32>| match input {
        Input::Probs => v,
        Input::LogProbs => v.iter().map(|&x| x.ln()).collect(),
        Input::Logits => v.iter().map(|&x| x.ln() * 1.5 + 2.0).collect(),
    };
    (as_input(p), as_input(q))
}

fn rows_match_widening<T: Element>(seed: u64) {
    let mut rng = rng(seed);
    let shapes = [(1, 1), (3, 3), (2, 7), (5, 10), (4, 1000), (2, 4099)];
    for (k, &(rows, cols)) in shapes.iter().enumerate() {
        for input in [Input::Probs, Input::LogProbs, Input::Logits] {
            let (p, q) = pair(&mut rng, rows, cols, input, k % 2 == 0);
            let (p, q) = (narrow::<T>(&p), narrow::<T>(&q));
            let (wp, wq) = (widen(&p), widen(&q));
            for normalize in [false, true] {
                let opts = Options {
                    normalize,
                    ..Options::input(input)
                };
                for m in Measure::ALL {
                    let (qq, wqq) = if m.uses_q() {
                        (Some(&q[..]), Some(&wq[..]))
                    } else {
                        (None, None)
                    };
                    let want = cpu::rows(m, &wp, wqq, cols, &opts).unwrap();
                    // The reference takes the 16-bit slices too, widening them alike.
                    assert_eq!(cpu::rows(m, &p, qq, cols, &opts).unwrap(), want);
                    for (i, e) in every_path().into_iter().enumerate() {
                        let got = e.rows(m, &p, qq, cols, &opts).unwrap();
                        let what = format!("{:?} {rows}×{cols} {m:?} {opts:?} path {i}", T::DTYPE);
                        assert_rows_close(&got.values, &want.values, &what);
                        assert_eq!(got.top1_agree, want.top1_agree, "{what}");
                    }
                }
            }
        }
    }
}

#[test]
fn f16_rows_equal_the_reference_over_their_widening_on_every_path() {
    rows_match_widening::<f16>(61);
}

#[test]
fn bf16_rows_equal_the_reference_over_their_widening_on_every_path() {
    rows_match_widening::<bf16>(62);
}

#[test]
fn close_half_rows_whose_sums_differ_keep_the_stated_allowance() {
    // Distributions rounded to 16 bits sum to 1 only within ~1e-3, so for close rows Σ(p − q)
    // cancels against the non-negative terms: KL may be off by 2^-22·|Σp − Σq| (README,
    // "Precision"; a fuzz found an f16 row with mass in two of ten columns, KL 1.5e-6, 3e-5
    // off). Such rows, mass in two of ten columns; with `normalize` at the bar.
    fn rows_of<T: Element>(seed: u64) {
        let mut r = rng(seed);
        let (rows, cols) = (64, 10);
        let (mut p, mut q) = (vec![0.0f32; rows * cols], vec![0.0f32; rows * cols]);
        for row in 0..rows {
            let at = row * cols + row % (cols - 1);
            // The fuzz's pair (f16 values) in every other row, random ones in the rest.
            let (a, b) = if row % 2 == 0 {
                (vec![0.59472656, 0.4050293], vec![0.57958984, 0.4206543])
            } else {
                let a = dirichlet(&mut r, 1, 2, 1.0);
                let b = perturbed(&mut r, &a, 2e-2);
                (a, b)
            };
            p[at..at + 2].copy_from_slice(&a);
            q[at..at + 2].copy_from_slice(&b);
        }
        let (p, q) = (narrow::<T>(&p), narrow::<T>(&q));
        let (wp, wq) = (widen(&p), widen(&q));
        for (i, e) in every_path().into_iter().enumerate() {
            for normalize in [false, true] {
                let opts = Options {
                    normalize,
                    ..Options::default()
                };
                let got = e.rows(Measure::KullbackLeibler, &p, Some(&q), cols, &opts);
                let want = cpu::rows(Measure::KullbackLeibler, &wp, Some(&wq), cols, &opts);
                let (got, want) = (got.unwrap().values, want.unwrap().values);
                for (row, (&g, &c)) in got.iter().zip(&want).enumerate() {
                    let span = row * cols..(row + 1) * cols;
                    let sum = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>();
                    let apart = sum(&wp[span.clone()]) - sum(&wq[span]);
                    let what = format!("{:?} path {i} {opts:?} row {row}", T::DTYPE);
                    if normalize || (g - c).abs() > 2f64.powi(-22) * apart.abs() {
                        assert_close(g, c, &what);
                    }
                }
            }
        }
    }
    rows_of::<f16>(64);
    rows_of::<bf16>(65);
}

#[test]
fn every_finite_f16_widens_exactly() {
    // One element per row, so each row's value checks one widening: every non-negative finite
    // f16 (zero and the subnormals included) as a probability, −p·ln p; every non-positive
    // one as a log-probability, −e^a·a.
    let e = engine();
    let bits = |range: std::ops::RangeInclusive<u16>| -> Vec<f16> {
        range
            .map(f16::from_bits)
            .filter(|v| v.is_finite())
            .collect()
    };
    for (values, input) in [
        (bits(0x0000..=0x7bff), Input::Probs),
        (bits(0x8000..=0xfbff), Input::LogProbs),
    ] {
        let opts = Options::input(input);
        let wide = widen(&values);
        let got = e.rows(Measure::Entropy, &values, None, 1, &opts).unwrap();
        let want = cpu::rows(Measure::Entropy, &wide, None, 1, &opts).unwrap();
        assert_rows_close(
            &got.values,
            &want.values,
            &format!("every f16 as {input:?}"),
        );
    }
}

#[test]
fn bad_half_values_are_named_with_their_value() {
    let e = engine();
    let mut p = narrow::<f16>(&[0.25, 0.25, 0.25, 0.25, 0.5, 0.5]);
    let q = narrow::<f16>(&[0.25; 6]);
    p[3] = f16::NAN;
    let err = e.rows(
        Measure::KullbackLeibler,
        &p,
        Some(&q),
        3,
        &Options::default(),
    );
    match err {
        Err(Error::InvalidValue {
            side: Side::P,
            index: 3,
            row: 1,
            col: 0,
            problem: Problem::NaN,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    let mut q = narrow::<bf16>(&[0.25; 6]);
    q[5] = bf16::from_f32(-0.5);
    let p = narrow::<bf16>(&[0.25; 6]);
    let err = e
        .rows(Measure::JensenShannon, &p, Some(&q), 2, &Options::default())
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidValue {
                side: Side::Q,
                index: 5,
                row: 2,
                col: 1,
                value,
                problem: Problem::Negative,
            } if value == -0.5
        ),
        "{err:?}"
    );
    let inf = narrow::<f16>(&[0.5, 70000.0]);
    let err = e.entropy(&inf).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidValue {
                index: 1,
                problem: Problem::Infinite,
                ..
            }
        ),
        "{err:?}: 70000 is beyond f16 and reads +∞"
    );
}

/// A storage buffer on `e`'s device holding 16-bit values, padded to whole words.
fn half_buffer<T: Element>(e: &klgpu::Engine, label: &str, data: &[T]) -> wgpu::Buffer {
    e.create_buffer_init(label, data).unwrap()
}

#[test]
fn invalid_values_in_16_bit_buffers_are_named_as_from_host_slices() {
    for seed in fuzz_seeds().unwrap_or(1..4) {
        invalid_values_named_as_from_host_slices::<f16>(seed);
        invalid_values_named_as_from_host_slices::<bf16>(seed);
    }
}

#[test]
fn half_buffers_at_any_element_offset_match_the_reference() {
    for e in every_path() {
        buffers_at_odd_offsets(e);
    }
}

fn buffers_at_odd_offsets(e: &klgpu::Engine) {
    let mut rng = rng(63);
    let (rows, cols) = (6, 333);
    for input in [Input::Probs, Input::Logits] {
        let (p, q) = pair(&mut rng, rows, cols, input, true);
        let (p, q) = (narrow::<bf16>(&p), narrow::<bf16>(&q));
        // One element of padding in front of P, none in front of Q: odd element offsets, and
        // P and Q at different offsets modulo 4.
        let mut padded = vec![bf16::from_f32(0.5)];
        padded.extend_from_slice(&p);
        let pb = half_buffer(e, "p", &padded);
        let qb = half_buffer(e, "q", &q);
        let out = e.create_f32_buffer("out", rows as u64).unwrap();
        let opts = Options {
            dtype: Dtype::BF16,
            ..Options::input(input)
        };
        let n = (rows * cols * 2) as u64;
        for m in Measure::ALL {
            let qs = m.uses_q().then(|| qb.slice(..n));
            e.rows_buffers(m, pb.slice(2..2 + n), qs, cols, &opts, out.slice(..))
                .unwrap();
            let got = read_f64(e, &out);
            let (wp, wq) = (widen(&p), widen(&q));
            let want = cpu::rows(m, &wp, m.uses_q().then_some(&wq[..]), cols, &opts).unwrap();
            assert_rows_close(&got, &want.values, &format!("bf16 buffers {m:?} {input:?}"));
        }
        // A bad value in a recording is found and read back from the 16-bit buffer.
        let mut bad = padded.clone();
        bad[1 + cols + 4] = bf16::from_f32(-2.0);
        let bb = half_buffer(e, "bad", &bad);
        let probs = Options {
            dtype: Dtype::BF16,
            ..Options::default()
        };
        if input == Input::Probs {
            let kl = Measure::KullbackLeibler;
            let (ps, qs) = (bb.slice(2..2 + n), Some(qb.slice(..n)));
            let err = recorded_rows(e, kl, ps, qs, cols, &probs, out.slice(..)).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::InvalidValue {
                        side: Side::P,
                        row: 1,
                        col: 4,
                        value,
                        problem: Problem::Negative,
                        ..
                    } if value == -2.0
                ),
                "{err:?}"
            );
        }
    }
}

#[test]
fn half_buffer_slices_must_be_whole_elements_and_words() {
    let e = engine();
    let b = half_buffer(e, "b", &narrow::<f16>(&[0.5; 8]));
    let opts = Options {
        dtype: Dtype::F16,
        ..Options::default()
    };
    let odd = e.divergence_buffers(Measure::Entropy, b.slice(1..9), None, &opts);
    assert!(
        matches!(odd, Err(Error::InvalidBuffer { name: "p", .. })),
        "{odd:?}"
    );
    let ragged = e.divergence_buffers(Measure::Entropy, b.slice(0..7), None, &opts);
    assert!(
        matches!(ragged, Err(Error::InvalidBuffer { name: "p", .. })),
        "{ragged:?}"
    );
    // Three f16 in a 6-byte buffer: the last word is not whole.
    let short = e.device().create_buffer(&wgpu::BufferDescriptor {
        label: Some("short"),
        size: 6,
        usage: wgpu::BufferUsages::STORAGE,
        mapped_at_creation: false,
    });
    let err = e.divergence_buffers(Measure::Entropy, short.slice(..), None, &opts);
    match err {
        Err(Error::InvalidBuffer { name: "p", reason }) => {
            assert!(reason.contains("multiple of 4 bytes"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // Whole words: 1.5 bits of entropy... H(¼,¼,½) = 1.5 ln 2 from a 3-element slice.
    let h = half_buffer(e, "h", &narrow::<f16>(&[0.25, 0.25, 0.5]));
    let got = e
        .divergence_buffers(Measure::Entropy, h.slice(..6), None, &opts)
        .unwrap();
    assert_close(got, 1.5 * std::f64::consts::LN_2, "entropy of three f16");
}

#[test]
fn an_odd_count_of_half_elements_is_padded_with_a_nan() {
    // A buffer holds whole words: three f16 logits took a zero pad, which `slice(..)` read as
    // a fourth logit (entropy of [1, 2, 3, 0]: 0.948 for 0.832). The pad is now a NaN, which
    // fails where it is read; the slice of the data alone is right.
    let e = engine();
    fn check<T: Element>(e: &klgpu::Engine, to: fn(f32) -> T) {
        let z: Vec<T> = [1.0f32, 2.0, 3.0].map(to).to_vec();
        let b = e.create_buffer_init("z", &z).unwrap();
        assert_eq!(b.size(), 8);
        let opts = Options {
            input: Input::Logits,
            dtype: T::DTYPE,
            ..Options::default()
        };
        let h = Measure::Entropy;
        let err = e
            .divergence_buffers(h, b.slice(..), None, &opts)
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidValue {
                    index: 3,
                    problem: Problem::NaN,
                    ..
                }
            ),
            "{:?}: {err}",
            T::DTYPE
        );
        let want = cpu::divergence(h, &widen(&z), None, &Options::input(Input::Logits)).unwrap();
        let got = e.divergence_buffers(h, b.slice(..6), None, &opts).unwrap();
        assert_close(got, want, "the data alone");
    }
    check(e, f16::from_f32);
    check(e, bf16::from_f32);
}
