// Host emulation of the CUDA subset used by gpufusion's kernels (kernels/*.cu), so that the
// very same source compiles with g++ and runs on the CPU: execution-space qualifiers vanish,
// the built-in thread coordinates are thread-local globals, math functions come from libm,
// and gf_host_launch runs a kernel body once per (block, thread) of a 1-D grid, in order.
// Kernels may use no shared memory, barriers, atomics or warp intrinsics (they have none).
#pragma once

#include <cmath>
#include <math.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct gf_uint3 {
    unsigned int x, y, z;
};

static thread_local gf_uint3 threadIdx = {0, 0, 0};
static thread_local gf_uint3 blockIdx = {0, 0, 0};
static thread_local gf_uint3 blockDim = {1, 1, 1};
static thread_local gf_uint3 gridDim = {1, 1, 1};

template <typename Body>
inline void gf_host_launch(unsigned int grid, unsigned int block, Body body) {
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned int b = 0; b < grid; ++b) {
        for (unsigned int t = 0; t < block; ++t) {
            blockIdx = {b, 0, 0};
            threadIdx = {t, 0, 0};
            body();
        }
    }
}
