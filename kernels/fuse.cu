// gpufusion: fuse one output chunk from its tile windows, in one pass.
//
// __global__ functions
//   fuse_chunk<T, U, A, NDIM, MODE, INTERP>
//       mirrors gpufusion.backends.numpy_ref.fuse_chunk (operation for operation)
//       T      tile (window) element type: unsigned char, signed char, unsigned short, short,
//              float (accumulated in float); unsigned int, int, unsigned long long, long long,
//              double (accumulated in double: float cannot hold their values)
//       U      output element type (T or A)
//       A      accumulator type (numpy_ref.accumulator_dtype of T): float or double
//       NDIM   2 or 3
//       MODE   blend mode code (gpufusion.blend.MODE_CODES): 0 linear, 1 cosine, 2 average,
//              3 max, 4 overlay
//       INTERP interpolation code (gpufusion.blend.INTERP_CODES): 0 linear, 1 nearest
//   fuse_chunk_separable<T, U, A, NDIM, MODE, INTERP, PX>
//       the same result for chunks of pure translations, from per-axis tables (see below;
//       also mirrors gpufusion.backends.numpy_ref.fuse_chunk); PX output pixels per thread
//   fuse_blocks_separable<T, U, A, NDIM, MODE, INTERP, PX>
//       many blocks of translations per launch from device-resident tiles and a block
//       table (the same body as fuse_chunk_separable, per block; see the end of the file)
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
//   keep_single  nonzero: in the ramp modes a pixel one entry alone covers takes its sample
//              itself, not w * v / w, which can be an ulp off (numpy_ref.keeps_single_samples)
//
// Compiled with --std=c++17 (if constexpr) and --fmad=false (the host emulation with
// -ffp-contract=off), so that every a*b+c stays a rounded multiply then a rounded add, exactly
// the float32/float64 operations NumPy performs; with contraction, fused multiply-adds would
// round once and drift from the reference by an ulp here and there. Coordinates and ramps are
// float64, samples, weights and sums of type A, in the reference's order. (CuPy also appends
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

// Output conversion: integers are rounded half to even and clipped (numpy_ref.cast_output)
// to [lo, hi]: the type's limits, rounded toward zero to a double (numpy_ref.integer_bounds;
// 8- and 16-bit outputs come from float accumulators, where these limits are exact too).
template <typename U> struct gf_output;
template <> struct gf_output<unsigned char> {
    static constexpr bool integral = true;
    static constexpr double lo = 0.0, hi = 255.0;
};
template <> struct gf_output<signed char> {
    static constexpr bool integral = true;
    static constexpr double lo = -128.0, hi = 127.0;
};
template <> struct gf_output<unsigned short> {
    static constexpr bool integral = true;
    static constexpr double lo = 0.0, hi = 65535.0;
};
template <> struct gf_output<short> {
    static constexpr bool integral = true;
    static constexpr double lo = -32768.0, hi = 32767.0;
};
template <> struct gf_output<unsigned int> {
    static constexpr bool integral = true;
    static constexpr double lo = 0.0, hi = 4294967295.0;
};
template <> struct gf_output<int> {
    static constexpr bool integral = true;
    static constexpr double lo = -2147483648.0, hi = 2147483647.0;
};
template <> struct gf_output<unsigned long long> {
    static constexpr bool integral = true;
    static constexpr double lo = 0.0, hi = 18446744073709549568.0;  // 2**64 - 2048
};
template <> struct gf_output<long long> {
    static constexpr bool integral = true;
    static constexpr double lo = -9223372036854775808.0, hi = 9223372036854774784.0;
};
template <> struct gf_output<float> {
    static constexpr bool integral = false;
    static constexpr double lo = 0.0, hi = 0.0;
};
template <> struct gf_output<double> {
    static constexpr bool integral = false;
    static constexpr double lo = 0.0, hi = 0.0;
};

// rint in the accumulator's precision (rintf for float, as NumPy's rint of float32)
__device__ __forceinline__ float gf_rint(float v) { return rintf(v); }
__device__ __forceinline__ double gf_rint(double v) { return rint(v); }

template <typename U, typename A>
__device__ __forceinline__ U gf_cast_output(A v) {
    if constexpr (gf_output<U>::integral) {
        const A r = gf_min(gf_max(gf_rint(v), (A)gf_output<U>::lo), (A)gf_output<U>::hi);
        return (U)r;
    } else {
        return (U)v;
    }
}

// gpufusion.blend.ramp_weights for one coordinate: t is the tile coordinate (float64); the
// ramp is computed in double and returned as the accumulator type A.
template <int MODE, typename A>
__device__ __forceinline__ A gf_ramp(double t, double size, double width) {
    if (!(width > 0.0)) {
        return (A)1;
    }
    const double d = gf_min(t + 0.5, size - 0.5 - t);
    double r = gf_min(d / width, 1.0);
    if (MODE == GF_MODE_COSINE) {
        r = 0.5 - 0.5 * cos(GF_PI * r);
    }
    return (A)r;
}

// numpy_ref._sample, nearest: the pixel at floor(q + 0.5), clipped into the window.
template <typename T, typename A, int NDIM>
__device__ __forceinline__ A gf_sample_nearest(const T* __restrict__ win,
                                               const long long* ws, const double* q) {
    long long lin = 0;
    for (int d = 0; d < NDIM; ++d) {
        const long long i = gf_min(gf_max((long long)floor(q[d] + 0.5), 0LL), ws[d] - 1);
        lin = lin * ws[d] + i;
    }
    return (A)win[lin];
}

// numpy_ref.lerp_corners: the 2**NDIM corner samples v (corner c has bit NDIM-1-d set for the
// upper neighbour along axis d) combined last axis first, in A; v is overwritten.
template <typename A, int NDIM>
__device__ __forceinline__ A gf_lerp_corners(A* v, const A* f) {
    int n = 1 << NDIM;
    for (int d = NDIM - 1; d >= 0; --d) {
        n >>= 1;
        const A g = (A)1 - f[d];
        for (int i = 0; i < n; ++i) {
            v[i] = g * v[2 * i] + f[d] * v[2 * i + 1];
        }
    }
    return v[0];
}

// numpy_ref._sample + lerp_corners, linear: corner c has bit (NDIM-1-d) set for the upper
// neighbour along axis d; the corners are combined last axis first, in A.
template <typename T, typename A, int NDIM>
__device__ __forceinline__ A gf_sample_linear(const T* __restrict__ win,
                                              const long long* ws, const double* q) {
    long long i0[NDIM], i1[NDIM];
    A f[NDIM];
    for (int d = 0; d < NDIM; ++d) {
        const double fl = floor(q[d]);
        const long long a = gf_min(gf_max((long long)fl, 0LL), ws[d] - 1);
        i0[d] = a;
        i1[d] = gf_min(a + 1, ws[d] - 1);
        f[d] = (A)(q[d] - fl);
    }
    A v[1 << NDIM];
    for (int c = 0; c < (1 << NDIM); ++c) {
        long long lin = 0;
        for (int d = 0; d < NDIM; ++d) {
            const bool up = (c >> (NDIM - 1 - d)) & 1;
            lin = lin * ws[d] + (up ? i1[d] : i0[d]);
        }
        v[c] = (A)win[lin];
    }
    return gf_lerp_corners<A, NDIM>(v, f);
}

template <typename T, typename U, typename A, int NDIM, int MODE, int INTERP>
__global__ void fuse_chunk(const T* __restrict__ windows, const long long* __restrict__ idesc,
                           const double* __restrict__ fdesc, long long n_entries,
                           U* __restrict__ out, long long s0, long long s1, long long s2,
                           double bw0, double bw1, double bw2, double cover_eps,
                           long long keep_single) {
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
        A num = 0, den = 0, val = 0;
        bool hit = false;
        [[maybe_unused]] bool multi = false;  // RAMP: a second entry covers the pixel
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
            A v;
            if constexpr (INTERP == GF_INTERP_NEAREST) {
                v = gf_sample_nearest<T, A, NDIM>(win, ws, q);
            } else {
                v = gf_sample_linear<T, A, NDIM>(win, ws, q);
            }
            if constexpr (RAMP) {
                A w = gf_ramp<MODE, A>(q[0] + (double)w0[0], (double)ts[0], width[0]);
                for (int d = 1; d < NDIM; ++d) {
                    w = w * gf_ramp<MODE, A>(q[d] + (double)w0[d], (double)ts[d], width[d]);
                }
                num = num + w * v;
                den = den + w;
                multi = multi || hit;  // a second entry: the weighted mean, else v itself
                hit = true;
                val = v;
            } else if constexpr (WEIGHTED) {
                num = num + v;
                den = den + (A)1;
            } else if constexpr (MODE == GF_MODE_MAX) {
                val = hit ? gf_max(val, v) : v;
                hit = true;
            } else {
                val = v;
                hit = true;
            }
        }
        A result;
        if constexpr (RAMP) {
            result = keep_single && hit && !multi ? val : (den > (A)0 ? num / den : (A)0);
        } else if constexpr (WEIGHTED) {
            result = den > (A)0 ? num / den : (A)0;
        } else {
            result = hit ? val : (A)0;
        }
        out[p] = gf_cast_output<U, A>(result);
    }
}

// ---------------------------------------------------------------------------------------
// fuse_chunk_separable<T, U, A, NDIM, MODE, INTERP, PX>: the same result as fuse_chunk, bit
// for bit, for chunks whose entries are all pure translations (the general kernel stays the
// reference twin; gpufusion.backends.cupy_backend picks with `algorithm=`).
//
// For a translation, q_d = offset_d + l_d: each axis's coordinate, coverage, clamped
// indices, interpolation fraction and ramp weight depend on l_d alone. The host computes
// them per axis in float64 with exactly the general kernel's operations
// (gpufusion.backends.cuda_kernels.separable_tables) and packs them per entry:
//   woff   k long long: element offset of each window in `windows`
//   cover  k x NDIM x 2 int: the covered range [lo, hi) of chunk coordinates along each axis
//   atab   k x (s0 + .. + s_{NDIM-1}) x 2 A: (fraction f, ramp weight r) at each coordinate
//   itab   k x (s0 + .. + s_{NDIM-1}) x 2 int: window element offsets of the lower and upper
//          neighbour along the axis (index times the window's stride; nearest: the nearest
//          pixel, twice)
// Each thread computes PX consecutive pixels of one row (along the last axis): the row's
// coverage, weight product and offsets are read once per entry for all PX pixels. Index
// arithmetic is 32-bit (the host selects this kernel only when the chunk and every window
// have fewer than 2**31 elements). Samples, weights and sums are formed as in fuse_chunk:
// corners summed as offsets, combined last axis first, w = ((r_0 * r_1) * r_2).

template <typename T, typename A, int NDIM>
__device__ __forceinline__ A gf_lerp_offsets(const T* __restrict__ win, const int* o0,
                                             const int* o1, const A* f) {
    A v[1 << NDIM];
    for (int c = 0; c < (1 << NDIM); ++c) {
        int lin = 0;
        for (int d = 0; d < NDIM; ++d) {
            const bool up = (c >> (NDIM - 1 - d)) & 1;
            lin += up ? o1[d] : o0[d];
        }
        v[c] = (A)win[lin];
    }
    return gf_lerp_corners<A, NDIM>(v, f);
}

// The body of both separable kernels: one output block, its threads numbered first, first +
// step, ... (a grid-stride loop over the block's PX-pixel row groups).
template <typename T, typename U, typename A, int NDIM, int MODE, int INTERP, int PX>
__device__ __forceinline__ void gf_separable_block(const T* __restrict__ windows,
                                                   const long long* __restrict__ woff,
                                                   const int* __restrict__ cover,
                                                   const A* __restrict__ atab,
                                                   const int* __restrict__ itab,
                                                   long long n_entries, U* __restrict__ out,
                                                   long long s0, long long s1, long long s2,
                                                   long long keep_single, unsigned int first,
                                                   unsigned int step) {
    static_assert(NDIM == 2 || NDIM == 3, "fuse_chunk_separable: NDIM must be 2 or 3");
    constexpr bool RAMP = MODE == GF_MODE_LINEAR || MODE == GF_MODE_COSINE;
    constexpr bool WEIGHTED = RAMP || MODE == GF_MODE_AVERAGE;
    const int shape[3] = {(int)s0, (int)s1, (int)s2};
    const int sx = shape[NDIM - 1];
    int axis0[3] = {0, shape[0], shape[0] + shape[1]};  // start of each axis in a table row
    const int tlen = axis0[NDIM - 1] + sx;               // table entries per chunk entry
    const int groups = (sx + PX - 1) / PX;
    const int rows = NDIM == 2 ? shape[0] : shape[0] * shape[1];
    const unsigned int total = (unsigned int)rows * (unsigned int)groups;
    const int n = (int)n_entries;
    for (unsigned int t = first; t < total; t += step) {
        const int row = (int)(t / (unsigned int)groups);
        const int x0 = (int)(t - (unsigned int)row * (unsigned int)groups) * PX;
        int l[NDIM];  // the row's coordinates along the leading axes
        if (NDIM == 2) {
            l[0] = row;
        } else {
            l[0] = row / shape[1];
            l[1] = row - l[0] * shape[1];
        }
        A num[PX], den[PX], val[PX];
        bool hit[PX];
        [[maybe_unused]] bool multi[PX];
        for (int j = 0; j < PX; ++j) {
            num[j] = 0;
            den[j] = 0;
            val[j] = 0;
            hit[j] = false;
            multi[j] = false;
        }
        for (int k = 0; k < n; ++k) {
            const int* cv = cover + k * 2 * NDIM;
            bool covered = true;
            for (int d = 0; d < NDIM - 1; ++d) {
                covered = covered && l[d] >= cv[2 * d] && l[d] < cv[2 * d + 1];
            }
            const int xlo = cv[2 * (NDIM - 1)], xhi = cv[2 * (NDIM - 1) + 1];
            if (!covered || xhi <= x0 || xlo >= x0 + PX) {
                continue;
            }
            const A* at = atab + 2 * (long long)k * tlen;
            const int* it = itab + 2 * (long long)k * tlen;
            const T* win = windows + woff[k];
            int o0[NDIM], o1[NDIM];
            A f[NDIM];
            [[maybe_unused]] A wrow = (A)1;
            for (int d = 0; d < NDIM - 1; ++d) {
                const int e = 2 * (axis0[d] + l[d]);
                o0[d] = it[e];
                o1[d] = it[e + 1];
                f[d] = at[e];
                if constexpr (RAMP) {
                    wrow = d == 0 ? at[e + 1] : wrow * at[e + 1];
                }
            }
            for (int j = 0; j < PX; ++j) {
                const int x = x0 + j;
                if (x < xlo || x >= xhi) {
                    continue;
                }
                const int e = 2 * (axis0[NDIM - 1] + x);
                o0[NDIM - 1] = it[e];
                o1[NDIM - 1] = it[e + 1];
                f[NDIM - 1] = at[e];
                A v;
                if constexpr (INTERP == GF_INTERP_NEAREST) {
                    int lin = 0;
                    for (int d = 0; d < NDIM; ++d) {
                        lin += o0[d];
                    }
                    v = (A)win[lin];
                } else {
                    v = gf_lerp_offsets<T, A, NDIM>(win, o0, o1, f);
                }
                if constexpr (RAMP) {
                    const A w = wrow * at[e + 1];
                    num[j] = num[j] + w * v;
                    den[j] = den[j] + w;
                    multi[j] = multi[j] || hit[j];
                    hit[j] = true;
                    val[j] = v;
                } else if constexpr (WEIGHTED) {
                    num[j] = num[j] + v;
                    den[j] = den[j] + (A)1;
                } else if constexpr (MODE == GF_MODE_MAX) {
                    val[j] = hit[j] ? gf_max(val[j], v) : v;
                    hit[j] = true;
                } else {
                    val[j] = v;
                    hit[j] = true;
                }
            }
        }
        U* dst = out + row * sx;
        for (int j = 0; j < PX; ++j) {
            const int x = x0 + j;
            if (x >= sx) {
                break;
            }
            A result;
            if constexpr (RAMP) {
                result = keep_single && hit[j] && !multi[j]
                             ? val[j] : (den[j] > (A)0 ? num[j] / den[j] : (A)0);
            } else if constexpr (WEIGHTED) {
                result = den[j] > (A)0 ? num[j] / den[j] : (A)0;
            } else {
                result = hit[j] ? val[j] : (A)0;
            }
            dst[x] = gf_cast_output<U, A>(result);
        }
    }
}

template <typename T, typename U, typename A, int NDIM, int MODE, int INTERP, int PX>
__global__ void fuse_chunk_separable(const T* __restrict__ windows,
                                     const long long* __restrict__ woff,
                                     const int* __restrict__ cover,
                                     const A* __restrict__ atab, const int* __restrict__ itab,
                                     long long n_entries, U* __restrict__ out, long long s0,
                                     long long s1, long long s2, long long keep_single) {
    gf_separable_block<T, U, A, NDIM, MODE, INTERP, PX>(
        windows, woff, cover, atab, itab, n_entries, out, s0, s1, s2, keep_single,
        blockIdx.x * blockDim.x + threadIdx.x, blockDim.x * gridDim.x);
}

// ---------------------------------------------------------------------------------------
// fuse_blocks_separable<T, U, A, NDIM, MODE, INTERP, PX>: many output blocks of translations
// in one launch, from tiles resident in device memory (gpufusion.backends.resident), each
// block computed exactly as fuse_chunk_separable computes it (the same body), so the result
// is bit-identical to one launch per block and to the NumPy reference.
//   tiles    every tile of the mosaic, concatenated (C order)
//   btab     n_blocks rows of 8 long long: [0] first entry of the block, [1] entries,
//            [2] element offset of the block's output in `out`, [3..6) block shape s0, s1,
//            s2 (1 past NDIM), [6] element offset of the block's first entry in atab and
//            itab, [7] unused (0)
//   woff     per entry (all blocks, in block order): element offset in `tiles` of the
//            entry's window origin (tile offset + window start times the tile's strides)
//   cover, atab, itab   as for fuse_chunk_separable, per entry, with itab offsets in the
//            tile's strides (the window is read in place inside its tile)
//   per_block  CUDA blocks given to each output block; the grid is a multiple of it, and
//            output blocks beyond the grid are taken in turn (grid-stride over blocks)
template <typename T, typename U, typename A, int NDIM, int MODE, int INTERP, int PX>
__global__ void fuse_blocks_separable(const T* __restrict__ tiles,
                                      const long long* __restrict__ btab,
                                      const long long* __restrict__ woff,
                                      const int* __restrict__ cover,
                                      const A* __restrict__ atab, const int* __restrict__ itab,
                                      long long n_blocks, long long per_block,
                                      U* __restrict__ out, long long keep_single) {
    const unsigned int per = (unsigned int)per_block;
    const unsigned int span = gridDim.x / per;  // output blocks in flight
    const unsigned int first = (blockIdx.x % per) * blockDim.x + threadIdx.x;
    for (long long b = blockIdx.x / per; b < n_blocks; b += span) {
        const long long* row = btab + 8 * b;
        gf_separable_block<T, U, A, NDIM, MODE, INTERP, PX>(
            tiles, woff + row[0], cover + 2 * NDIM * row[0], atab + row[6], itab + row[6],
            row[1], out + row[2], row[3], row[4], row[5], keep_single, first,
            per * blockDim.x);
    }
}
