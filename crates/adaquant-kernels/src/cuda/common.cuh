// Helpers shared by every adaquant CUDA kernel.
//
// NVRTC compiles each kernel as one program: the generated preamble (layout constants from the Rust definitions
// in `format.rs`, see `cuda/layout.rs`), then this file, then the kernel file. No CUDA headers are included, so the
// programs compile with the NVRTC library alone; half and bfloat16 conversions use PTX instructions directly.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

#define ADQ_INF __int_as_float(0x7f800000)
#define ADQ_NEG_INF __int_as_float(0xff800000)

// `AdqWidth<W>` (compile-time properties of the width at position W of `Bits::ALL`) and every ADQ_* constant are
// generated in the preamble from the Rust definitions.

// ---------------------------------------------------------------------------------------------------------------
// Scalar conversions.

#ifdef ADQ_EMULATE
// CPU emulation (emulate.h): the compiler's _Float16 rounds to nearest even like the PTX instructions.
__device__ __forceinline__ float adq_f16_to_f32(u16 h) {
    _Float16 x;
    std::memcpy(&x, &h, 2);
    return (float)x;
}
__device__ __forceinline__ u16 adq_f32_to_f16(float f) {
    _Float16 x = (_Float16)f;
    u16 h;
    std::memcpy(&h, &x, 2);
    return h;
}
// Dynamic shared memory of the running block.
#define ADQ_DYNAMIC_SMEM(name) float4* name = adq_emu_smem()
#else
__device__ __forceinline__ float adq_f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// Round to nearest even, as `half::f16::from_f32`.
__device__ __forceinline__ u16 adq_f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
// Dynamic shared memory of the running block.
#define ADQ_DYNAMIC_SMEM(name) extern __shared__ float4 name[]
#endif

__device__ __forceinline__ float adq_bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }

// Round to nearest even, as `half::bf16::from_f32`; NaN stays a quiet NaN.
__device__ __forceinline__ u16 adq_f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (u16)((u >> 16) | 0x40u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

// Loads element `i` of a buffer of the given `AdqDtype`.
__device__ __forceinline__ float adq_load(const void* p, i64 i, u32 dtype) {
    if (dtype == ADQ_DTYPE_F16) {
        return adq_f16_to_f32(((const u16*)p)[i]);
    } else if (dtype == ADQ_DTYPE_BF16) {
        return adq_bf16_to_f32(((const u16*)p)[i]);
    }
    return ((const float*)p)[i];
}

// Stores element `i` of a buffer of the given `AdqDtype`.
__device__ __forceinline__ void adq_store(void* p, i64 i, u32 dtype, float x) {
    if (dtype == ADQ_DTYPE_F16) {
        ((u16*)p)[i] = adq_f32_to_f16(x);
    } else if (dtype == ADQ_DTYPE_BF16) {
        ((u16*)p)[i] = adq_f32_to_bf16(x);
    } else {
        ((float*)p)[i] = x;
    }
}

// Loads one group scale or minimum stored as `AdqMeta`.
__device__ __forceinline__ float adq_load_meta(const void* p, i64 i, u32 meta) {
    return meta == ADQ_META_F16 ? adq_f16_to_f32(((const u16*)p)[i]) : ((const float*)p)[i];
}

// Stores one group scale or minimum and returns the value as stored (rounded to f16 when the metadata is f16).
__device__ __forceinline__ float adq_store_meta(void* p, i64 i, u32 meta, float x) {
    if (meta == ADQ_META_F16) {
        u16 h = adq_f32_to_f16(x);
        ((u16*)p)[i] = h;
        return adq_f16_to_f32(h);
    }
    ((float*)p)[i] = x;
    return x;
}

// The next float above a finite x >= 0.
__device__ __forceinline__ float adq_next_up_nonneg(float x) {
    return __uint_as_float((__float_as_uint(x) & 0x7fffffffu) + 1u);
}

// The largest metadata value <= x (finite), or infinity when x lies outside the metadata type's finite range.
// Mirrors `meta_floor` in quant/mod.rs.
__device__ __forceinline__ float adq_meta_floor(float x, u32 meta) {
    if (meta != ADQ_META_F16) {
        return x;
    }
    if (fabsf(x) > 65504.0f) {
        return ADQ_INF;
    }
    u32 b = adq_f32_to_f16(x);
    if (adq_f16_to_f32((u16)b) > x) {
        b = (b == 0u || (b & 0x8000u)) ? ((b | 0x8000u) + 1u) : (b - 1u);
    }
    return adq_f16_to_f32((u16)b);
}

// The smallest metadata value >= x (x >= 0); infinity when there is none. Mirrors `meta_ceil` in quant/mod.rs.
__device__ __forceinline__ float adq_meta_ceil(float x, u32 meta) {
    if (meta != ADQ_META_F16) {
        return x;
    }
    u32 b = adq_f32_to_f16(x);
    if (adq_f16_to_f32((u16)b) < x) {
        b += 1u;
    }
    return adq_f16_to_f32((u16)b);
}

// The stored (scale, minimum) of a group with finite extremes mn <= mx, covering the group: the minimum rounded
// toward minus infinity, the scale (mx - stored minimum) / max_code rounded up, with the f32 difference corrected
// by TwoSum and the quotient by the sign of a fused residual. Bit for bit `covering_params` in quant/mod.rs.
__device__ __forceinline__ void adq_covering_params(float mn, float mx, float max_code, u32 meta, float* sc,
                                                    float* m_out) {
    const float m = adq_meta_floor(mn, meta);
    float r = __fsub_rn(mx, m);
    const float b = __fsub_rn(r, mx);
    const float a = __fsub_rn(r, b);
    const float err = __fadd_rn(__fsub_rn(mx, a), __fsub_rn(-m, b));
    if (err > 0.0f) {
        r = adq_next_up_nonneg(r);
    }
    float q = __fdiv_rn(r, max_code);
    if (__fmaf_rn(q, max_code, -r) < 0.0f) {
        q = adq_next_up_nonneg(q);
    }
    *sc = adq_meta_ceil(q, meta);
    *m_out = m;
}

// ---------------------------------------------------------------------------------------------------------------
// Stream element order (see `GroupAxis` in format.rs). In both layouts the group of stream element `e` is `e / G`.

// Stream element index of (token `t`, channel `c`) for a stream whose token 0 starts a group block.
__device__ __forceinline__ i64 adq_stream_index(i64 t, u32 c, u32 head_dim, u32 axis, u32 group) {
    if (axis == ADQ_AXIS_PER_TOKEN) {
        return t * head_dim + c;
    }
    i64 blk = t / group;
    return blk * (i64)group * head_dim + (i64)c * group + (t - blk * group);
}

// Inverse of `adq_stream_index`: token and channel of stream element `e`.
__device__ __forceinline__ void adq_stream_coords(i64 e, u32 head_dim, u32 axis, u32 group, i64* t, u32* c) {
    if (axis == ADQ_AXIS_PER_TOKEN) {
        *t = e / head_dim;
        *c = (u32)(e - *t * head_dim);
    } else {
        i64 block = (i64)group * head_dim;
        i64 blk = e / block;
        u32 r = (u32)(e - blk * block);
        *c = r / group;
        *t = blk * group + (r - *c * group);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Codes.

// Digit `k` (0..4) of a base-3 byte, by repeated exact division by 3 (x / 3 == (x * 171) >> 9 for x < 256).
__device__ __forceinline__ u32 adq_ternary_digit(u32 byte, u32 k) {
    for (u32 i = 0; i < k; ++i) {
        byte = (byte * 171u) >> 9;
    }
    return byte - 3u * ((byte * 171u) >> 9);
}

// Code at position `pos` of a byte buffer: `pos` is a bit offset for 2^b-level widths and a digit index (five per
// byte) for ternary. Straddling widths (3, 5, 6) read one byte past the code, which buffers pad.
template <int W>
__device__ __forceinline__ u32 adq_code_at(const u8* s, u32 pos) {
    typedef AdqWidth<W> Wd;
    if constexpr (Wd::ternary) {
        u32 byte = s[pos / 5u];
        return adq_ternary_digit(byte, pos % 5u);
    } else if constexpr (Wd::code_bits == 8) {
        return s[pos >> 3];
    } else if constexpr ((8 % Wd::code_bits) == 0) {
        return (s[pos >> 3] >> (pos & 7u)) & ((1u << Wd::code_bits) - 1u);
    } else {
        u32 lo = pos >> 3;
        u32 two = (u32)s[lo] | ((u32)s[lo + 1] << 8);
        return (two >> (pos & 7u)) & ((1u << Wd::code_bits) - 1u);
    }
}

// Position (as used by `adq_code_at`) of stream element `e` relative to a buffer that starts at stream byte `byte0`.
template <int W>
__device__ __forceinline__ u32 adq_code_pos(i64 e, i64 byte0) {
    typedef AdqWidth<W> Wd;
    if (Wd::ternary) {
        return (u32)(e - byte0 * 5);
    }
    return (u32)(e * Wd::code_bits - byte0 * 8);
}

// First stream byte that holds part of element `e`.
template <int W>
__device__ __forceinline__ i64 adq_byte_of(i64 e) {
    typedef AdqWidth<W> Wd;
    return Wd::ternary ? e / 5 : (e * Wd::code_bits) >> 3;
}

// One past the last stream byte that holds part of elements `< e`.
template <int W>
__device__ __forceinline__ i64 adq_byte_end(i64 e) {
    typedef AdqWidth<W> Wd;
    return Wd::ternary ? (e + 4) / 5 : (e * Wd::code_bits + 7) >> 3;
}

// Asymmetric min-max code of `x` for a group with stored minimum `mn` and stored scale `sc`:
// clamp(round((x - mn) / sc), 0, levels - 1), with code 0 for a constant group (sc == 0).
// Division and rounding (half away from zero) are IEEE-exact and match the host reference bit for bit.
template <int W>
__device__ __forceinline__ u32 adq_quant_code(float x, float mn, float sc) {
    typedef AdqWidth<W> Wd;
    if (!(sc > 0.0f)) {
        return 0u;
    }
    float q = roundf(__fdiv_rn(__fsub_rn(x, mn), sc));
    q = fminf(fmaxf(q, 0.0f), (float)(Wd::levels - 1));
    return (u32)q;
}

// Dequantized value min + code * scale, rounded exactly as the host reference (no fused multiply-add).
__device__ __forceinline__ float adq_dequant(u32 code, float mn, float sc) {
    return __fadd_rn(mn, __fmul_rn((float)code, sc));
}
