// Decode attention for grouped-query attention over a batch of sequences of different lengths, flash-decoding
// style: `adq_attn_split` computes, for one (split of the sequence, KV head, sequence), the softmax statistics and
// the unnormalised output of every query head that shares the KV head; `adq_attn_reduce` merges the splits.
//
// Fused build (ADQ_BASELINE == 0, specialised by ADQ_K_WIDTH, ADQ_V_WIDTH, ADQ_HEAD_DIM): like the CPU cache, each
// side (keys, values) of a sequence of `T` tokens holds `S` exact sink tokens, `Qk` (or `Qv`) quantized tokens and
// an exact f32 tail of the rest, kept as a ring. Attention walks the tokens in the order packed/tail first, sinks
// last (softmax does not depend on the order): u in [0, T - S) is token S + u, u in [T - S, T) is sink u - (T - S).
// Packed bytes of a tile are read once into shared memory and dequantized on the fly, never materialised; tail and
// sink rows, a few hundred tokens at most, are read straight from global memory.
// Baseline build (ADQ_BASELINE == 1): every token is an f16 row of one [capacity][head_dim] buffer per head, staged
// through shared memory tile by tile.
//
// Scores and outputs accumulate in f32. `lens` holds ADQ_LENS_STRIDE u32 per sequence: Qk, Qv, S, T, the ring
// start of the key tail, the ring start of the value tail (the baseline reads only T).

#ifndef ADQ_HEAD_DIM
#error "ADQ_HEAD_DIM must be defined"
#endif
#ifndef ADQ_BASELINE
#define ADQ_BASELINE 0
#endif
// Lloyd-Max sides (ADQ_K_LLOYD / ADQ_V_LLOYD == 1): one scale per group and no minimum; a code reconstructs as
// scale * adq_lloyd<width>(code), the Gaussian MSE-optimal levels of the preamble.
#ifndef ADQ_K_LLOYD
#define ADQ_K_LLOYD 0
#endif
#ifndef ADQ_V_LLOYD
#define ADQ_V_LLOYD 0
#endif
#if ADQ_BASELINE
#define ADQ_K_WIDTH 0
#define ADQ_V_WIDTH 0
typedef u16 ExactT;
#else
typedef float ExactT;
#endif

constexpr u32 D = ADQ_HEAD_DIM;
constexpr u32 TILE = ADQ_ATTN_TILE;
constexpr u32 NT = ADQ_ATTN_THREADS;
constexpr u32 MAXG = ADQ_MAX_GQA;
constexpr u32 ROW = D + 1;  // Shared-memory row stride of exact tiles, odd so that rows fall in distinct banks.
constexpr u32 PACKED_REGION = TILE * D + ADQ_PAD_BYTES;

static_assert(TILE == 64, "the softmax phase gives each lane two tokens");
static_assert(NT % TILE == 0 && NT / TILE == 2, "the score phase uses two threads per token");
static_assert(NT % D == 0, "head_dim must divide the block size");
static_assert(MAXG <= NT / 32 * 2, "the softmax phase gives each warp two query heads");
static_assert(MAXG % 4 == 0, "query heads load as float4");
static_assert(ADQ_SMEM_TILE_BYTES >= TILE * ROW * 4, "exact tile region too small");
static_assert(ADQ_SMEM_TILE_BYTES >= 2 * PACKED_REGION, "packed tile region too small");
static_assert(ADQ_SMEM_META_ENTRIES >= TILE * D / ADQ_MIN_GROUP, "metadata region too small");

// Scalar parameters, laid out exactly as `AttnParams` in cuda/layout.rs: fourteen u32, four u64, an f32 and a
// reserved u32. The u32 fields form a base struct so that the offsets can be checked without offsetof.
struct AdqAttnParamsHead {
    u32 batch;
    u32 n_q_heads;
    u32 n_kv_heads;
    u32 gqa;
    u32 k_axis;
    u32 k_group_shift;
    u32 v_axis;
    u32 v_group_shift;
    u32 meta_dtype;
    u32 q_dtype;
    u32 chunk;
    u32 n_splits;
    u32 sink_cap;
    u32 window_cap;
};
struct AdqAttnParams : AdqAttnParamsHead {
    u64 k_stream_stride;
    u64 v_stream_stride;
    u64 k_meta_stride;
    u64 v_meta_stride;
    float sm_scale;
    u32 reserved;
};
static_assert(sizeof(AdqAttnParams) == ADQ_SIZEOF_ATTN_PARAMS, "AttnParams size differs from Rust");
static_assert(sizeof(AdqAttnParamsHead) == ADQ_OFFSETOF_ATTN_PARAMS_K_STREAM_STRIDE,
              "AttnParams layout differs from Rust");
static_assert(sizeof(AdqAttnParamsHead) + 4 * sizeof(u64) == ADQ_OFFSETOF_ATTN_PARAMS_SM_SCALE,
              "AttnParams layout differs from Rust");

// Copies `n_bytes` from `src` (4-byte aligned) into shared memory as 32-bit words.
__device__ __forceinline__ void adq_copy_words(u32* dst, const u8* src, u32 n_bytes) {
    const u32* s = (const u32*)src;
    const u32 words = (n_bytes + 3) / 4;
    for (u32 i = threadIdx.x; i < words; i += NT) {
        dst[i] = s[i];
    }
}

// Loads the packed bytes of stream elements [e_lo, e_hi) into `dst`; returns the stream byte that dst[0] holds.
template <int WID>
__device__ __forceinline__ i64 adq_load_packed(u8* dst, const u8* stream, i64 e_lo, i64 e_hi) {
    const i64 b0 = adq_byte_of<WID>(e_lo) & ~(i64)3;
    const i64 b1 = adq_byte_end<WID>(e_hi);
    adq_copy_words((u32*)dst, stream + b0, (u32)(b1 - b0));
    return b0;
}

// Loads `n` group scales and minima starting at group `g_lo` as f32: scales at dst[0..n), minima at dst[E..E+n)
// (no minima for a null `minv`: Lloyd-Max sides).
__device__ __forceinline__ void adq_load_meta_tile(float* dst, const void* scale, const void* minv, i64 g_lo,
                                                   u32 n, u32 meta) {
    for (u32 i = threadIdx.x; i < n; i += NT) {
        dst[i] = adq_load_meta(scale, g_lo + i, meta);
        if (minv != nullptr) dst[ADQ_SMEM_META_ENTRIES + i] = adq_load_meta(minv, g_lo + i, meta);
    }
}

// The value of a key (or value) code whose group's scale sits at meta[m] and minimum at meta[E + m].
__device__ __forceinline__ float adq_k_value(u32 code, const float* meta, u32 m) {
#if ADQ_K_LLOYD
    return adq_lloyd<ADQ_K_WIDTH>(code) * meta[m];
#else
    return fmaf((float)code, meta[m], meta[ADQ_SMEM_META_ENTRIES + m]);
#endif
}
__device__ __forceinline__ float adq_v_value(u32 code, const float* meta, u32 m) {
#if ADQ_V_LLOYD
    return adq_lloyd<ADQ_V_WIDTH>(code) * meta[m];
#else
    return fmaf((float)code, meta[m], meta[ADQ_SMEM_META_ENTRIES + m]);
#endif
}

__device__ __forceinline__ float adq_exact_to_f32(float x) { return x; }
__device__ __forceinline__ float adq_exact_to_f32(u16 x) { return adq_f16_to_f32(x); }

// Loads rows [r0, r0 + n) of a [capacity][head_dim] f16 buffer into f32 rows of stride ROW (the baseline's tiles),
// eight halves per 16-byte load (rows are 16-byte aligned: head_dim * 2 is a multiple of 16). Only the baseline
// build (ExactT = u16) calls it.
__device__ __forceinline__ void adq_load_rows(float* dst, const ExactT* src, u32 r0, u32 n) {
    const uint4* s = (const uint4*)(src + (i64)r0 * D);
    for (u32 i = threadIdx.x; i < n * D / 8; i += NT) {
        const uint4 w = s[i];
        const u32 e = i * 8;
        float* o = dst + (e / D) * ROW + e % D;
        const u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (u32 j = 0; j < 4; ++j) {
            o[2 * j] = adq_exact_to_f32((ExactT)(words[j] & 0xffffu));
            o[2 * j + 1] = adq_exact_to_f32((ExactT)(words[j] >> 16));
        }
    }
}

// Loads the first `gqa` of MAXG consecutive floats (16-byte aligned) as float4s.
__device__ __forceinline__ void adq_load_heads(float* dst, const float* src, u32 gqa) {
    const float4* s4 = (const float4*)src;
#pragma unroll
    for (u32 j = 0; j < MAXG / 4; ++j) {
        if (4 * j < gqa) {
            const float4 w = s4[j];
            dst[4 * j] = w.x;
            dst[4 * j + 1] = w.y;
            dst[4 * j + 2] = w.z;
            dst[4 * j + 3] = w.w;
        }
    }
}

__device__ __forceinline__ float adq_warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

__device__ __forceinline__ float adq_warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// Row `u` (attention order) of one side of a sequence: a tail row from the ring, or a sink row.
__device__ __forceinline__ const ExactT* adq_exact_row(const ExactT* sink, const ExactT* tail, u32 u, u32 q,
                                                       u32 tail_end, u32 ring_start, u32 ring_cap) {
    if (u < tail_end) {
        return tail + (i64)((ring_start + (u - q)) % ring_cap) * D;
    }
    return sink + (i64)(u - tail_end) * D;
}

template <bool QUANT>
__device__ __forceinline__ void adq_attn_split_impl(const AdqAttnParams& p, const u32* lens, const void* q,
                                                    const u8* kq, const void* k_scale, const void* k_min,
                                                    const u8* vq, const void* v_scale, const void* v_min,
                                                    const ExactT* k_sink, const ExactT* v_sink,
                                                    const ExactT* k_tail, const ExactT* v_tail, float* part_acc,
                                                    float* part_ml) {
    ADQ_DYNAMIC_SMEM(adq_smem4);
    u8* smem = (u8*)adq_smem4;
    float* tile_f = (float*)(smem + ADQ_SMEM_TILE_OFF);
    u8* tile_k = smem + ADQ_SMEM_TILE_OFF;
    u8* tile_v = smem + ADQ_SMEM_TILE_OFF + PACKED_REGION;
    float* kmeta = (float*)(smem + ADQ_SMEM_KMETA_OFF);
    float* vmeta = (float*)(smem + ADQ_SMEM_VMETA_OFF);
    float* qs = (float*)(smem + ADQ_SMEM_Q_OFF);
    float* sc = (float*)(smem + ADQ_SMEM_S_OFF);  // [2][MAXG][TILE] partial scores.
    float* pt = sc;  // [TILE][MAXG] probabilities, written over the scores once they are read.
    float* st = (float*)(smem + ADQ_SMEM_STAT_OFF);  // m[MAXG], l[MAXG], alpha[MAXG].

    const u32 split = blockIdx.x;
    const u32 kvh = blockIdx.y;
    const u32 b = blockIdx.z;
    const u32 tid = threadIdx.x;
    const u32 gqa = p.gqa;
    const u32 hq0 = kvh * gqa;
    const u64 stream_id = (u64)b * p.n_kv_heads + kvh;

    const u32* ln = lens + (u64)b * ADQ_LENS_STRIDE;
    const u32 len = ln[3];
    const u32 n_sink = QUANT ? ln[2] : 0u;
    const u32 qk = QUANT ? ln[0] : 0u;
    const u32 qv = QUANT ? ln[1] : 0u;
    const u32 tail_end = len - n_sink;  // Attention-order index where the sinks begin.
    const u32 k_ring = QUANT ? ln[4] : 0u;
    const u32 v_ring = QUANT ? ln[5] : 0u;
    const u32 s0 = split * p.chunk;
    const u32 s1 = min(len, s0 + p.chunk);

    // Scaled queries, channel-major ([D][MAXG]) so that one channel's heads load as float4.
    for (u32 i = tid; i < MAXG * D; i += NT) {
        const u32 h = i % MAXG;
        const u32 c = i / MAXG;
        qs[i] = h < gqa ? adq_load(q, ((i64)b * p.n_q_heads + hq0 + h) * D + c, p.q_dtype) * p.sm_scale : 0.0f;
    }
    if (tid < MAXG) {
        st[tid] = ADQ_NEG_INF;
        st[MAXG + tid] = 0.0f;
        st[2 * MAXG + tid] = 1.0f;
    }

    const ExactT* ks = k_sink + stream_id * p.sink_cap * D;
    const ExactT* vs = v_sink + stream_id * p.sink_cap * D;
    const ExactT* kt = k_tail + stream_id * p.window_cap * D;
    const ExactT* vt = v_tail + stream_id * p.window_cap * D;
    const u32 mb = p.meta_dtype == ADQ_META_F16 ? 2u : 4u;
    const u8* kstream = QUANT ? kq + stream_id * p.k_stream_stride : nullptr;
    const u8* vstream = QUANT ? vq + stream_id * p.v_stream_stride : nullptr;
    const void* ksc = QUANT ? (const u8*)k_scale + stream_id * p.k_meta_stride * mb : nullptr;
    const void* kmn = QUANT && !ADQ_K_LLOYD ? (const u8*)k_min + stream_id * p.k_meta_stride * mb : nullptr;
    const void* vsc = QUANT ? (const u8*)v_scale + stream_id * p.v_meta_stride * mb : nullptr;
    const void* vmn = QUANT && !ADQ_V_LLOYD ? (const u8*)v_min + stream_id * p.v_meta_stride * mb : nullptr;
    const u32 kg = 1u << p.k_group_shift;
    const u32 vg = 1u << p.v_group_shift;

    float acc[MAXG];
#pragma unroll
    for (u32 h = 0; h < MAXG; ++h) acc[h] = 0.0f;

    const u32 ti = tid % TILE;  // Token of the tile in the score phase.
    const u32 half = tid / TILE;
    const u32 c_lo = half * (D / 2);
    const u32 vc = tid % D;  // Channel in the value phase.
    const u32 vpart = tid / D;
    constexpr u32 NP = NT / D;
    __syncthreads();

    for (u32 t = s0; t < s1; t += TILE) {
        const u32 n = min(TILE, s1 - t);
        // Packed parts of this tile: tokens [t, nk) of the key stream and [t, nv) of the value stream.
        const u32 nk = QUANT ? max(t, min(t + n, qk)) : t;
        const u32 nv = QUANT ? max(t, min(t + n, qv)) : t;
        i64 kb0 = 0, vb0 = 0, kg_lo = 0, vg_lo = 0;
        if (QUANT) {
            if (nk > t) {
                const i64 e_lo = (i64)t * D;
                const i64 e_hi = (i64)nk * D;
                kb0 = adq_load_packed<ADQ_K_WIDTH>(tile_k, kstream, e_lo, e_hi);
                kg_lo = e_lo >> p.k_group_shift;
                adq_load_meta_tile(kmeta, ksc, kmn, kg_lo, (u32)((e_hi - e_lo) >> p.k_group_shift), p.meta_dtype);
            }
            if (nv > t) {
                const i64 e_lo = (i64)t * D;
                const i64 e_hi = (i64)nv * D;
                vb0 = adq_load_packed<ADQ_V_WIDTH>(tile_v, vstream, e_lo, e_hi);
                vg_lo = e_lo >> p.v_group_shift;
                adq_load_meta_tile(vmeta, vsc, vmn, vg_lo, (u32)((e_hi - e_lo) >> p.v_group_shift), p.meta_dtype);
            }
        } else {
            adq_load_rows(tile_f, kt, t, n);
        }
        __syncthreads();

        // Scores: two threads per token, each over half of the channels.
        float s[MAXG];
#pragma unroll
        for (u32 h = 0; h < MAXG; ++h) s[h] = 0.0f;
        if (ti < n) {
            const u32 u = t + ti;
            if (QUANT && u < nk) {
                if (p.k_axis == ADQ_AXIS_PER_CHANNEL) {
                    const i64 blk = (i64)u >> p.k_group_shift;
                    const i64 a = blk * kg * D + (u & (kg - 1));
                    const u32 m0 = (u32)(blk * D - kg_lo);
                    // Code positions in the tile advance by one group of codes per channel.
                    const u32 step = AdqWidth<ADQ_K_WIDTH>::ternary ? kg : kg * AdqWidth<ADQ_K_WIDTH>::code_bits;
                    u32 pos = adq_code_pos<ADQ_K_WIDTH>(a + (i64)c_lo * kg, kb0);
                    for (u32 c = c_lo; c < c_lo + D / 2; ++c, pos += step) {
                        const u32 code = adq_code_at<ADQ_K_WIDTH>(tile_k, pos);
                        const float kv = adq_k_value(code, kmeta, m0 + c);
                        float qh[MAXG];
                        adq_load_heads(qh, qs + c * MAXG, gqa);
#pragma unroll
                        for (u32 h = 0; h < MAXG; ++h)
                            if (h < gqa) s[h] = fmaf(qh[h], kv, s[h]);
                    }
                } else {
                    const i64 e0 = (i64)u * D;
                    const u32 mrow = (u32)((e0 >> p.k_group_shift) - kg_lo);
                    const u32 step = AdqWidth<ADQ_K_WIDTH>::ternary ? 1u : AdqWidth<ADQ_K_WIDTH>::code_bits;
                    u32 pos = adq_code_pos<ADQ_K_WIDTH>(e0 + c_lo, kb0);
                    for (u32 c = c_lo; c < c_lo + D / 2; ++c, pos += step) {
                        const u32 code = adq_code_at<ADQ_K_WIDTH>(tile_k, pos);
                        const u32 m = mrow + (c >> p.k_group_shift);
                        const float kv = adq_k_value(code, kmeta, m);
                        float qh[MAXG];
                        adq_load_heads(qh, qs + c * MAXG, gqa);
#pragma unroll
                        for (u32 h = 0; h < MAXG; ++h)
                            if (h < gqa) s[h] = fmaf(qh[h], kv, s[h]);
                    }
                }
            } else if (QUANT) {
                const ExactT* row = adq_exact_row(ks, kt, u, qk, tail_end, k_ring, p.window_cap);
                for (u32 c = c_lo; c < c_lo + D / 2; ++c) {
                    const float kv = adq_exact_to_f32(row[c]);
                    float qh[MAXG];
                    adq_load_heads(qh, qs + c * MAXG, gqa);
#pragma unroll
                    for (u32 h = 0; h < MAXG; ++h)
                        if (h < gqa) s[h] = fmaf(qh[h], kv, s[h]);
                }
            } else {
                const float* row = tile_f + ti * ROW;
                for (u32 c = c_lo; c < c_lo + D / 2; ++c) {
                    const float kv = row[c];
                    float qh[MAXG];
                    adq_load_heads(qh, qs + c * MAXG, gqa);
#pragma unroll
                    for (u32 h = 0; h < MAXG; ++h)
                        if (h < gqa) s[h] = fmaf(qh[h], kv, s[h]);
                }
            }
        }
#pragma unroll
        for (u32 h = 0; h < MAXG; ++h) sc[(half * MAXG + h) * TILE + ti] = s[h];
        __syncthreads();

        // Online softmax: each warp owns query heads w and w + NT / 32. The probabilities are written token-major
        // ([TILE][MAXG], over the partial scores) once every warp has read its scores.
        {
            const u32 warp = tid / 32;
            const u32 lane = tid % 32;
            float pr[2][2];
#pragma unroll
            for (u32 k = 0; k < 2; ++k) {
                const u32 h = warp + k * (NT / 32);
                pr[k][0] = 0.0f;
                pr[k][1] = 0.0f;
                if (h < gqa) {
                    float v0 = lane < n ? sc[h * TILE + lane] + sc[(MAXG + h) * TILE + lane] : ADQ_NEG_INF;
                    float v1 =
                        lane + 32 < n ? sc[h * TILE + lane + 32] + sc[(MAXG + h) * TILE + lane + 32] : ADQ_NEG_INF;
                    const float m_old = st[h];
                    const float m_new = fmaxf(m_old, adq_warp_max(fmaxf(v0, v1)));
                    pr[k][0] = lane < n ? expf(v0 - m_new) : 0.0f;
                    pr[k][1] = lane + 32 < n ? expf(v1 - m_new) : 0.0f;
                    const float sum = adq_warp_sum(pr[k][0] + pr[k][1]);
                    if (lane == 0) {
                        const float alpha = m_old == ADQ_NEG_INF ? 0.0f : expf(m_old - m_new);
                        st[h] = m_new;
                        st[MAXG + h] = st[MAXG + h] * alpha + sum;
                        st[2 * MAXG + h] = alpha;
                    }
                }
            }
            __syncthreads();
#pragma unroll
            for (u32 k = 0; k < 2; ++k) {
                const u32 h = warp + k * (NT / 32);
                if (h < gqa) {
                    pt[lane * MAXG + h] = pr[k][0];
                    pt[(lane + 32) * MAXG + h] = pr[k][1];
                }
            }
        }
        if (!QUANT) {
            __syncthreads();
            adq_load_rows(tile_f, vt, t, n);
        }
        __syncthreads();

        // Values: one channel per thread, NP threads share a channel and split the tokens.
#pragma unroll
        for (u32 h = 0; h < MAXG; ++h)
            if (h < gqa) acc[h] *= st[2 * MAXG + h];
        if (QUANT) {
            const u32 npk = nv - t;  // Packed value tokens of this tile come first.
            if (p.v_axis == ADQ_AXIS_PER_TOKEN) {
                const u32 cg = vc >> p.v_group_shift;
                const u32 groups_per_token = D >> p.v_group_shift;
                // Code positions advance by NP tokens per step.
                const u32 step = NP * D * (AdqWidth<ADQ_V_WIDTH>::ternary ? 1u : AdqWidth<ADQ_V_WIDTH>::code_bits);
                u32 pos = adq_code_pos<ADQ_V_WIDTH>((i64)(t + vpart) * D + vc, vb0);
                for (u32 i = vpart; i < npk; i += NP, pos += step) {
                    const u32 code = adq_code_at<ADQ_V_WIDTH>(tile_v, pos);
                    const u32 m = i * groups_per_token + cg;
                    const float vv = adq_v_value(code, vmeta, m);
                    float ph[MAXG];
                    adq_load_heads(ph, pt + i * MAXG, gqa);
#pragma unroll
                    for (u32 h = 0; h < MAXG; ++h)
                        if (h < gqa) acc[h] = fmaf(ph[h], vv, acc[h]);
                }
            } else {
                for (u32 i = vpart; i < npk; i += NP) {
                    const i64 tok = (i64)t + i;
                    const i64 blk = tok >> p.v_group_shift;
                    const i64 e = blk * vg * D + (i64)vc * vg + (tok & (vg - 1));
                    const u32 code = adq_code_at<ADQ_V_WIDTH>(tile_v, adq_code_pos<ADQ_V_WIDTH>(e, vb0));
                    const i64 m = blk * D + vc - vg_lo;
                    const float vv = adq_v_value(code, vmeta, (u32)m);
                    float ph[MAXG];
                    adq_load_heads(ph, pt + i * MAXG, gqa);
#pragma unroll
                    for (u32 h = 0; h < MAXG; ++h)
                        if (h < gqa) acc[h] = fmaf(ph[h], vv, acc[h]);
                }
            }
            // Exact value rows (tail, then sinks): the first of them has the parity of npk.
            for (u32 i = npk + ((vpart + NP - npk % NP) % NP); i < n; i += NP) {
                const ExactT* row = adq_exact_row(vs, vt, t + i, qv, tail_end, v_ring, p.window_cap);
                const float vv = adq_exact_to_f32(row[vc]);
                float ph[MAXG];
                adq_load_heads(ph, pt + i * MAXG, gqa);
#pragma unroll
                for (u32 h = 0; h < MAXG; ++h)
                    if (h < gqa) acc[h] = fmaf(ph[h], vv, acc[h]);
            }
        } else {
            for (u32 i = vpart; i < n; i += NP) {
                const float vv = tile_f[i * ROW + vc];
                float ph[MAXG];
                adq_load_heads(ph, pt + i * MAXG, gqa);
#pragma unroll
                for (u32 h = 0; h < MAXG; ++h)
                    if (h < gqa) acc[h] = fmaf(ph[h], vv, acc[h]);
            }
        }
        __syncthreads();
    }

    // Merge the NP partial accumulators of each channel and write this split's partial results.
    if (NP > 1) {
        if (vpart > 0) {
#pragma unroll
            for (u32 h = 0; h < MAXG; ++h) tile_f[((vpart - 1) * MAXG + h) * D + vc] = acc[h];
        }
        __syncthreads();
        if (vpart == 0) {
            for (u32 j = 1; j < NP; ++j) {
#pragma unroll
                for (u32 h = 0; h < MAXG; ++h) acc[h] += tile_f[((j - 1) * MAXG + h) * D + vc];
            }
        }
    }
    if (vpart == 0) {
#pragma unroll
        for (u32 h = 0; h < MAXG; ++h) {
            if (h < gqa) {
                const u64 row = ((u64)b * p.n_q_heads + hq0 + h) * p.n_splits + split;
                part_acc[row * D + vc] = acc[h];
            }
        }
    }
    if (tid < gqa) {
        const u64 row = ((u64)b * p.n_q_heads + hq0 + tid) * p.n_splits + split;
        part_ml[2 * row] = st[tid];
        part_ml[2 * row + 1] = st[MAXG + tid];
    }
}

#if ADQ_BASELINE
// f16 baseline: the same split and reduction over unquantized f16 keys and values ([capacity][head_dim] per head,
// `window_cap` = capacity, the length in lens[ADQ_LENS_STRIDE * b + 3]).
extern "C" __global__ void __launch_bounds__(NT)
    adq_attn_f16_split(const AdqAttnParams p, const u32* lens, const void* q, const u16* k, const u16* v,
                       float* part_acc, float* part_ml) {
    adq_attn_split_impl<false>(p, lens, q, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, k, v, k, v,
                               part_acc, part_ml);
}
#else
extern "C" __global__ void __launch_bounds__(NT)
    adq_attn_split(const AdqAttnParams p, const u32* lens, const void* q, const u8* kq, const void* k_scale,
                   const void* k_min, const u8* vq, const void* v_scale, const void* v_min, const float* k_sink,
                   const float* v_sink, const float* k_tail, const float* v_tail, float* part_acc, float* part_ml) {
    adq_attn_split_impl<true>(p, lens, q, kq, k_scale, k_min, vq, v_scale, v_min, k_sink, v_sink, k_tail, v_tail,
                              part_acc, part_ml);
}
#endif

// Merges the splits of one (query head, sequence): out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.
extern "C" __global__ void __launch_bounds__(D) adq_attn_reduce(const AdqAttnParams p, const float* part_acc,
                                                                const float* part_ml, void* out) {
    const u32 hq = blockIdx.x;
    const u32 b = blockIdx.y;
    const u32 c = threadIdx.x;
    const u64 base = ((u64)b * p.n_q_heads + hq) * p.n_splits;
    float m = ADQ_NEG_INF;
    for (u32 s = 0; s < p.n_splits; ++s) m = fmaxf(m, part_ml[2 * (base + s)]);
    float num = 0.0f;
    float den = 0.0f;
    for (u32 s = 0; s < p.n_splits; ++s) {
        const float l = part_ml[2 * (base + s) + 1];
        if (l > 0.0f) {
            const float w = expf(part_ml[2 * (base + s)] - m);
            den = fmaf(w, l, den);
            num = fmaf(w, part_acc[(base + s) * D + c], num);
        }
    }
    adq_store(out, ((i64)b * p.n_q_heads + hq) * D + c, p.q_dtype, num / den);
}
