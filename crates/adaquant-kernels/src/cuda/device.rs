//! The CUDA implementation (feature `cuda`): NVRTC compilation, the module cache, device buffers and launches.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, DriverError, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

use super::layout::{
    axis_code, meta_code, AttnParams, AttnSmem, DType, KernelSpec, ATTN_THREADS, ATTN_TILE, LENS_STRIDE, MAX_GQA,
    MIN_ATTN_GROUP, QUANT_THREADS,
};
pub use super::layout::{from_dtype_bytes, median, quantized_tokens, stream_stride, to_dtype_bytes};
pub use super::libs::{driver_available, nvrtc_available, NVRTC_LIB_ENV};
use super::reference::{self, PackedStream};
use crate::error::{Error, Result};
use crate::format::{Bits, GroupAxis, MetaDtype, QuantSpec, ZeroPoint};

// SAFETY: AttnParams is #[repr(C)], holds only plain numbers, and attn.cu declares the same layout (checked by
// static_assert against the generated preamble).
unsafe impl DeviceRepr for AttnParams {}

/// Environment variable naming a folder of precompiled PTX files ([`KernelSpec::ptx_file`]); when set, modules
/// load from it and NVRTC is needed only for specialisations missing there (for GPU machines without NVRTC).
pub const PTX_DIR_ENV: &str = "ADAQUANT_PTX_DIR";

fn ptx_dir() -> Option<std::path::PathBuf> {
    std::env::var_os(PTX_DIR_ENV).filter(|d| !d.is_empty()).map(std::path::PathBuf::from)
}

/// Compiles one specialisation to PTX for a virtual architecture such as `compute_80`, keeping NVRTC's log in
/// the error.
pub fn compile_ptx(spec: &KernelSpec, arch: &'static str) -> Result<String> {
    nvrtc_available()?;
    let opts = CompileOptions {
        options: spec.nvrtc_options(),
        arch: Some(arch),
        name: Some(spec.file().to_string()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(spec.program(), opts).map_err(|e| compile_error(spec, arch, e))?;
    Ok(ptx.to_src())
}

fn compile_error(spec: &KernelSpec, arch: &str, e: CompileError) -> Error {
    match e {
        CompileError::CompileError { nvrtc, log, options } => Error::Cuda(format!(
            "NVRTC failed to compile {} for {arch} ({nvrtc:?}, options {options:?}):\n{}",
            spec.name(),
            log.to_string_lossy()
        )),
        other => Error::Cuda(format!("NVRTC failed on {} for {arch}: {other:?}", spec.name())),
    }
}

/// Maps a driver error to [`Error::Cuda`], saying what was being done.
fn cu<T>(r: std::result::Result<T, DriverError>, what: &str) -> Result<T> {
    r.map_err(|e| Error::Cuda(format!("{what}: {e:?}")))
}

/// A CUDA device with its stream and the cache of compiled modules, one per [`KernelSpec`].
pub struct CudaKernels {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: &'static str,
    sm_count: usize,
    modules: RwLock<HashMap<KernelSpec, Arc<CudaModule>>>,
}

impl std::fmt::Debug for CudaKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaKernels").field("arch", &self.arch).field("sm_count", &self.sm_count).finish()
    }
}

impl CudaKernels {
    /// Opens device `ordinal`. Fails with [`Error::Cuda`] when the driver or NVRTC is missing or no such device
    /// exists.
    pub fn new(ordinal: usize) -> Result<Arc<CudaKernels>> {
        driver_available()?;
        if ptx_dir().is_none() {
            nvrtc_available()?;
        }
        let count = cu(CudaContext::device_count(), "counting CUDA devices")?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::Cuda(format!("no CUDA device {ordinal}: this machine has {count}")));
        }
        let ctx = cu(CudaContext::new(ordinal), "creating a CUDA context")?;
        let (major, minor) = cu(ctx.compute_capability(), "reading the compute capability")?;
        let arch: &'static str = match (major, minor) {
            (8, 0) => "compute_80",
            (9, 0) => "compute_90",
            (ma, mi) => Box::leak(format!("compute_{ma}{mi}").into_boxed_str()),
        };
        let sm_count = cu(
            ctx.attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
            "reading the multiprocessor count",
        )? as usize;
        let stream = ctx.default_stream();
        Ok(Arc::new(CudaKernels { ctx, stream, arch, sm_count, modules: RwLock::new(HashMap::new()) }))
    }

    /// The device name, such as `NVIDIA H200`.
    pub fn device_name(&self) -> Result<String> {
        cu(self.ctx.name(), "reading the device name")
    }

    /// The virtual architecture kernels are compiled for (`compute_90` on an H200).
    pub fn arch(&self) -> &'static str {
        self.arch
    }

    /// Streaming multiprocessors of the device.
    pub fn sm_count(&self) -> usize {
        self.sm_count
    }

    /// The stream every launch goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for all work on the stream and reports any asynchronous error.
    pub fn synchronize(&self) -> Result<()> {
        cu(self.stream.synchronize(), "synchronizing the stream")
    }

    /// The compiled module of a specialisation: read lock first, compile under the write lock on a miss.
    pub fn module(&self, spec: &KernelSpec) -> Result<Arc<CudaModule>> {
        if let Some(m) = self.modules.read().map_err(|_| poisoned())?.get(spec) {
            return Ok(m.clone());
        }
        let mut w = self.modules.write().map_err(|_| poisoned())?;
        if let Some(m) = w.get(spec) {
            return Ok(m.clone());
        }
        let precompiled = ptx_dir().map(|d| d.join(spec.ptx_file(self.arch))).filter(|p| p.is_file());
        let ptx = match precompiled {
            Some(path) => std::fs::read_to_string(&path)
                .map_err(|e| Error::Cuda(format!("reading precompiled PTX {}: {e}", path.display())))?,
            None => compile_ptx(spec, self.arch)?,
        };
        let m = cu(self.ctx.load_module(Ptx::from_src(ptx)), &format!("loading {}", spec.name()))?;
        if matches!(spec, KernelSpec::Attn { .. } | KernelSpec::AttnF16 { .. } | KernelSpec::AttnLloyd { .. }) {
            let head_dim = match *spec {
                KernelSpec::Attn { head_dim, .. }
                | KernelSpec::AttnF16 { head_dim }
                | KernelSpec::AttnLloyd { head_dim, .. } => head_dim,
                KernelSpec::Quant { .. } => unreachable!("matched above"),
            };
            let smem = AttnSmem::for_head_dim(head_dim).total as i32;
            let f = cu(m.load_function(spec.functions()[0]), &format!("loading {}", spec.functions()[0]))?;
            cu(
                f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem),
                &format!("granting {smem} bytes of shared memory to {}", spec.name()),
            )?;
        }
        w.insert(*spec, m.clone());
        Ok(m)
    }

    /// One kernel function of a specialisation.
    pub fn function(&self, spec: &KernelSpec, name: &str) -> Result<CudaFunction> {
        let m = self.module(spec)?;
        cu(m.load_function(name), &format!("loading {name} from {}", spec.name()))
    }

    /// Uploads a host slice.
    pub fn upload<T: DeviceRepr>(&self, x: &[T]) -> Result<CudaSlice<T>> {
        cu(self.stream.memcpy_stod(x), "copying to the device")
    }

    /// Downloads a device slice (waits for the stream).
    pub fn download<T: DeviceRepr>(&self, x: &CudaSlice<T>) -> Result<Vec<T>> {
        cu(self.stream.memcpy_dtov(x), "copying from the device")
    }

    /// Allocates zeroed device memory.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        cu(self.stream.alloc_zeros(n.max(1)), &format!("allocating {n} elements"))
    }

    /// Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written, median of `iters` copies
    /// of a `bytes`-byte buffer.
    pub fn copy_bandwidth(&self, bytes: usize, iters: usize) -> Result<f64> {
        let src: CudaSlice<u8> = self.zeros(bytes)?;
        let mut dst: CudaSlice<u8> = self.zeros(bytes)?;
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters.max(1) + 1 {
            let ms = self.time_ms(|| cu(self.stream.memcpy_dtod(&src, &mut dst), "device copy"))?;
            times.push(ms);
        }
        times.remove(0);
        let ms = median(&mut times);
        Ok(2.0 * bytes as f64 / (ms * 1e-3) / 1e9)
    }

    /// Runs `f` between two events on the stream and returns the elapsed milliseconds.
    pub fn time_ms(&self, f: impl FnOnce() -> Result<()>) -> Result<f64> {
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let start = cu(self.ctx.new_event(flags), "creating an event")?;
        let end = cu(self.ctx.new_event(flags), "creating an event")?;
        cu(start.record(&self.stream), "recording an event")?;
        f()?;
        cu(end.record(&self.stream), "recording an event")?;
        cu(end.synchronize(), "waiting for an event")?;
        Ok(f64::from(cu(start.elapsed_ms(&end), "reading an event")?))
    }
}

fn poisoned() -> Error {
    Error::Cuda("the module cache lock was poisoned by a panic in another thread".into())
}

/// Launch configuration of the elementwise quantization kernels over `n` items of each of `heads` streams.
fn grid(n: usize, heads: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n.div_ceil(QUANT_THREADS)).max(1) as u32, heads as u32, 1),
        block_dim: (QUANT_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Checks what the device quantizer supports beyond [`QuantSpec::validate`].
fn check_device_spec(spec: &QuantSpec, head_dim: usize) -> Result<()> {
    spec.validate(head_dim)?;
    if !matches!(spec.zero, ZeroPoint::MinMax) {
        return Err(Error::Cuda("the CUDA quantizer implements min-max zero points only, not HQQ".into()));
    }
    if spec.is_codebook() || spec.rotation.is_some() {
        return Err(Error::Cuda(
            "the CUDA cache implements uniform levels without rotation only; use the CPU cache for Lloyd-Max levels \
             and rotations"
                .into(),
        ));
    }
    Ok(())
}

/// Reads back the status words of `adq_quant_meta` and turns them into errors.
fn check_status(status: &[u32], what: &'static str, meta: MetaDtype) -> Result<()> {
    if status[0] != u32::MAX {
        return Err(Error::NonFinite { what, index: status[0] as usize, value: f32::from_bits(status[1]) });
    }
    if status[2] != 0 {
        let which = "scale or minimum";
        return Err(Error::MetaOverflow { what: which, value: f32::from_bits(status[3]), dtype: meta });
    }
    Ok(())
}

/// Converts stored metadata bytes to f32 values.
fn meta_values(bytes: &[u8], meta: MetaDtype) -> Vec<f32> {
    match meta {
        MetaDtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        MetaDtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
    }
}

/// Converts f32 metadata values to stored bytes.
fn meta_bytes(values: &[f32], meta: MetaDtype) -> Vec<u8> {
    match meta {
        MetaDtype::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        MetaDtype::F32 => values.iter().flat_map(|&v| v.to_le_bytes()).collect(),
    }
}

impl CudaKernels {
    /// Quantizes `heads` independent token-major [tokens][head_dim] blocks (`x` is [heads][tokens][head_dim]) on the
    /// device and returns each head's packed stream. Codes equal [`reference::quantize_ref`] bit for bit.
    pub fn quantize(
        &self,
        x: &[f32],
        heads: usize,
        tokens: usize,
        head_dim: usize,
        spec: &QuantSpec,
    ) -> Result<Vec<PackedStream>> {
        check_device_spec(spec, head_dim)?;
        if x.len() != heads * tokens * head_dim {
            return Err(Error::ShapeMismatch {
                what: "blocks to quantize ([heads][tokens][head_dim])",
                expected: heads * tokens * head_dim,
                got: x.len(),
            });
        }
        reference::check_block(spec, tokens * head_dim, tokens, head_dim)?;
        if heads == 0 || tokens == 0 {
            return Ok(vec![PackedStream { codes: vec![], scale: vec![], min: vec![] }; heads]);
        }
        let n = tokens * head_dim;
        let groups = n / spec.group;
        let mb = spec.meta.bytes();
        let stride = stream_stride(spec.bits, tokens, head_dim);
        let src = self.upload(x)?;
        let mut codes: CudaSlice<u8> = self.zeros(heads * stride)?;
        // Poisoned metadata (all ones: NaN in f16 and f32) shows any group the kernels skip.
        let mut scale = self.upload(&vec![0xffu8; heads * groups * mb])?;
        let mut minv = self.upload(&vec![0xffu8; heads * groups * mb])?;
        let mut status = self.upload(&[u32::MAX, 0, 0, 0])?;
        let qspec = KernelSpec::Quant { bits: spec.bits };
        let f_meta = self.function(&qspec, "adq_quant_meta")?;
        let f_pack = self.function(&qspec, "adq_pack")?;
        let (dt, hs, ring0, ringc) = (DType::F32.code(), n as u64, 0u32, tokens as u32);
        let (nt, d, axis, group, meta) =
            (tokens as u32, head_dim as u32, axis_code(spec.axis), spec.group as u32, meta_code(spec.meta));
        let (mhs, g0, e0, dhs) = (groups as u64, 0u64, 0u64, stride as u64);
        let mut b = self.stream.launch_builder(&f_meta);
        b.arg(&src).arg(&dt).arg(&hs).arg(&ring0).arg(&ringc).arg(&nt).arg(&d).arg(&axis).arg(&group);
        b.arg(&mut scale).arg(&mut minv).arg(&meta).arg(&mhs).arg(&g0).arg(&mut status);
        // SAFETY: the argument list matches adq_quant_meta in quant.cu; every buffer holds `heads` streams of the
        // sizes the kernel indexes (n source elements, `groups` metadata entries per head).
        cu(unsafe { b.launch(grid(groups, heads)) }, "launching adq_quant_meta")?;
        let n_bytes = spec.bits.packed_bytes(n);
        let mut b = self.stream.launch_builder(&f_pack);
        b.arg(&src).arg(&dt).arg(&hs).arg(&ring0).arg(&ringc).arg(&nt).arg(&d).arg(&axis).arg(&group);
        b.arg(&scale).arg(&minv).arg(&meta).arg(&mhs).arg(&mut codes).arg(&dhs).arg(&e0);
        // SAFETY: as above for adq_pack; each head's stream has `stride` >= packed bytes + pad bytes.
        cu(unsafe { b.launch(grid(n_bytes, heads)) }, "launching adq_pack")?;
        check_status(&self.download(&status)?, "blocks to quantize", spec.meta)?;
        let codes = self.download(&codes)?;
        let scale = meta_values(&self.download(&scale)?, spec.meta);
        let minv = meta_values(&self.download(&minv)?, spec.meta);
        Ok((0..heads)
            .map(|h| PackedStream {
                codes: codes[h * stride..h * stride + n_bytes].to_vec(),
                scale: scale[h * groups..(h + 1) * groups].to_vec(),
                min: minv[h * groups..(h + 1) * groups].to_vec(),
            })
            .collect())
    }

    /// Dequantizes packed streams (one per head, each `tokens` tokens) on the device into [heads][tokens][head_dim].
    pub fn dequantize(
        &self,
        streams: &[PackedStream],
        tokens: usize,
        head_dim: usize,
        spec: &QuantSpec,
    ) -> Result<Vec<f32>> {
        check_device_spec(spec, head_dim)?;
        reference::check_block(spec, tokens * head_dim, tokens, head_dim)?;
        let heads = streams.len();
        let n = tokens * head_dim;
        let groups = n / spec.group;
        let n_bytes = spec.bits.packed_bytes(n);
        for s in streams {
            if s.codes.len() != n_bytes {
                return Err(Error::ShapeMismatch { what: "packed codes", expected: n_bytes, got: s.codes.len() });
            }
            if s.scale.len() != groups || s.min.len() != groups {
                return Err(Error::ShapeMismatch { what: "group metadata", expected: groups, got: s.scale.len() });
            }
        }
        if heads == 0 || tokens == 0 {
            return Ok(vec![]);
        }
        let stride = stream_stride(spec.bits, tokens, head_dim);
        let mut codes = vec![0u8; heads * stride];
        let mut sc = Vec::with_capacity(heads * groups);
        let mut mn = Vec::with_capacity(heads * groups);
        for (h, s) in streams.iter().enumerate() {
            codes[h * stride..h * stride + n_bytes].copy_from_slice(&s.codes);
            sc.extend_from_slice(&s.scale);
            mn.extend_from_slice(&s.min);
        }
        let codes = self.upload(&codes)?;
        let sc = self.upload(&meta_bytes(&sc, spec.meta))?;
        let mn = self.upload(&meta_bytes(&mn, spec.meta))?;
        let mut out = self.upload(&vec![f32::NAN; heads * n])?;
        let f = self.function(&KernelSpec::Quant { bits: spec.bits }, "adq_dequant")?;
        let (shs, e0, nt, d) = (stride as u64, 0u64, tokens as u32, head_dim as u32);
        let (axis, group, meta, mhs) = (axis_code(spec.axis), spec.group as u32, meta_code(spec.meta), groups as u64);
        let (odt, ohs) = (DType::F32.code(), n as u64);
        let mut b = self.stream.launch_builder(&f);
        b.arg(&codes).arg(&shs).arg(&e0).arg(&nt).arg(&d).arg(&axis).arg(&group).arg(&sc).arg(&mn).arg(&meta);
        b.arg(&mhs).arg(&mut out).arg(&odt).arg(&ohs);
        // SAFETY: the argument list matches adq_dequant in quant.cu; buffers hold `heads` streams of the indexed
        // sizes, codes padded by PAD_BYTES.
        cu(unsafe { b.launch(grid(n, heads)) }, "launching adq_dequant")?;
        self.download(&out)
    }
}

/// Shape and precision of a [`DeviceKvCache`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceCacheConfig {
    /// Sequences held side by side.
    pub batch: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Most tokens one sequence may hold.
    pub capacity: usize,
    pub k: QuantSpec,
    pub v: QuantSpec,
    /// Most recent tokens kept exact (per-channel sides hold between `residual` and `residual + group - 1`).
    pub residual: usize,
    /// First tokens kept exact forever.
    pub sinks: usize,
}

/// Tokens appended to the device per step of [`DeviceKvCache::append`] (bounds the tail ring).
const APPEND_PIECE: usize = 64;

/// Device buffers of one side (keys or values) of every (sequence, KV head).
struct Side {
    spec: QuantSpec,
    stride: usize,
    groups_cap: usize,
    codes: CudaSlice<u8>,
    scale: CudaSlice<u8>,
    minv: CudaSlice<u8>,
    sink: CudaSlice<f32>,
    tail: CudaSlice<f32>,
}

/// Per-sequence counters (host copy of the `lens` rows).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct SeqState {
    tokens: usize,
    q: [usize; 2],
    ring: [usize; 2],
}

/// A quantized KV cache of one layer that lives on the device: packed key and value streams per (sequence, KV
/// head), an exact tail of recent tokens kept as a ring, and exact sinks, with the CPU cache's streaming semantics
/// (each token quantized exactly once when it leaves the tail; see [`quantized_tokens`]).
pub struct DeviceKvCache {
    kernels: Arc<CudaKernels>,
    cfg: DeviceCacheConfig,
    window_cap: usize,
    sides: [Side; 2],
    seqs: Vec<SeqState>,
    lens: CudaSlice<u32>,
    lens_dirty: bool,
    status: CudaSlice<u32>,
    part_acc: CudaSlice<f32>,
    part_ml: CudaSlice<f32>,
}

impl DeviceKvCache {
    /// Allocates an empty cache. Fails on shapes the kernels do not handle: group sizes must be powers of two of
    /// at least 16 (per-channel groups at most 64, per-token groups dividing head_dim), one metadata type for keys
    /// and values, min-max zero points, head_dim 64 or 128.
    pub fn new(kernels: Arc<CudaKernels>, cfg: DeviceCacheConfig) -> Result<DeviceKvCache> {
        KernelSpec::check_head_dim(cfg.head_dim)?;
        for spec in [cfg.k, cfg.v] {
            check_device_spec(&spec, cfg.head_dim)?;
            let g = spec.group;
            if !g.is_power_of_two() || g < MIN_ATTN_GROUP || (spec.axis == GroupAxis::PerChannel && g > ATTN_TILE) {
                return Err(Error::Cuda(format!(
                    "group size {g} ({}) is not supported by the CUDA attention: use a power of two from \
                     {MIN_ATTN_GROUP} to {} for per-channel groups, or dividing head_dim for per-token groups",
                    spec.axis, ATTN_TILE
                )));
            }
        }
        if cfg.k.meta != cfg.v.meta {
            return Err(Error::Cuda("keys and values must share one metadata type on the GPU".into()));
        }
        if cfg.batch == 0 || cfg.n_kv_heads == 0 || cfg.capacity == 0 {
            return Err(Error::ShapeMismatch {
                what: "batch, n_kv_heads and capacity (must be positive)",
                expected: 1,
                got: 0,
            });
        }
        let k = &kernels;
        let streams = cfg.batch * cfg.n_kv_heads;
        let d = cfg.head_dim;
        let block = |s: &QuantSpec| if s.axis == GroupAxis::PerChannel { s.group } else { 1 };
        let window_cap = cfg.residual + block(&cfg.k).max(block(&cfg.v)) + APPEND_PIECE;
        let cap_tokens = cfg.capacity.div_ceil(ATTN_TILE) * ATTN_TILE;
        let side = |spec: QuantSpec| -> Result<Side> {
            let stride = stream_stride(spec.bits, cap_tokens, d);
            let groups_cap = cap_tokens * d / spec.group;
            Ok(Side {
                spec,
                stride,
                groups_cap,
                codes: k.zeros(streams * stride)?,
                scale: k.zeros(streams * groups_cap * spec.meta.bytes())?,
                minv: k.zeros(streams * groups_cap * spec.meta.bytes())?,
                sink: k.zeros(streams * cfg.sinks.max(1) * d)?,
                tail: k.zeros(streams * window_cap * d)?,
            })
        };
        let sides = [side(cfg.k)?, side(cfg.v)?];
        Ok(DeviceKvCache {
            lens: k.zeros(cfg.batch * LENS_STRIDE)?,
            status: k.upload(&[u32::MAX, 0, 0, 0])?,
            part_acc: k.zeros(1)?,
            part_ml: k.zeros(1)?,
            kernels,
            cfg,
            window_cap,
            sides,
            seqs: vec![SeqState::default(); cfg.batch],
            lens_dirty: true,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &DeviceCacheConfig {
        &self.cfg
    }

    /// Tokens held by sequence `seq`.
    pub fn tokens(&self, seq: usize) -> usize {
        self.seqs.get(seq).map_or(0, |s| s.tokens)
    }

    /// Quantized (keys, values) tokens of sequence `seq`.
    pub fn quantized(&self, seq: usize) -> (usize, usize) {
        self.seqs.get(seq).map_or((0, 0), |s| (s.q[0], s.q[1]))
    }

    /// Appends `n` tokens to sequence `seq`: `k` and `v` are [n][n_kv_heads][head_dim] f32. Tokens that leave the
    /// exact tail are quantized on the device, once. Non-finite input is [`Error::NonFinite`] and changes nothing.
    pub fn append(&mut self, seq: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let (h, d) = (self.cfg.n_kv_heads, self.cfg.head_dim);
        if seq >= self.cfg.batch {
            return Err(Error::ShapeMismatch {
                what: "sequence index (must be below batch)",
                expected: self.cfg.batch,
                got: seq,
            });
        }
        if !k.len().is_multiple_of(h * d) || v.len() != k.len() {
            return Err(Error::ShapeMismatch {
                what: "appended keys and values ([n][n_kv_heads][head_dim] each)",
                expected: k.len() / (h * d) * h * d,
                got: v.len(),
            });
        }
        let n = k.len() / (h * d);
        if self.seqs[seq].tokens + n > self.cfg.capacity {
            return Err(Error::ShapeMismatch {
                what: "tokens after append (capacity)",
                expected: self.cfg.capacity,
                got: self.seqs[seq].tokens + n,
            });
        }
        for (what, x) in [("appended keys", k), ("appended values", v)] {
            if let Some(index) = x.iter().position(|x| !x.is_finite()) {
                return Err(Error::NonFinite { what, index, value: x[index] });
            }
        }
        let before = self.seqs[seq];
        let r = (|| {
            for p0 in (0..n).step_by(APPEND_PIECE) {
                let p1 = (p0 + APPEND_PIECE).min(n);
                self.append_piece(seq, &k[p0 * h * d..p1 * h * d], &v[p0 * h * d..p1 * h * d])?;
            }
            Ok(())
        })();
        if r.is_err() {
            self.seqs[seq] = before;
        }
        self.lens_dirty = true;
        r
    }

    fn append_piece(&mut self, seq: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let (h, d, sinks, wcap) = (self.cfg.n_kv_heads, self.cfg.head_dim, self.cfg.sinks, self.window_cap);
        let n = k.len() / (h * d);
        let st = self.seqs[seq];
        let t0 = st.tokens;
        let stream = self.kernels.stream().clone();
        for (si, x) in [k, v].into_iter().enumerate() {
            let side = &mut self.sides[si];
            let live = t0 - t0.min(sinks) - st.q[si];
            for head in 0..h {
                let sid = seq * h + head;
                // Sink rows.
                for i in 0..n {
                    let p = t0 + i;
                    let row = &x[(i * h + head) * d..][..d];
                    if p < sinks {
                        let off = (sid * sinks + p) * d;
                        let mut dst = side.sink.slice_mut(off..off + d);
                        cu(stream.memcpy_htod(row, &mut dst), "copying sink tokens")?;
                    }
                }
                // Tail rows, contiguous runs between ring wraps.
                let first = sinks.saturating_sub(t0).min(n);
                let mut i = first;
                while i < n {
                    let slot = (st.ring[si] + live + (i - first)) % wcap;
                    let run = (n - i).min(wcap - slot);
                    let mut rows = Vec::with_capacity(run * d);
                    for j in i..i + run {
                        rows.extend_from_slice(&x[(j * h + head) * d..][..d]);
                    }
                    let off = (sid * wcap + slot) * d;
                    let mut dst = side.tail.slice_mut(off..off + run * d);
                    cu(stream.memcpy_htod(&rows, &mut dst), "copying tail tokens")?;
                    i += run;
                }
            }
        }
        let t1 = t0 + n;
        let mut next = st;
        next.tokens = t1;
        for si in 0..2 {
            let spec = self.sides[si].spec;
            let q1 = quantized_tokens(&spec, t1, self.cfg.residual, sinks);
            let flush = q1 - st.q[si];
            if flush > 0 {
                self.flush(seq, si, st.ring[si], st.q[si], flush)?;
                next.q[si] = q1;
                next.ring[si] = (st.ring[si] + flush) % wcap;
            }
        }
        if next.q != st.q {
            let status = self.kernels.download(&self.status)?;
            if let Err(e) = check_status(&status, "tokens leaving the tail", self.cfg.k.meta) {
                self.status = self.kernels.upload(&[u32::MAX, 0, 0, 0])?;
                return Err(e);
            }
        }
        self.seqs[seq] = next;
        Ok(())
    }

    /// Quantizes `flush` tail tokens of one side of sequence `seq`, starting at ring slot `ring`, appending them to
    /// the packed streams after `q` quantized tokens.
    fn flush(&mut self, seq: usize, si: usize, ring: usize, q: usize, flush: usize) -> Result<()> {
        let (h, d, wcap) = (self.cfg.n_kv_heads, self.cfg.head_dim, self.window_cap);
        let kernels = self.kernels.clone();
        let side = &mut self.sides[si];
        let spec = side.spec;
        let qspec = KernelSpec::Quant { bits: spec.bits };
        let f_meta = kernels.function(&qspec, "adq_quant_meta")?;
        let f_pack = kernels.function(&qspec, "adq_pack")?;
        let mb = spec.meta.bytes();
        let sid0 = seq * h;
        let src = side.tail.slice(sid0 * wcap * d..(sid0 + h) * wcap * d);
        let mut scale = side.scale.slice_mut(sid0 * side.groups_cap * mb..(sid0 + h) * side.groups_cap * mb);
        let mut minv = side.minv.slice_mut(sid0 * side.groups_cap * mb..(sid0 + h) * side.groups_cap * mb);
        let mut codes = side.codes.slice_mut(sid0 * side.stride..(sid0 + h) * side.stride);
        let (dt, hs, ring0, ringc) = (DType::F32.code(), (wcap * d) as u64, ring as u32, wcap as u32);
        let (nt, dd, axis, group, meta) =
            (flush as u32, d as u32, axis_code(spec.axis), spec.group as u32, meta_code(spec.meta));
        let (mhs, g0, e0, dhs) =
            (side.groups_cap as u64, (q * d / spec.group) as u64, (q * d) as u64, side.stride as u64);
        let stream = kernels.stream();
        let mut b = stream.launch_builder(&f_meta);
        b.arg(&src).arg(&dt).arg(&hs).arg(&ring0).arg(&ringc).arg(&nt).arg(&dd).arg(&axis).arg(&group);
        b.arg(&mut scale).arg(&mut minv).arg(&meta).arg(&mhs).arg(&g0).arg(&mut self.status);
        // SAFETY: the argument list matches adq_quant_meta; the views cover the h streams of this sequence, the
        // ring holds wcap rows per head, and the new groups end within groups_cap.
        cu(unsafe { b.launch(grid(flush * d / spec.group, h)) }, "launching adq_quant_meta")?;
        let first = if spec.bits == Bits::B1_58 { q * d / 5 } else { q * d * (spec.bits.nominal() as usize) / 8 };
        let n_bytes = spec.bits.packed_bytes((q + flush) * d) - first;
        let mut b = stream.launch_builder(&f_pack);
        b.arg(&src).arg(&dt).arg(&hs).arg(&ring0).arg(&ringc).arg(&nt).arg(&dd).arg(&axis).arg(&group);
        b.arg(&mut scale).arg(&mut minv).arg(&meta).arg(&mhs).arg(&mut codes).arg(&dhs).arg(&e0);
        // SAFETY: as above for adq_pack; the codes end within the stream stride.
        cu(unsafe { b.launch(grid(n_bytes, h)) }, "launching adq_pack")?;
        Ok(())
    }

    /// Downloads the packed stream of one side (0 keys, 1 values) of one (sequence, KV head), for checks.
    pub fn packed(&self, seq: usize, head: usize, side: usize) -> Result<PackedStream> {
        let s = self.sides.get(side).ok_or(Error::ShapeMismatch {
            what: "side (0 keys, 1 values)",
            expected: 1,
            got: side,
        })?;
        let sid = seq * self.cfg.n_kv_heads + head;
        let q = self.seqs.get(seq).map_or(0, |st| st.q[side]);
        let d = self.cfg.head_dim;
        let mb = s.spec.meta.bytes();
        let groups = q * d / s.spec.group;
        let codes = self.kernels.download(&s.codes)?;
        let scale = self.kernels.download(&s.scale)?;
        let minv = self.kernels.download(&s.minv)?;
        let m0 = sid * s.groups_cap * mb;
        Ok(PackedStream {
            codes: codes[sid * s.stride..][..s.spec.bits.packed_bytes(q * d)].to_vec(),
            scale: meta_values(&scale[m0..m0 + groups * mb], s.spec.meta),
            min: meta_values(&minv[m0..m0 + groups * mb], s.spec.meta),
        })
    }

    /// Sets sequence lengths without writing keys or values (the buffers keep their contents, zeros in a new
    /// cache). Only for timing attention, whose cost does not depend on the values.
    pub fn set_lengths_for_benchmark(&mut self, tokens: &[usize]) -> Result<()> {
        if tokens.len() != self.cfg.batch || tokens.iter().any(|&t| t > self.cfg.capacity) {
            return Err(Error::ShapeMismatch {
                what: "benchmark lengths (one per sequence, within capacity)",
                expected: self.cfg.batch,
                got: tokens.len(),
            });
        }
        for (s, &t) in self.seqs.iter_mut().zip(tokens) {
            let q = |spec: &QuantSpec| quantized_tokens(spec, t, self.cfg.residual, self.cfg.sinks);
            *s = SeqState { tokens: t, q: [q(&self.cfg.k), q(&self.cfg.v)], ring: [0, 0] };
        }
        self.lens_dirty = true;
        Ok(())
    }

    /// Bytes one attention call reads from the cache: packed codes, metadata, exact tails and sinks.
    pub fn attention_bytes(&self) -> usize {
        let d = self.cfg.head_dim;
        let mut total = 0;
        for st in &self.seqs {
            let sinks = st.tokens.min(self.cfg.sinks);
            for (si, side) in self.sides.iter().enumerate() {
                let q = st.q[si];
                let exact = st.tokens - q;
                total += side.spec.bytes(q, 1, d) + exact * d * 4;
                let _ = sinks;
            }
        }
        total * self.cfg.n_kv_heads
    }

    fn sync_lens(&mut self) -> Result<()> {
        if self.lens_dirty {
            let mut host = vec![0u32; self.cfg.batch * LENS_STRIDE];
            for (b, s) in self.seqs.iter().enumerate() {
                let row = &mut host[b * LENS_STRIDE..(b + 1) * LENS_STRIDE];
                row[0] = s.q[0] as u32;
                row[1] = s.q[1] as u32;
                row[2] = s.tokens.min(self.cfg.sinks) as u32;
                row[3] = s.tokens as u32;
                row[4] = s.ring[0] as u32;
                row[5] = s.ring[1] as u32;
            }
            cu(self.kernels.stream().memcpy_htod(&host, &mut self.lens), "copying sequence lengths")?;
            self.lens_dirty = false;
        }
        Ok(())
    }

    /// Launches fused decode attention for every sequence: `q` is [batch][n_q_heads][head_dim] of `dtype` on the
    /// device (raw bytes), `out` the same shape and type. Every sequence must hold at least one token.
    pub fn attention_launch(
        &mut self,
        q: &CudaSlice<u8>,
        out: &mut CudaSlice<u8>,
        dtype: DType,
        n_q_heads: usize,
        sm_scale: f32,
    ) -> Result<()> {
        let cfg = self.cfg;
        check_attention_shape(cfg.batch, n_q_heads, cfg.n_kv_heads, cfg.head_dim, dtype, q.len(), out.len())?;
        if let Some(b) = self.seqs.iter().position(|s| s.tokens == 0) {
            return Err(Error::Cuda(format!("sequence {b} is empty: attention needs at least one token")));
        }
        self.sync_lens()?;
        let max_len = self.seqs.iter().map(|s| s.tokens).max().unwrap_or(1);
        let mut p = base_params(&self.kernels, cfg.batch, n_q_heads, cfg.n_kv_heads, max_len, dtype, sm_scale);
        p.k_axis = axis_code(cfg.k.axis);
        p.k_group_shift = cfg.k.group.trailing_zeros();
        p.v_axis = axis_code(cfg.v.axis);
        p.v_group_shift = cfg.v.group.trailing_zeros();
        p.meta_dtype = meta_code(cfg.k.meta);
        p.sink_cap = cfg.sinks.max(1) as u32;
        p.window_cap = self.window_cap as u32;
        p.k_stream_stride = self.sides[0].stride as u64;
        p.v_stream_stride = self.sides[1].stride as u64;
        p.k_meta_stride = self.sides[0].groups_cap as u64;
        p.v_meta_stride = self.sides[1].groups_cap as u64;
        ensure_workspace(&self.kernels, &mut self.part_acc, &mut self.part_ml, &p, cfg.head_dim)?;
        let spec = KernelSpec::Attn { k: cfg.k.bits, v: cfg.v.bits, head_dim: cfg.head_dim };
        let f = self.kernels.function(&spec, "adq_attn_split")?;
        let stream = self.kernels.stream().clone();
        let [ks, vs] = &self.sides;
        let mut b = stream.launch_builder(&f);
        b.arg(&p).arg(&self.lens).arg(q).arg(&ks.codes).arg(&ks.scale).arg(&ks.minv).arg(&vs.codes).arg(&vs.scale);
        b.arg(&vs.minv).arg(&ks.sink).arg(&vs.sink).arg(&ks.tail).arg(&vs.tail).arg(&mut self.part_acc);
        b.arg(&mut self.part_ml);
        // SAFETY: the argument list matches adq_attn_split; every buffer is laid out as AttnParams describes and
        // lens holds LENS_STRIDE entries per sequence consistent with the buffers.
        cu(unsafe { b.launch(split_config(&p, cfg.head_dim)) }, "launching adq_attn_split")?;
        launch_reduce(&self.kernels, &spec, &p, &self.part_acc, &self.part_ml, out, cfg.head_dim)
    }

    /// Fused decode attention with host buffers: `q` is [batch][n_q_heads][head_dim] f32, converted to `dtype`
    /// on upload; returns the output as f32.
    pub fn attend(&mut self, q: &[f32], dtype: DType, n_q_heads: usize, sm_scale: f32) -> Result<Vec<f32>> {
        let kernels = self.kernels.clone();
        let qd = kernels.upload(&to_dtype_bytes(q, dtype))?;
        let mut out = kernels.upload(&vec![0xffu8; q.len() * dtype.bytes()])?;
        self.attention_launch(&qd, &mut out, dtype, n_q_heads, sm_scale)?;
        Ok(from_dtype_bytes(&kernels.download(&out)?, dtype))
    }
}

/// Unquantized f16 keys and values of a batch of sequences on the device, for the baseline attention kernel.
pub struct DeviceF16Kv {
    kernels: Arc<CudaKernels>,
    batch: usize,
    n_kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
    tokens: Vec<usize>,
    lens: CudaSlice<u32>,
    part_acc: CudaSlice<f32>,
    part_ml: CudaSlice<f32>,
}

impl DeviceF16Kv {
    /// Allocates zeroed [batch][n_kv_heads][capacity][head_dim] keys and values.
    pub fn new(
        kernels: Arc<CudaKernels>,
        batch: usize,
        n_kv_heads: usize,
        head_dim: usize,
        capacity: usize,
    ) -> Result<DeviceF16Kv> {
        KernelSpec::check_head_dim(head_dim)?;
        if batch == 0 || n_kv_heads == 0 || capacity == 0 {
            return Err(Error::ShapeMismatch {
                what: "batch, n_kv_heads and capacity (must be positive)",
                expected: 1,
                got: 0,
            });
        }
        let n = batch * n_kv_heads * capacity * head_dim;
        Ok(DeviceF16Kv {
            k: kernels.zeros(n)?,
            v: kernels.zeros(n)?,
            lens: kernels.zeros(batch * LENS_STRIDE)?,
            part_acc: kernels.zeros(1)?,
            part_ml: kernels.zeros(1)?,
            tokens: vec![0; batch],
            kernels,
            batch,
            n_kv_heads,
            head_dim,
            capacity,
        })
    }

    /// Replaces sequence `seq` with `k`, `v` ([tokens][n_kv_heads][head_dim] f32, rounded to f16).
    pub fn set_sequence(&mut self, seq: usize, k: &[f32], v: &[f32]) -> Result<()> {
        let (h, d) = (self.n_kv_heads, self.head_dim);
        let t = k.len() / (h * d);
        if seq >= self.batch || k.len() != t * h * d || v.len() != k.len() || t > self.capacity {
            return Err(Error::ShapeMismatch {
                what: "sequence keys and values ([tokens][n_kv_heads][head_dim])",
                expected: t * h * d,
                got: v.len(),
            });
        }
        let stream = self.kernels.stream().clone();
        for (x, dst) in [(k, &mut self.k), (v, &mut self.v)] {
            for head in 0..h {
                let rows: Vec<u16> =
                    (0..t * d).map(|i| half::f16::from_f32(x[((i / d) * h + head) * d + i % d]).to_bits()).collect();
                let off = ((seq * h + head) * self.capacity) * d;
                let mut view = dst.slice_mut(off..off + t * d);
                cu(stream.memcpy_htod(&rows, &mut view), "copying f16 keys and values")?;
            }
        }
        self.tokens[seq] = t;
        self.sync_lens()
    }

    /// Sets sequence lengths without writing keys or values; only for timing.
    pub fn set_lengths_for_benchmark(&mut self, tokens: &[usize]) -> Result<()> {
        if tokens.len() != self.batch || tokens.iter().any(|&t| t > self.capacity) {
            return Err(Error::ShapeMismatch {
                what: "benchmark lengths (one per sequence, within capacity)",
                expected: self.batch,
                got: tokens.len(),
            });
        }
        self.tokens.copy_from_slice(tokens);
        self.sync_lens()
    }

    fn sync_lens(&mut self) -> Result<()> {
        let mut host = vec![0u32; self.batch * LENS_STRIDE];
        for (b, &t) in self.tokens.iter().enumerate() {
            host[b * LENS_STRIDE + 3] = t as u32;
        }
        cu(self.kernels.stream().memcpy_htod(&host, &mut self.lens), "copying sequence lengths")
    }

    /// Bytes one attention call reads: every key and value element in f16.
    pub fn attention_bytes(&self) -> usize {
        self.tokens.iter().sum::<usize>() * self.n_kv_heads * self.head_dim * 2 * 2
    }

    /// Launches the f16 baseline attention (same shapes as [`DeviceKvCache::attention_launch`]).
    pub fn attention_launch(
        &mut self,
        q: &CudaSlice<u8>,
        out: &mut CudaSlice<u8>,
        dtype: DType,
        n_q_heads: usize,
        sm_scale: f32,
    ) -> Result<()> {
        check_attention_shape(self.batch, n_q_heads, self.n_kv_heads, self.head_dim, dtype, q.len(), out.len())?;
        if let Some(b) = self.tokens.iter().position(|&t| t == 0) {
            return Err(Error::Cuda(format!("sequence {b} is empty: attention needs at least one token")));
        }
        let max_len = self.tokens.iter().copied().max().unwrap_or(1);
        let mut p = base_params(&self.kernels, self.batch, n_q_heads, self.n_kv_heads, max_len, dtype, sm_scale);
        p.window_cap = self.capacity as u32;
        ensure_workspace(&self.kernels, &mut self.part_acc, &mut self.part_ml, &p, self.head_dim)?;
        let spec = KernelSpec::AttnF16 { head_dim: self.head_dim };
        let f = self.kernels.function(&spec, "adq_attn_f16_split")?;
        let stream = self.kernels.stream().clone();
        let mut b = stream.launch_builder(&f);
        b.arg(&p).arg(&self.lens).arg(q).arg(&self.k).arg(&self.v).arg(&mut self.part_acc).arg(&mut self.part_ml);
        // SAFETY: the argument list matches adq_attn_f16_split; k and v hold capacity rows per (sequence, head).
        cu(unsafe { b.launch(split_config(&p, self.head_dim)) }, "launching adq_attn_f16_split")?;
        launch_reduce(&self.kernels, &spec, &p, &self.part_acc, &self.part_ml, out, self.head_dim)
    }

    /// Baseline attention with host buffers (see [`DeviceKvCache::attend`]).
    pub fn attend(&mut self, q: &[f32], dtype: DType, n_q_heads: usize, sm_scale: f32) -> Result<Vec<f32>> {
        let kernels = self.kernels.clone();
        let qd = kernels.upload(&to_dtype_bytes(q, dtype))?;
        let mut out = kernels.upload(&vec![0xffu8; q.len() * dtype.bytes()])?;
        self.attention_launch(&qd, &mut out, dtype, n_q_heads, sm_scale)?;
        Ok(from_dtype_bytes(&kernels.download(&out)?, dtype))
    }
}

fn check_attention_shape(
    batch: usize,
    n_q_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    q_bytes: usize,
    out_bytes: usize,
) -> Result<()> {
    if n_kv_heads == 0 || n_q_heads == 0 || !n_q_heads.is_multiple_of(n_kv_heads) || n_q_heads / n_kv_heads > MAX_GQA {
        return Err(Error::BadGqa { n_q_heads, n_kv_heads });
    }
    let want = batch * n_q_heads * head_dim * dtype.bytes();
    if q_bytes != want {
        return Err(Error::ShapeMismatch {
            what: "query bytes ([batch][n_q_heads][head_dim])",
            expected: want,
            got: q_bytes,
        });
    }
    if out_bytes != want {
        return Err(Error::ShapeMismatch {
            what: "output bytes ([batch][n_q_heads][head_dim])",
            expected: want,
            got: out_bytes,
        });
    }
    Ok(())
}

/// Parameters shared by the fused and baseline kernels, with the split chosen to give the device about four
/// blocks per multiprocessor.
fn base_params(
    kernels: &CudaKernels,
    batch: usize,
    n_q_heads: usize,
    n_kv_heads: usize,
    max_len: usize,
    dtype: DType,
    sm_scale: f32,
) -> AttnParams {
    let pairs = batch * n_kv_heads;
    let want_splits = (4 * kernels.sm_count()).div_ceil(pairs).max(1);
    let chunk = max_len.div_ceil(want_splits).div_ceil(ATTN_TILE).max(1) * ATTN_TILE;
    AttnParams {
        batch: batch as u32,
        n_q_heads: n_q_heads as u32,
        n_kv_heads: n_kv_heads as u32,
        gqa: (n_q_heads / n_kv_heads) as u32,
        q_dtype: dtype.code(),
        chunk: chunk as u32,
        n_splits: max_len.div_ceil(chunk) as u32,
        sm_scale,
        sink_cap: 1,
        ..AttnParams::default()
    }
}

fn ensure_workspace(
    kernels: &CudaKernels,
    acc: &mut CudaSlice<f32>,
    ml: &mut CudaSlice<f32>,
    p: &AttnParams,
    head_dim: usize,
) -> Result<()> {
    let rows = (p.batch * p.n_q_heads * p.n_splits) as usize;
    if acc.len() < rows * head_dim {
        *acc = kernels.zeros(rows * head_dim)?;
    }
    if ml.len() < rows * 2 {
        *ml = kernels.zeros(rows * 2)?;
    }
    Ok(())
}

fn split_config(p: &AttnParams, head_dim: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (p.n_splits, p.n_kv_heads, p.batch),
        block_dim: (ATTN_THREADS as u32, 1, 1),
        shared_mem_bytes: AttnSmem::for_head_dim(head_dim).total as u32,
    }
}

fn launch_reduce(
    kernels: &CudaKernels,
    spec: &KernelSpec,
    p: &AttnParams,
    acc: &CudaSlice<f32>,
    ml: &CudaSlice<f32>,
    out: &mut CudaSlice<u8>,
    head_dim: usize,
) -> Result<()> {
    let f = kernels.function(spec, "adq_attn_reduce")?;
    let cfg =
        LaunchConfig { grid_dim: (p.n_q_heads, p.batch, 1), block_dim: (head_dim as u32, 1, 1), shared_mem_bytes: 0 };
    let mut b = kernels.stream().launch_builder(&f);
    b.arg(p).arg(acc).arg(ml).arg(out);
    // SAFETY: the argument list matches adq_attn_reduce; the workspace holds batch * n_q_heads * n_splits rows.
    cu(unsafe { b.launch(cfg) }, "launching adq_attn_reduce").map(|_| ())
}
