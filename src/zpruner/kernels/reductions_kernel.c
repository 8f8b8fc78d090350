/* The reductions behind Z-Pruner's whole-matrix scalars (zpruner/kernels/reductions.py):
 * one read of a range of floats where torch takes several passes. Neither needs torch's
 * order of summation: a count is exact, and the sum of squares only decides a float32 std
 * within a bound that holds in any order (reductions.py, matrix_std).
 */
#include <stdint.h>

#define LANES 16 /* independent float64 accumulators, so that the sum vectorises */

/* The sum of (x[i] - m)^2 over n floats, each term as torch makes it (x to float64, minus
 * m, squared, in float64), summed in lanes: another order than torch's sum, which
 * reductions.py's matrix_std allows for its fast sum (any order of n non-negative terms is
 * within (n - 1) * 2^-53 of the exact sum). */
double sum_squared_deviations(const float *x, int64_t n, double m)
{
    double lanes[LANES] = {0.0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) {
            double d = (double)x[i + l] - m;
            lanes[l] += d * d;
        }
    for (; i < n; i++) {
        double d = (double)x[i] - m;
        lanes[0] += d * d;
    }
    double total = 0.0;
    for (int l = 0; l < LANES; l++)
        total += lanes[l];
    return total;
}

/* How many of n floats are below t (NaN is not): torch's count_nonzero(x < t). */
int64_t count_below(const float *x, int64_t n, float t)
{
    int64_t count = 0;
    for (int64_t i = 0; i < n; i++)
        count += x[i] < t;
    return count;
}
