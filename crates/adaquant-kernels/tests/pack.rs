//! Packing: round trips, fast against reference, ranges.

mod common;

use adaquant_kernels::pack::{pack, pack_ref, unpack, unpack_range, unpack_ref};
use adaquant_kernels::Bits;

const LENGTHS: [usize; 17] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 31, 37, 63, 65, 101, 1003];

#[test]
fn round_trip_every_width_and_awkward_length() {
    let mut rng = common::rng(1);
    for bits in Bits::ALL {
        for n in LENGTHS {
            let codes = common::codes(&mut rng, n, bits.levels());
            let mut a = vec![0xAAu8; bits.packed_bytes(n)];
            let mut b = vec![0x55u8; bits.packed_bytes(n)];
            pack_ref(bits, &codes, &mut a).unwrap();
            pack(bits, &codes, &mut b).unwrap();
            assert_eq!(a, b, "pack {bits} n={n}");
            let mut u = vec![0xFFu8; n];
            unpack_ref(bits, &a, n, &mut u).unwrap();
            assert_eq!(u, codes, "unpack_ref {bits} n={n}");
            let mut w = vec![0xFFu8; n];
            unpack(bits, &a, n, &mut w).unwrap();
            assert_eq!(w, codes, "unpack {bits} n={n}");
        }
    }
}

#[test]
fn stored_bits_are_dense() {
    for bits in Bits::ALL {
        let n = 40_000;
        let per_code = 8.0 * bits.packed_bytes(n) as f64 / n as f64;
        assert!((per_code - bits.stored_bits()).abs() < 1e-3, "{bits}: {per_code}");
        assert!(per_code <= bits.nominal().ceil(), "{bits}");
    }
}

#[test]
fn unpack_range_matches_slices() {
    let mut rng = common::rng(2);
    for bits in Bits::ALL {
        let n = 203;
        let codes = common::codes(&mut rng, n, bits.levels());
        let mut packed = vec![0u8; bits.packed_bytes(n)];
        pack(bits, &codes, &mut packed).unwrap();
        for start in [0, 1, 3, 5, 7, 8, 11, 64, 99, 200] {
            for len in [0, 1, 2, 3, 9, 17, 64] {
                if start + len > n {
                    continue;
                }
                let mut out = vec![0xEEu8; len];
                unpack_range(bits, &packed, start, &mut out);
                assert_eq!(out, &codes[start..start + len], "{bits} start={start} len={len}");
            }
        }
    }
}
