//! The budget solver against the authors' greedy on their shipped norm files.
//!
//! `data/llama3.2-1b_{frobenius,spectral}_norm.json` are `kvq/assets/{frobenius,spectral}_norm/Llama3.2-1B.json`
//! from GitHub mohsenhariri/spectral-kv at commit e9ed4238 (the per-layer norms of W_K and W_V of Llama-3.2-1B).
//! The expected allocations below were computed by `data/greedy_reference.py`, an independent Python
//! reimplementation of the greedy described in the paper and in `kvq/bit_pattern.py`:
//!
//! ```text
//! cd crates/adaquant-cache/tests/data
//! python3 greedy_reference.py llama3.2-1b_frobenius_norm.json 4
//! python3 greedy_reference.py llama3.2-1b_spectral_norm.json 4
//! python3 greedy_reference.py llama3.2-1b_frobenius_norm.json 4 8 6 4 2 1.58 1
//! python3 greedy_reference.py llama3.2-1b_frobenius_norm.json 2 8 6 4 2 1.58 1
//! ```

use std::path::PathBuf;

use adaquant_cache::alloc::{BitBudget, Sensitivities, Solver};
use adaquant_cache::{CacheError, KvqConfig};
use adaquant_kernels::Bits;

fn norms(kind: &str) -> Sensitivities {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/data/llama3.2-1b_{kind}_norm.json"));
    Sensitivities::load_kvq(&p).unwrap()
}

fn bits(xs: &[f64]) -> Vec<Bits> {
    xs.iter().map(|&x| Bits::from_f64(x).unwrap()).collect()
}

fn solve(kind: &str, avg: f64, widths: Option<&[f64]>, solver: Solver) -> (Vec<Bits>, Vec<Bits>, f64) {
    let mut b = BitBudget::new(avg);
    b.solver = solver;
    if let Some(w) = widths {
        b.widths = bits(w);
    }
    let a = b.solve(&norms(kind)).unwrap();
    (a.k, a.v, a.avg_bits)
}

#[test]
fn reproduces_the_authors_greedy_at_budget_four() {
    for solver in [Solver::Greedy, Solver::GreedyExact] {
        let (k, v, avg) = solve("frobenius", 4.0, None, solver);
        assert_eq!(k, bits(&[6., 6., 6., 4., 4., 4., 6., 6., 6., 4., 4., 4., 4., 4., 4., 4.]));
        assert_eq!(v, bits(&[3., 3., 3., 3., 3., 3., 3., 3., 3., 3., 3., 3., 4., 4., 4., 4.]));
        assert_eq!(avg, 4.0);
        let (k, v, avg) = solve("spectral", 4.0, None, solver);
        assert_eq!(k, bits(&[6., 6., 6., 6., 6., 6., 6., 6., 6., 6., 6., 6., 6., 6., 4., 6.]));
        assert_eq!(v, bits(&[2., 2., 2., 2., 2., 2., 2., 2., 2., 2., 2., 2., 2., 2., 3., 3.]));
        assert_eq!(avg, 4.0);
        // The widths of the authors' evaluation runs.
        let (k, v, _) = solve("frobenius", 4.0, Some(&[8., 6., 4., 2., 1.58, 1.]), solver);
        assert_eq!(k, bits(&[6., 6., 4., 4., 4., 4., 4., 4., 4., 4., 4., 4., 4., 4., 4., 4.]));
        assert_eq!(v, bits(&[2., 2., 4., 4., 4., 4., 4., 4., 4., 4., 4., 4., 4., 4., 4., 4.]));
    }
}

#[test]
fn the_greedy_can_stop_short_and_the_default_spends_the_budget() {
    let w = [8., 6., 4., 2., 1.58, 1.];
    let (k, v, avg) = solve("frobenius", 2.0, Some(&w), Solver::Greedy);
    assert_eq!(k, bits(&[4., 4., 4., 2., 2., 2., 4., 2., 4., 2., 2., 2., 2., 2., 2., 2.]));
    assert_eq!(v, bits(&[1., 1., 1., 1.58, 1., 1., 1., 1.58, 1., 1.58, 1., 1.58, 1.58, 2., 2., 2.]));
    assert!((avg * 32.0 - 63.9).abs() < 1e-9, "{avg}");
    let (_, _, avg) = solve("frobenius", 2.0, Some(&w), Solver::GreedyExact);
    assert!((avg - 2.0).abs() < 1e-12);
    let mut b = BitBudget::new(2.0);
    b.widths = bits(&w);
    let greedy_err = {
        b.solver = Solver::Greedy;
        b.solve(&norms("frobenius")).unwrap().modeled_error
    };
    b.solver = Solver::Optimal;
    let opt = b.solve(&norms("frobenius")).unwrap();
    assert!(opt.modeled_error <= greedy_err * (1.0 + 1e-12));
    assert!(opt.avg_bits <= 2.0 + 1e-12);
}

#[test]
fn keys_get_more_bits_than_values_on_llama() {
    for kind in ["frobenius", "spectral"] {
        let (k, v, _) = solve(kind, 4.0, None, Solver::default());
        let ks: f64 = k.iter().map(|b| b.nominal()).sum();
        let vs: f64 = v.iter().map(|b| b.nominal()).sum();
        assert!(ks > vs, "{kind}: {ks} vs {vs}");
    }
}

#[test]
fn the_authors_config_shape_with_their_norms() {
    let n = norms("frobenius");
    let c = KvqConfig::from_json(r#"{"budget": 4, "residual_length": 64}"#).unwrap().to_config(16, Some(&n)).unwrap();
    let (k, v, _) = solve("frobenius", 4.0, None, Solver::Greedy);
    for (i, l) in c.layers.iter().enumerate() {
        assert_eq!(l.k.spec().unwrap().bits, k[i]);
        assert_eq!(l.v.spec().unwrap().bits, v[i]);
    }
    let err = BitBudget::new(0.5).solve(&n).unwrap_err();
    assert!(matches!(err, CacheError::Allocation(_)));
}
