/* The passes of a threshold selection over a range of float32 scores
 * (zpruner/kernels/selection.py, _select_compiled): a count, a gather and the mask, each
 * one loop over the range where torch takes three to five ops with bool temporaries.
 * Comparisons only, no arithmetic: the result is the torch passes' exactly. NaN compares
 * false everywhere, so it is never below, never a candidate, and kept (as top-k, which
 * ranks NaN highest). The loops are written without branches on the data, so that the
 * compiler can vectorise them.
 */
#include <stdint.h>
#include <string.h>

#define BUFFER 1024 /* candidates gathered on the stack, then copied out */

/* counts[0] += how many x < lo; counts[1] += how many lo <= x <= hi */
void select_count(const float *x, int64_t n, float lo, float hi, int64_t *counts)
{
    int64_t below = 0, inside = 0;
    for (int64_t i = 0; i < n; i++) {
        below += x[i] < lo;
        inside += (x[i] >= lo) & (x[i] <= hi);
    }
    counts[0] += below;
    counts[1] += inside;
}

/* The x with lo <= x <= hi, in index order, into out (as many as select_count found). */
void select_gather(const float *x, int64_t n, float lo, float hi, float *out)
{
    float buffer[BUFFER + 1];
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        buffer[m] = x[i];
        m += (x[i] >= lo) & (x[i] <= hi);
        if (m == BUFFER) {
            memcpy(out, buffer, sizeof buffer[0] * BUFFER);
            out += BUFFER;
            m = 0;
        }
    }
    memcpy(out, buffer, sizeof buffer[0] * m);
}

/* keep[i] = 0 where x[i] < t and for the first ties_to_drop x[i] == t (index order), 1
 * elsewhere; ties_to_drop < 0: for every x[i] == t. */
void select_keep(const float *x, int64_t n, float t, int64_t ties_to_drop, uint8_t *keep)
{
    int64_t i = 0;
    if (ties_to_drop < 0) {
        for (; i < n; i++)
            keep[i] = !(x[i] <= t);
        return;
    }
    for (; i < n && ties_to_drop > 0; i++) {
        int tie = x[i] == t;
        keep[i] = !((x[i] < t) | tie);
        ties_to_drop -= tie;
    }
    for (; i < n; i++)
        keep[i] = !(x[i] < t);
}
