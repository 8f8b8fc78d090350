/* Energy compensation's passes over a chunk of rows, each fused into one loop per row.
 *
 * The eager form (zpruner/updates.py) runs about twenty torch ops per chunk, each a pass
 * over the chunk; here a row is read once per pass and its 20 KB stay in L1. Built by
 * zpruner/kernels/native.py with -ffp-contract=off: every elementwise expression below rounds as
 * torch's separate ops do, in their order (no fused multiply-add). Only the sums differ:
 * float64 accumulators in lanes instead of torch's float32 cascade, i.e. float32
 * reassociation of the sums, which updates.py allows above one chunk.
 *
 * Matrices are float32 [rows, cols], row-major and contiguous; keep is 0/1 bytes (torch's
 * bool); a dropped weight is x * 0.0f (so -0.0 for a negative x, as torch gives).
 */
#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#if FLT_EVAL_METHOD != 0
#error "float arithmetic here would round in a wider type than torch's float32 ops (x87?)"
#endif

#define LANES 16 /* independent accumulators: lets the compiler vectorise a sum without reordering it */

static double lane_total(const double *lanes)
{
    double total = 0.0;
    for (int l = 0; l < LANES; l++)
        total += lanes[l];
    return total;
}

/* Adds to e0[j] the sum over the chunk's rows of (W0 - mu)^2 and to e[j] that of
 * ((W - mu) * keep)^2, for every column j. W NULL: W is W0 * keep, whose term is then
 * (W0 - mu)^2 * keep, the same bits. */
void ec_column_energies(const float *W0, const float *W, const uint8_t *keep, const float *mu,
                        int64_t rows, int64_t cols, double *e0, double *e)
{
    for (int64_t i = 0; i < rows; i++) {
        const float *d = W0 + i * cols;
        const uint8_t *k = keep + i * cols;
        if (W == NULL) {
            for (int64_t j = 0; j < cols; j++) {
                float t0 = d[j] - mu[j];
                float s0 = t0 * t0;
                e0[j] += s0;
                e[j] += s0 * (float)k[j];
            }
        } else {
            const float *w = W + i * cols;
            for (int64_t j = 0; j < cols; j++) {
                float t0 = d[j] - mu[j];
                float t = (w[j] - mu[j]) * (float)k[j];
                e0[j] += t0 * t0;
                e[j] += t * t;
            }
        }
    }
}

/* One pass over the chunk's rows, writing W:
 *   fresh: W = W0 * keep first;
 *   cmu, cgamma not NULL: a column step's rescale, W = (((W - cmu) * cgamma) + cmu) * keep;
 *   row_step: then the row step, with mu the mean of the dense row W0,
 *     E0 = sum (W0 - mu)^2, E = sum ((W - mu) * keep)^2, gamma = clamp(sqrt(E0 / E), lo, hi)
 *     (1 where E = 0), W = (((W - mu) * gamma) + mu) * keep. */
void ec_row_pass(const float *W0, float *W, const uint8_t *keep, int fresh, const float *cmu,
                 const float *cgamma, int row_step, float lo, float hi, int64_t rows, int64_t cols)
{
    const int64_t whole = cols - cols % LANES;
    for (int64_t i = 0; i < rows; i++) {
        const float *d = W0 + i * cols;
        const uint8_t *k = keep + i * cols;
        float *w = W + i * cols;
        float mu = 0.0f;
        if (row_step) {
            double lanes[LANES] = {0};
            for (int64_t j0 = 0; j0 < whole; j0 += LANES)
                for (int l = 0; l < LANES; l++)
                    lanes[l] += d[j0 + l];
            for (int64_t j = whole; j < cols; j++)
                lanes[j - whole] += d[j];
            mu = (float)(lane_total(lanes) / (double)cols);
        }
        double dense[LANES] = {0}, kept[LANES] = {0};
        for (int64_t j0 = 0; j0 < cols; j0 += LANES) {
            int n = (int)(cols - j0 < LANES ? cols - j0 : LANES);
            for (int l = 0; l < n; l++) {
                int64_t j = j0 + l;
                float kf = (float)k[j];
                float x = fresh ? d[j] * kf : w[j];
                if (cgamma != NULL)
                    x = (((x - cmu[j]) * cgamma[j]) + cmu[j]) * kf;
                if (row_step) {
                    float t0 = d[j] - mu;
                    dense[l] += t0 * t0;
                    x = x - mu; /* the rescale's first step, kept in W for the second loop */
                    float t = x * kf;
                    kept[l] += t * t;
                }
                w[j] = x;
            }
        }
        if (!row_step)
            continue;
        float E0 = (float)lane_total(dense), E = (float)lane_total(kept);
        float gamma = E > 0.0f ? sqrtf(E0 / E) : 1.0f;
        gamma = gamma < lo ? lo : (gamma > hi ? hi : gamma); /* torch.clamp's: a NaN stays NaN */
        for (int64_t j = 0; j < cols; j++)
            w[j] = ((w[j] * gamma) + mu) * (float)k[j];
    }
}
