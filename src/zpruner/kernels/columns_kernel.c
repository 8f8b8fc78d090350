/* Column moments for CVR's column variance (zpruner/kernels/columns.py, column_variance):
 * Σx and Σx² down the columns of a chunk of rows, in float64, in one read of the chunk.
 *
 * x² of a float32 is exact in float64 (48 significant bits), and column_variance's error
 * bound holds for any order of summation, so the row order here needs no match with
 * torch's. W: float32 [rows, cols] with row stride ldw; sum and sumsq: [cols], added to.
 */
#include <stdint.h>

void column_moments(const float *W, int64_t ldw, int64_t rows, int64_t cols, double *sum, double *sumsq)
{
    for (int64_t i = 0; i < rows; i++) {
        const float *w = W + i * ldw;
        for (int64_t j = 0; j < cols; j++) {
            double x = (double)w[j];
            sum[j] += x;
            sumsq[j] += x * x;
        }
    }
}
