/* Z-Pruner's score from its operands, for a chunk of rows in one loop
 * (zpruner/kernels/score_passes.py).
 *
 * The eager pass runs thirteen torch ops per chunk, each a pass over it; here each weight
 * is read once. Built by zpruner/kernels/native.py with -ffp-contract=off: every step
 * rounds as torch's op does, in its order (x³ is (x * x) * x, as torch's pow with exponent
 * 3), and there is no sum, so the score has the eager pass's bits.
 *
 * W and S: float32 [rows, cols], row-major with row strides ldw and lds; S holds W / the
 * column norms on entry and the score on return. row_norm: [rows]; act: [cols], the
 * activation norms to the power 1.5. alpha and beta = 1 - alpha: the blend, as float32.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>

#if FLT_EVAL_METHOD != 0
#error "float arithmetic here would round in a wider type than torch's float32 ops (x87?)"
#endif

void zpruner_score(const float *W, int64_t ldw, float *S, int64_t lds, const float *row_norm, const float *act,
                   float mean_r, float std_r, float mean_c, float std_c, float alpha, float beta,
                   int64_t rows, int64_t cols)
{
    for (int64_t i = 0; i < rows; i++) {
        const float *w = W + i * ldw;
        float *s = S + i * lds;
        const float norm = row_norm[i];
        for (int64_t j = 0; j < cols; j++) {
            float z_r = fabsf((w[j] / norm - mean_r) / std_r);
            float z_c = fabsf((s[j] - mean_c) / std_c);
            z_r = z_r * z_r * z_r * alpha;
            z_c = z_c * z_c * z_c * beta;
            s[j] = (z_c + z_r) * act[j];
        }
    }
}
