//! # klgpu
//!
//! KL divergence, cross-entropy, entropy and Jensen–Shannon divergence on whatever GPU adapter
//! wgpu finds, with an f64 CPU reference ([`cpu`]) that uses the same conventions and errors.
//!
//! Each result is one fused pass over the data (KL and JS of logits, and of normalized rows
//! whose sums the one pass cannot prove close, first read each row for its log-sum-exp or
//! sum): a WGSL kernel validates every element, computes its term in a cancellation-free form
//! and reduces in parallel on the GPU (subgroup shuffles where available, shared memory
//! otherwise); the host reads back a few bytes.
//!
//! ```no_run
//! let engine = klgpu::Engine::new()?;
//! let p = [0.1f32, 0.2, 0.7];
//! let q = [0.3f32, 0.3, 0.4];
//! let kl = engine.kl_divergence(&p, &q)?;
//! let reference = klgpu::cpu::kl_divergence(&p, &q)?;
//! assert!((kl - reference).abs() <= 1e-5 * reference);
//! # Ok::<(), klgpu::Error>(())
//! ```
//!
//! ## Conventions
//! - Natural log (nats) unless [`Options::base`] says otherwise.
//! - As `scipy.special.rel_entr`: 0·log(0/q) = 0 (also for q = 0); p > 0 with q = 0 gives +∞
//!   for KL and cross-entropy. No epsilon clamping.
//! - Inputs are taken as given; [`Options::normalize`] divides each row by its sum first.
//! - Elements are f32, f16 or bf16 ([`Element`], [`Options::dtype`] for GPU buffers); 16-bit
//!   ones are widened to f32 exactly in the kernel, which reads half the bytes.
//! - Empty or mismatched inputs are errors ([`Error::EmptyInput`], [`Error::LengthMismatch`]);
//!   NaN, ±∞ or negative probabilities are errors that name the first offending index
//!   ([`Error::InvalidValue`]). The kernel raises flags while it
//!   computes; only then does the host look for the index.
//!
//! ## Precision
//! Against an exact evaluation of the same f32 inputs, results are within 1e-5 relative (1e-11
//! absolute where the value is below 1e-6) for rows that are distributions; identical inputs
//! give exactly 0. The README says how this is achieved and tested, and where it is looser:
//! KL of log-probabilities, rows whose sums differ or that are not distributions (terms of
//! both signs cancel), all-subnormal rows the kernel normalizes.
#![deny(missing_docs)]

mod buffers;
pub mod cpu;
mod engine;
mod error;
mod kernels;
mod launch;
pub mod plan;
pub mod stats;
mod types;

pub use buffers::Workspace;
pub use engine::{Engine, EngineOptions, Tuning, list_adapters, pick_adapter};
pub use error::{Error, Problem, Result, Side};
/// The half-precision types host slices may hold ([`Element`]).
pub use half;
pub use types::{Base, Dtype, Element, Input, Measure, Options, Reduction, RowResults};
/// The wgpu version klgpu is built on, so callers pass matching devices and buffers.
pub use wgpu;

/// Compiles the README's examples as doctests.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
