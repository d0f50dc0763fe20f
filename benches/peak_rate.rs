//! The CPU's own multiply-add peak, for the linear benchmarks' "of peak"
//! figures: independent chains of float32 FMAs (`vfmadd231ps`) and, where the
//! CPU has AVX512_BF16, of bfloat16 dot products (`vdpbf16ps`), on one
//! thread and on every thread at once. No memory is touched.
//!
//!     rustc -O -C target-cpu=native benches/peak_rate.rs -o /tmp/peak_rate && /tmp/peak_rate
//!
//! GFLOP/s count a multiply-add as two operations.

#[cfg(target_arch = "x86_64")]
mod peak {
    use std::arch::x86_64::*;

    /// Instructions per chain step: more chains than the latency × issue rate.
    const CHAINS: usize = 16;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma(steps: usize) -> f32 {
        let b = _mm512_set1_ps(1e-9);
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..steps {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(b, b, *a);
            }
        }
        acc.iter().fold(0.0, |s, &a| s + _mm512_reduce_add_ps(a))
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn dot(steps: usize) -> f32 {
        let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3000_3000));
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..steps {
            for a in acc.iter_mut() {
                *a = _mm512_dpbf16_ps(*a, b, b);
            }
        }
        acc.iter().fold(0.0, |s, &a| s + _mm512_reduce_add_ps(a))
    }

    /// GFLOP/s of `kernel` on `threads` threads at once (`flops` per
    /// instruction): the best of 5 runs of about a second.
    pub fn rate(kernel: unsafe fn(usize) -> f32, flops: f64, threads: usize) -> f64 {
        let steps = 200_000_000 / CHAINS * 16;
        let once = || {
            let start = std::time::Instant::now();
            std::thread::scope(|s| {
                for _ in 0..threads {
                    // SAFETY: called only after the features were detected.
                    s.spawn(|| std::hint::black_box(unsafe { kernel(steps) }));
                }
            });
            let secs = start.elapsed().as_secs_f64();
            threads as f64 * (steps * CHAINS) as f64 * flops / secs / 1e9
        };
        (0..5).map(|_| once()).fold(0.0, f64::max)
    }
}

#[cfg(target_arch = "x86_64")]
fn main() {
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    if !is_x86_feature_detected!("avx512f") {
        println!("no AVX-512F: nothing measured");
        return;
    }
    for threads in [1, all] {
        let f = peak::rate(peak::fma, 32.0, threads);
        print!("{threads} thread(s): float32 FMA {f:.1} GFLOP/s");
        if is_x86_feature_detected!("avx512bf16") {
            let d = peak::rate(peak::dot, 64.0, threads);
            print!(", bfloat16 dot {d:.1} GFLOP/s");
        }
        println!();
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("x86-64 only");
}
