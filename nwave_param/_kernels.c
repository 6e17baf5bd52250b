/* The penalties' forward and backward in one pass each over a weight matrix.
 *
 * Built on first use by nwave_param/native.py with the system C compiler and loaded with ctypes;
 * without a compiler nwave_param runs the same math with torch ops.  See nwave_param/kernels.py
 * for the math; the tests hold both paths to the definition in nwave_param/functional.py.
 *
 * m is a contiguous (rows, cols) matrix.  runs holds (start, count, length) triples: `count`
 * blocks of `length` consecutive rows from row `start`.  choice[b * cols + j] is the sign of
 * Q - P of block column (b, j), blocks numbered run by run: +1 where the positives are the
 * minority, -1 where the negatives are, 0 on a tie.  The inner loops are branch-free so that
 * the compiler vectorizes them; NaN is counted on the side and propagated at the end.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* One block of LENGTH rows from `base`: per column, the block's P, Q, excess and NaN count. */
#define FORWARD_BLOCK(T, FABS, LENGTH)                                                            \
    for (int64_t j = 0; j < cols; j++) {                                                          \
        T p = 0, q = 0, e = 0, n = 0;                                                             \
        for (int64_t i = 0; i < (LENGTH); i++) {                                                  \
            const T v = base[i * cols + j];                                                       \
            const T excess = FABS(v) - bound;                                                     \
            const T kept = excess > 0 ? excess : 0;                                               \
            e += squared ? kept * kept : kept;                                                    \
            p += v > 0 ? v : 0;                                                                   \
            q += v < 0 ? -v : 0;                                                                  \
            n += v != v;                                                                          \
        }                                                                                         \
        magnitudes[j] += e;                                                                       \
        topologies[j] += p < q ? p : q;                                                           \
        nans[j] += n;                                                                             \
        out[j] = (int8_t)((p < q) - (q < p));                                                     \
    }

#define DEFINE_FORWARD(T, NAME, FABS, ATTRIBUTE)                                                  \
    ATTRIBUTE static int NAME(const T *restrict m, int64_t cols, const int64_t *runs,             \
                             int64_t nruns, double limit, int64_t power, int8_t *restrict choice, \
                             double *sums) {                                                      \
        const T bound = (T)limit;                                                                 \
        const int squared = power == 2;                                                           \
        /* per-column accumulators: the column loop carries no reduction, so it vectorizes */    \
        T *scratch = calloc(3 * (cols ? cols : 1), sizeof(T));                                    \
        if (!scratch) return 1;                                                                   \
        T *restrict magnitudes = scratch, *restrict topologies = scratch + cols;                  \
        T *restrict nans = scratch + 2 * cols;                                                    \
        int64_t block = 0;                                                                        \
        for (int64_t r = 0; r < nruns; r++) {                                                     \
            const int64_t start = runs[3 * r], count = runs[3 * r + 1], length = runs[3 * r + 2]; \
            for (int64_t b = 0; b < count; b++, block++) {                                        \
                const T *restrict base = m + (start + b * length) * cols;                         \
                int8_t *restrict out = choice + block * cols;                                     \
                switch (length) { /* a constant row count lets the column loop vectorize */      \
                    case 1: FORWARD_BLOCK(T, FABS, 1); break;                                     \
                    case 2: FORWARD_BLOCK(T, FABS, 2); break;                                     \
                    case 3: FORWARD_BLOCK(T, FABS, 3); break;                                     \
                    case 4: FORWARD_BLOCK(T, FABS, 4); break;                                     \
                    case 5: FORWARD_BLOCK(T, FABS, 5); break;                                     \
                    case 6: FORWARD_BLOCK(T, FABS, 6); break;                                     \
                    case 7: FORWARD_BLOCK(T, FABS, 7); break;                                     \
                    case 8: FORWARD_BLOCK(T, FABS, 8); break;                                     \
                    default: FORWARD_BLOCK(T, FABS, length);                                      \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        double magnitude = 0, topology = 0, nan_count = 0;                                        \
        for (int64_t j = 0; j < cols; j++) {                                                      \
            magnitude += magnitudes[j];                                                           \
            topology += topologies[j];                                                            \
            nan_count += nans[j];                                                                 \
        }                                                                                         \
        free(scratch);                                                                            \
        sums[0] = nan_count ? NAN : magnitude;                                                    \
        sums[1] = nan_count ? NAN : topology;                                                     \
        return 0;                                                                                 \
    }                                                                                             \

/* Narrow matrices (fewer than 64 columns) miss the widest vector loop: give them 256-bit vectors. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define NARROW_VECTORS __attribute__((target("prefer-vector-width=256")))
#else
#define NARROW_VECTORS
#endif

#define DEFINE_KERNELS(T, SUFFIX, FABS)                                                           \
    DEFINE_FORWARD(T, forward_wide_##SUFFIX, FABS, )                                              \
    DEFINE_FORWARD(T, forward_narrow_##SUFFIX, FABS, NARROW_VECTORS)                              \
    int nwp_forward_##SUFFIX(const T *m, int64_t cols, const int64_t *runs, int64_t nruns,       \
                             double limit, int64_t power, int8_t *choice, double *sums) {        \
        return (cols < 64 ? forward_narrow_##SUFFIX : forward_wide_##SUFFIX)(                     \
            m, cols, runs, nruns, limit, power, choice, sums);                                    \
    }                                                                                             \
                                                                                                  \
    int nwp_backward_##SUFFIX(const T *restrict m, T *restrict grad, int64_t cols,                \
                              const int64_t *runs,                                                \
                              int64_t nruns, const int8_t *choice, double limit, int64_t power,   \
                              double grad_magnitude, double grad_topology) {                      \
        const T bound = (T)limit, gm = (T)grad_magnitude, gt = (T)grad_topology;                  \
        const T gm_power = power == 2 ? 2 * gm : gm;                                              \
        const int squared = power == 2;                                                           \
        /* d min(P,Q) / dM = clamp(sign(M), lo, hi): (0,1) if P<Q, (-1,0) if Q<P, (-1/2,1/2) tie */ \
        T *scratch = malloc(sizeof(T) * 2 * (cols ? cols : 1));                                   \
        if (!scratch) return 1;                                                                   \
        T *restrict low = scratch, *restrict high = scratch + cols;                               \
        int64_t block = 0;                                                                        \
        for (int64_t r = 0; r < nruns; r++) {                                                     \
            const int64_t start = runs[3 * r], count = runs[3 * r + 1], length = runs[3 * r + 2]; \
            for (int64_t b = 0; b < count; b++, block++) {                                        \
                const int8_t *c = choice + block * cols;                                          \
                for (int64_t j = 0; j < cols; j++) {                                              \
                    low[j] = (T)(c[j] - 1) * (T)0.5;                                              \
                    high[j] = (T)(c[j] + 1) * (T)0.5;                                             \
                }                                                                                 \
                for (int64_t i = 0; i < length; i++) {                                            \
                    const int64_t offset = (start + b * length + i) * cols;                       \
                    const T *row = m + offset;                                                    \
                    T *out = grad + offset;                                                       \
                    for (int64_t j = 0; j < cols; j++) {                                          \
                        const T v = row[j];                                                       \
                        const T sign = (T)(v > 0) - (T)(v < 0);                                   \
                        T s = sign < low[j] ? low[j] : sign;                                      \
                        s = s > high[j] ? high[j] : s;                                            \
                        const T excess = FABS(v) - bound;                                         \
                        const T kept = excess > 0 ? excess : 0;                                   \
                        const T slope = squared ? kept : (T)(excess > 0);                         \
                        const T g = gt * s + gm_power * slope * sign;                             \
                        out[j] = v != v ? v : g;                                                  \
                    }                                                                             \
                }                                                                                 \
            }                                                                                     \
        }                                                                                         \
        free(scratch);                                                                            \
        return 0;                                                                                 \
    }

DEFINE_KERNELS(float, f32, fabsf)
DEFINE_KERNELS(double, f64, fabs)
