//! Bit widths, group layouts and the exact byte accounting of packed KV streams.
//!
//! A packed stream holds the codes of one KV head of one layer (keys or values) as a dense bit stream in a fixed
//! element order (see [`GroupAxis`]). Widths 1, 2, 3, 4, 5, 6 and 8 store exactly that many bits per code: every run
//! of 8 codes occupies exactly `bits` bytes, least significant bits first. Width 1.58 (three levels) stores five
//! base-3 digits per byte (3^5 = 243 <= 256), that is 1.6 bits per code. Nothing is padded to a wider container.
//!
//! Bit order: code `i` of a stream occupies bits `i * b .. (i + 1) * b` of the stream read as one little-endian
//! integer (least significant bits first, a code may straddle a byte boundary for b = 3, 5, 6). For 1.58, code `i`
//! is base-3 digit `i % 5` of byte `i / 5`: `byte = c0 + 3 c1 + 9 c2 + 27 c3 + 81 c4`.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// A packed bit width. Invalid widths cannot be constructed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Bits {
    B1,
    /// Three levels (ternary), five codes per byte.
    B1_58,
    B2,
    B3,
    B4,
    B5,
    B6,
    B8,
}

impl Bits {
    /// Every packed width, narrowest first.
    pub const ALL: [Bits; 8] = [Bits::B1, Bits::B1_58, Bits::B2, Bits::B3, Bits::B4, Bits::B5, Bits::B6, Bits::B8];

    /// Number of quantization levels (2^b, or 3 for 1.58).
    pub const fn levels(self) -> u32 {
        match self {
            Bits::B1 => 2,
            Bits::B1_58 => 3,
            Bits::B2 => 4,
            Bits::B3 => 8,
            Bits::B4 => 16,
            Bits::B5 => 32,
            Bits::B6 => 64,
            Bits::B8 => 256,
        }
    }

    /// Largest code, `levels - 1`.
    pub const fn max_code(self) -> u8 {
        (self.levels() - 1) as u8
    }

    /// The nominal width as people write it (1.58 for ternary).
    pub const fn nominal(self) -> f64 {
        match self {
            Bits::B1 => 1.0,
            Bits::B1_58 => 1.58,
            Bits::B2 => 2.0,
            Bits::B3 => 3.0,
            Bits::B4 => 4.0,
            Bits::B5 => 5.0,
            Bits::B6 => 6.0,
            Bits::B8 => 8.0,
        }
    }

    /// Stored bits per code in a long stream (1.6 for ternary, the nominal width otherwise).
    pub const fn stored_bits(self) -> f64 {
        match self {
            Bits::B1_58 => 1.6,
            b => b.nominal(),
        }
    }

    /// Codes per packing unit and bytes per packing unit: 8 codes in `b` bytes, or 5 ternary codes in 1 byte.
    pub const fn unit(self) -> (usize, usize) {
        match self {
            Bits::B1_58 => (5, 1),
            Bits::B1 => (8, 1),
            Bits::B2 => (8, 2),
            Bits::B3 => (8, 3),
            Bits::B4 => (8, 4),
            Bits::B5 => (8, 5),
            Bits::B6 => (8, 6),
            Bits::B8 => (8, 8),
        }
    }

    /// Bytes of a dense stream of `n_codes` codes (the last unit may be partial and is rounded up to whole bytes).
    pub const fn packed_bytes(self, n_codes: usize) -> usize {
        match self {
            Bits::B1_58 => n_codes.div_ceil(5),
            b => (n_codes * (b.nominal() as usize)).div_ceil(8),
        }
    }

    /// Parses a width from a number such as `4` or `1.58` (also accepts 1.6 for ternary).
    pub fn from_f64(x: f64) -> Result<Bits> {
        let close = |a: f64| (x - a).abs() < 1e-6;
        Ok(if close(1.0) {
            Bits::B1
        } else if close(1.58) || close(1.6) || close(1.585) {
            Bits::B1_58
        } else if close(2.0) {
            Bits::B2
        } else if close(3.0) {
            Bits::B3
        } else if close(4.0) {
            Bits::B4
        } else if close(5.0) {
            Bits::B5
        } else if close(6.0) {
            Bits::B6
        } else if close(8.0) {
            Bits::B8
        } else {
            return Err(Error::UnsupportedBits { got: x.to_string() });
        })
    }

    /// Stable lower-case name used in file names and JSON (`"1"`, `"1.58"`, ..., `"8"`).
    pub const fn name(self) -> &'static str {
        match self {
            Bits::B1 => "1",
            Bits::B1_58 => "1.58",
            Bits::B2 => "2",
            Bits::B3 => "3",
            Bits::B4 => "4",
            Bits::B5 => "5",
            Bits::B6 => "6",
            Bits::B8 => "8",
        }
    }
}

impl fmt::Display for Bits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Bits {
    type Err = Error;
    fn from_str(s: &str) -> Result<Bits> {
        let x: f64 = s.trim().parse().map_err(|_| Error::UnsupportedBits { got: s.to_string() })?;
        Bits::from_f64(x)
    }
}

impl TryFrom<f64> for Bits {
    type Error = Error;
    fn try_from(x: f64) -> Result<Bits> {
        Bits::from_f64(x)
    }
}

// Serialized as a JSON number (4, 1.58), the way people write widths in configs.
impl Serialize for Bits {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            Bits::B1_58 => s.serialize_f64(1.58),
            b => s.serialize_u64(b.nominal() as u64),
        }
    }
}

impl<'de> Deserialize<'de> for Bits {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Bits, D::Error> {
        let x = f64::deserialize(d)?;
        Bits::from_f64(x).map_err(serde::de::Error::custom)
    }
}

/// Which elements share a group's scale and minimum.
///
/// Element order of a packed stream (one KV head; `d` = head_dim, `G` = group size):
/// - `PerToken`: token-major; element (t, c) sits at `t * d + c`; a group is `G` consecutive channels of one token,
///   with metadata index `t * (d / G) + c / G`. This is the authors' HQQ `axis=1` layout.
/// - `PerChannel`: blocks of `G` tokens; inside a block channel-major; element (t, c) sits at
///   `(t / G) * G * d + c * G + t % G`; a group is `G` consecutive tokens of one channel, with metadata index
///   `(t / G) * d + c`. This is KIVI's key layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupAxis {
    PerToken,
    PerChannel,
}

impl fmt::Display for GroupAxis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GroupAxis::PerToken => "per_token",
            GroupAxis::PerChannel => "per_channel",
        })
    }
}

impl FromStr for GroupAxis {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "per_token" | "token" | "tok" => Ok(GroupAxis::PerToken),
            "per_channel" | "channel" | "chan" => Ok(GroupAxis::PerChannel),
            other => Err(format!("unknown group axis '{other}': use per-token or per-channel")),
        }
    }
}

/// Storage type of the per-group scale and minimum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetaDtype {
    #[default]
    F16,
    F32,
}

impl MetaDtype {
    /// Bytes of one scale or one minimum.
    pub const fn bytes(self) -> usize {
        match self {
            MetaDtype::F16 => 2,
            MetaDtype::F32 => 4,
        }
    }
}

/// How the zero point (group minimum) is chosen.
///
/// In JSON: `{"kind": "min_max"}`, or `{"kind": "hqq"}` with any of `iters`, `p`, `beta` and `kappa`; a missing
/// parameter takes the authors' default ([`ZeroPoint::HQQ`]).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ZeroPoint {
    /// Plain min-max: scale = (max - min) / (levels - 1), min = group minimum.
    #[default]
    MinMax,
    /// HQQ-style refinement of the zero point by half-quadratic iterations on an lp (p < 1) error.
    Hqq {
        #[serde(default = "hqq_default_iters")]
        iters: u32,
        #[serde(default = "hqq_default_p")]
        p: f32,
        #[serde(default = "hqq_default_beta")]
        beta: f32,
        #[serde(default = "hqq_default_kappa")]
        kappa: f32,
    },
}

fn hqq_default_iters() -> u32 {
    20
}
fn hqq_default_p() -> f32 {
    0.7
}
fn hqq_default_beta() -> f32 {
    10.0
}
fn hqq_default_kappa() -> f32 {
    1.01
}

impl ZeroPoint {
    /// HQQ with the authors' defaults (`mobiusml/hqq`, `optimize_weights_proximal`; the settings of the paper's
    /// cache): 20 iterations, lp norm p = 0.7, beta = 10, beta multiplied by kappa = 1.01 after each iteration.
    pub const HQQ: ZeroPoint = ZeroPoint::Hqq { iters: 20, p: 0.7, beta: 10.0, kappa: 1.01 };

    /// Whether this is HQQ (any parameters).
    pub fn is_hqq(&self) -> bool {
        matches!(self, ZeroPoint::Hqq { .. })
    }
}

/// The reconstruction levels of a group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Levels {
    /// Evenly spaced levels `min + code * scale` (a scale and a minimum per group).
    #[default]
    Uniform,
    /// The Lloyd-Max levels of a unit Gaussian times the group's RMS, `scale * L[code]` (one scale per group, no
    /// minimum); widths 1, 1.58, 2, 3 and 4. Meant for rotated data, whose coordinates are close to Gaussian.
    /// See [`crate::quant::codebook`].
    LloydMax,
}

impl Levels {
    /// Whether these are the uniform levels (the default, left out of JSON).
    pub fn is_uniform(&self) -> bool {
        *self == Levels::Uniform
    }
}

/// A fixed orthogonal transform applied to every token of a stream before it is quantized: a random +-1 diagonal
/// from `seed` followed by a normalised Walsh-Hadamard transform (see [`crate::rotate`]). The packed stream holds
/// rotated values; whoever holds it (the cache) rotates tokens on the way in, rotates queries to match keys, and
/// rotates attention outputs back for values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rotation {
    /// Base seed of the sign patterns; the cache derives one pattern per layer, side and KV head from it.
    #[serde(default)]
    pub seed: u64,
}

/// A complete quantization recipe for one stream: width, group size, group axis, metadata type, zero point.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantSpec {
    pub bits: Bits,
    pub group: usize,
    pub axis: GroupAxis,
    #[serde(default)]
    pub meta: MetaDtype,
    #[serde(default)]
    pub zero: ZeroPoint,
    /// Uniform (min-max or HQQ) or Lloyd-Max levels.
    #[serde(default, skip_serializing_if = "Levels::is_uniform")]
    pub levels: Levels,
    /// Rotation of each token before quantization (`None`: quantize the values as they are).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<Rotation>,
}

impl QuantSpec {
    /// A min-max spec with f16 metadata.
    pub fn new(bits: Bits, group: usize, axis: GroupAxis) -> QuantSpec {
        QuantSpec {
            bits,
            group,
            axis,
            meta: MetaDtype::F16,
            zero: ZeroPoint::MinMax,
            levels: Levels::Uniform,
            rotation: None,
        }
    }

    /// Whether groups store Lloyd-Max levels (one scale per group, no minimum).
    pub fn is_codebook(&self) -> bool {
        self.levels == Levels::LloydMax
    }

    /// Metadata entries per group: a scale and a minimum, or one scale for Lloyd-Max levels.
    pub fn metas_per_group(&self) -> usize {
        if self.is_codebook() {
            1
        } else {
            2
        }
    }

    /// Number of stored minimums for `tokens` tokens of one head (none for Lloyd-Max levels).
    pub fn n_mins(&self, tokens: usize, head_dim: usize) -> usize {
        if self.is_codebook() {
            0
        } else {
            self.n_groups(tokens, head_dim)
        }
    }

    /// Checks that the group size works with this head dimension.
    /// Per-channel groups span tokens, so only a zero group is rejected here; the cache checks its window.
    pub fn validate(&self, head_dim: usize) -> Result<()> {
        if self.group == 0 {
            return Err(Error::ZeroGroup);
        }
        if self.is_codebook() {
            if crate::quant::codebook::levels(self.bits).is_none() {
                return Err(Error::Unsupported {
                    what: format!("Lloyd-Max levels at {} bits", self.bits),
                    hint: "Lloyd-Max codebooks exist for widths 1, 1.58, 2, 3 and 4",
                });
            }
            if self.zero.is_hqq() {
                return Err(Error::Unsupported {
                    what: "an HQQ zero point with Lloyd-Max levels".into(),
                    hint: "Lloyd-Max groups have a scale and no zero point; use min-max (the default) with them",
                });
            }
        }
        if let Some(r) = self.rotation {
            crate::rotate::block_size(head_dim).map_err(|_| Error::RotationSize { head_dim, seed: r.seed })?;
        }
        if self.axis == GroupAxis::PerToken && !head_dim.is_multiple_of(self.group) {
            return Err(Error::GroupDoesNotDivide {
                group: self.group,
                len: head_dim,
                what: "head_dim",
                axis: self.axis,
            });
        }
        Ok(())
    }

    /// The smallest positive number of tokens at which a stream of this spec can be cut from the front: a whole
    /// number of groups (per-channel groups span tokens) whose codes end on a byte of the packed stream (1.58-bit
    /// codes come five to a byte, so a 64-channel token does not end on one). [`crate::quant::PackedView::try_suffix`]
    /// and [`crate::quant::PackedStream::drop_front`] cut at multiples of it.
    pub fn token_align(&self, head_dim: usize) -> usize {
        let base = match self.axis {
            GroupAxis::PerChannel => self.group.max(1),
            GroupAxis::PerToken => 1,
        };
        let (unit, _) = self.bits.unit();
        let elems = base * head_dim.max(1);
        base * (unit / gcd(elems, unit))
    }

    /// Number of groups (metadata entries) for `tokens` tokens of one head.
    /// For `PerChannel`, `tokens` must be a multiple of the group size.
    pub fn n_groups(&self, tokens: usize, head_dim: usize) -> usize {
        tokens * head_dim / self.group
    }

    /// Exact bytes of `tokens` quantized tokens of `heads` KV heads: codes (one dense stream per head) plus
    /// a scale and a minimum per group (only a scale for Lloyd-Max levels). A rotation adds nothing: its signs
    /// come from the seed.
    pub fn bytes(&self, tokens: usize, heads: usize, head_dim: usize) -> usize {
        let per_head = self.bits.packed_bytes(tokens * head_dim)
            + self.metas_per_group() * self.meta.bytes() * self.n_groups(tokens, head_dim);
        heads * per_head
    }
}

/// Greatest common divisor (`gcd(a, 0) = a`).
pub(crate) fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_parse_and_print() {
        for b in Bits::ALL {
            assert_eq!(b.name().parse::<Bits>().unwrap(), b);
            let json = serde_json_like(b);
            assert_eq!(Bits::from_f64(json).unwrap(), b);
        }
        assert!("7".parse::<Bits>().is_err());
        assert!("16".parse::<Bits>().is_err());
        assert!("x".parse::<Bits>().is_err());
    }

    fn serde_json_like(b: Bits) -> f64 {
        b.nominal()
    }

    #[test]
    fn packed_bytes_are_dense() {
        assert_eq!(Bits::B1_58.packed_bytes(10), 2);
        assert_eq!(Bits::B1_58.packed_bytes(11), 3);
        assert_eq!(Bits::B3.packed_bytes(8), 3);
        assert_eq!(Bits::B3.packed_bytes(9), 4);
        assert_eq!(Bits::B5.packed_bytes(64), 40);
        assert_eq!(Bits::B6.packed_bytes(4), 3);
        for b in Bits::ALL {
            let (codes, bytes) = b.unit();
            assert_eq!(b.packed_bytes(codes * 1000), bytes * 1000, "{b}");
        }
    }

    #[test]
    fn k4v2_group64_f16_is_three_and_a_half_bits() {
        let k = QuantSpec::new(Bits::B4, 64, GroupAxis::PerChannel);
        let v = QuantSpec::new(Bits::B2, 64, GroupAxis::PerToken);
        let (t, h, d) = (1024, 3, 64);
        let bits = 8.0 * (k.bytes(t, h, d) + v.bytes(t, h, d)) as f64 / (2 * t * h * d) as f64;
        assert!((bits - 3.5).abs() < 1e-12, "{bits}");
    }
}
