// gpufusion: fuse one output chunk from its tile windows, in one pass.
//
// __global__ functions
//   fuse_chunk<T, U, NDIM, MODE, INTERP>
//       mirrors gpufusion.backends.numpy_ref.fuse_chunk (operation for operation)
//       T      tile (window) element type: unsigned char, signed char, unsigned short, short, float
//       U      output element type (T or float)
//       NDIM   2 or 3
//       MODE   blend mode code (gpufusion.blend.MODE_CODES): 0 linear, 1 cosine, 2 average,
//              3 max, 4 overlay
//       INTERP interpolation code (gpufusion.blend.INTERP_CODES): 0 linear, 1 nearest
//
// Each thread computes whole output pixels (grid-stride loop over the chunk in C order): it
// loops over the chunk's entries (tiles, in plan order), maps the pixel into the entry's
// window, tests coverage, samples, weights, accumulates, then normalises, rounds and writes
// once. Shapes arrive as arguments, never as template parameters, so uneven edge chunks reuse
// the same compiled kernel.
//
// Inputs (packed by gpufusion.backends.cuda_kernels.pack_fusion_chunk, one buffer per chunk):
//   windows  all windows of the chunk, concatenated, each C-contiguous
//   idesc    k rows of (2 + 3*NDIM) long long:
//              [0] element offset of the window in `windows`
//              [1] 1 when the entry is a pure translation (its matrix is exactly the identity)
//              [2 .. 2+NDIM)          window shape
//              [2+NDIM .. 2+2*NDIM)   window origin in tile pixels (win_lo, "w0")
//              [2+2*NDIM .. 2+3*NDIM) tile shape
//   fdesc    k rows of (NDIM*NDIM + NDIM) double: the linear part M of the inverse affine
//              (row-major), then `offset`, so that q = offset + M @ l (see gpufusion.plan).
//
// Compiled with --std=c++17 (if constexpr) and --fmad=false (the host emulation with
// -ffp-contract=off), so that every a*b+c stays a rounded multiply then a rounded add, exactly
// the float32/float64 operations NumPy performs; with contraction, fused multiply-adds would
// round once and drift from the reference by an ulp here and there. Coordinates and ramps are
// float64, samples, weights and sums float32, in the reference's order. (CuPy also appends
// -ftz=true: float32 subnormals, below 1.2e-38, flush to zero; no image value or weight is
// that small.) The kernel uses no shared memory, atomics or barriers, so it also compiles as
// plain C++ (tests/host_emulation) and is checked against the NumPy reference without a GPU.

#define GF_MODE_LINEAR 0
#define GF_MODE_COSINE 1
#define GF_MODE_AVERAGE 2
#define GF_MODE_MAX 3
#define GF_MODE_OVERLAY 4
#define GF_INTERP_LINEAR 0
#define GF_INTERP_NEAREST 1

#define GF_PI 3.141592653589793

template <typename V>
__device__ __forceinline__ V gf_min(V a, V b) { return b < a ? b : a; }

template <typename V>
__device__ __forceinline__ V gf_max(V a, V b) { return a < b ? b : a; }

// Output conversion: integers are rounded half to even and clipped (numpy_ref.cast_output).
template <typename U> struct gf_output;
template <> struct gf_output<unsigned char> {
    static constexpr bool integral = true;
    static constexpr float lo = 0.0f, hi = 255.0f;
};
template <> struct gf_output<signed char> {
    static constexpr bool integral = true;
    static constexpr float lo = -128.0f, hi = 127.0f;
};
template <> struct gf_output<unsigned short> {
    static constexpr bool integral = true;
    static constexpr float lo = 0.0f, hi = 65535.0f;
};
template <> struct gf_output<short> {
    static constexpr bool integral = true;
    static constexpr float lo = -32768.0f, hi = 32767.0f;
};
template <> struct gf_output<float> {
    static constexpr bool integral = false;
    static constexpr float lo = 0.0f, hi = 0.0f;
};

template <typename U>
__device__ __forceinline__ U gf_cast_output(float v) {
    if constexpr (gf_output<U>::integral) {
        const float r = gf_min(gf_max(rintf(v), gf_output<U>::lo), gf_output<U>::hi);
        return (U)r;
    } else {
        return (U)v;
    }
}

// gpufusion.blend.ramp_weights for one coordinate: t is the tile coordinate (float64).
template <int MODE>
__device__ __forceinline__ float gf_ramp(double t, double size, double width) {
    if (!(width > 0.0)) {
        return 1.0f;
    }
    const double d = gf_min(t + 0.5, size - 0.5 - t);
    double r = gf_min(d / width, 1.0);
    if (MODE == GF_MODE_COSINE) {
        r = 0.5 - 0.5 * cos(GF_PI * r);
    }
    return (float)r;
}

// numpy_ref._sample, nearest: the pixel at floor(q + 0.5), clipped into the window.
template <typename T, int NDIM>
__device__ __forceinline__ float gf_sample_nearest(const T* __restrict__ win,
                                                   const long long* ws, const double* q) {
    long long lin = 0;
    for (int d = 0; d < NDIM; ++d) {
        const long long i = gf_min(gf_max((long long)floor(q[d] + 0.5), 0LL), ws[d] - 1);
        lin = lin * ws[d] + i;
    }
    return (float)win[lin];
}

// numpy_ref._sample + lerp_corners, linear: corner c has bit (NDIM-1-d) set for the upper
// neighbour along axis d; the corners are combined last axis first, in float32.
template <typename T, int NDIM>
__device__ __forceinline__ float gf_sample_linear(const T* __restrict__ win,
                                                  const long long* ws, const double* q) {
    long long i0[NDIM], i1[NDIM];
    float f[NDIM];
    for (int d = 0; d < NDIM; ++d) {
        const double fl = floor(q[d]);
        const long long a = gf_min(gf_max((long long)fl, 0LL), ws[d] - 1);
        i0[d] = a;
        i1[d] = gf_min(a + 1, ws[d] - 1);
        f[d] = (float)(q[d] - fl);
    }
    float v[1 << NDIM];
    for (int c = 0; c < (1 << NDIM); ++c) {
        long long lin = 0;
        for (int d = 0; d < NDIM; ++d) {
            const bool up = (c >> (NDIM - 1 - d)) & 1;
            lin = lin * ws[d] + (up ? i1[d] : i0[d]);
        }
        v[c] = (float)win[lin];
    }
    int n = 1 << NDIM;
    for (int d = NDIM - 1; d >= 0; --d) {
        n >>= 1;
        const float g = 1.0f - f[d];
        for (int i = 0; i < n; ++i) {
            v[i] = g * v[2 * i] + f[d] * v[2 * i + 1];
        }
    }
    return v[0];
}

template <typename T, typename U, int NDIM, int MODE, int INTERP>
__global__ void fuse_chunk(const T* __restrict__ windows, const long long* __restrict__ idesc,
                           const double* __restrict__ fdesc, long long n_entries,
                           U* __restrict__ out, long long s0, long long s1, long long s2,
                           double bw0, double bw1, double bw2, double cover_eps) {
    static_assert(NDIM == 2 || NDIM == 3, "fuse_chunk: NDIM must be 2 or 3");
    constexpr int ISTRIDE = 2 + 3 * NDIM;
    constexpr int FSTRIDE = NDIM * NDIM + NDIM;
    constexpr bool RAMP = MODE == GF_MODE_LINEAR || MODE == GF_MODE_COSINE;
    constexpr bool WEIGHTED = RAMP || MODE == GF_MODE_AVERAGE;
    const long long shape[3] = {s0, s1, s2};
    const double width[3] = {bw0, bw1, bw2};
    long long total = 1;
    for (int d = 0; d < NDIM; ++d) {
        total *= shape[d];
    }
    const long long step = (long long)blockDim.x * (long long)gridDim.x;
    for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < total; p += step) {
        double l[NDIM];
        long long rest = p;
        for (int d = NDIM - 1; d >= 0; --d) {
            l[d] = (double)(rest % shape[d]);
            rest /= shape[d];
        }
        float num = 0.0f, den = 0.0f, val = 0.0f;
        bool hit = false;
        for (long long k = 0; k < n_entries; ++k) {
            const long long* id = idesc + k * ISTRIDE;
            const double* fd = fdesc + k * FSTRIDE;
            const long long* ws = id + 2;
            const long long* w0 = id + 2 + NDIM;
            const long long* ts = id + 2 + 2 * NDIM;
            const bool translation = id[1] != 0;
            double q[NDIM];
            bool covered = true;
            for (int d = 0; d < NDIM && covered; ++d) {
                // q_d = offset_d + sum_j M_dj l_j, summed in j order (for the identity this
                // is exactly offset_d + l_d, so translations skip the products)
                double qd = fd[NDIM * NDIM + d];
                if (translation) {
                    qd = qd + l[d];
                } else {
                    for (int j = 0; j < NDIM; ++j) {
                        qd = qd + fd[d * NDIM + j] * l[j];
                    }
                }
                const double lo = (double)(-w0[d]);
                const double hi = (double)(ts[d] - 1 - w0[d]);
                covered = qd >= lo - cover_eps && qd <= hi + cover_eps;
                q[d] = gf_min(gf_max(qd, lo), hi);
            }
            if (!covered) {
                continue;
            }
            const T* win = windows + id[0];
            float v;
            if constexpr (INTERP == GF_INTERP_NEAREST) {
                v = gf_sample_nearest<T, NDIM>(win, ws, q);
            } else {
                v = gf_sample_linear<T, NDIM>(win, ws, q);
            }
            if constexpr (RAMP) {
                float w = gf_ramp<MODE>(q[0] + (double)w0[0], (double)ts[0], width[0]);
                for (int d = 1; d < NDIM; ++d) {
                    w = w * gf_ramp<MODE>(q[d] + (double)w0[d], (double)ts[d], width[d]);
                }
                num = num + w * v;
                den = den + w;
            } else if constexpr (WEIGHTED) {
                num = num + v;
                den = den + 1.0f;
            } else if constexpr (MODE == GF_MODE_MAX) {
                val = hit ? gf_max(val, v) : v;
                hit = true;
            } else {
                val = v;
                hit = true;
            }
        }
        float result;
        if constexpr (WEIGHTED) {
            result = den > 0.0f ? num / den : 0.0f;
        } else {
            result = hit ? val : 0.0f;
        }
        out[p] = gf_cast_output<U>(result);
    }
}
