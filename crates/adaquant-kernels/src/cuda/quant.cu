// Group-wise asymmetric quantization into packed streams, and the inverse.
//
// Specialised by ADQ_WIDTH (the position of the width in `Bits::ALL`). Group size, group axis, head dimension,
// metadata type and source type are run-time arguments. Every kernel works on `heads` independent streams
// (blockIdx.y), one per KV head, and on a range of whole groups starting at a group boundary, so the same kernels
// quantize a block on its own and append a block to a device-resident cache.
//
// Source tokens are read through a ring: token `t` of the block is row `(ring_start + t) % ring_cap` of the
// head's [ring_cap][head_dim] source, so a full-precision window kept as a ring buffer is quantized in place.

#ifndef ADQ_WIDTH
#error "ADQ_WIDTH must be defined (position of the width in Bits::ALL)"
#endif

typedef AdqWidth<ADQ_WIDTH> W;
// Bits per code in the stream; ternary streams never use it (they hold five digits per byte).
constexpr u32 CB = W::ternary ? 1u : W::code_bits;

__device__ __forceinline__ float adq_source_value(const void* ptr, u32 dtype, u64 head_stride, u32 ring_start,
                                                  u32 ring_cap, u32 head_dim, u32 head, i64 t, u32 c) {
    i64 row = (i64)(((u64)ring_start + (u64)t) % ring_cap);
    return adq_load(ptr, (i64)head * (i64)head_stride + row * head_dim + c, dtype);
}

// Computes the scale and minimum of groups `g0 .. g0 + n_groups` of each head (one thread per group), stores them
// as `meta` (f16 or f32), and records problems in `status`: [0] the flat index head * n_tokens * head_dim +
// t * head_dim + c of the first non-finite source element (u32::MAX when all are finite), [1] its bits;
// [2] 1 when a scale or minimum overflows its metadata type, [3] the bits of such a value.
extern "C" __global__ void adq_quant_meta(const void* src, u32 src_dtype, u64 src_head_stride, u32 ring_start,
                                          u32 ring_cap, u32 n_tokens, u32 head_dim, u32 axis, u32 group,
                                          void* scale, void* minv, u32 meta, u64 meta_head_stride, u64 g0,
                                          u32* status) {
    const u32 head = blockIdx.y;
    const u64 n_groups = (u64)n_tokens * head_dim / group;
    const u64 g = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= n_groups) {
        return;
    }
    float mn = ADQ_INF;
    float mx = ADQ_NEG_INF;
    bool finite = true;
    for (u32 k = 0; k < group; ++k) {
        i64 t;
        u32 c;
        adq_stream_coords((i64)(g * group + k), head_dim, axis, group, &t, &c);
        float x = adq_source_value(src, src_dtype, src_head_stride, ring_start, ring_cap, head_dim, head, t, c);
        if (!isfinite(x)) {
            if (finite) {
                u32 flat = (u32)((u64)head * n_tokens * head_dim + (u64)t * head_dim + c);
                u32 prev = atomicMin(&status[0], flat);
                if (flat < prev) {
                    status[1] = __float_as_uint(x);
                }
            }
            finite = false;
            continue;
        }
        mn = fminf(mn, x);
        mx = fmaxf(mx, x);
    }
    if (!finite) {
        mn = 0.0f;
        mx = 0.0f;
    }
    // The covering pair (quant/mod.rs): stored values are exact in the metadata type, so storing does not round.
    float sc;
    float mn_cover;
    adq_covering_params(mn, mx, (float)(W::levels - 1), meta, &sc, &mn_cover);
    const i64 m = (i64)head * (i64)meta_head_stride + (i64)(g0 + g);
    const float sc_stored = adq_store_meta(scale, m, meta, sc);
    const float mn_stored = adq_store_meta(minv, m, meta, mn_cover);
    if (finite && !(isfinite(sc_stored) && isfinite(mn_stored))) {
        status[2] = 1u;
        status[3] = __float_as_uint(isfinite(mn_stored) ? sc : mn);
    }
}

// Packs elements `e0 .. e0 + n_tokens * head_dim` of each head's stream (one thread per output byte), using the
// metadata written by `adq_quant_meta`. Bytes shared with codes outside the range keep those codes, so appending
// a block never disturbs the codes before it.
extern "C" __global__ void adq_pack(const void* src, u32 src_dtype, u64 src_head_stride, u32 ring_start,
                                    u32 ring_cap, u32 n_tokens, u32 head_dim, u32 axis, u32 group,
                                    const void* scale, const void* minv, u32 meta, u64 meta_head_stride,
                                    u8* dst, u64 dst_head_stride, u64 e0) {
    const u32 head = blockIdx.y;
    const i64 e_begin = (i64)e0;
    const i64 e_end = e_begin + (i64)n_tokens * head_dim;
    const i64 b_begin = adq_byte_of<ADQ_WIDTH>(e_begin);
    const i64 b_end = adq_byte_end<ADQ_WIDTH>(e_end);
    const i64 j = b_begin + (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= b_end) {
        return;
    }
    u8* out = dst + (i64)head * (i64)dst_head_stride;
    const i64 meta_base = (i64)head * (i64)meta_head_stride;

    // Code of stream element e (inside the range).
#define ADQ_CODE_OF(e, code)                                                                                       \
    do {                                                                                                           \
        i64 t_;                                                                                                    \
        u32 c_;                                                                                                    \
        adq_stream_coords((e) - e_begin, head_dim, axis, group, &t_, &c_);                                        \
        float x_ = adq_source_value(src, src_dtype, src_head_stride, ring_start, ring_cap, head_dim, head, t_, c_); \
        i64 g_ = meta_base + (e) / group;                                                                          \
        float sc_ = adq_load_meta(scale, g_, meta);                                                                \
        float mn_ = adq_load_meta(minv, g_, meta);                                                                 \
        code = adq_quant_code<ADQ_WIDTH>(x_, mn_, sc_);                                                            \
    } while (0)

    if constexpr (W::ternary) {
        u32 old = out[j];
        u32 byte = 0;
        u32 p3 = 1;
        for (u32 k = 0; k < 5; ++k) {
            i64 e = j * 5 + k;
            u32 d;
            if (e >= e_begin && e < e_end) {
                ADQ_CODE_OF(e, d);
            } else {
                d = adq_ternary_digit(old, k);
            }
            byte += d * p3;
            p3 *= 3u;
        }
        out[j] = (u8)byte;
    } else {
        const i64 bit0 = j * 8;
        i64 e_first = bit0 / CB;
        i64 e_last = (bit0 + 7) / CB;
        if (e_first < e_begin) e_first = e_begin;
        if (e_last > e_end - 1) e_last = e_end - 1;
        u32 val = 0;
        u32 mask = 0;
        const u32 full = (1u << CB) - 1u;
        for (i64 e = e_first; e <= e_last; ++e) {
            u32 code;
            ADQ_CODE_OF(e, code);
            i64 off = e * CB - bit0;
            if (off >= 0) {
                val |= code << off;
                mask |= full << off;
            } else {
                val |= code >> (-off);
                mask |= full >> (-off);
            }
        }
        mask &= 0xffu;
        u32 byte = val & mask;
        if (mask != 0xffu) {
            byte |= (u32)out[j] & ~mask & 0xffu;
        }
        out[j] = (u8)byte;
    }
#undef ADQ_CODE_OF
}

// Dequantizes elements `e0 .. e0 + n_tokens * head_dim` of each head's stream (one thread per element) into a
// token-major [n_tokens][head_dim] output per head (`out_head_stride` elements apart), as min + code * scale.
extern "C" __global__ void adq_dequant(const u8* stream, u64 stream_head_stride, u64 e0, u32 n_tokens,
                                       u32 head_dim, u32 axis, u32 group, const void* scale, const void* minv,
                                       u32 meta, u64 meta_head_stride, void* out, u32 out_dtype,
                                       u64 out_head_stride) {
    const u32 head = blockIdx.y;
    const i64 n = (i64)n_tokens * head_dim;
    const i64 r = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= n) {
        return;
    }
    const i64 e = (i64)e0 + r;
    const i64 byte0 = adq_byte_of<ADQ_WIDTH>(e);
    const u8* s = stream + (i64)head * (i64)stream_head_stride + byte0;
    const u32 code = adq_code_at<ADQ_WIDTH>(s, adq_code_pos<ADQ_WIDTH>(e, byte0));
    const i64 g = (i64)head * (i64)meta_head_stride + e / group;
    const float x = adq_dequant(code, adq_load_meta(minv, g, meta), adq_load_meta(scale, g, meta));
    i64 t;
    u32 c;
    adq_stream_coords(r, head_dim, axis, group, &t, &c);
    adq_store(out, (i64)head * (i64)out_head_stride + t * head_dim + c, out_dtype, x);
}
