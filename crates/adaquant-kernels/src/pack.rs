//! Dense packing of low-bit codes into byte streams, in the element and bit order documented in [`crate::format`].
//!
//! Every function comes in a pair: `*_ref` is the obviously correct scalar loop over single codes; the plain name is
//! the fast twin, specialised per width (whole packing units of 8 codes in `b` bytes, or 5 ternary codes per byte
//! through a lookup table). Both produce bit-identical streams; the tests compare them on awkward lengths.

use crate::error::{Error, Result};
use crate::format::Bits;

/// Powers of three, the weights of the five base-3 digits of a 1.58-bit byte.
pub const POW3: [u8; 5] = [1, 3, 9, 27, 81];

/// The five ternary digits of every byte value: `TERNARY_DIGITS[byte][k] = (byte / 3^k) % 3`.
pub static TERNARY_DIGITS: [[u8; 5]; 256] = ternary_table();

const fn ternary_table() -> [[u8; 5]; 256] {
    let mut t = [[0u8; 5]; 256];
    let mut b = 0;
    while b < 256 {
        let mut k = 0;
        while k < 5 {
            t[b][k] = ((b / POW3[k] as usize) % 3) as u8;
            k += 1;
        }
        b += 1;
    }
    t
}

fn check_pack(bits: Bits, codes: &[u8], out: &[u8]) -> Result<()> {
    let expected = bits.packed_bytes(codes.len());
    if out.len() != expected {
        return Err(Error::ShapeMismatch { what: "packed output bytes", expected, got: out.len() });
    }
    let max = bits.max_code();
    if let Some(index) = codes.iter().position(|&c| c > max) {
        return Err(Error::CodeOutOfRange { code: codes[index], index, bits });
    }
    Ok(())
}

fn check_unpack(bits: Bits, packed: &[u8], n: usize, out: &[u8]) -> Result<()> {
    if out.len() != n {
        return Err(Error::ShapeMismatch { what: "unpacked output codes", expected: n, got: out.len() });
    }
    let need = bits.packed_bytes(n);
    if packed.len() < need {
        return Err(Error::ShapeMismatch { what: "packed input bytes", expected: need, got: packed.len() });
    }
    Ok(())
}

/// Reads code `i` of a packed stream, one code at a time (the reference definition of the bit order).
#[inline]
pub fn code_at(bits: Bits, packed: &[u8], i: usize) -> u8 {
    match bits {
        Bits::B1_58 => (packed[i / 5] / POW3[i % 5]) % 3,
        _ => {
            let b = bits.nominal() as usize;
            let bit = i * b;
            let byte = bit / 8;
            let shift = bit % 8;
            let lo = packed[byte] as u16;
            let hi = if shift + b > 8 { (packed[byte + 1] as u16) << 8 } else { 0 };
            (((lo | hi) >> shift) & ((1u16 << b) - 1)) as u8
        }
    }
}

/// Writes code `i` into a packed stream whose bits for code `i` are still zero.
#[inline]
fn or_code_at(bits: Bits, packed: &mut [u8], i: usize, c: u8) {
    match bits {
        Bits::B1_58 => packed[i / 5] += c * POW3[i % 5],
        _ => {
            let b = bits.nominal() as usize;
            let bit = i * b;
            let byte = bit / 8;
            let shift = bit % 8;
            let v = (c as u16) << shift;
            packed[byte] |= v as u8;
            if shift + b > 8 {
                packed[byte + 1] |= (v >> 8) as u8;
            }
        }
    }
}

/// Keeps the first `n` codes of a packed stream: drops the bytes past them and zeroes the bits of later codes in
/// the last byte kept, so the stream is byte for byte what packing only those `n` codes gives.
pub(crate) fn truncate_codes(bits: Bits, packed: &mut Vec<u8>, n: usize) {
    packed.truncate(bits.packed_bytes(n));
    match bits {
        Bits::B1_58 => {
            if !n.is_multiple_of(5) {
                packed[n / 5] %= POW3[n % 5];
            }
        }
        _ => {
            let bit = n * bits.nominal() as usize;
            if !bit.is_multiple_of(8) {
                packed[bit / 8] &= (1u8 << (bit % 8)) - 1;
            }
        }
    }
}

/// Packs `codes` (each below `bits.levels()`) into `out`, which must hold exactly `bits.packed_bytes(codes.len())`
/// bytes. Reference twin of [`pack`]: one code at a time.
pub fn pack_ref(bits: Bits, codes: &[u8], out: &mut [u8]) -> Result<()> {
    check_pack(bits, codes, out)?;
    out.fill(0);
    for (i, &c) in codes.iter().enumerate() {
        or_code_at(bits, out, i, c);
    }
    Ok(())
}

/// Unpacks the first `n` codes of `packed` (at least `bits.packed_bytes(n)` bytes) into `out` (`n` codes).
/// Reference twin of [`unpack`]: one code at a time.
pub fn unpack_ref(bits: Bits, packed: &[u8], n: usize, out: &mut [u8]) -> Result<()> {
    check_unpack(bits, packed, n, out)?;
    for (i, o) in out.iter_mut().enumerate() {
        *o = code_at(bits, packed, i);
    }
    Ok(())
}

/// Packs `codes` into `out` (exactly `bits.packed_bytes(codes.len())` bytes); fast twin of [`pack_ref`].
pub fn pack(bits: Bits, codes: &[u8], out: &mut [u8]) -> Result<()> {
    check_pack(bits, codes, out)?;
    pack_unchecked(bits, codes, out);
    Ok(())
}

/// Unpacks the first `n` codes of `packed` into `out`; fast twin of [`unpack_ref`].
pub fn unpack(bits: Bits, packed: &[u8], n: usize, out: &mut [u8]) -> Result<()> {
    check_unpack(bits, packed, n, out)?;
    unpack_unchecked(bits, packed, out);
    Ok(())
}

/// Unpacks codes `start .. start + out.len()` of a packed stream into `out`.
///
/// # Panics
///
/// Panics if `packed` holds fewer than `start + out.len()` codes; callers pass ranges of streams they own.
pub fn unpack_range(bits: Bits, packed: &[u8], start: usize, out: &mut [u8]) {
    let (unit_codes, unit_bytes) = bits.unit();
    assert!(
        packed.len() >= bits.packed_bytes(start + out.len()),
        "unpack_range: codes {start}..{} are past the end of a {}-byte stream",
        start + out.len(),
        packed.len()
    );
    // Codes before the first unit boundary are read one at a time, the rest as whole units.
    let head = ((unit_codes - start % unit_codes) % unit_codes).min(out.len());
    for (k, o) in out[..head].iter_mut().enumerate() {
        *o = code_at(bits, packed, start + k);
    }
    let aligned = start + head;
    unpack_unchecked(bits, &packed[aligned / unit_codes * unit_bytes..], &mut out[head..]);
}

/// Packs `codes` into `packed` starting at code index `start`; the stream's bits from `start` on must be zero
/// (as they are in freshly grown storage). `packed` must hold `bits.packed_bytes(start + codes.len())` bytes.
pub(crate) fn pack_at(bits: Bits, packed: &mut [u8], start: usize, codes: &[u8], fast: bool) {
    let (unit_codes, unit_bytes) = bits.unit();
    debug_assert!(packed.len() >= bits.packed_bytes(start + codes.len()));
    let head = if fast { ((unit_codes - start % unit_codes) % unit_codes).min(codes.len()) } else { codes.len() };
    for (k, &c) in codes[..head].iter().enumerate() {
        or_code_at(bits, packed, start + k, c);
    }
    if head < codes.len() {
        let aligned = start + head;
        let rest = &codes[head..];
        let from = aligned / unit_codes * unit_bytes;
        let to = from + bits.packed_bytes(rest.len());
        pack_unchecked(bits, rest, &mut packed[from..to]);
    }
}

/// Fast packing without checks; `out.len() == bits.packed_bytes(codes.len())`.
pub(crate) fn pack_unchecked(bits: Bits, codes: &[u8], out: &mut [u8]) {
    match bits {
        Bits::B1_58 => pack_ternary(codes, out),
        Bits::B1 => pack_units::<1>(codes, out),
        Bits::B2 => pack_units::<2>(codes, out),
        Bits::B3 => pack_units::<3>(codes, out),
        Bits::B4 => pack_units::<4>(codes, out),
        Bits::B5 => pack_units::<5>(codes, out),
        Bits::B6 => pack_units::<6>(codes, out),
        Bits::B8 => out.copy_from_slice(codes),
    }
}

/// Fast unpacking without checks: `out.len()` codes from the start of `packed`.
pub(crate) fn unpack_unchecked(bits: Bits, packed: &[u8], out: &mut [u8]) {
    match bits {
        Bits::B1_58 => unpack_ternary(packed, out),
        Bits::B1 => unpack_units::<1>(packed, out),
        Bits::B2 => unpack_units::<2>(packed, out),
        Bits::B3 => unpack_units::<3>(packed, out),
        Bits::B4 => unpack_units::<4>(packed, out),
        Bits::B5 => unpack_units::<5>(packed, out),
        Bits::B6 => unpack_units::<6>(packed, out),
        Bits::B8 => {
            let n = out.len();
            out.copy_from_slice(&packed[..n]);
        }
    }
}

/// Packs whole units of 8 codes into `B` bytes through one 64-bit word, then the partial last unit.
#[inline]
fn pack_units<const B: usize>(codes: &[u8], out: &mut [u8]) {
    let full = codes.len() / 8;
    for (c, o) in codes.chunks_exact(8).zip(out.chunks_exact_mut(B)) {
        let mut w = 0u64;
        for k in 0..8 {
            w |= (c[k] as u64) << (k * B);
        }
        o.copy_from_slice(&w.to_le_bytes()[..B]);
    }
    let rest = &codes[full * 8..];
    if !rest.is_empty() {
        let mut w = 0u64;
        for (k, &c) in rest.iter().enumerate() {
            w |= (c as u64) << (k * B);
        }
        let tail = &mut out[full * B..];
        let len = tail.len();
        tail.copy_from_slice(&w.to_le_bytes()[..len]);
    }
}

/// Unpacks whole units of 8 codes from `B` bytes through one 64-bit word, then the partial last unit.
#[inline]
fn unpack_units<const B: usize>(packed: &[u8], out: &mut [u8]) {
    let mask = (1u64 << B) - 1;
    let full = out.len() / 8;
    for (o, p) in out.chunks_exact_mut(8).zip(packed.chunks_exact(B)) {
        let mut w = [0u8; 8];
        w[..B].copy_from_slice(p);
        let w = u64::from_le_bytes(w);
        for k in 0..8 {
            o[k] = ((w >> (k * B)) & mask) as u8;
        }
    }
    let rest = &mut out[full * 8..];
    if !rest.is_empty() {
        let bytes = (rest.len() * B).div_ceil(8);
        let mut w = [0u8; 8];
        w[..bytes].copy_from_slice(&packed[full * B..full * B + bytes]);
        let w = u64::from_le_bytes(w);
        for (k, o) in rest.iter_mut().enumerate() {
            *o = ((w >> (k * B)) & mask) as u8;
        }
    }
}

#[inline]
fn pack_ternary(codes: &[u8], out: &mut [u8]) {
    let full = codes.len() / 5;
    for (c, o) in codes.chunks_exact(5).zip(out.iter_mut()) {
        *o = c[0] + 3 * c[1] + 9 * c[2] + 27 * c[3] + 81 * c[4];
    }
    let rest = &codes[full * 5..];
    if !rest.is_empty() {
        out[full] = rest.iter().zip(POW3).map(|(&c, p)| c * p).sum();
    }
}

#[inline]
fn unpack_ternary(packed: &[u8], out: &mut [u8]) {
    let full = out.len() / 5;
    for (o, &b) in out.chunks_exact_mut(5).zip(packed) {
        o.copy_from_slice(&TERNARY_DIGITS[b as usize]);
    }
    let rest = &mut out[full * 5..];
    if !rest.is_empty() {
        let n = rest.len();
        rest.copy_from_slice(&TERNARY_DIGITS[packed[full] as usize][..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_at_matches_documented_order() {
        // Codes 1, 2, 3 at 2 bits: byte 0 = 1 | 2 << 2 | 3 << 4.
        let mut out = [0u8; 1];
        pack_ref(Bits::B2, &[1, 2, 3], &mut out).unwrap();
        assert_eq!(out[0], 1 | (2 << 2) | (3 << 4));
        // A 3-bit code straddling bytes: code 2 occupies bits 6..9.
        let mut out = [0u8; 2];
        pack_ref(Bits::B3, &[0, 0, 5], &mut out).unwrap();
        assert_eq!(out, [(5 << 6) as u8, 5 >> 2]);
        let mut out = [0u8; 2];
        pack_ref(Bits::B1_58, &[2, 1, 0, 0, 1, 2], &mut out).unwrap();
        assert_eq!(out, [2 + 3 + 81, 2]);
    }

    #[test]
    fn bad_input_is_an_error() {
        let mut out = [0u8; 1];
        assert!(matches!(pack_ref(Bits::B2, &[4], &mut out), Err(Error::CodeOutOfRange { code: 4, .. })));
        assert!(matches!(pack(Bits::B1_58, &[3], &mut out), Err(Error::CodeOutOfRange { code: 3, .. })));
        assert!(matches!(pack(Bits::B4, &[1, 2, 3], &mut out), Err(Error::ShapeMismatch { .. })));
        let mut codes = [0u8; 3];
        assert!(matches!(unpack(Bits::B4, &[0u8; 1], 3, &mut codes), Err(Error::ShapeMismatch { .. })));
    }
}
