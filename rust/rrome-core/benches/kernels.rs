//! Criterion benchmarks of the pure-Rust kernels: the moment update, the Cholesky factor and
//! its solves, and the rank-one write kernel on f32 / bf16 buffers.
//!
//! `cargo bench -p rrome-core --bench kernels` (or `make bench-rust`). Sizes are kept small
//! enough for the whole set to run in about a minute on two cores; `benches/run.py` measures
//! the full-size comparisons against torch.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rrome_core::chol::Cholesky;
use rrome_core::dtype::{encode_f32, Dtype};
use rrome_core::moments::SecondMoment;
use rrome_core::rank_one::{apply, Term};

/// Deterministic pseudo-random values in [-1, 1) (no rand dependency).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// A well-conditioned SPD matrix B Bᵀ / d + I (row-major), like a blended C0.
fn spd(d: usize) -> Vec<f64> {
    let r = d / 4;
    let b: Vec<f64> = values(d * r, 7).into_iter().map(f64::from).collect();
    let mut a = vec![0f64; d * d];
    for i in 0..d {
        for j in 0..=i {
            let v: f64 = (0..r).map(|k| b[i * r + k] * b[j * r + k]).sum::<f64>() / d as f64;
            a[i * d + j] = v;
            a[j * d + i] = v;
        }
        a[i * d + i] += 1.0;
    }
    a
}

fn moments(c: &mut Criterion) {
    let mut g = c.benchmark_group("moments_update");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    let n = 4096;
    for d in [256, 1024] {
        let keys = values(n * d, d as u64);
        g.throughput(Throughput::Elements((n * d * d / 2) as u64)); // multiply-adds of the lower triangle
        g.bench_with_input(BenchmarkId::from_parameter(d), &keys, |bch, keys| {
            let mut m = SecondMoment::new(d).unwrap();
            bch.iter(|| m.update(black_box(keys)).unwrap());
        });
    }
    g.finish();
}

fn cholesky(c: &mut Criterion) {
    let mut g = c.benchmark_group("cholesky");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    for d in [512, 1024] {
        let a = spd(d);
        g.bench_with_input(BenchmarkId::new("factor", d), &a, |bch, a| {
            bch.iter(|| Cholesky::new(black_box(a), d, 0.0).unwrap());
        });
        let chol = Cholesky::new(&a, d, 0.0).unwrap();
        let rhs: Vec<f64> = values(d * 100, 3).into_iter().map(f64::from).collect();
        g.bench_with_input(BenchmarkId::new("solve_100_vectors", d), &rhs, |bch, rhs| {
            bch.iter(|| {
                for k in rhs.chunks(d) {
                    let mut x = k.to_vec();
                    chol.solve_in_place(&mut x, 1).unwrap();
                    black_box(x);
                }
            });
        });
        g.bench_with_input(BenchmarkId::new("solve_one_block_of_100", d), &rhs, |bch, rhs| {
            bch.iter(|| {
                let mut x = rhs.clone();
                chol.solve_in_place(&mut x, 100).unwrap();
                black_box(x);
            });
        });
    }
    g.finish();
}

fn rank_one(c: &mut Criterion) {
    let mut g = c.benchmark_group("rank_one_apply");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    // GPT-2 medium's c_proj in stored (in_out) layout: 4096 × 1024.
    let (rows, cols) = (4096, 1024);
    let old_f = values(rows * cols, 11);
    for dtype in [Dtype::F32, Dtype::BF16] {
        let mut old = vec![0u8; rows * cols * dtype.size()];
        encode_f32(dtype, &old_f, &mut old);
        let mut new = vec![0u8; old.len()];
        g.throughput(Throughput::Bytes(old.len() as u64));
        for n_terms in [1usize, 10] {
            let terms: Vec<Term> =
                (0..n_terms as u64).map(|t| Term { a: values(rows, 100 + t), b: values(cols, 200 + t) }).collect();
            let id = BenchmarkId::new(format!("{dtype}"), format!("{n_terms}_terms"));
            g.bench_function(id, |bch| {
                bch.iter(|| assert!(apply(dtype, rows, cols, black_box(&old), &terms, &mut new)));
            });
        }
    }
    g.finish();
}

criterion_group!(benches, moments, cholesky, rank_one);
criterion_main!(benches);
