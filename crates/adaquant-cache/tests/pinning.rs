//! Pinning chosen layers to a width in the budget solver (e.g. first and last layer at 8 bits).

use adaquant_cache::{BitBudget, CacheError, Sensitivities};
use adaquant_kernels::format::Bits;

fn sens() -> Sensitivities {
    let k = vec![9.0, 3.0, 2.5, 4.0, 1.0, 7.0];
    let v = vec![1.0, 0.8, 1.2, 0.6, 0.9, 2.0];
    Sensitivities::new(k, v).unwrap()
}

#[test]
fn pinned_layers_keep_their_width_and_the_rest_is_solved_on_what_is_left() {
    let s = sens();
    let budget = BitBudget::new(4.0).pin(0, Bits::B8).pin(5, Bits::B8);
    let a = budget.solve(&s).unwrap();
    assert_eq!((a.k[0], a.v[0], a.k[5], a.v[5]), (Bits::B8, Bits::B8, Bits::B8, Bits::B8));
    assert!(a.avg_bits <= 4.0 + 1e-9, "{}", a.avg_bits);
    // The free layers get exactly what a budget over them alone, with the bits the pins leave, gives.
    let free = Sensitivities::new(vec![3.0, 2.5, 4.0, 1.0], vec![0.8, 1.2, 0.6, 0.9]).unwrap();
    let left = (2.0 * 6.0 * 4.0 - 4.0 * 8.0) / (2.0 * 4.0);
    let r = BitBudget::new(left).solve(&free).unwrap();
    assert_eq!(a.k[1..5], r.k[..]);
    assert_eq!(a.v[1..5], r.v[..]);
    // Without pins the solver would not have spent 8 bits on layer 5's values.
    let unpinned = BitBudget::new(4.0).solve(&s).unwrap();
    assert_ne!(unpinned.v[5], Bits::B8);
}

#[test]
fn impossible_pins_are_errors() {
    let s = sens();
    let e = BitBudget::new(2.0).pin(0, Bits::B8).pin(1, Bits::B8).pin(2, Bits::B8).solve(&s).unwrap_err();
    assert!(matches!(e, CacheError::Allocation(ref m) if m.contains("pinned")), "{e}");
    let e = BitBudget::new(4.0).pin(6, Bits::B8).solve(&s).unwrap_err();
    assert!(matches!(e, CacheError::Allocation(ref m) if m.contains("layer 6")), "{e}");
    // Pinning a layer twice keeps the last width.
    let a = BitBudget::new(4.0).pin(2, Bits::B2).pin(2, Bits::B6).solve(&s).unwrap();
    assert_eq!((a.k[2], a.v[2]), (Bits::B6, Bits::B6));
}
