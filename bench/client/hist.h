/* Log-linear latency histogram shared by sseload (recording) and its histogram dump.
 *
 * Values are nanoseconds. Values below 128 ns get one bucket each; above, every power of two
 * is split into 128 equal sub-buckets (as HdrHistogram does with 2 significant digits), so a
 * bucket is at most 1/128 of its lower bound wide and the reported bucket midpoint is within
 * 0.4 % of any value in it. The top bucket ends at 2^41 ns (about 2,199 s); larger values are
 * clamped into it. Range needed by the suite: 1 us .. 100 s.
 */
#ifndef SSELOAD_HIST_H
#define SSELOAD_HIST_H

#include <stdint.h>
#include <string.h>

#define HIST_SUB_BITS 7
#define HIST_SUB (1u << HIST_SUB_BITS)
#define HIST_MAX_EXP 40 /* highest power of two kept: [2^40, 2^41) */
#define HIST_BUCKETS (HIST_SUB + (HIST_MAX_EXP - HIST_SUB_BITS + 1) * HIST_SUB)

struct hist {
    uint64_t count;
    uint64_t max_ns;
    uint64_t buckets[HIST_BUCKETS];
};

static inline unsigned hist_index(uint64_t v)
{
    if (v < HIST_SUB)
        return (unsigned)v;
    unsigned e = 63u - (unsigned)__builtin_clzll(v);
    if (e > HIST_MAX_EXP)
        return HIST_BUCKETS - 1;
    return HIST_SUB + (e - HIST_SUB_BITS) * HIST_SUB +
           (unsigned)((v >> (e - HIST_SUB_BITS)) & (HIST_SUB - 1));
}

/* Lower bound (inclusive) and width of bucket `i`, in ns. */
static inline void hist_bounds(unsigned i, uint64_t *low, uint64_t *width)
{
    if (i < HIST_SUB) {
        *low = i;
        *width = 1;
        return;
    }
    unsigned k = i - HIST_SUB;
    unsigned shift = k / HIST_SUB;
    *low = (uint64_t)(HIST_SUB + k % HIST_SUB) << shift;
    *width = (uint64_t)1 << shift;
}

static inline void hist_record(struct hist *h, uint64_t v)
{
    h->buckets[hist_index(v)]++;
    h->count++;
    if (v > h->max_ns)
        h->max_ns = v;
}

static inline void hist_reset(struct hist *h)
{
    memset(h, 0, sizeof *h);
}

/* Value (ns) at quantile `permyriad` / 10000: the midpoint of the bucket holding the sample
 * of rank ceil(count * permyriad / 10000) (integer arithmetic, so a merge of dumped buckets
 * gives the same answer), never above the largest value recorded. 0 when empty. */
static inline double hist_quantile(const struct hist *h, unsigned permyriad)
{
    if (h->count == 0)
        return 0.0;
    uint64_t rank = (h->count * permyriad + 9999u) / 10000u;
    if (rank < 1)
        rank = 1;
    if (rank > h->count)
        rank = h->count;
    uint64_t seen = 0;
    for (unsigned i = 0; i < HIST_BUCKETS; i++) {
        seen += h->buckets[i];
        if (seen >= rank) {
            uint64_t low, width;
            hist_bounds(i, &low, &width);
            double mid = (double)low + (double)(width - 1) / 2.0;
            return mid > (double)h->max_ns ? (double)h->max_ns : mid;
        }
    }
    return (double)h->max_ns;
}

#endif
