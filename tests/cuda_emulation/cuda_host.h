// Just enough of CUDA to run a warp-synchronous kernel's source on the host, for tests.
//
// A launch runs the blocks one after another. A block's threads are fibers (ucontext) on the
// calling thread, switched round-robin: each runs until it waits at a barrier (a warp
// shuffle waits for its 32 lanes, __syncthreads for the block), so a run is deterministic
// and has no data races. Atomics are plain read-modify-writes, and __shared__ variables are
// statics, both safe with one block at a time. This checks a kernel's logic (indexing,
// strides, reductions, edge rows) without a GPU; timing, the memory model and PTX are for
// real hardware.
#pragma once

#include <ucontext.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct Dim3 {
    unsigned x = 0, y = 0, z = 0;
};
inline Dim3 threadIdx, blockIdx;  // set for the fiber about to run

namespace emu {

struct Fiber {
    ucontext_t context;
    std::unique_ptr<char[]> stack;
    bool done = false;
};

inline ucontext_t scheduler;
inline std::vector<Fiber> fibers;
inline unsigned current = 0;
inline const std::function<void()>* body = nullptr;

inline void yield() { swapcontext(&fibers[current].context, &scheduler); }

struct Barrier {
    unsigned expected, count = 0, generation = 0;
    void arrive_and_wait() {
        const unsigned mine = generation;
        if (++count == expected) {
            count = 0;
            ++generation;
            return;
        }
        while (generation == mine) yield();
    }
};

struct Block {
    explicit Block(unsigned threads) : all{threads}, warps(threads / 32, Barrier{32}),
                                       slots(2 * threads) {}
    Barrier all;
    std::vector<Barrier> warps;
    std::vector<uint64_t> slots;  // two per thread: shuffles alternate, one barrier each
    std::vector<unsigned> parity = std::vector<unsigned>(slots.size() / 2);
};
inline Block* block = nullptr;

inline void entry() {
    (*body)();
    fibers[current].done = true;  // returning resumes the scheduler (uc_link)
}

// Apart from the loops of launch(): getcontext returns twice, which may clobber locals.
[[gnu::noinline]] inline void start_fibers(size_t stack_bytes) {
    for (auto& f : fibers) {
        getcontext(&f.context);
        f.context.uc_stack = {f.stack.get(), 0, stack_bytes};
        f.context.uc_link = &scheduler;
        makecontext(&f.context, entry, 0);
        f.done = false;
    }
}

// Runs `kernel` on every thread of every block of a (gx, gy) grid of `threads`-thread blocks.
inline void launch(unsigned gx, unsigned gy, unsigned threads,
                   const std::function<void()>& kernel) {
    constexpr size_t stack_bytes = 64 << 10;
    fibers = std::vector<Fiber>(threads);
    for (auto& f : fibers) f.stack = std::make_unique_for_overwrite<char[]>(stack_bytes);
    body = &kernel;
    for (unsigned y = 0; y < gy; ++y) {
        for (unsigned x = 0; x < gx; ++x) {
            Block b(threads);
            block = &b;
            blockIdx = {x, y, 0};
            start_fibers(stack_bytes);
            for (unsigned left = threads; left > 0;) {
                left = 0;
                for (current = 0; current < threads; ++current) {
                    if (fibers[current].done) continue;
                    threadIdx = {current, 0, 0};
                    swapcontext(&scheduler, &fibers[current].context);
                    left += !fibers[current].done;
                }
            }
        }
    }
    fibers.clear();
}

}  // namespace emu

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    static_assert(sizeof(T) <= sizeof(uint64_t));
    const unsigned t = threadIdx.x, lane = t & 31, base = t - lane;
    auto& b = *emu::block;
    const unsigned p = b.parity[t];
    b.parity[t] ^= 1u;
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    b.slots[2 * t + p] = bits;
    b.warps[t / 32].arrive_and_wait();
    bits = b.slots[2 * (base + (lane ^ static_cast<unsigned>(lane_mask))) + p];
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}

inline void __syncthreads() { emu::block->all.arrive_and_wait(); }

template <typename T>
inline T atomicAdd(T* p, T v) {
    T old = *p;
    *p = old + v;
    return old;
}

inline float __uint_as_float(unsigned int u) { return std::bit_cast<float>(u); }

// ex2.approx.ftz: the exact 2^x here (the GPU's is within 2^-22), flushed as there
inline float exp2_approx(float x) {
    const float y = std::exp2(x);
    return std::fabs(y) < 1.17549435e-38f ? 0.0f : y;
}

// IEEE conversions with round to nearest even, as PTX's cvt.rn
inline float half_to_float(unsigned short h) {
    return static_cast<float>(std::bit_cast<_Float16>(h));
}
inline unsigned short float_to_half(float v) {
    return std::bit_cast<unsigned short>(static_cast<_Float16>(v));
}
inline unsigned short float_to_bfloat16(float v) {
    uint32_t u = std::bit_cast<uint32_t>(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays NaN (quiet)
        return static_cast<unsigned short>((u >> 16) | 0x40);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<unsigned short>(u >> 16);
}
