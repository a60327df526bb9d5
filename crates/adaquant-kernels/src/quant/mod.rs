//! Group-wise asymmetric min-max quantization of one KV head into a packed stream, and dequantization.
//!
//! Semantics (DESIGN.md): for a group with minimum `min` and maximum `max`, `scale = (max - min) / (levels - 1)`,
//! `code = clamp(round((x - min) / scale), 0, levels - 1)` and `x^ = min + code * scale`. The stored pair covers
//! the group: the minimum is rounded toward minus infinity to the metadata type (f16 by default), and the scale is
//! `(max - stored min) / (levels - 1)` rounded up, so `stored min <= min` and `stored min + (levels - 1) * scale >=
//! max` hold exactly; the codes are computed against the stored values. Every element is then within half a stored
//! scale of its reconstruction, up to f32 rounding of the code and of `min + code * scale` (see
//! [`covering_params`]), however large the group's offset is next to its range. A constant group has scale 0 and
//! reconstructs exactly whenever its value is representable in the metadata type (always with f32 metadata).
//! A minimum or scale outside the finite range of the metadata type (beyond 65504 for f16) is
//! [`Error::MetaOverflow`].
//!
//! Lloyd-Max specs ([`crate::format::Levels::LloydMax`]) store one scale per group and no minimum; see [`codebook`].
//!
//! [`PackedStream`] owns the packed codes and metadata of one KV head and grows by appends; every value is quantized
//! exactly once, when it is pushed. [`PackedView`] borrows a stream (or any consistent set of buffers).

pub mod codebook;
mod cpu;
pub mod hqq;
pub(crate) mod reference;

use half::f16;

use crate::error::{Error, Result};
use crate::format::{GroupAxis, MetaDtype, QuantSpec};
use crate::pack;

/// Owned group metadata (scales or minimums) in its storage type.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaBuf {
    F16(Vec<f16>),
    F32(Vec<f32>),
}

impl MetaBuf {
    /// An empty buffer of the given type.
    pub fn new(dtype: MetaDtype) -> MetaBuf {
        MetaBuf::with_capacity(dtype, 0)
    }

    /// An empty buffer of the given type with room for `n` entries.
    pub fn with_capacity(dtype: MetaDtype, n: usize) -> MetaBuf {
        match dtype {
            MetaDtype::F16 => MetaBuf::F16(Vec::with_capacity(n)),
            MetaDtype::F32 => MetaBuf::F32(Vec::with_capacity(n)),
        }
    }

    /// The storage type.
    pub fn dtype(&self) -> MetaDtype {
        match self {
            MetaBuf::F16(_) => MetaDtype::F16,
            MetaBuf::F32(_) => MetaDtype::F32,
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        match self {
            MetaBuf::F16(v) => v.len(),
            MetaBuf::F32(v) => v.len(),
        }
    }

    /// Whether the buffer holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entry `i` as f32.
    pub fn get(&self, i: usize) -> f32 {
        self.view().get(i)
    }

    /// Bytes held by the entries (not counting spare capacity).
    pub fn bytes(&self) -> usize {
        self.len() * self.dtype().bytes()
    }

    /// Appends `x`, rounded to the storage type.
    pub fn push(&mut self, x: f32) {
        match self {
            MetaBuf::F16(v) => v.push(f16::from_f32(x)),
            MetaBuf::F32(v) => v.push(x),
        }
    }

    /// Removes every entry, keeping the allocation.
    pub fn clear(&mut self) {
        match self {
            MetaBuf::F16(v) => v.clear(),
            MetaBuf::F32(v) => v.clear(),
        }
    }

    /// Keeps the first `n` entries.
    pub fn truncate(&mut self, n: usize) {
        match self {
            MetaBuf::F16(v) => v.truncate(n),
            MetaBuf::F32(v) => v.truncate(n),
        }
    }

    /// Removes the first `n` entries (all of them when `n` exceeds the length).
    pub fn drain_front(&mut self, n: usize) {
        match self {
            MetaBuf::F16(v) => drop(v.drain(..n.min(v.len()))),
            MetaBuf::F32(v) => drop(v.drain(..n.min(v.len()))),
        }
    }

    /// A borrowed view of the entries.
    pub fn view(&self) -> MetaView<'_> {
        match self {
            MetaBuf::F16(v) => MetaView::F16(v),
            MetaBuf::F32(v) => MetaView::F32(v),
        }
    }

    fn reserve(&mut self, n: usize) {
        match self {
            MetaBuf::F16(v) => v.reserve(n),
            MetaBuf::F32(v) => v.reserve(n),
        }
    }
}

/// Borrowed group metadata (scales or minimums) in its storage type.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MetaView<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
}

impl<'a> MetaView<'a> {
    /// The storage type.
    pub fn dtype(&self) -> MetaDtype {
        match self {
            MetaView::F16(_) => MetaDtype::F16,
            MetaView::F32(_) => MetaDtype::F32,
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        match self {
            MetaView::F16(v) => v.len(),
            MetaView::F32(v) => v.len(),
        }
    }

    /// Whether the view holds no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entry `i` as f32.
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            MetaView::F16(v) => v[i].to_f32(),
            MetaView::F32(v) => v[i],
        }
    }

    /// Bytes of the entries.
    pub fn bytes(&self) -> usize {
        self.len() * self.dtype().bytes()
    }

    /// Entries `start .. start + len`.
    pub fn slice(&self, start: usize, len: usize) -> MetaView<'a> {
        match self {
            MetaView::F16(v) => MetaView::F16(&v[start..start + len]),
            MetaView::F32(v) => MetaView::F32(&v[start..start + len]),
        }
    }

    /// Converts entries `start .. start + out.len()` to f32.
    #[inline]
    pub fn read_into(&self, start: usize, out: &mut [f32]) {
        match self {
            MetaView::F16(v) => {
                let n = out.len();
                for (o, x) in out.iter_mut().zip(&v[start..start + n]) {
                    *o = x.to_f32();
                }
            }
            MetaView::F32(v) => {
                let n = out.len();
                out.copy_from_slice(&v[start..start + n]);
            }
        }
    }
}

/// Rounds `x` to the metadata type and back, failing when it does not fit.
#[inline]
pub(crate) fn round_meta(dtype: MetaDtype, what: &'static str, x: f32) -> Result<f32> {
    let r = match dtype {
        MetaDtype::F16 => f16::from_f32(x).to_f32(),
        MetaDtype::F32 => x,
    };
    if r.is_finite() {
        Ok(r)
    } else {
        Err(Error::MetaOverflow { what, value: x, dtype })
    }
}

/// Largest f16 magnitude.
const F16_MAX: f32 = 65504.0;

/// The next f32 above a finite `x >= 0` (`+0` for `x == -0`).
#[inline(always)]
fn next_up_nonneg(x: f32) -> f32 {
    f32::from_bits((x.to_bits() & 0x7fff_ffff) + 1)
}

/// The largest value of the metadata type that is at most `x` (finite), or [`Error::MetaOverflow`] when `x` lies
/// outside the type's finite range.
#[inline(always)]
fn meta_floor(dtype: MetaDtype, what: &'static str, x: f32) -> Result<f32> {
    match dtype {
        MetaDtype::F32 => Ok(x),
        MetaDtype::F16 => {
            if x.abs() > F16_MAX {
                return Err(Error::MetaOverflow { what, value: x, dtype });
            }
            let mut b = f16::from_f32(x).to_bits();
            if f16::from_bits(b).to_f32() > x {
                // One step toward minus infinity: positive values lose magnitude, negative ones (and +0) gain it.
                b = if b == 0 || b & 0x8000 != 0 { (b | 0x8000) + 1 } else { b - 1 };
            }
            Ok(f16::from_bits(b).to_f32())
        }
    }
}

/// The smallest value of the metadata type that is at least `x` (`x >= 0`), or [`Error::MetaOverflow`] when it
/// does not exist.
#[inline(always)]
fn meta_ceil(dtype: MetaDtype, what: &'static str, x: f32) -> Result<f32> {
    let r = match dtype {
        MetaDtype::F32 => x,
        MetaDtype::F16 => {
            let mut b = f16::from_f32(x).to_bits();
            if f16::from_bits(b).to_f32() < x {
                b += 1;
            }
            f16::from_bits(b).to_f32()
        }
    };
    if r.is_finite() {
        Ok(r)
    } else {
        Err(Error::MetaOverflow { what, value: x, dtype })
    }
}

/// The stored (scale, minimum) of a min-max group with extremes `mn <= mx` (finite): the pair covers the group.
///
/// `m` is the largest metadata value `<= mn`; `r` the smallest f32 `>= mx - m` (the rounding error of the f32
/// difference is recovered exactly with the TwoSum transformation); `q` the smallest f32 with `q * max_code >= r`
/// (the sign of the exact residual comes from one fused multiply-add); the scale is the smallest metadata value
/// `>= q`. Hence `m <= mn` and `m + max_code * scale >= mx` hold in exact arithmetic, and with f16 metadata the
/// scale is the smallest f16 for which they do. The CUDA quantizer (`quant.cu`) performs the same operations; the
/// reference quantizer computes the same pair on its own, in f64.
#[inline(always)]
pub(crate) fn covering_params(dtype: MetaDtype, max_code: f32, mn: f32, mx: f32) -> Result<(f32, f32)> {
    let m = meta_floor(dtype, "minimum", mn)?;
    let r = mx - m;
    let b = r - mx;
    let a = r - b;
    let err = (mx - a) + (-m - b);
    let r = if err > 0.0 { next_up_nonneg(r) } else { r };
    let mut q = r / max_code;
    if q.mul_add(max_code, -r) < 0.0 {
        q = next_up_nonneg(q);
    }
    let s = meta_ceil(dtype, "scale", q)?;
    Ok((s, m))
}

/// The code of `x` in a group with stored scale `s` and minimum `m` (the one quantization formula of the crate):
/// `clamp(round((x - m) / s), 0, max_code)`, rounding half away from zero.
///
/// Clamping first gives the same code (rounding is monotonic and the bounds are integers); on the clamped,
/// non-negative value, adding the largest float below 0.5 and truncating is exactly `f32::round`, and unlike
/// `f32::round` it vectorizes on x86-64.
#[inline(always)]
pub(crate) fn quantize_value(x: f32, s: f32, m: f32, max_code: f32) -> u8 {
    if s > 0.0 {
        (((x - m) / s).clamp(0.0, max_code) + 0.499_999_97) as u8
    } else {
        0
    }
}

/// Fails with [`Error::NonFinite`] at the first NaN or infinity.
pub(crate) fn check_finite(what: &'static str, x: &[f32]) -> Result<()> {
    // Summing `x * 0` is NaN exactly when some element is non-finite, and it vectorizes.
    let probe: f32 = x.chunks(256).map(|c| c.iter().map(|&v| v * 0.0).sum::<f32>()).sum();
    if probe.is_nan() {
        let index = x.iter().position(|v| !v.is_finite()).unwrap_or(0);
        return Err(Error::NonFinite { what, index, value: x[index] });
    }
    Ok(())
}

/// The packed keys or values of one KV head of one layer, growing by appends.
/// Stream element order as in [`crate::format::GroupAxis`].
#[derive(Clone, Debug, PartialEq)]
pub struct PackedStream {
    spec: QuantSpec,
    head_dim: usize,
    tokens: usize,
    codes: Vec<u8>,
    scales: MetaBuf,
    mins: MetaBuf,
}

impl PackedStream {
    /// An empty stream; checks the spec against `head_dim`.
    pub fn new(spec: QuantSpec, head_dim: usize) -> Result<Self> {
        PackedStream::with_capacity(spec, head_dim, 0)
    }

    /// An empty stream with room for `tokens` tokens without reallocating.
    pub fn with_capacity(spec: QuantSpec, head_dim: usize, tokens: usize) -> Result<Self> {
        spec.validate(head_dim)?;
        if head_dim == 0 {
            return Err(Error::ShapeMismatch { what: "head_dim (must be positive)", expected: 1, got: 0 });
        }
        let groups = tokens * head_dim / spec.group;
        let n_mins = spec.n_mins(tokens, head_dim);
        Ok(PackedStream {
            spec,
            head_dim,
            tokens: 0,
            codes: Vec::with_capacity(spec.bits.packed_bytes(tokens * head_dim)),
            scales: MetaBuf::with_capacity(spec.meta, groups),
            mins: MetaBuf::with_capacity(spec.meta, n_mins),
        })
    }

    /// Quantizes `x` (`[t][head_dim]`, one head) group by group and appends the codes and metadata; each value is
    /// quantized exactly once. Per-channel streams need `t` to be a multiple of the group size. Non-finite input
    /// returns [`Error::NonFinite`] and leaves the stream unchanged.
    pub fn push(&mut self, x: &[f32]) -> Result<()> {
        self.push_with(x, true)
    }

    /// Reference twin of [`PackedStream::push`]: scalar loops, one code at a time.
    pub fn push_ref(&mut self, x: &[f32]) -> Result<()> {
        self.push_with(x, false)
    }

    fn push_with(&mut self, x: &[f32], fast: bool) -> Result<()> {
        let d = self.head_dim;
        if !x.len().is_multiple_of(d) {
            return Err(Error::ShapeMismatch {
                what: "pushed values (a whole number of tokens of head_dim)",
                expected: x.len() / d * d,
                got: x.len(),
            });
        }
        let t = x.len() / d;
        if t == 0 {
            return Ok(());
        }
        let spec = self.spec;
        if spec.axis == GroupAxis::PerChannel && !t.is_multiple_of(spec.group) {
            return Err(Error::GroupDoesNotDivide {
                group: spec.group,
                len: t,
                what: "tokens pushed at once",
                axis: spec.axis,
            });
        }
        check_finite("input to quantize", x)?;
        let n_groups = spec.n_groups(t, d);
        let mut codes = vec![0u8; t * d];
        let mut scales = vec![0f32; n_groups];
        let mut mins = vec![0f32; spec.n_mins(t, d)];
        if spec.is_codebook() {
            codebook::quantize_codes(&spec, d, x, &mut codes, &mut scales, fast)?;
        } else if fast {
            cpu::quantize_codes(&spec, d, x, &mut codes, &mut scales, &mut mins)?;
        } else {
            reference::quantize_codes(&spec, d, x, &mut codes, &mut scales, &mut mins)?;
        }
        // Nothing below can fail: the stream changes only now.
        let start = self.tokens * d;
        self.codes.resize(spec.bits.packed_bytes(start + t * d), 0);
        pack::pack_at(spec.bits, &mut self.codes, start, &codes, fast);
        self.scales.reserve(n_groups);
        self.mins.reserve(mins.len());
        for &s in &scales {
            self.scales.push(s);
        }
        for &m in &mins {
            self.mins.push(m);
        }
        self.tokens += t;
        Ok(())
    }

    /// Number of quantized tokens held.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The quantization recipe.
    pub fn spec(&self) -> &QuantSpec {
        &self.spec
    }

    /// Channels per token.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Bytes held: codes plus metadata; equals `spec.bytes(tokens, 1, head_dim)`.
    pub fn bytes(&self) -> usize {
        self.code_bytes() + self.meta_bytes()
    }

    /// Bytes of packed codes.
    pub fn code_bytes(&self) -> usize {
        self.codes.len()
    }

    /// Bytes of scales and minimums.
    pub fn meta_bytes(&self) -> usize {
        self.scales.bytes() + self.mins.bytes()
    }

    /// A borrowed view of everything held.
    pub fn view(&self) -> PackedView<'_> {
        PackedView {
            spec: self.spec,
            head_dim: self.head_dim,
            tokens: self.tokens,
            codes: &self.codes,
            scales: self.scales.view(),
            mins: self.mins.view(),
        }
    }

    /// Keeps the first `tokens` tokens, leaving the stream exactly (codes, metadata and bytes) as it was when it
    /// held that many: the undo of the pushes since. Per-channel streams need `tokens` to be a multiple of the group
    /// size ([`Error::GroupDoesNotDivide`] otherwise, and the stream is unchanged); more tokens than held is a no-op.
    pub fn truncate(&mut self, tokens: usize) -> Result<()> {
        if tokens >= self.tokens {
            return Ok(());
        }
        if self.spec.axis == GroupAxis::PerChannel && !tokens.is_multiple_of(self.spec.group) {
            return Err(Error::GroupDoesNotDivide {
                group: self.spec.group,
                len: tokens,
                what: "tokens kept by truncate",
                axis: self.spec.axis,
            });
        }
        let d = self.head_dim;
        pack::truncate_codes(self.spec.bits, &mut self.codes, tokens * d);
        let groups = self.spec.n_groups(tokens, d);
        self.scales.truncate(groups);
        self.mins.truncate(groups);
        self.tokens = tokens;
        Ok(())
    }

    /// Removes the first `tokens` tokens (codes and metadata), leaving the stream exactly as if it had been built by
    /// pushing only the tokens after them: how a sliding-window cache frees history no query can see any more.
    /// `tokens` must be a multiple of [`QuantSpec::token_align`] ([`Error::GroupDoesNotDivide`] otherwise, and the
    /// stream is unchanged); more tokens than held empties the stream. Costs a copy of what stays.
    pub fn drop_front(&mut self, tokens: usize) -> Result<()> {
        let tokens = tokens.min(self.tokens);
        if tokens == 0 {
            return Ok(());
        }
        let d = self.head_dim;
        let align = self.spec.token_align(d);
        if !tokens.is_multiple_of(align) && tokens != self.tokens {
            return Err(Error::GroupDoesNotDivide {
                group: align,
                len: tokens,
                what: "tokens dropped from the front (a whole number of groups ending on a code byte)",
                axis: self.spec.axis,
            });
        }
        if tokens == self.tokens {
            self.clear();
            return Ok(());
        }
        self.codes.drain(..self.spec.bits.packed_bytes(tokens * d));
        self.scales.drain_front(self.spec.n_groups(tokens, d));
        self.mins.drain_front(self.spec.n_mins(tokens, d));
        self.tokens -= tokens;
        Ok(())
    }

    /// Removes every token, keeping the allocations.
    pub fn clear(&mut self) {
        self.tokens = 0;
        self.codes.clear();
        self.scales.clear();
        self.mins.clear();
    }
}

/// A borrowed packed stream: `tokens` tokens of one KV head in the element order of `spec.axis`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PackedView<'a> {
    pub spec: QuantSpec,
    pub head_dim: usize,
    pub tokens: usize,
    pub codes: &'a [u8],
    pub scales: MetaView<'a>,
    pub mins: MetaView<'a>,
}

impl<'a> PackedView<'a> {
    /// The first `tokens` tokens.
    ///
    /// # Panics
    ///
    /// Panics if `tokens` exceeds the view or, for per-channel groups, is not a multiple of the group size;
    /// [`PackedView::try_prefix`] returns an error instead.
    pub fn prefix(&self, tokens: usize) -> Self {
        match self.try_prefix(tokens) {
            Ok(v) => v,
            Err(e) => panic!("PackedView::prefix: {e}"),
        }
    }

    /// The first `tokens` tokens, or an error if the view is shorter or a per-channel block would be cut.
    pub fn try_prefix(&self, tokens: usize) -> Result<Self> {
        if tokens > self.tokens {
            return Err(Error::BadView {
                what: "prefix tokens (at most the view's tokens)",
                expected: self.tokens,
                got: tokens,
            });
        }
        if self.spec.axis == GroupAxis::PerChannel && !tokens.is_multiple_of(self.spec.group) {
            return Err(Error::GroupDoesNotDivide {
                group: self.spec.group,
                len: tokens,
                what: "prefix tokens",
                axis: self.spec.axis,
            });
        }
        let d = self.head_dim;
        let groups = self.spec.n_groups(tokens, d);
        Ok(PackedView {
            tokens,
            codes: &self.codes[..self.spec.bits.packed_bytes(tokens * d)],
            scales: self.scales.slice(0, groups),
            mins: self.mins.slice(0, self.spec.n_mins(tokens, d)),
            ..*self
        })
    }

    /// The tokens from `start` on: the view a stream that had dropped its first `start` tokens would give.
    /// `start` must be at most the view's tokens and a multiple of [`QuantSpec::token_align`] (or equal to the
    /// view's tokens), so that the codes start on a byte and the metadata on a group.
    pub fn try_suffix(&self, start: usize) -> Result<Self> {
        if start > self.tokens {
            return Err(Error::BadView {
                what: "suffix start (at most the view's tokens)",
                expected: self.tokens,
                got: start,
            });
        }
        let d = self.head_dim;
        let align = self.spec.token_align(d);
        if !start.is_multiple_of(align) && start != self.tokens {
            return Err(Error::GroupDoesNotDivide {
                group: align,
                len: start,
                what: "suffix start (a whole number of groups ending on a code byte)",
                axis: self.spec.axis,
            });
        }
        let (groups, mins) = (self.spec.n_groups(start, d), self.spec.n_mins(start, d));
        let code_start = if start == self.tokens {
            self.codes.len().min(self.spec.bits.packed_bytes(self.tokens * d))
        } else {
            self.spec.bits.packed_bytes(start * d)
        };
        Ok(PackedView {
            tokens: self.tokens - start,
            codes: &self.codes[code_start..],
            scales: self.scales.slice(groups.min(self.scales.len()), self.scales.len() - groups.min(self.scales.len())),
            mins: self.mins.slice(mins.min(self.mins.len()), self.mins.len() - mins.min(self.mins.len())),
            ..*self
        })
    }

    /// Bytes of codes and metadata the view covers.
    pub fn bytes(&self) -> usize {
        self.codes.len() + self.scales.bytes() + self.mins.bytes()
    }

    /// Checks that the parts agree: spec valid, buffer lengths match `tokens`.
    pub fn check(&self) -> Result<()> {
        self.spec.validate(self.head_dim)?;
        let d = self.head_dim;
        if d == 0 {
            return Err(Error::BadView { what: "head_dim", expected: 1, got: 0 });
        }
        if self.spec.axis == GroupAxis::PerChannel && !self.tokens.is_multiple_of(self.spec.group) {
            return Err(Error::GroupDoesNotDivide {
                group: self.spec.group,
                len: self.tokens,
                what: "tokens of a per-channel view",
                axis: self.spec.axis,
            });
        }
        let need = self.spec.bits.packed_bytes(self.tokens * d);
        if self.codes.len() < need {
            return Err(Error::BadView { what: "code bytes", expected: need, got: self.codes.len() });
        }
        let groups = self.spec.n_groups(self.tokens, d);
        if self.scales.len() != groups {
            return Err(Error::BadView { what: "scales", expected: groups, got: self.scales.len() });
        }
        let n_mins = self.spec.n_mins(self.tokens, d);
        if self.mins.len() != n_mins {
            return Err(Error::BadView { what: "minimums", expected: n_mins, got: self.mins.len() });
        }
        Ok(())
    }
}

fn check_out(view: &PackedView<'_>, out: &[f32]) -> Result<()> {
    view.check()?;
    let expected = view.tokens * view.head_dim;
    if out.len() != expected {
        return Err(Error::ShapeMismatch { what: "dequantized output ([tokens][head_dim])", expected, got: out.len() });
    }
    Ok(())
}

/// Reconstructs `[tokens][head_dim]` values from a packed view, one element at a time. Reference twin of
/// [`dequantize`].
pub fn dequantize_ref(view: &PackedView<'_>, out: &mut [f32]) -> Result<()> {
    check_out(view, out)?;
    if view.spec.is_codebook() {
        codebook::dequantize_ref(view, out);
    } else {
        reference::dequantize(view, out);
    }
    Ok(())
}

/// Reconstructs `[tokens][head_dim]` values from a packed view; fast twin of [`dequantize_ref`] with bit-identical
/// results.
pub fn dequantize(view: &PackedView<'_>, out: &mut [f32]) -> Result<()> {
    check_out(view, out)?;
    if view.spec.is_codebook() {
        codebook::dequantize(view, out);
    } else {
        cpu::dequantize(view, out);
    }
    Ok(())
}

/// Quantizes `x` (`[t][head_dim]`, one head) into a new stream with the scalar reference path.
pub fn quantize_ref(spec: &QuantSpec, head_dim: usize, x: &[f32]) -> Result<PackedStream> {
    let mut s = PackedStream::with_capacity(*spec, head_dim, x.len() / head_dim.max(1))?;
    s.push_ref(x)?;
    Ok(s)
}

/// Quantizes `x` (`[t][head_dim]`, one head) into a new stream with the fast path.
pub fn quantize(spec: &QuantSpec, head_dim: usize, x: &[f32]) -> Result<PackedStream> {
    let mut s = PackedStream::with_capacity(*spec, head_dim, x.len() / head_dim.max(1))?;
    s.push(x)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dropping whole aligned blocks from the front leaves exactly the stream of the remaining tokens, and a suffix
    /// view equals the view of that stream, for every width, both axes and codebook levels; unaligned cuts are errors.
    #[test]
    fn dropping_the_front_equals_pushing_only_the_rest() {
        use crate::format::{Bits, Levels};
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for d in [64usize, 40] {
            for bits in Bits::ALL {
                for (axis, group) in [(GroupAxis::PerToken, 8), (GroupAxis::PerChannel, 4)] {
                    for codebook in [false, true] {
                        let mut spec = QuantSpec::new(bits, group, axis);
                        if codebook {
                            if bits > Bits::B4 {
                                continue;
                            }
                            spec.levels = Levels::LloydMax;
                        }
                        let align = spec.token_align(d);
                        assert!(align > 0 && (align * d).is_multiple_of(bits.unit().0));
                        let t = 8 * align.max(4);
                        let x: Vec<f32> = (0..t * d).map(|_| rng.random_range(-2.0..2.0)).collect();
                        let mut s = PackedStream::new(spec, d).unwrap();
                        s.push(&x).unwrap();
                        let what = format!("{bits} {axis:?} g{group} d{d} codebook {codebook}");
                        for cut in [align, 3 * align] {
                            let mut rest = PackedStream::new(spec, d).unwrap();
                            rest.push(&x[cut * d..]).unwrap();
                            assert_eq!(s.view().try_suffix(cut).unwrap(), rest.view(), "{what} suffix {cut}");
                            let mut dropped = s.clone();
                            dropped.drop_front(cut).unwrap();
                            assert_eq!(dropped, rest, "{what} drop {cut}");
                            assert_eq!(dropped.bytes(), spec.bytes(t - cut, 1, d), "{what}");
                        }
                        let all = s.view().try_suffix(t).unwrap();
                        assert_eq!((all.tokens, all.codes.len(), all.scales.len()), (0, 0, 0), "{what}");
                        if align > 1 {
                            assert!(s.view().try_suffix(align + 1).is_err(), "{what}");
                            let before = s.clone();
                            assert!(s.drop_front(align + 1).is_err(), "{what}");
                            assert_eq!(s, before, "{what}: a refused drop changes nothing");
                        }
                        assert!(s.view().try_suffix(t + 1).is_err());
                    }
                }
            }
        }
    }

    #[test]
    fn quantize_value_rounds_like_f32_round() {
        // Ties, values just below ties, out-of-range values and the largest code.
        let mut v = vec![-3.0f32, -0.5, -0.0, 0.0, 0.499_999_97, 0.5, 1.5, 2.5, 14.5, 15.0, 15.4, 16.0, 300.0];
        v.extend((0..20_000).map(|i| i as f32 * 0.000_813 - 0.3));
        for max_code in [1.0f32, 2.0, 3.0, 15.0, 255.0] {
            for &x in &v {
                let want = x.round().clamp(0.0, max_code) as u8;
                assert_eq!(quantize_value(x, 1.0, 0.0, max_code), want, "x={x} max={max_code}");
            }
        }
    }
}
