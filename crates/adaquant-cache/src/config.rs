//! Cache configurations: per-layer precision of keys and values, the exact window, and serializable cache specs.
//!
//! Everything here serializes to JSON with serde. A [`CacheSpec`] names any cache adaquant can build (full precision
//! in f32 or f16, a quantized cache given layer by layer or uniformly, or the authors' `kvq` config shape), and
//! [`CacheSpec::build`] turns it into a boxed [`KvCache`] for a model's [`CacheShape`].

use std::fmt;
use std::str::FromStr;

use adaquant_kernels::{Bits, GroupAxis, QuantSpec};
use serde::{Deserialize, Serialize};

use crate::full::{FullDtype, FullPrecisionCache};
use crate::quant::QuantizedCache;
use crate::{CacheError, CacheShape, KvCache, Result};

/// Default group size (the authors' and KIVI's choice).
pub const DEFAULT_GROUP: usize = 64;
/// Default number of most recent tokens kept in full precision.
pub const DEFAULT_RESIDUAL: usize = 128;

/// Precision of one side (keys or values) of one layer.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Unquantized: every token kept exact (16-bit and wider; the cache holds f32).
    Full,
    /// Quantized with this recipe once a token leaves the exact window.
    Quant(QuantSpec),
}

impl Precision {
    /// `bits` with the default recipe: group 64, per-token groups, f16 metadata, min-max zero point.
    pub fn bits(bits: Bits) -> Precision {
        Precision::Quant(QuantSpec::new(bits, DEFAULT_GROUP, GroupAxis::PerToken))
    }

    /// `bits` with per-token groups of `group` channels.
    pub fn per_token(bits: Bits, group: usize) -> Precision {
        Precision::Quant(QuantSpec::new(bits, group, GroupAxis::PerToken))
    }

    /// `bits` with per-channel groups of `group` tokens (KIVI's key layout).
    pub fn per_channel(bits: Bits, group: usize) -> Precision {
        Precision::Quant(QuantSpec::new(bits, group, GroupAxis::PerChannel))
    }

    /// The quantization recipe, or `None` for full precision.
    pub fn spec(&self) -> Option<&QuantSpec> {
        match self {
            Precision::Full => None,
            Precision::Quant(s) => Some(s),
        }
    }

    /// Nominal bits per element: 16 for full precision (the usual baseline), the width otherwise.
    pub fn nominal_bits(&self) -> f64 {
        self.spec().map_or(16.0, |s| s.bits.nominal())
    }

    /// The same recipe with another width (full precision stays full precision).
    pub fn with_bits(&self, bits: Bits) -> Precision {
        match self {
            Precision::Full => Precision::Full,
            Precision::Quant(s) => Precision::Quant(QuantSpec { bits, ..*s }),
        }
    }

    /// Number of tokens of this side that are quantized once `tokens` tokens were appended, with `sinks` exact
    /// leading tokens and a window of `residual` exact recent tokens.
    ///
    /// Per-token groups flush token by token, so exactly `residual` tokens stay exact once more than
    /// `sinks + residual` exist. Per-channel groups flush `group` tokens at a time, so between `residual` and
    /// `residual + group - 1` tokens stay exact.
    pub fn quantized_tokens(&self, tokens: usize, residual: usize, sinks: usize) -> usize {
        match self {
            Precision::Full => 0,
            Precision::Quant(s) => {
                let free = tokens.saturating_sub(sinks + residual);
                match s.axis {
                    GroupAxis::PerToken => free,
                    GroupAxis::PerChannel => free / s.group * s.group,
                }
            }
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Precision::Full => f.write_str("16"),
            Precision::Quant(s) => f.write_str(s.bits.name()),
        }
    }
}

/// Precision of one layer's keys and values (independent, so keys can get more bits than values).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerPrecision {
    pub k: Precision,
    pub v: Precision,
}

impl LayerPrecision {
    /// Keys and values with the given precisions.
    pub fn new(k: Precision, v: Precision) -> LayerPrecision {
        LayerPrecision { k, v }
    }

    /// Both sides unquantized.
    pub fn full() -> LayerPrecision {
        LayerPrecision { k: Precision::Full, v: Precision::Full }
    }

    /// `k` bits for keys and `v` bits for values, default recipe (group 64, per-token groups for both).
    pub fn split(k: Bits, v: Bits) -> LayerPrecision {
        LayerPrecision { k: Precision::bits(k), v: Precision::bits(v) }
    }

    /// KIVI's layout: keys in per-channel groups, values in per-token groups, both of 64.
    pub fn kivi(k: Bits, v: Bits) -> LayerPrecision {
        LayerPrecision { k: Precision::per_channel(k, DEFAULT_GROUP), v: Precision::per_token(v, DEFAULT_GROUP) }
    }
}

fn default_residual() -> usize {
    DEFAULT_RESIDUAL
}

/// Configuration of a [`QuantizedCache`]: one [`LayerPrecision`] per layer and the cache-wide exact windows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QuantCacheConfig {
    pub layers: Vec<LayerPrecision>,
    /// Most recent tokens kept in full precision (at least this many once enough tokens exist).
    #[serde(default = "default_residual")]
    pub residual: usize,
    /// Leading tokens of the sequence (attention sinks) kept in full precision forever.
    #[serde(default)]
    pub sinks: usize,
}

impl QuantCacheConfig {
    /// The same precision on every one of `n_layers` layers, default window (128 exact tokens, no sinks).
    pub fn uniform(n_layers: usize, layer: LayerPrecision) -> QuantCacheConfig {
        QuantCacheConfig { layers: vec![layer; n_layers], residual: DEFAULT_RESIDUAL, sinks: 0 }
    }

    /// Fixed split: `k` bits for keys and `v` bits for values everywhere (e.g. K4V2), default recipe.
    pub fn split(n_layers: usize, k: Bits, v: Bits) -> QuantCacheConfig {
        Self::uniform(n_layers, LayerPrecision::split(k, v))
    }

    /// KIVI's layout (per-channel keys, per-token values) with `k`/`v` bits everywhere.
    pub fn kivi(n_layers: usize, k: Bits, v: Bits) -> QuantCacheConfig {
        Self::uniform(n_layers, LayerPrecision::kivi(k, v))
    }

    /// Every layer unquantized.
    pub fn full(n_layers: usize) -> QuantCacheConfig {
        Self::uniform(n_layers, LayerPrecision::full())
    }

    /// The same config with another exact window length.
    pub fn with_residual(mut self, residual: usize) -> QuantCacheConfig {
        self.residual = residual;
        self
    }

    /// The same config with `sinks` exact leading tokens.
    pub fn with_sinks(mut self, sinks: usize) -> QuantCacheConfig {
        self.sinks = sinks;
        self
    }

    /// Checks the config against a cache shape: one entry per layer, per-token groups dividing head_dim,
    /// per-channel groups dividing the residual window.
    pub fn validate(&self, shape: &CacheShape) -> Result<()> {
        shape.validate()?;
        if self.layers.len() != shape.n_layers {
            return Err(CacheError::Field {
                field: "layers".into(),
                msg: format!(
                    "{} layer precisions given but the model has {} layers; give one per layer",
                    self.layers.len(),
                    shape.n_layers
                ),
            });
        }
        for (i, l) in self.layers.iter().enumerate() {
            for (side, p) in [("k", &l.k), ("v", &l.v)] {
                let Some(s) = p.spec() else { continue };
                let field = format!("layers[{i}].{side}.group");
                s.validate(shape.head_dim)
                    .map_err(|e| CacheError::Field { field: field.clone(), msg: e.to_string() })?;
                if s.axis == GroupAxis::PerChannel && !self.residual.is_multiple_of(s.group) {
                    return Err(CacheError::Field {
                        field,
                        msg: format!(
                            "per-channel group of {} tokens does not divide the residual window of {} tokens; \
                             pick a residual that is a multiple of the group",
                            s.group, self.residual
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Average nominal bits per element over all K and V matrices (16 for unquantized ones), metadata excluded.
    pub fn average_bits(&self) -> f64 {
        if self.layers.is_empty() {
            return 0.0;
        }
        let sum: f64 = self.layers.iter().map(|l| l.k.nominal_bits() + l.v.nominal_bits()).sum();
        sum / (2 * self.layers.len()) as f64
    }

    /// A short name: `K4V2 g64 r128` when every layer agrees, `mixed K4.25/V2.5 avg r128` otherwise.
    pub fn describe(&self) -> String {
        let mut s = match self.layers.first() {
            Some(first) if self.layers.iter().all(|l| l == first) => {
                let mut s = format!("K{}V{}", first.k, first.v);
                let groups: Vec<String> = [first.k, first.v]
                    .iter()
                    .filter_map(|p| p.spec().map(|q| format!("{}{}", q.group, axis_tag(q.axis))))
                    .collect();
                if !groups.is_empty() {
                    s.push_str(&format!(" g{}", groups.join("/")));
                }
                s
            }
            _ => {
                let n = self.layers.len().max(1) as f64;
                let k: f64 = self.layers.iter().map(|l| l.k.nominal_bits()).sum::<f64>() / n;
                let v: f64 = self.layers.iter().map(|l| l.v.nominal_bits()).sum::<f64>() / n;
                format!("mixed K{k:.3}/V{v:.3} avg")
            }
        };
        s.push_str(&format!(" r{}", self.residual));
        if self.sinks > 0 {
            s.push_str(&format!(" s{}", self.sinks));
        }
        s.push_str(&crate::quantizer::describe_families(&self.layers));
        s
    }
}

fn axis_tag(axis: GroupAxis) -> &'static str {
    match axis {
        GroupAxis::PerToken => "",
        GroupAxis::PerChannel => "c",
    }
}

/// Any cache adaquant can build, as a serializable value (`{"kind": "full_f16"}`, `{"kind": "quant", ...}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CacheSpec {
    /// [`FullPrecisionCache`] in f32.
    FullF32,
    /// [`FullPrecisionCache`] rounding keys and values to f16 (the usual inference baseline).
    FullF16,
    /// A quantized cache with the same precision on every layer, whatever the model's depth.
    Uniform {
        layer: LayerPrecision,
        #[serde(default = "default_residual")]
        residual: usize,
        #[serde(default)]
        sinks: usize,
    },
    /// A quantized cache given layer by layer.
    Quant(QuantCacheConfig),
    /// The authors' `kvq` config shape (see [`crate::kvq`]), translated when the cache is built.
    Kvq { kvq: serde_json::Value },
}

impl CacheSpec {
    /// The quantized-cache config this spec stands for on a model with `n_layers` layers (`None` for the
    /// full-precision caches).
    pub fn quant_config(&self, n_layers: usize) -> Result<Option<QuantCacheConfig>> {
        Ok(match self {
            CacheSpec::FullF32 | CacheSpec::FullF16 => None,
            CacheSpec::Uniform { layer, residual, sinks } => {
                Some(QuantCacheConfig { layers: vec![*layer; n_layers], residual: *residual, sinks: *sinks })
            }
            CacheSpec::Quant(c) => Some(c.clone()),
            CacheSpec::Kvq { kvq } => Some(crate::kvq::KvqConfig::from_value(kvq)?.to_config(n_layers, None)?),
        })
    }

    /// Builds the cache for `shape`.
    pub fn build(&self, shape: CacheShape) -> Result<Box<dyn KvCache>> {
        Ok(match self {
            CacheSpec::FullF32 => Box::new(FullPrecisionCache::with_dtype(shape, FullDtype::F32)?),
            CacheSpec::FullF16 => Box::new(FullPrecisionCache::with_dtype(shape, FullDtype::F16)?),
            _ => {
                let config = self.quant_config(shape.n_layers)?.expect("quantized specs have a config");
                Box::new(QuantizedCache::new(shape, config)?)
            }
        })
    }

    /// Parses a spec from JSON text.
    pub fn from_json(text: &str) -> Result<CacheSpec> {
        serde_json::from_str(text).map_err(|e| CacheError::ConfigFile { path: "<json>".into(), msg: e.to_string() })
    }

    /// Reads a spec from a JSON file.
    pub fn load(path: &std::path::Path) -> Result<CacheSpec> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CacheError::ConfigFile { path: path.display().to_string(), msg: e.to_string() })?;
        serde_json::from_str(&text)
            .map_err(|e| CacheError::ConfigFile { path: path.display().to_string(), msg: e.to_string() })
    }
}

/// Short names for the command line: `f32`, `f16`, `k4v2`, `k8v4-kivi`, `k4v2-g32-r64-s4`, `k16v2`, `k4v2-hqq`,
/// `k3v2-rot-lloyd` (16 means unquantized). Options after the widths: `g<group>`, `r<residual>`, `s<sinks>` and
/// `kivi` (keys in per-channel groups; values always use per-token groups), and the quantizer: `minmax` (the
/// default), `hqq` (HQQ zero points with the authors' defaults), `lloyd` (Lloyd-Max levels), `rot` (Hadamard
/// rotation of keys and values), `krot` or `vrot` (rotate one side only); see [`crate::Quantizer`].
impl FromStr for CacheSpec {
    type Err = CacheError;

    fn from_str(s: &str) -> Result<CacheSpec> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "f32" | "full" | "fp32" => return Ok(CacheSpec::FullF32),
            "f16" | "fp16" => return Ok(CacheSpec::FullF16),
            _ => {}
        }
        let bad = |msg: String| CacheError::Field { field: "cache".into(), msg };
        let mut parts = s.split(['-', '_', ' ']).filter(|p| !p.is_empty());
        let head = parts.next().unwrap_or_default();
        let rest = head.strip_prefix('k').ok_or_else(|| {
            bad(format!("'{s}': expected f32, f16 or k<bits>v<bits>[-g<group>][-r<residual>][-s<sinks>][-kivi]"))
        })?;
        let (kb, vb) = rest.split_once('v').ok_or_else(|| bad(format!("'{s}': missing v<bits>")))?;
        let width = |x: &str| -> Result<Option<Bits>> {
            let n: f64 = x.parse().map_err(|_| bad(format!("'{x}' is not a bit width")))?;
            if (n - 16.0).abs() < 1e-9 {
                return Ok(None);
            }
            Bits::from_f64(n).map(Some).map_err(|e| bad(e.to_string()))
        };
        let (kb, vb) = (width(kb)?, width(vb)?);
        let (mut group, mut residual, mut sinks, mut kivi) = (DEFAULT_GROUP, DEFAULT_RESIDUAL, 0, false);
        let mut fam = crate::quantizer::ShortOptions::default();
        for p in parts {
            let num = |x: &str| -> Result<usize> { x.parse().map_err(|_| bad(format!("bad option '{p}'"))) };
            if fam.take(p) {
                continue;
            }
            if p == "kivi" {
                kivi = true;
            } else if let Some(x) = p.strip_prefix('g') {
                group = num(x)?;
            } else if let Some(x) = p.strip_prefix('r') {
                residual = num(x)?;
            } else if let Some(x) = p.strip_prefix('s') {
                sinks = num(x)?;
            } else {
                return Err(bad(format!(
                    "unknown option '{p}' (use g<group>, r<residual>, s<sinks>, kivi, minmax, hqq, lloyd, rot, krot, vrot)"
                )));
            }
        }
        let k_axis = if kivi { GroupAxis::PerChannel } else { GroupAxis::PerToken };
        let prec = |b: Option<Bits>, axis, rotate| match b {
            None => Ok(Precision::Full),
            Some(b) => fam.spec(QuantSpec::new(b, group, axis), rotate).map(Precision::Quant),
        };
        Ok(CacheSpec::Uniform {
            layer: LayerPrecision {
                k: prec(kb, k_axis, fam.rotate_k)?,
                v: prec(vb, GroupAxis::PerToken, fam.rotate_v)?,
            },
            residual,
            sinks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantized_token_counts_follow_the_window_rules() {
        let pt = Precision::bits(Bits::B4);
        assert_eq!(pt.quantized_tokens(100, 128, 0), 0);
        assert_eq!(pt.quantized_tokens(129, 128, 0), 1);
        assert_eq!(pt.quantized_tokens(300, 128, 4), 168);
        let pc = Precision::per_channel(Bits::B4, 32);
        assert_eq!(pc.quantized_tokens(128 + 31, 128, 0), 0);
        assert_eq!(pc.quantized_tokens(128 + 32, 128, 0), 32);
        assert_eq!(pc.quantized_tokens(128 + 95, 128, 2), 64);
        assert_eq!(Precision::Full.quantized_tokens(1000, 0, 0), 0);
    }

    #[test]
    fn validation_names_the_bad_field() {
        let shape = CacheShape::new(2, 4, 2, 64, 1024);
        assert!(QuantCacheConfig::split(2, Bits::B4, Bits::B2).validate(&shape).is_ok());
        assert!(QuantCacheConfig::kivi(2, Bits::B4, Bits::B2).validate(&shape).is_ok());
        let err = QuantCacheConfig::split(3, Bits::B4, Bits::B2).validate(&shape).unwrap_err();
        assert!(matches!(&err, CacheError::Field { field, .. } if field == "layers"), "{err}");
        let mut c = QuantCacheConfig::split(2, Bits::B4, Bits::B2);
        c.layers[1].v = Precision::per_token(Bits::B2, 48);
        let err = c.validate(&shape).unwrap_err();
        assert!(matches!(&err, CacheError::Field { field, .. } if field == "layers[1].v.group"), "{err}");
        let c = QuantCacheConfig::kivi(2, Bits::B4, Bits::B2).with_residual(100);
        let err = c.validate(&shape).unwrap_err();
        assert!(matches!(&err, CacheError::Field { field, .. } if field == "layers[0].k.group"), "{err}");
        let mut c = QuantCacheConfig::split(2, Bits::B4, Bits::B2);
        c.layers[0].k = Precision::per_token(Bits::B4, 0);
        assert!(c.validate(&shape).is_err());
    }

    #[test]
    fn specs_round_trip_through_json() {
        let specs = [
            CacheSpec::FullF32,
            CacheSpec::FullF16,
            CacheSpec::Quant(QuantCacheConfig::kivi(3, Bits::B4, Bits::B1_58).with_sinks(4)),
            "k8v4-g32-r64-s2".parse().unwrap(),
        ];
        for s in specs {
            let json = serde_json::to_string(&s).unwrap();
            assert_eq!(CacheSpec::from_json(&json).unwrap(), s, "{json}");
        }
        let c: QuantCacheConfig =
            serde_json::from_str(r#"{"layers":[{"k":"full","v":{"quant":{"bits":2,"group":32,"axis":"per_token"}}}]}"#)
                .unwrap();
        assert_eq!(c.residual, DEFAULT_RESIDUAL);
        assert_eq!(c.sinks, 0);
        assert_eq!(c.layers[0].v, Precision::per_token(Bits::B2, 32));
        assert!(serde_json::from_str::<QuantCacheConfig>(
            r#"{"layers":[{"k":"full","v":{"quant":{"bits":7,"group":32,"axis":"per_token"}}}]}"#
        )
        .is_err());
    }

    #[test]
    fn short_names_parse() {
        let s: CacheSpec = "k4v2".parse().unwrap();
        let c = s.quant_config(2).unwrap().unwrap();
        assert_eq!(c, QuantCacheConfig::split(2, Bits::B4, Bits::B2));
        assert_eq!(c.describe(), "K4V2 g64/64 r128");
        let c = "k8v1.58-kivi-r64-s4".parse::<CacheSpec>().unwrap().quant_config(1).unwrap().unwrap();
        assert_eq!(c, QuantCacheConfig::kivi(1, Bits::B8, Bits::B1_58).with_residual(64).with_sinks(4));
        let c = "k16v4".parse::<CacheSpec>().unwrap().quant_config(1).unwrap().unwrap();
        assert_eq!(c.layers[0].k, Precision::Full);
        assert_eq!("f16".parse::<CacheSpec>().unwrap(), CacheSpec::FullF16);
        for bad in ["k7v2", "q4", "k4", "k4v2-x3", "k4v2-gx"] {
            assert!(bad.parse::<CacheSpec>().is_err(), "{bad}");
        }
        assert!((QuantCacheConfig::split(4, Bits::B4, Bits::B2).average_bits() - 3.0).abs() < 1e-12);
    }
}
