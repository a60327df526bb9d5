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

    /// Parses a spec from JSON text: adaquant's tagged shape (`{"kind": ...}`), a bare [`QuantCacheConfig`]
    /// (`{"layers": [...], ...}`), or the authors' kvq shape (`{"nbits": ...}`, see [`crate::kvq`]).
    pub fn from_json(text: &str) -> Result<CacheSpec> {
        Self::from_json_at(text, "<inline JSON>")
    }

    /// Reads a spec from a JSON file (every shape [`CacheSpec::from_json`] accepts).
    pub fn load(path: &std::path::Path) -> Result<CacheSpec> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CacheError::ConfigFile { path: path.display().to_string(), msg: e.to_string() })?;
        Self::from_json_at(&text, &path.display().to_string())
    }

    fn from_json_at(text: &str, origin: &str) -> Result<CacheSpec> {
        let bad = |msg: String| CacheError::ConfigFile { path: origin.to_string(), msg };
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let obj = value.as_object().ok_or_else(|| {
            bad("expected a JSON object: {\"kind\": ...}, {\"layers\": [...]} or the kvq shape {\"nbits\": ...}".into())
        })?;
        let spec = if obj.contains_key("kind") {
            serde_json::from_value::<CacheSpec>(value).map_err(|e| bad(e.to_string()))?
        } else if obj.contains_key("layers") {
            CacheSpec::Quant(serde_json::from_value::<QuantCacheConfig>(value).map_err(|e| bad(e.to_string()))?)
        } else {
            CacheSpec::Kvq { kvq: value }
        };
        // A kvq config is checked now, so a bad field is reported where the spec is read, not when it is built.
        if let CacheSpec::Kvq { kvq } = &spec {
            crate::kvq::KvqConfig::from_value(kvq)?;
        }
        Ok(spec)
    }

    /// Parses a cache argument of any command (`--cache`) or of the library: every accepted form, in one place.
    ///
    /// - a short name: `f32`, `f16`, `k4v2`, `k16v2` (16 = unquantized side), `k4v2-g32-r64-s4-kivi`, ...;
    /// - inline JSON (text starting with `{`) in any shape [`CacheSpec::from_json`] accepts;
    /// - the path of a JSON file in the same shapes: a name ending in `.json`, or any existing file whose name is
    ///   not a short name.
    ///
    /// `str::parse::<CacheSpec>()` is this function.
    pub fn parse_arg(arg: &str) -> Result<CacheSpec> {
        let s = arg.trim();
        if s.is_empty() {
            return Err(CacheError::Field {
                field: "cache".into(),
                msg: "empty; give a short name such as k4v2, inline JSON, or a JSON file".into(),
            });
        }
        if s.starts_with(['{', '[']) {
            return Self::from_json(s);
        }
        if s.to_ascii_lowercase().ends_with(".json") {
            return Self::load(std::path::Path::new(s));
        }
        match parse_short_name(s) {
            Ok(spec) => Ok(spec),
            Err(e) if std::path::Path::new(s).is_file() => Self::load(std::path::Path::new(s)).map_err(|le| match le {
                CacheError::ConfigFile { path, msg } => {
                    CacheError::ConfigFile { path, msg: format!("{msg} (and not a short name: {e})") }
                }
                other => other,
            }),
            Err(e) => Err(e),
        }
    }
}

/// Every form of [`CacheSpec::parse_arg`]: short names, inline JSON and JSON files.
impl FromStr for CacheSpec {
    type Err = CacheError;

    fn from_str(s: &str) -> Result<CacheSpec> {
        CacheSpec::parse_arg(s)
    }
}

/// Short names for the command line: `f32`, `f16`, `k4v2`, `k8v4-kivi`, `k4v2-g32-r64-s4`, `k16v2`, `k4v2-hqq`,
/// `k3v2-rot-lloyd` (16 means unquantized). Options after the widths: `g<group>`, `r<residual>`, `s<sinks>` and
/// `kivi` (keys in per-channel groups; values always use per-token groups), and the quantizer: `minmax` (the
/// default), `hqq` (HQQ zero points with the authors' defaults), `lloyd` (Lloyd-Max levels), `rot` (Hadamard
/// rotation of keys and values), `krot` or `vrot` (rotate one side only); see [`crate::Quantizer`].
fn parse_short_name(s: &str) -> Result<CacheSpec> {
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
        bad(format!(
            "'{s}': expected f32, f16, k<bits>v<bits>[-g<group>][-r<residual>][-s<sinks>][-kivi][-hqq|-lloyd][-rot], \
             inline JSON ({{\"kind\": ...}} or the kvq shape), or a JSON file"
        ))
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
        layer: LayerPrecision { k: prec(kb, k_axis, fam.rotate_k)?, v: prec(vb, GroupAxis::PerToken, fam.rotate_v)? },
        residual,
        sinks,
    })
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

    /// Every form a cache argument may take (short names, inline JSON in each shape, JSON files), through the one
    /// parser that every command and the library use, and the errors of malformed ones.
    #[test]
    fn every_cache_argument_form_parses() {
        let dir = std::env::temp_dir().join(format!("adaquant-cache-arg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let parse = |s: &str| s.parse::<CacheSpec>().unwrap_or_else(|e| panic!("{s}: {e}"));
        let config = |s: &str| parse(s).quant_config(2).unwrap().unwrap_or_else(|| panic!("{s}: not quantized"));

        // Short names.
        for (s, want) in [
            ("f32", CacheSpec::FullF32),
            ("full", CacheSpec::FullF32),
            ("FP32", CacheSpec::FullF32),
            ("f16", CacheSpec::FullF16),
            ("fp16", CacheSpec::FullF16),
        ] {
            assert_eq!(parse(s), want, "{s}");
        }
        assert_eq!(config("k4v2"), QuantCacheConfig::split(2, Bits::B4, Bits::B2));
        assert_eq!(config("  K4V2 "), QuantCacheConfig::split(2, Bits::B4, Bits::B2));
        assert_eq!(parse("k4v2").quant_config(2).unwrap().unwrap().describe(), "K4V2 g64/64 r128");
        assert_eq!(
            config("k8v1.58-kivi-r64-s4"),
            QuantCacheConfig::kivi(2, Bits::B8, Bits::B1_58).with_residual(64).with_sinks(4)
        );
        let c = config("k16v2");
        assert_eq!((c.layers[0].k, c.layers[0].v), (Precision::Full, Precision::bits(Bits::B2)));
        assert_eq!(config("k16v16"), QuantCacheConfig::full(2));

        // One configuration written in every form gives the same cache config: K4 per-channel groups of 32,
        // V2 per-token groups of 32, window 64, 4 sinks.
        let want = QuantCacheConfig::uniform(
            2,
            LayerPrecision::new(Precision::per_channel(Bits::B4, 32), Precision::per_token(Bits::B2, 32)),
        )
        .with_residual(64)
        .with_sinks(4);
        let layer = r#"{"k":{"quant":{"bits":4,"group":32,"axis":"per_channel"}},"v":{"quant":{"bits":2,"group":32,"axis":"per_token"}}}"#;
        // A kvq config means HQQ unless it names another quantizer (checked below); this one names min-max.
        let kvq = r#"{"nbits":{"k":4,"v":2},"group_size":32,"residual_length":64,"axis":{"k":"per_channel","v":1},"sinks":4,"quantizer":"minmax"}"#;
        let inline = [
            format!(r#"{{"kind":"uniform","layer":{layer},"residual":64,"sinks":4}}"#),
            format!(r#"{{"kind":"quant","layers":[{layer},{layer}],"residual":64,"sinks":4}}"#),
            format!(r#"{{"layers":[{layer},{layer}],"residual":64,"sinks":4}}"#),
            format!(r#"{{"kind":"kvq","kvq":{kvq}}}"#),
            kvq.to_string(),
            format!("  {kvq}\n"),
        ];
        let mut forms = vec!["k4v2-g32-r64-s4-kivi".to_string(), "k4v2_kivi_g32_s4_r64".to_string()];
        for (i, json) in inline.iter().enumerate() {
            forms.push(json.clone());
            // The same JSON as a file: named .json, .JSON, or with any other name.
            for name in [format!("spec{i}.json"), format!("spec{i}.JSON"), format!("spec{i}.cfg")] {
                let path = dir.join(name);
                std::fs::write(&path, json).unwrap();
                forms.push(path.display().to_string());
            }
        }
        for f in &forms {
            assert_eq!(config(f), want, "{f}");
        }
        let hqq = config(r#"{"nbits":{"k":4,"v":2},"group_size":32}"#);
        assert!(
            matches!(hqq.layers[0].k, Precision::Quant(q) if q.zero != adaquant_kernels::ZeroPoint::MinMax),
            "{hqq:?}"
        );
        // Specs written by serde read back.
        for spec in [CacheSpec::FullF16, parse("k4v2-g32-r64-s4-kivi"), CacheSpec::Quant(want.clone())] {
            assert_eq!(parse(&serde_json::to_string(&spec).unwrap()), spec);
        }
        assert_eq!(CacheSpec::from_json(r#"{"kind":"full_f16"}"#).unwrap(), CacheSpec::FullF16);

        // Malformed arguments are typed errors naming what is wrong.
        for bad in ["", "  ", "k7v2", "q4", "k4", "k4v2-x3", "k4v2-gx", "kxv2", "[1, 2]"] {
            assert!(bad.parse::<CacheSpec>().is_err(), "{bad:?}");
        }
        let err = |s: &str| s.parse::<CacheSpec>().unwrap_err().to_string();
        assert!(err("{\"kind\": \"bogus\"}").contains("bogus"), "{}", err("{\"kind\": \"bogus\"}"));
        assert!(err("{not json").contains("<inline JSON>"));
        assert!(err("[1, 2]").contains("expected a JSON object"));
        assert!(err(r#"{"nbits": 4, "axis": 0}"#).contains("`axis`"), "{}", err(r#"{"nbits": 4, "axis": 0}"#));
        assert!(err(r#"{"nbits": 4, "colour": 1}"#).contains("`colour`"));
        assert!(err("{}").contains("nbits"));
        let missing = dir.join("missing.json").display().to_string();
        assert!(err(&missing).contains(&missing), "{}", err(&missing));
        let broken = dir.join("broken.json");
        std::fs::write(&broken, "{\"kind\": ").unwrap();
        assert!(err(&broken.display().to_string()).contains("broken.json"));
        let not_spec = dir.join("notes.txt");
        std::fs::write(&not_spec, "hello").unwrap();
        let e = err(&not_spec.display().to_string());
        assert!(e.contains("notes.txt") && e.contains("not a short name"), "{e}");
        assert!(err("q4").contains("inline JSON"), "the error lists every form: {}", err("q4"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn average_bits_count_both_sides() {
        assert!((QuantCacheConfig::split(4, Bits::B4, Bits::B2).average_bits() - 3.0).abs() < 1e-12);
    }
}
