// kernels/softmax_xent.cu run on the host (see cuda_host.h), for tests/test_kernels_cuda.py.
#include "cuda_host.h"

#define SOFTMAX_XENT_HOST_EMULATION
#include "../../kernels/softmax_xent.cu"

// dtype: 0 float32, 1 float16, 2 bfloat16; the other arguments are the kernel's.
extern "C" void launch_softmax_xent(int dtype, unsigned grid_x, unsigned grid_y,
                                    const void* const* logits, void* const* grad,
                                    const long long* labels, long long rows, int classes,
                                    long long logits_row_stride, long long grad_row_stride,
                                    int rows_per_warp, float scale, long long ignore_index,
                                    double* loss, u64* top1, u64* top5) {
    emu::launch(grid_x, grid_y, 32 * WARPS_PER_BLOCK, [&] {
        if (dtype == 0) {
            softmax_xent_f32((const float* const*)logits, (float* const*)grad, labels, rows,
                             classes, logits_row_stride, grad_row_stride, rows_per_warp,
                             scale, ignore_index, loss, top1, top5);
        } else {
            auto fn = dtype == 1 ? softmax_xent_f16 : softmax_xent_bf16;
            fn((const u16* const*)logits, (u16* const*)grad, labels, rows, classes,
               logits_row_stride, grad_row_stride, rows_per_warp, scale, ignore_index, loss,
               top1, top5);
        }
    });
}
