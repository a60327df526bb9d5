use std::time::Instant;
use adaquant_cache::{CacheShape, FullPrecisionCache, KvCache};
fn main() {
    let (n, k, m) = (512, 576, 1536);
    let x: Vec<f32> = (0..n * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let w: Vec<f32> = (0..m * k).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
    let mut out = vec![0.0f32; n * m];
    let mut e: Vec<f32> = (0..700_000).map(|i| (i % 100) as f32 / 50.0 - 1.0).collect();
    let t = Instant::now();
    let s: f32 = e.iter().map(|v| v.exp()).sum();
    println!("exp 1M before matmul: {:.2} ms ({s})", t.elapsed().as_secs_f64() * 1e3);
    for _ in 0..2 {
        let t = Instant::now();
        adaquant_model::linalg::matmul_t(&x, n, k, &w, m, &mut out);
        let dt = t.elapsed().as_secs_f64();
        println!("matmul {n}x{k}x{m}: {:.2} ms = {:.1} GFLOP/s", dt * 1e3, 2.0 * (n * k * m) as f64 / dt / 1e9);
    }
    for par in [faer::Par::Seq, faer::Par::rayon(2)] {
        let t = Instant::now();
        for _ in 0..3 {
        faer::linalg::matmul::matmul(faer::MatMut::from_row_major_slice_mut(&mut out, n, m), faer::Accum::Replace,
            faer::MatRef::from_row_major_slice(&x, n, k), faer::MatRef::from_row_major_slice(&w, m, k).transpose(), 1.0f32, par);
        }
        let dt = t.elapsed().as_secs_f64() / 3.0;
        println!("faer {par:?}: {:.2} ms = {:.1} GFLOP/s", dt * 1e3, 2.0 * (n * k * m) as f64 / dt / 1e9);
    }
    let t = Instant::now();
    let s: f32 = e.iter().map(|v| v.exp()).sum();
    println!("exp 1M after matmul: {:.2} ms ({s})", t.elapsed().as_secs_f64() * 1e3);
    let t = Instant::now();
    adaquant_model::linalg::swiglu(&mut e, &out[..700_000]);
    println!("swiglu 1M: {:.2} ms", t.elapsed().as_secs_f64() * 1e3);
    let shape = CacheShape::new(1, 9, 3, 64, 512);
    let mut c = FullPrecisionCache::new(shape).unwrap();
    let q = vec![0.01f32; 512 * 576];
    let kv = vec![0.02f32; 512 * 192];
    let mut o = vec![0.0f32; 512 * 576];
    let t = Instant::now();
    c.append_attend(0, &q, &kv, &kv, &mut o).unwrap();
    println!("attention 512 tokens one layer: {:.2} ms", t.elapsed().as_secs_f64() * 1e3);
    let (n, k, m) = (1, 576, 1536);
    let t = Instant::now();
    for _ in 0..100 { adaquant_model::linalg::matmul_t(&x[..k], n, k, &w, m, &mut out[..m]); }
    let dt = t.elapsed().as_secs_f64() / 100.0;
    println!("matvec {k}x{m}: {:.3} ms = {:.1} GFLOP/s", dt * 1e3, 2.0 * (n * k * m) as f64 / dt / 1e9);
}
