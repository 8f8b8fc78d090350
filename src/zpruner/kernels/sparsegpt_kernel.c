/* SparseGPT's column loop within one block, on a range of output rows
 * (zpruner/kernels/sparsegpt_columns.py; the eager loop: zpruner/sparsegpt.py).
 *
 * The eager loop runs four torch ops and a temporary per column of W, in Python; here
 * TILE output rows at a time are copied out transposed (the block's columns as rows of
 * TILE floats, in L1), worked off column by column with every step a vector over the
 * TILE rows, and copied back. Built by zpruner/kernels/native.py with -ffp-contract=off,
 * so every value rounds as the reference's separate ops round it:
 * err = (w - w * keep) / U[j][j], then w[r] = w[r] - (U[j][r] * err) for r >= j. There is
 * no sum: the bits are the reference's, and the output rows are independent, so any split
 * of them over threads or tiles gives the same.
 *
 * W points at W[row0][i1] (row stride ldw), keep at keep[row0][i1] (0/1 bytes, stride
 * ldk), U at the block's diagonal U[i1][i1] (stride ldu), err at err[row0][0] (stride
 * lde); columns j_begin <= j < j_end of the block are worked off, each updating the
 * block's columns j..width-1.
 */
#include <float.h>
#include <stdint.h>
#include <stdlib.h>

#if FLT_EVAL_METHOD != 0
#error "float arithmetic here would round in a wider type than torch's float32 ops (x87?)"
#endif

#define TILE 32 /* output rows worked off together, transposed: every step is a vector over them */

/* Returns 0, or -1 if the tile buffers could not be allocated (nothing written then).
 * ldu: U's row stride (the caller passes the block's own contiguous copy). */
int sparsegpt_columns(float *W, int64_t ldw, const uint8_t *keep, int64_t ldk, const float *U, int64_t ldu,
                      float *err, int64_t lde, int64_t rows, int64_t j_begin, int64_t j_end, int64_t width)
{
    /* the tile transposed: B[r][t] = W[row0 + t][r], K the same of keep, E of err */
    float *B = malloc(sizeof(float) * 3 * (size_t)width * TILE);
    if (B == NULL)
        return -1;
    float *K = B + width * TILE, *E = K + width * TILE;
    for (int64_t c0 = 0; c0 < rows; c0 += TILE) {
        int64_t n = rows - c0 < TILE ? rows - c0 : TILE;
        for (int64_t t = 0; t < TILE; t++)
            for (int64_t r = 0; r < width; r++) {
                B[r * TILE + t] = t < n ? W[(c0 + t) * ldw + r] : 0.0f;
                K[r * TILE + t] = t < n ? (float)keep[(c0 + t) * ldk + r] : 1.0f;
            }
        for (int64_t j = j_begin; j < j_end; j++) {
            const float *u = U + j * ldu;
            const float *bj = B + j * TILE, *kj = K + j * TILE;
            float e[TILE];
            for (int t = 0; t < TILE; t++)
                e[t] = (bj[t] - bj[t] * kj[t]) / u[j];
            for (int t = 0; t < TILE; t++)
                E[j * TILE + t] = e[t];
            for (int64_t r = j; r < width; r++) {
                float *br = B + r * TILE;
                const float ur = u[r];
                for (int t = 0; t < TILE; t++)
                    br[t] = br[t] - ur * e[t];
            }
        }
        for (int64_t t = 0; t < n; t++) {
            for (int64_t r = 0; r < width; r++)
                W[(c0 + t) * ldw + r] = B[r * TILE + t];
            for (int64_t j = j_begin; j < j_end; j++)
                err[(c0 + t) * lde + j] = E[j * TILE + t];
        }
    }
    free(B);
    return 0;
}
