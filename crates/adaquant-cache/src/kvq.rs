//! Reader of the authors' `kvq` config shape (`KVQConfig` in GitHub mohsenhariri/spectral-kv, commit e9ed4238).
//!
//! Accepted fields and their translation:
//! - `nbits`: a width for keys and values, or `{"k": .., "v": ..}` where each side is a width or a per-layer list.
//!   A list shorter than the model repeats its last entry, as the authors' cache does. adaquant also accepts 16
//!   for an unquantized side.
//! - `budget` (average bits per element) with optional `bit_range` (allowed widths): the greedy budget solver of
//!   [`crate::alloc`] over the sensitivities in `norms` (`{"w_k": [..], "w_v": [..]}`, the authors' norm-file
//!   shape) or passed by the caller. Exactly one of `nbits` and `budget`.
//! - `group_size`: like `nbits` (default 64); or `group_budget` (average group size) with optional `group_range`,
//!   allocated by [`crate::alloc::allocate_groups`] over the same sensitivities.
//! - `residual_length`: a number, or `{"k", "v"}` with equal entries (default 64, the authors' default). adaquant
//!   keeps exactly this many recent tokens exact; the authors' cache instead lets its window fill and then
//!   quantizes all of it, so it holds between 0 and `residual_length - 1` exact tokens.
//! - `axis`: 1 (or `"per_token"`) is the authors' HQQ `axis=1`, adaquant's per-token groups. 0 is HQQ's strided
//!   grouping of a flattened tensor, which adaquant does not implement: it is an error; `"per_channel"` selects
//!   KIVI-style per-channel groups instead. A number or `{"k", "v"}`.
//! - `sinks` (adaquant only): leading tokens kept exact.
//! - `quantizer` (adaquant only): the quantizer family of every quantized side, one of the names of
//!   [`crate::Quantizer`] (`"hqq"`, `"minmax"`, `"rot-hqq"`, `"rot-lloyd"`, ...). The default is `"hqq"` with the
//!   authors' settings (20 iterations, p = 0.7, beta = 10, kappa = 1.01), because the authors' cache quantizes with
//!   HQQ; give `"minmax"` for adaquant's plain min-max groups.
//! - `score`, `model`, `compute_dtype`, `device`: accepted and ignored (the norms come from `norms`).
//!
//! Every invalid value is a [`CacheError::Field`] naming the field.

use adaquant_kernels::{Bits, GroupAxis, QuantSpec};
use serde_json::Value;

use crate::alloc::{allocate_groups, BitBudget, Sensitivities, Solver, DEFAULT_GROUP_SIZES};
use crate::config::{LayerPrecision, Precision, QuantCacheConfig};
use crate::quantizer::Quantizer;
use crate::{CacheError, Result};

/// The authors' default residual length.
pub const KVQ_DEFAULT_RESIDUAL: usize = 64;

/// A per-layer setting of the kvq shape: one value for every layer, or a list.
#[derive(Clone, Debug, PartialEq)]
pub enum PerLayer<T> {
    All(T),
    List(Vec<T>),
}

impl<T: Clone> PerLayer<T> {
    /// The value of layer `i` of `n` (a short list repeats its last entry; a long one is an error).
    fn expand(&self, field: &str, n: usize) -> Result<Vec<T>> {
        match self {
            PerLayer::All(x) => Ok(vec![x.clone(); n]),
            PerLayer::List(xs) => {
                if xs.is_empty() || xs.len() > n {
                    return Err(field_err(
                        field,
                        format!("{} entries for a model with {n} layers; give between 1 and {n}", xs.len()),
                    ));
                }
                Ok((0..n).map(|i| xs[i.min(xs.len() - 1)].clone()).collect())
            }
        }
    }
}

/// A parsed kvq config, before it is applied to a model.
#[derive(Clone, Debug, PartialEq)]
pub struct KvqConfig {
    /// Key and value precisions (`None` entries of a width mean unquantized).
    pub nbits: Option<(PerLayer<Precision>, PerLayer<Precision>)>,
    pub budget: Option<f64>,
    pub bit_range: Option<Vec<Bits>>,
    pub group_size: Option<(PerLayer<usize>, PerLayer<usize>)>,
    pub group_budget: Option<f64>,
    pub group_range: Option<Vec<usize>>,
    pub residual: usize,
    pub axis: (GroupAxis, GroupAxis),
    pub sinks: usize,
    pub norms: Option<Sensitivities>,
    /// The quantizer family of every quantized side (default HQQ, the authors' quantizer).
    pub quantizer: Quantizer,
}

fn field_err(field: &str, msg: impl Into<String>) -> CacheError {
    CacheError::Field { field: field.to_string(), msg: msg.into() }
}

fn number(field: &str, v: &Value) -> Result<f64> {
    v.as_f64().ok_or_else(|| field_err(field, format!("expected a number, got {v}")))
}

fn count(field: &str, v: &Value) -> Result<usize> {
    v.as_u64().map(|x| x as usize).ok_or_else(|| field_err(field, format!("expected a non-negative integer, got {v}")))
}

fn width(field: &str, v: &Value) -> Result<Precision> {
    let x = number(field, v)?;
    if (x - 16.0).abs() < 1e-9 {
        return Ok(Precision::Full);
    }
    let b = Bits::from_f64(x).map_err(|e| field_err(field, e.to_string()))?;
    Ok(Precision::bits(b))
}

/// A value that is either one `T`, or `{"k": .., "v": ..}` of `T`s.
fn kv_pair<T>(field: &str, v: &Value, one: impl Fn(&str, &Value) -> Result<T>) -> Result<(T, T)>
where
    T: Clone,
{
    match v {
        Value::Object(m) => {
            let side = |s: &str| {
                let f = format!("{field}.{s}");
                let x = m.get(s).ok_or_else(|| field_err(field, "an object must give both \"k\" and \"v\""))?;
                one(&f, x)
            };
            if let Some(extra) = m.keys().find(|k| *k != "k" && *k != "v") {
                return Err(field_err(field, format!("unknown key \"{extra}\"; only \"k\" and \"v\" are allowed")));
            }
            Ok((side("k")?, side("v")?))
        }
        _ => {
            let x = one(field, v)?;
            Ok((x.clone(), x))
        }
    }
}

fn per_layer<T>(field: &str, v: &Value, one: &impl Fn(&str, &Value) -> Result<T>) -> Result<PerLayer<T>> {
    match v {
        Value::Array(xs) => xs
            .iter()
            .enumerate()
            .map(|(i, x)| one(&format!("{field}[{i}]"), x))
            .collect::<Result<_>>()
            .map(PerLayer::List),
        _ => one(field, v).map(PerLayer::All),
    }
}

fn axis(field: &str, v: &Value) -> Result<GroupAxis> {
    match v {
        Value::Number(_) => match v.as_i64() {
            Some(1) => Ok(GroupAxis::PerToken),
            Some(0) => Err(field_err(
                field,
                "axis 0 is HQQ's strided grouping of the flattened cache, which adaquant does not implement; \
                 use 1 (per-token groups) or \"per_channel\" (KIVI-style groups over tokens)",
            )),
            _ => Err(field_err(field, format!("axis must be 0 or 1, got {v}"))),
        },
        Value::String(s) => s.parse().map_err(|e: String| field_err(field, e)),
        _ => Err(field_err(field, format!("expected 1, \"per_token\" or \"per_channel\", got {v}"))),
    }
}

impl KvqConfig {
    /// Parses kvq JSON text.
    pub fn from_json(text: &str) -> Result<KvqConfig> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| CacheError::ConfigFile { path: "<kvq json>".into(), msg: e.to_string() })?;
        Self::from_value(&v)
    }

    /// Parses a kvq config from a JSON value.
    pub fn from_value(v: &Value) -> Result<KvqConfig> {
        let m = v.as_object().ok_or_else(|| field_err("kvq", "expected a JSON object"))?;
        const KNOWN: [&str; 15] = [
            "nbits",
            "budget",
            "bit_range",
            "group_size",
            "group_budget",
            "group_range",
            "residual_length",
            "axis",
            "sinks",
            "norms",
            "quantizer",
            "score",
            "model",
            "compute_dtype",
            "device",
        ];
        if let Some(k) = m.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(field_err(k, format!("unknown field; known fields are {}", KNOWN.join(", "))));
        }
        let get = |k: &str| m.get(k).filter(|x| !x.is_null());
        let nbits = get("nbits").map(|v| kv_pair("nbits", v, |f, x| per_layer(f, x, &width))).transpose()?;
        let budget = get("budget").map(|v| number("budget", v)).transpose()?;
        match (&nbits, &budget) {
            (Some(_), Some(_)) => {
                return Err(field_err("budget", "give exactly one of `nbits` and `budget`, not both"))
            }
            (None, None) => return Err(field_err("nbits", "give exactly one of `nbits` and `budget`")),
            _ => {}
        }
        let bit_range = get("bit_range")
            .map(|v| {
                let xs = v.as_array().ok_or_else(|| field_err("bit_range", "expected a list of widths"))?;
                xs.iter()
                    .enumerate()
                    .map(|(i, x)| {
                        let f = format!("bit_range[{i}]");
                        Bits::from_f64(number(&f, x)?).map_err(|e| field_err(&f, e.to_string()))
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .transpose()?;
        if bit_range.is_some() && budget.is_none() {
            return Err(field_err("bit_range", "only meaningful with `budget`"));
        }
        let group_size =
            get("group_size").map(|v| kv_pair("group_size", v, |f, x| per_layer(f, x, &count))).transpose()?;
        let group_budget = get("group_budget").map(|v| number("group_budget", v)).transpose()?;
        if group_size.is_some() && group_budget.is_some() {
            return Err(field_err("group_budget", "give at most one of `group_size` and `group_budget`"));
        }
        let group_range = get("group_range")
            .map(|v| {
                let xs = v.as_array().ok_or_else(|| field_err("group_range", "expected a list of group sizes"))?;
                xs.iter().enumerate().map(|(i, x)| count(&format!("group_range[{i}]"), x)).collect::<Result<Vec<_>>>()
            })
            .transpose()?;
        let residual = match get("residual_length") {
            None => KVQ_DEFAULT_RESIDUAL,
            Some(v) => {
                let (k, r) = kv_pair("residual_length", v, count)?;
                if k != r {
                    return Err(field_err(
                        "residual_length",
                        format!("keys ({k}) and values ({r}) must share one window in adaquant"),
                    ));
                }
                k
            }
        };
        let axis = match get("axis") {
            None => (GroupAxis::PerToken, GroupAxis::PerToken),
            Some(v) => kv_pair("axis", v, axis)?,
        };
        let sinks = get("sinks").map(|v| count("sinks", v)).transpose()?.unwrap_or(0);
        let norms = get("norms")
            .map(|v| {
                let m = v.as_object().ok_or_else(|| field_err("norms", "expected {\"w_k\": [..], \"w_v\": [..]}"))?;
                let list = |k: &str| -> Result<Vec<f64>> {
                    let f = format!("norms.{k}");
                    let xs = m.get(k).and_then(Value::as_array).ok_or_else(|| field_err(&f, "expected a list"))?;
                    xs.iter().map(|x| number(&f, x)).collect()
                };
                Sensitivities::new(list("w_k")?, list("w_v")?).map_err(|e| field_err("norms", e.to_string()))
            })
            .transpose()?;
        let quantizer = match get("quantizer") {
            None => Quantizer::Hqq,
            Some(Value::String(q)) => q.parse().map_err(|e: String| field_err("quantizer", e))?,
            Some(v) => return Err(field_err("quantizer", format!("expected a name such as \"hqq\", got {v}"))),
        };
        Ok(KvqConfig {
            nbits,
            budget,
            bit_range,
            group_size,
            group_budget,
            group_range,
            residual,
            axis,
            sinks,
            norms,
            quantizer,
        })
    }

    /// Translates to a [`QuantCacheConfig`] for a model with `n_layers` layers. `norms` (the sensitivities for
    /// `budget` and `group_budget`) overrides the config's own `norms` field.
    pub fn to_config(&self, n_layers: usize, norms: Option<&Sensitivities>) -> Result<QuantCacheConfig> {
        let norms = norms.or(self.norms.as_ref());
        let need_norms = |field: &str| -> Result<&Sensitivities> {
            let s = norms.ok_or_else(|| {
                field_err(
                    field,
                    "needs sensitivities: add a `norms` field ({\"w_k\": [..], \"w_v\": [..]}, e.g. the authors' \
                     norm file) or pass them to the translation",
                )
            })?;
            if s.n_layers() != n_layers {
                return Err(field_err(
                    "norms",
                    format!("{} layers of norms for a model with {n_layers} layers", s.n_layers()),
                ));
            }
            Ok(s)
        };
        let (k_prec, v_prec): (Vec<Precision>, Vec<Precision>) = match (&self.nbits, self.budget) {
            (Some((k, v)), _) => (k.expand("nbits.k", n_layers)?, v.expand("nbits.v", n_layers)?),
            (None, Some(avg)) => {
                let s = need_norms("budget")?;
                let mut b = BitBudget::new(avg);
                // The authors' solver, so their configs give their allocations.
                b.solver = Solver::Greedy;
                if let Some(r) = &self.bit_range {
                    b.widths = r.clone();
                }
                let a = b.solve(s).map_err(|e| field_err("budget", e.to_string()))?;
                (a.k.into_iter().map(Precision::bits).collect(), a.v.into_iter().map(Precision::bits).collect())
            }
            (None, None) => return Err(field_err("nbits", "give exactly one of `nbits` and `budget`")),
        };
        let (k_group, v_group): (Vec<usize>, Vec<usize>) = match (&self.group_size, self.group_budget) {
            (Some((k, v)), _) => (k.expand("group_size.k", n_layers)?, v.expand("group_size.v", n_layers)?),
            (None, Some(avg)) => {
                let s = need_norms("group_budget")?;
                if !avg.is_finite() || avg <= 0.0 {
                    return Err(field_err("group_budget", format!("must be positive, got {avg}")));
                }
                let range = self.group_range.clone().unwrap_or_else(|| DEFAULT_GROUP_SIZES.to_vec());
                let flat = s.interleaved();
                let g = allocate_groups(&flat, flat.len() as f64 / avg, &range)
                    .map_err(|e| field_err("group_range", e.to_string()))?;
                (g.iter().step_by(2).copied().collect(), g.iter().skip(1).step_by(2).copied().collect())
            }
            (None, None) => (vec![64; n_layers], vec![64; n_layers]),
        };
        let with = |p: Precision, group: usize, axis: GroupAxis| match p {
            Precision::Full => Precision::Full,
            Precision::Quant(s) => Precision::Quant(self.quantizer.apply(QuantSpec { group, axis, ..s })),
        };
        let layers = (0..n_layers)
            .map(|i| LayerPrecision {
                k: with(k_prec[i], k_group[i], self.axis.0),
                v: with(v_prec[i], v_group[i], self.axis.1),
            })
            .collect();
        Ok(QuantCacheConfig { layers, residual: self.residual, sinks: self.sinks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Err(CacheError::Field { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    /// Every quantized side of `c` with the HQQ zero point, as kvq configs default to.
    fn hqq(mut c: QuantCacheConfig) -> QuantCacheConfig {
        for l in &mut c.layers {
            for p in [&mut l.k, &mut l.v] {
                if let Precision::Quant(s) = p {
                    *s = Quantizer::Hqq.apply(*s);
                }
            }
        }
        c
    }

    #[test]
    fn kvq_configs_mean_hqq_unless_they_say_otherwise() {
        let c = KvqConfig::from_json(r#"{"nbits": {"k": 4, "v": 2}}"#).unwrap().to_config(2, None).unwrap();
        for l in &c.layers {
            assert_eq!(l.k.spec().unwrap().zero, adaquant_kernels::ZeroPoint::HQQ);
            assert_eq!(l.v.spec().unwrap().zero, adaquant_kernels::ZeroPoint::HQQ);
        }
        assert!(c.describe().ends_with(" hqq"), "{}", c.describe());
        let c = KvqConfig::from_json(r#"{"nbits": {"k": 4, "v": 2}, "quantizer": "minmax"}"#)
            .unwrap()
            .to_config(2, None)
            .unwrap();
        assert_eq!(c, QuantCacheConfig::split(2, Bits::B4, Bits::B2).with_residual(64));
        let c = KvqConfig::from_json(r#"{"nbits": 3, "quantizer": "rot-lloyd"}"#).unwrap().to_config(1, None).unwrap();
        assert_eq!(Quantizer::of(c.layers[0].k.spec().unwrap()), Quantizer::RotLloyd);
        assert_eq!(field_of(KvqConfig::from_json(r#"{"nbits": 4, "quantizer": "turbo"}"#)), "quantizer");
        assert_eq!(field_of(KvqConfig::from_json(r#"{"nbits": 4, "quantizer": 3}"#)), "quantizer");
    }

    #[test]
    fn fixed_widths_translate() {
        let c = KvqConfig::from_json(r#"{"nbits": {"k": 4, "v": 2}, "residual_length": 128, "axis": 1}"#)
            .unwrap()
            .to_config(3, None)
            .unwrap();
        assert_eq!(c, hqq(QuantCacheConfig::split(3, Bits::B4, Bits::B2)));
        let c = KvqConfig::from_json(r#"{"nbits": 8}"#).unwrap().to_config(2, None).unwrap();
        assert_eq!(c, hqq(QuantCacheConfig::split(2, Bits::B8, Bits::B8).with_residual(64)));
        let c = KvqConfig::from_json(
            r#"{"nbits": {"k": [8, 4], "v": 1.58}, "group_size": {"k": 32, "v": [64, 128, 32]},
                "axis": {"k": "per_channel", "v": 1}, "residual_length": {"k": 64, "v": 64}, "sinks": 4,
                "model": "x", "score": 1}"#,
        )
        .unwrap()
        .to_config(3, None)
        .unwrap();
        let plain = |p: Precision| match p {
            Precision::Quant(s) => Precision::Quant(Quantizer::MinMax.apply(s)),
            p => p,
        };
        assert_eq!(plain(c.layers[0].k), Precision::per_channel(Bits::B8, 32));
        assert_eq!(plain(c.layers[2].k), Precision::per_channel(Bits::B4, 32));
        assert_eq!(plain(c.layers[1].v), Precision::per_token(Bits::B1_58, 128));
        assert_eq!(plain(c.layers[2].v), Precision::per_token(Bits::B1_58, 32));
        assert_eq!((c.residual, c.sinks), (64, 4));
        let c = KvqConfig::from_json(r#"{"nbits": {"k": 16, "v": 4}}"#).unwrap().to_config(1, None).unwrap();
        assert_eq!(c.layers[0].k, Precision::Full);
    }

    #[test]
    fn budgets_use_the_norms() {
        let json = r#"{"budget": 3, "bit_range": [1, 2, 4, 8], "group_budget": 64,
                       "norms": {"w_k": [40, 30], "w_v": [5, 10]}}"#;
        let c = KvqConfig::from_json(json).unwrap().to_config(2, None).unwrap();
        let bits: f64 = c.layers.iter().map(|l| l.k.nominal_bits() + l.v.nominal_bits()).sum();
        assert!((bits - 12.0).abs() < 1e-9);
        assert!(c.layers.iter().all(|l| l.k.nominal_bits() > l.v.nominal_bits()));
        let groups: f64 = c
            .layers
            .iter()
            .map(|l| 1.0 / l.k.spec().unwrap().group as f64 + 1.0 / l.v.spec().unwrap().group as f64)
            .sum();
        assert!((groups - 4.0 / 64.0).abs() < 1e-9);
        let err = KvqConfig::from_json(r#"{"budget": 3}"#).unwrap().to_config(2, None);
        assert_eq!(field_of(err), "budget");
        let err = KvqConfig::from_json(json).unwrap().to_config(3, None);
        assert_eq!(field_of(err), "norms");
    }

    #[test]
    fn invalid_fields_are_named() {
        for (json, field) in [
            (r#"{"nbits": 7}"#, "nbits"),
            (r#"{"nbits": {"k": 4}}"#, "nbits"),
            (r#"{"nbits": {"k": 4, "v": [2, 9]}}"#, "nbits.v[1]"),
            (r#"{"nbits": 4, "budget": 4}"#, "budget"),
            (r#"{}"#, "nbits"),
            (r#"{"nbits": 4, "axis": 0}"#, "axis"),
            (r#"{"nbits": 4, "axis": {"k": 1, "v": 2}}"#, "axis.v"),
            (r#"{"nbits": 4, "residual_length": {"k": 64, "v": 32}}"#, "residual_length"),
            (r#"{"nbits": 4, "group_size": -3}"#, "group_size"),
            (r#"{"nbits": 4, "bit_range": [4]}"#, "bit_range"),
            (r#"{"budget": 4, "bit_range": [4, 5.5]}"#, "bit_range[1]"),
            (r#"{"nbits": 4, "group_size": 64, "group_budget": 64}"#, "group_budget"),
            (r#"{"nbits": 4, "nbit": 4}"#, "nbit"),
        ] {
            assert_eq!(field_of(KvqConfig::from_json(json)), field, "{json}");
        }
        let err = KvqConfig::from_json(r#"{"nbits": {"k": [4, 4, 4], "v": 2}}"#).unwrap().to_config(2, None);
        assert_eq!(field_of(err), "nbits.k");
        let err =
            KvqConfig::from_json(r#"{"budget": 0.5, "norms": {"w_k": [1], "w_v": [1]}}"#).unwrap().to_config(1, None);
        assert_eq!(field_of(err), "budget");
    }
}
