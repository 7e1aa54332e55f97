// gpufusion: 2x mean downsampling of one block (one resolution-pyramid step).
//
// __global__ functions
//   downsample_mean2<T, ACC, ALGORITHM>
//       mirrors gpufusion.pyramid.downsample_mean2(block, factors, algorithm)
//       T          element type (input and output): unsigned char, signed char,
//                  unsigned short, short, unsigned int, int, float, double
//       ACC        accumulator: float, or double for 32-bit integers and double (as the
//                  reference's _accumulator_dtype)
//       ALGORITHM  0 "corners" (the reference's default), 1 "pairwise"
//
// The block is viewed as 4-D, (n0, n1, n2, n3), C-contiguous; the caller
// (gpufusion.backends.cuda_kernels.downsample_geometry) merges neighbouring kept axes and pads
// with leading axes of length 1. Axis d is reduced by f_d (1 or 2): output length
// ceil(n_d / f_d), a trailing odd sample being the mean of the samples that exist. Each thread
// computes whole output samples (grid-stride loop). The up to 16 input samples of an output
// sample are indexed by a bit per halved axis (bit d: the upper sample along axis d).
//
//   corners   the reference sums the strided corner views into one accumulator, corner 0
//             first, then corners 1, 2, ... (a corner's bits name its halved axes in axis
//             order, so the ascending order is the same here), each corner only where it
//             exists; then it scales by 0.5 once per halved axis (exact in binary).
//   pairwise  the reference halves the axes one after the other, in index order, replacing
//             each pair by (lower + upper) * 0.5 and keeping a trailing odd sample as it is.
//
// Both in ACC; integer results are rounded half to even and clipped to T's range, floats
// converted back to T. Compiled with --fmad=false like fuse.cu. No shared memory, atomics or
// barriers: it also runs as C++ on the host (tests/host_emulation).

template <typename T> struct gf_ds_limits;
template <> struct gf_ds_limits<unsigned char> {
    static constexpr bool integral = true;
    static constexpr double lo = 0.0, hi = 255.0;
};
template <> struct gf_ds_limits<signed char> {
    static constexpr bool integral = true;
    static constexpr double lo = -128.0, hi = 127.0;
};
template <> struct gf_ds_limits<unsigned short> {
    static constexpr bool integral = true;
    static constexpr double lo = 0.0, hi = 65535.0;
};
template <> struct gf_ds_limits<short> {
    static constexpr bool integral = true;
    static constexpr double lo = -32768.0, hi = 32767.0;
};
template <> struct gf_ds_limits<unsigned int> {
    static constexpr bool integral = true;
    static constexpr double lo = 0.0, hi = 4294967295.0;
};
template <> struct gf_ds_limits<int> {
    static constexpr bool integral = true;
    static constexpr double lo = -2147483648.0, hi = 2147483647.0;
};
template <> struct gf_ds_limits<float> {
    static constexpr bool integral = false;
    static constexpr double lo = 0.0, hi = 0.0;
};
template <> struct gf_ds_limits<double> {
    static constexpr bool integral = false;
    static constexpr double lo = 0.0, hi = 0.0;
};

__device__ __forceinline__ float gf_ds_rint(float v) { return rintf(v); }
__device__ __forceinline__ double gf_ds_rint(double v) { return rint(v); }

template <typename T, typename ACC>
__device__ __forceinline__ T gf_ds_cast(ACC v) {
    if constexpr (gf_ds_limits<T>::integral) {
        const ACC lo = (ACC)gf_ds_limits<T>::lo;
        const ACC hi = (ACC)gf_ds_limits<T>::hi;
        ACC r = gf_ds_rint(v);
        r = r < lo ? lo : r;
        r = hi < r ? hi : r;
        return (T)r;
    } else {
        return (T)v;
    }
}

template <typename T, typename ACC, int ALGORITHM>
__global__ void downsample_mean2(const T* __restrict__ in, T* __restrict__ out,
                                 long long n0, long long n1, long long n2, long long n3,
                                 long long f0, long long f1, long long f2, long long f3) {
    const long long n[4] = {n0, n1, n2, n3};
    const long long f[4] = {f0, f1, f2, f3};
    long long m[4];
    long long stride[4];
    long long total = 1;
    for (int d = 3; d >= 0; --d) {
        m[d] = (n[d] + f[d] - 1) / f[d];
        stride[d] = d == 3 ? 1 : stride[d + 1] * n[d + 1];
        total *= m[d];
    }
    const ACC half = (ACC)0.5;
    const long long step = (long long)blockDim.x * (long long)gridDim.x;
    for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < total; p += step) {
        long long rest = p;
        long long base = 0;
        bool up[4];
        for (int d = 3; d >= 0; --d) {
            const long long o = rest % m[d];
            rest /= m[d];
            const long long i = o * f[d];
            base += i * stride[d];
            up[d] = f[d] == 2 && i + 1 < n[d];
        }
        // v[c]: bit d of c selects the upper sample along axis d (only where up[d]).
        ACC v[16];
        for (int c = 0; c < 16; ++c) {
            long long lin = base;
            bool used = true;
            for (int d = 0; d < 4; ++d) {
                if ((c >> d) & 1) {
                    used = used && up[d];
                    lin += stride[d];
                }
            }
            v[c] = used ? (ACC)in[lin] : (ACC)0;
        }
        ACC r;
        if constexpr (ALGORITHM == 0) {
            // corners: ascending corner order, only corners that exist, then the scaling
            r = v[0];
            for (int c = 1; c < 16; ++c) {
                bool exists = true;
                for (int d = 0; d < 4; ++d) {
                    exists = exists && (!((c >> d) & 1) || up[d]);
                }
                if (exists) {
                    r = r + v[c];
                }
            }
            for (int d = 0; d < 4; ++d) {
                if (up[d]) {
                    r = r * half;
                }
            }
        } else {
            // pairwise: halve axis 0 first, then 1, 2, 3; after axis d the values live at
            // indices whose bits 0..d are zero
            for (int d = 0; d < 4; ++d) {
                if (!up[d]) {
                    continue;  // kept axis, or a trailing odd sample: the lower value stays
                }
                const int bit = 1 << d;
                for (int c = 0; c < 16; c += 2 * bit) {
                    v[c] = (v[c] + v[c + bit]) * half;
                }
            }
            r = v[0];
        }
        out[p] = gf_ds_cast<T, ACC>(r);
    }
}
