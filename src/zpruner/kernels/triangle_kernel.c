/* A symmetric matrix's lower triangle written from its upper one (zpruner/kernels/lapack.py).
 *
 * LAPACK's spotri leaves the inverse in one triangle; the next factorisation reads the
 * other. torch fills it with a strided loop; here the copy runs tile by tile, so that the
 * rows read and the rows written both stay in cache. Values are moved as 32-bit patterns:
 * a copy, no arithmetic (-0.0 and NaN payloads included).
 *
 * a: row-major [n, n] with row stride lda; a[r][c] = a[c][r] for every r > c.
 */
#include <stdint.h>

#define TILE 64

void mirror_upper_to_lower(uint32_t *a, int64_t n, int64_t lda)
{
    for (int64_t c0 = 0; c0 < n; c0 += TILE) {
        int64_t c1 = c0 + TILE < n ? c0 + TILE : n;
        for (int64_t r0 = c0; r0 < n; r0 += TILE) {
            int64_t r1 = r0 + TILE < n ? r0 + TILE : n;
            for (int64_t r = r0; r < r1; r++) {
                int64_t end = r < c1 ? r : c1;
                for (int64_t c = c0; c < end; c++)
                    a[r * lda + c] = a[c * lda + r];
            }
        }
    }
}
