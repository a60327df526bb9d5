// A small CPU emulation of the CUDA features adaquant's kernels use, so that the real kernel sources can run on a
// machine without a GPU (`tests/cuda_emulated.rs` compiles them with g++ and compares with the host twins).
// Each block runs its threads as OS threads with a block barrier for __syncthreads and a warp barrier for shuffles;
// blocks run one after another. This checks indexing, packing and the softmax merge, not speed or memory-model
// subtleties, and it is not part of any GPU build.
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define ADQ_EMULATE 1
#define __global__
#define __device__
#define __constant__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct uint4 {
    unsigned x, y, z, w;
};
struct float4 {
    float x, y, z, w;
};
struct adq_dim3 {
    unsigned x = 0, y = 0, z = 0;
};

inline thread_local adq_dim3 threadIdx, blockIdx;
inline adq_dim3 blockDim, gridDim;

struct AdqEmuBlock {
    std::unique_ptr<std::barrier<>> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<float> shfl;
    std::vector<unsigned char> smem;
};
inline thread_local AdqEmuBlock* adq_emu_block = nullptr;

inline void __syncthreads() { adq_emu_block->block->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float x, int o) {
    const unsigned t = threadIdx.x;
    auto& w = *adq_emu_block->warps[t / 32];
    adq_emu_block->shfl[t] = x;
    w.arrive_and_wait();
    const float y = adq_emu_block->shfl[(t & ~31u) | ((t % 32) ^ (unsigned)o)];
    w.arrive_and_wait();
    return y;
}

inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline float __uint_as_float(unsigned i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned i;
    std::memcpy(&i, &f, 4);
    return i;
}
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
using std::isfinite;

inline unsigned atomicMin(unsigned* p, unsigned v) {
    std::atomic_ref<unsigned> a(*p);
    unsigned old = a.load();
    while (v < old && !a.compare_exchange_weak(old, v)) {
    }
    return old;
}

inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }

inline float4* adq_emu_smem() { return reinterpret_cast<float4*>(adq_emu_block->smem.data()); }

// Runs `kernel` over the grid. Blocks that synchronise run each thread on its own OS thread; kernels without
// barriers (`sync == false`) run their threads one after another.
inline void adq_emu_launch(adq_dim3 grid, unsigned threads, size_t smem_bytes, bool sync,
                           const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = adq_dim3{threads, 1, 1};
    for (unsigned z = 0; z < grid.z; ++z) {
        for (unsigned y = 0; y < grid.y; ++y) {
            for (unsigned x = 0; x < grid.x; ++x) {
                AdqEmuBlock blk;
                blk.block = std::make_unique<std::barrier<>>(threads);
                for (unsigned w = 0; w < (threads + 31) / 32; ++w) {
                    blk.warps.push_back(std::make_unique<std::barrier<>>(32));
                }
                blk.shfl.assign(threads, 0.0f);
                // Poisoned shared memory: a read before a write shows up as NaN.
                blk.smem.assign(smem_bytes + 16, 0xff);
                auto body = [&](unsigned t) {
                    adq_emu_block = &blk;
                    blockIdx = adq_dim3{x, y, z};
                    threadIdx = adq_dim3{t, 0, 0};
                    kernel();
                };
                if (sync) {
                    std::vector<std::thread> ts;
                    for (unsigned t = 0; t < threads; ++t) ts.emplace_back(body, t);
                    for (auto& th : ts) th.join();
                } else {
                    for (unsigned t = 0; t < threads; ++t) body(t);
                }
            }
        }
    }
}
