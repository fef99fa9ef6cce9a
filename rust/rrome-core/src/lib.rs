//! rrome-core: the numeric and file half of rrome, with no Python in it.
//!
//! - [`moments`]: f64 second moments Σ k kᵀ of layer keys (ROME's C0), mergeable across workers.
//! - [`chol`]: Cholesky factorisation of C0, reused for every solve C0⁻¹ k.
//! - [`safetensors_header`], [`checkpoint`]: validated reading of safetensors files and model folders.
//! - [`square_file`]: reading the square F64 matrix files of the statistics and of C0's factor.
//! - [`deltas`], [`rank_one`]: rank-one deltas, their file format, and the write kernel.
//! - [`check`]: every problem of a batch of deltas against a checkpoint, each located.
//! - [`journal`], [`lock`], [`patch`]: crash-safe application, revert and recovery.
//!
//! The `rrome-py` crate exposes this to Python; the core is tested on its own with `cargo test`.

pub mod check;
pub mod checkpoint;
pub mod chol;
pub mod deltas;
pub mod dtype;
pub mod error;
pub mod fsutil;
pub mod journal;
pub mod lock;
pub mod moments;
pub mod patch;
pub mod rank_one;
pub mod safetensors_header;
pub mod square_file;
pub mod text;

pub use error::{Error, Result};
