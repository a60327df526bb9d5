//! Quantizer families: the named combinations of zero point, levels and rotation that sweeps, short names and
//! kvq configs select.
//!
//! | name | zero point | levels | rotation |
//! |---|---|---|---|
//! | `minmax` | min-max | uniform | none |
//! | `hqq` | HQQ (20 iterations, p = 0.7, beta = 10, kappa = 1.01) | uniform | none |
//! | `rot-minmax` | min-max | uniform | Hadamard |
//! | `rot-hqq` | HQQ | uniform | Hadamard |
//! | `lloyd` | none (one scale per group) | Lloyd-Max | none |
//! | `rot-lloyd` | none (one scale per group) | Lloyd-Max | Hadamard |
//!
//! The group layout (per-token or per-channel keys) is separate: the sweep's `--k-axis`, a short name's `kivi`.

use std::fmt;
use std::str::FromStr;

use adaquant_kernels::{Levels, QuantSpec, Rotation, ZeroPoint};
use serde::{Deserialize, Serialize};

/// A quantizer family; see the module documentation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Quantizer {
    /// Uniform levels, min-max zero point (adaquant's default).
    #[default]
    #[serde(rename = "minmax")]
    MinMax,
    /// Uniform levels, HQQ-refined zero point (the authors' quantizer).
    Hqq,
    /// Hadamard rotation, then min-max.
    #[serde(rename = "rot-minmax")]
    RotMinMax,
    /// Hadamard rotation, then HQQ.
    RotHqq,
    /// Lloyd-Max levels without rotation.
    Lloyd,
    /// Hadamard rotation, then Lloyd-Max levels (TurboQuant's recipe with per-group scales).
    RotLloyd,
}

impl Quantizer {
    /// Every family.
    pub const ALL: [Quantizer; 6] = [
        Quantizer::MinMax,
        Quantizer::Hqq,
        Quantizer::RotMinMax,
        Quantizer::RotHqq,
        Quantizer::Lloyd,
        Quantizer::RotLloyd,
    ];

    /// Stable name used in keys, tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Quantizer::MinMax => "minmax",
            Quantizer::Hqq => "hqq",
            Quantizer::RotMinMax => "rot-minmax",
            Quantizer::RotHqq => "rot-hqq",
            Quantizer::Lloyd => "lloyd",
            Quantizer::RotLloyd => "rot-lloyd",
        }
    }

    /// Whether tokens are rotated before quantization.
    pub fn rotates(self) -> bool {
        matches!(self, Quantizer::RotMinMax | Quantizer::RotHqq | Quantizer::RotLloyd)
    }

    /// The zero point of this family's uniform levels.
    pub fn zero(self) -> ZeroPoint {
        match self {
            Quantizer::Hqq | Quantizer::RotHqq => ZeroPoint::HQQ,
            _ => ZeroPoint::MinMax,
        }
    }

    /// The levels of this family.
    pub fn levels(self) -> Levels {
        match self {
            Quantizer::Lloyd | Quantizer::RotLloyd => Levels::LloydMax,
            _ => Levels::Uniform,
        }
    }

    /// `spec` with this family's zero point, levels and rotation (seed 0); width, group, axis and metadata type
    /// are kept.
    pub fn apply(self, spec: QuantSpec) -> QuantSpec {
        QuantSpec {
            zero: self.zero(),
            levels: self.levels(),
            rotation: self.rotates().then_some(Rotation { seed: 0 }),
            ..spec
        }
    }

    /// The family of a spec (HQQ with any parameters counts as HQQ).
    pub fn of(spec: &QuantSpec) -> Quantizer {
        match (spec.levels, spec.zero.is_hqq(), spec.rotation.is_some()) {
            (Levels::LloydMax, _, false) => Quantizer::Lloyd,
            (Levels::LloydMax, _, true) => Quantizer::RotLloyd,
            (Levels::Uniform, false, false) => Quantizer::MinMax,
            (Levels::Uniform, true, false) => Quantizer::Hqq,
            (Levels::Uniform, false, true) => Quantizer::RotMinMax,
            (Levels::Uniform, true, true) => Quantizer::RotHqq,
        }
    }
}

impl fmt::Display for Quantizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Quantizer {
    type Err = String;
    fn from_str(s: &str) -> Result<Quantizer, String> {
        let t = s.trim().to_ascii_lowercase().replace(['_', '+'], "-");
        let t = t.replace("min-max", "minmax").replace("lloyd-max", "lloyd").replace("rotated-", "rot-");
        Quantizer::ALL.into_iter().find(|q| q.name() == t).ok_or_else(|| {
            let names: Vec<&str> = Quantizer::ALL.iter().map(|q| q.name()).collect();
            format!("unknown quantizer '{}': use one of {}", s.trim(), names.join(", "))
        })
    }
}

/// The quantizer options of a short cache name (`hqq`, `minmax`, `lloyd`, `rot`, `krot`, `vrot`).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ShortOptions {
    hqq: bool,
    lloyd: bool,
    pub rotate_k: bool,
    pub rotate_v: bool,
}

impl ShortOptions {
    /// Takes `option` if it is a quantizer option.
    pub fn take(&mut self, option: &str) -> bool {
        match option {
            "minmax" => self.hqq = false,
            "hqq" => self.hqq = true,
            "lloyd" => self.lloyd = true,
            "rot" => (self.rotate_k, self.rotate_v) = (true, true),
            "krot" => self.rotate_k = true,
            "vrot" => self.rotate_v = true,
            _ => return false,
        }
        true
    }

    /// `spec` with these options, rotated when `rotate`.
    pub fn spec(&self, spec: QuantSpec, rotate: bool) -> crate::Result<QuantSpec> {
        if self.hqq && self.lloyd {
            return Err(crate::CacheError::Field {
                field: "cache".into(),
                msg: "hqq and lloyd do not combine: Lloyd-Max groups have no zero point".into(),
            });
        }
        Ok(QuantSpec {
            zero: if self.hqq { ZeroPoint::HQQ } else { ZeroPoint::MinMax },
            levels: if self.lloyd { Levels::LloydMax } else { Levels::Uniform },
            rotation: rotate.then_some(Rotation { seed: 0 }),
            ..spec
        })
    }
}

/// The quantizer part of a config's short description: empty when every quantized side is plain min-max,
/// ` <family>` when every quantized side shares one family, ` K<family>/V<family>` when keys and values differ
/// but agree across layers, ` mixed quantizers` otherwise.
pub(crate) fn describe_families(layers: &[crate::LayerPrecision]) -> String {
    let fam = |p: &crate::Precision| p.spec().map(Quantizer::of);
    let ks: Vec<Quantizer> = layers.iter().filter_map(|l| fam(&l.k)).collect();
    let vs: Vec<Quantizer> = layers.iter().filter_map(|l| fam(&l.v)).collect();
    let one = |xs: &[Quantizer]| xs.first().copied().filter(|f| xs.iter().all(|x| x == f));
    match (one(&ks), one(&vs), ks.is_empty(), vs.is_empty()) {
        (None, _, false, _) | (_, None, _, false) => " mixed quantizers".into(),
        (k, v, _, _) => {
            let (k, v) = (k.or(v).unwrap_or_default(), v.or(k).unwrap_or_default());
            if k == v {
                if k == Quantizer::MinMax {
                    String::new()
                } else {
                    format!(" {k}")
                }
            } else {
                format!(" K{k}/V{v}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use adaquant_kernels::{Bits, GroupAxis};

    #[test]
    fn names_parse_and_families_round_trip() {
        let base = QuantSpec::new(Bits::B4, 64, GroupAxis::PerChannel);
        for q in Quantizer::ALL {
            assert_eq!(q.name().parse::<Quantizer>().unwrap(), q);
            assert_eq!(Quantizer::of(&q.apply(base)), q);
            let json = serde_json::to_string(&q).unwrap();
            assert_eq!(json, format!("\"{}\"", q.name()));
            assert_eq!(serde_json::from_str::<Quantizer>(&json).unwrap(), q);
            assert_eq!(q.apply(base).axis, GroupAxis::PerChannel);
            assert!(q.apply(base).validate(64).is_ok(), "{q}");
        }
        assert_eq!("rot_lloyd".parse::<Quantizer>().unwrap(), Quantizer::RotLloyd);
        assert_eq!("min-max".parse::<Quantizer>().unwrap(), Quantizer::MinMax);
        let err = "turbo".parse::<Quantizer>().unwrap_err();
        assert!(err.contains("rot-lloyd"), "{err}");
        assert_eq!(Quantizer::Hqq.apply(base).zero, ZeroPoint::Hqq { iters: 20, p: 0.7, beta: 10.0, kappa: 1.01 });
    }

    #[test]
    fn short_names_select_the_quantizer() {
        use crate::{CacheSpec, Precision};
        let config = |name: &str| name.parse::<CacheSpec>().unwrap().quant_config(2).unwrap().unwrap();
        let c = config("k4v2-hqq");
        assert_eq!(c.layers[0].k.spec().unwrap().zero, ZeroPoint::HQQ);
        assert_eq!(c.layers[1].v.spec().unwrap().zero, ZeroPoint::HQQ);
        assert_eq!(c.describe(), "K4V2 g64/64 r128 hqq");
        let c = config("k3v2-rot-lloyd-kivi");
        assert_eq!(Quantizer::of(c.layers[0].k.spec().unwrap()), Quantizer::RotLloyd);
        assert_eq!(c.layers[0].k.spec().unwrap().axis, GroupAxis::PerChannel);
        assert_eq!(c.describe(), "K3V2 g64c/64 r128 rot-lloyd");
        let c = config("k4v2-vrot");
        assert_eq!(Quantizer::of(c.layers[0].k.spec().unwrap()), Quantizer::MinMax);
        assert_eq!(Quantizer::of(c.layers[0].v.spec().unwrap()), Quantizer::RotMinMax);
        assert_eq!(c.describe(), "K4V2 g64/64 r128 Kminmax/Vrot-minmax");
        let c = config("k16v2-rot-hqq");
        assert_eq!(c.layers[0].k, Precision::Full);
        assert_eq!(c.describe(), "K16V2 g64 r128 rot-hqq");
        assert_eq!(config("k4v2-hqq-minmax"), config("k4v2"));
        for bad in ["k4v2-hqq-lloyd", "k8v2-lloyd", "k4v2-turbo"] {
            let err =
                bad.parse::<CacheSpec>().and_then(|s| s.build(crate::CacheShape::new(1, 2, 1, 64, 64)).map(|_| ()));
            assert!(err.is_err(), "{bad}");
        }
    }
}
