// Fused softmax cross-entropy: loss, hits and gradient of K probes' logits in one read.
//
// For probe k and row b, with z = logits[k][b, :C] and label y = labels[b]:
//   grad[k][b, c] = (softmax(z)_c - [c == y]) * scale
//   loss[k]      += logsumexp(z) - z_y
//   top1[k]      += no class above z_y, and none tied with it at a lower index (argmax == y)
//   top5[k]      += fewer than 5 classes strictly above z_y
// Rows whose label is `ignore_index` (or outside [0, C)) add nothing and get a zero gradient.
//
// Layout: one warp per (probe, row). Each lane walks the classes with a stride of 32 in two
// sweeps: an online max / sum-of-exp (and the rank of z_y), then the gradient write. The row is
// read twice from global memory (the second read mostly hits L1 / L2 for C up to a few
// thousand) and written once, with one exponential per class and sweep (ex2.approx: a row
// costs about 29 instructions per float32 logit, under the memory time on an H200; see
// benchmarks/sass.py). Arithmetic is float32 whatever the storage type; per-probe sums
// go through a warp shuffle, a shared-memory block reduction and one atomic per block (float64
// for the loss, so that millions of rows sum without loss of precision).
//
// Self-contained on purpose (no CUDA headers): it compiles with NVRTC on a machine without the
// CUDA toolkit headers; half and bfloat16 conversions are the PTX cvt instructions. The tests
// also compile it for the host (tests/cuda_emulation), where those three come from C++.

typedef unsigned short u16;
typedef unsigned long long u64;

struct F32 {
    typedef float T;
    static __device__ __forceinline__ float load(const float* p) { return *p; }
    static __device__ __forceinline__ void store(float* p, float v) { *p = v; }
};

#ifndef SOFTMAX_XENT_HOST_EMULATION  // the tests' host emulation brings its own conversions
__device__ __forceinline__ float half_to_float(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 float_to_half(float v) {  // round to nearest even
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}
__device__ __forceinline__ u16 float_to_bfloat16(float v) {  // sm_80 and later
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}
// 2^x in two instructions, relative error below 2^-22 (PTX ISA); results under 2^-126
// flush to 0, far below what a probability in float32 sums can show. expf() costs 8.
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
#endif

struct F16 {
    typedef u16 T;
    static __device__ __forceinline__ float load(const u16* p) { return half_to_float(*p); }
    static __device__ __forceinline__ void store(u16* p, float v) { *p = float_to_half(v); }
};

struct BF16 {
    typedef u16 T;
    static __device__ __forceinline__ float load(const u16* p) {
        return __uint_as_float(((unsigned int)*p) << 16);
    }
    static __device__ __forceinline__ void store(u16* p, float v) { *p = float_to_bfloat16(v); }
};

#define WARPS_PER_BLOCK 8
#define LOWEST -3.402823466e38f  // the running max starts finite: no inf - inf
#define LOG2E 1.4426950408889634f

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ int warp_sum_int(int v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// grid: (ceil(B / (WARPS_PER_BLOCK * rows_per_warp)), K); block: 32 * WARPS_PER_BLOCK threads.
// logits[k] / grad[k] point at probe k's (B, C) matrix with row strides in elements; classes
// are contiguous. grad may equal logits (in place); grad == nullptr computes no gradient.
template <typename S>
__device__ void softmax_xent(const typename S::T* const* logits, typename S::T* const* grad,
                             const long long* labels, long long rows, int classes,
                             long long logits_row_stride, long long grad_row_stride,
                             int rows_per_warp, float scale, long long ignore_index,
                             double* loss, u64* top1, u64* top5) {
    typedef typename S::T T;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int k = blockIdx.y;
    const T* zk = logits[k];
    T* gk = grad == nullptr ? nullptr : grad[k];

    float loss_acc = 0.0f;  // per warp, over its rows; a few hundred rows at most
    int top1_acc = 0, top5_acc = 0;
    const long long first = ((long long)blockIdx.x * WARPS_PER_BLOCK + warp) * rows_per_warp;
    for (long long b = first; b < first + rows_per_warp && b < rows; ++b) {
        const T* z = zk + b * logits_row_stride;
        const long long y = labels[b];
        // a label outside [0, C) is the caller's error (the solver checks them): never read
        // out of bounds for it, count nothing
        const bool counted = y != ignore_index && y >= 0 && y < classes;
        const int yc = counted ? (int)y : 0;
        const float zy = S::load(z + yc);
        float m = LOWEST, s = 0.0f;
        int above = 0, tied_before = 0;
#pragma unroll 4
        for (int c = lane; c < classes; c += 32) {  // unrolled: several loads in flight
            const float v = S::load(z + c);
            // online softmax with one exponential per class: exp(-|v - m|) rescales the
            // running sum to a new max, or is the new term (written as an if, the two
            // branches each took an exponential, both executed)
            const float d = v - m;
            const float e = exp2_approx(-fabsf(d) * LOG2E);
            const bool higher = d > 0.0f;
            s = higher ? fmaf(s, e, 1.0f) : s + e;
            m = higher ? v : m;
            above += v > zy;
            tied_before += (v == zy) & (c < yc);
        }
        const float mm = warp_max(m);
        s = warp_sum(s * expf(m - mm));  // lanes without a class hold s = 0
        above = warp_sum_int(above);
        tied_before = warp_sum_int(tied_before);
        const float lse = mm + logf(s);
        if (counted && lane == 0) {
            loss_acc += lse - zy;
            top1_acc += (above == 0) & (tied_before == 0);
            top5_acc += above < 5;
        }
        if (gk != nullptr) {
            T* g = gk + b * grad_row_stride;
            const float inv = (counted ? scale : 0.0f) / s;  // softmax * scale, or 0
            const float hit = counted ? scale : 0.0f;  // subtracted at the label
#pragma unroll 4
            for (int c = lane; c < classes; c += 32) {
                const float p = exp2_approx((S::load(z + c) - mm) * LOG2E) * inv;
                S::store(g + c, c == yc ? p - hit : p);
            }
        }
    }

    __shared__ float s_loss[WARPS_PER_BLOCK];
    __shared__ int s_top1[WARPS_PER_BLOCK], s_top5[WARPS_PER_BLOCK];
    if (lane == 0) {
        s_loss[warp] = loss_acc;
        s_top1[warp] = top1_acc;
        s_top5[warp] = top5_acc;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double l = 0.0;
        u64 t1 = 0, t5 = 0;
        for (int w = 0; w < WARPS_PER_BLOCK; ++w) {
            l += (double)s_loss[w];
            t1 += (u64)s_top1[w];
            t5 += (u64)s_top5[w];
        }
        atomicAdd(loss + k, l);
        atomicAdd(top1 + k, t1);
        atomicAdd(top5 + k, t5);
    }
}

#define DEFINE_KERNEL(NAME, S)                                                              \
    extern "C" __global__ void __launch_bounds__(32 * WARPS_PER_BLOCK)                      \
    NAME(const S::T* const* logits, S::T* const* grad, const long long* labels,             \
         long long rows, int classes, long long logits_row_stride,                          \
         long long grad_row_stride, int rows_per_warp, float scale, long long ignore_index, \
         double* loss, u64* top1, u64* top5) {                                              \
        softmax_xent<S>(logits, grad, labels, rows, classes, logits_row_stride,             \
                        grad_row_stride, rows_per_warp, scale, ignore_index, loss, top1,    \
                        top5);                                                              \
    }

DEFINE_KERNEL(softmax_xent_f32, F32)
DEFINE_KERNEL(softmax_xent_f16, F16)
DEFINE_KERNEL(softmax_xent_bf16, BF16)
