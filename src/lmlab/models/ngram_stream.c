/* The n-gram stream scorer of lmlab.models.ngram in one C loop per order.

   NGramLM._score_stream_torch is the reference: this file repeats its arithmetic line by
   line, so the probabilities are equal bit for bit (tests/models/test_ngram.py). Built
   with -ffp-contract=off and no fast-math (lmlab.native), each float64 operation rounds as
   torch's eager op does; the log is left to torch.

   Per order, the positions go in blocks of BLOCK: first every key's hash and a prefetch of
   its group's displacement, then its slot and a prefetch of its record, then the reads.
   So the two cache misses of a lookup (displacement, record) overlap with those of the
   other positions of the block instead of following each other, as they would in a loop
   that finished one position before starting the next. */

#include <stdint.h>
#include <string.h>

/* One order m >= 2 (NGramLM._stream_tables' _Stream, with its _HashIndex). */
typedef struct {
    const int64_t *displacement; /* [M] per group: XORed onto a key's top bits */
    const int64_t *records;      /* [4S]: two 16-byte records a slot, as int64 pairs */
    const int64_t *next_name;    /* [V+1] the next order's starts: a row's first context */
    const double *next_weight;   /*       (by symbol; NULL at the highest order) */
    int64_t restart_name;        /* the next order's all-BOS context (a sentence start) */
    double restart_weight;
    int64_t mixer, side_bit, bits, group_mask, none;
    int64_t kind; /* 0: interpolated, 1: add_k (an unseen token gets its context's base),
                     2: backoff form */
} ngram_order;

enum { BLOCK = 64 };

static double as_double(int64_t bits) {
    double x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

/* p(targets[t] | the stream up to t) for t < Q, in p [Q]; name, weight and top [Q] are
   scratch. near [Q]: each position's nearest context symbol (V: BOS, and so is end, the
   sentence end's id, or -1 if there is none); rows of T positions;
   unigram [V]: p from the empty context; name1, weight1 [V+1]: the one-token contexts by
   symbol; orders [n-1]: m = 2..n. Products wrap modulo 2^64, as int64 tensors do. */
void ngram_score_stream(int64_t Q, int64_t T, int64_t V, int64_t n, int64_t end,
                        const int64_t *near,
                        const int64_t *targets, const double *unigram, const int64_t *name1,
                        const double *weight1, const ngram_order *orders, int64_t per_name,
                        int64_t per_target, double *p, int64_t *name, double *weight,
                        int64_t *top) {
    for (int64_t t = 0; t < Q; t++) {
        const int64_t symbol = near[t] == end ? V : near[t];
        p[t] = unigram[targets[t]];
        name[t] = name1[symbol];
        weight[t] = weight1[symbol];
    }
    for (int64_t j = 1; j < n; j++) {
        const ngram_order *o = &orders[j - 1];
        const int last = j == n - 1;
        int64_t handed_name = -1; /* what position t-1 hands on as position t's context */
        double handed_weight = 1.0;
        for (int64_t start = 0; start < Q; start += BLOCK) {
            const int64_t stop = start + BLOCK < Q ? start + BLOCK : Q;
            for (int64_t t = start; t < stop; t++) { /* the key's P, then its group */
                if (name[t] < 0) continue;
                uint64_t product = (uint64_t)name[t] * (uint64_t)per_name
                                   + (uint64_t)targets[t] * (uint64_t)per_target;
                top[t] = (int64_t)(product * (uint64_t)o->mixer) >> o->side_bit;
                __builtin_prefetch(&o->displacement[(top[t] >> (o->bits + 1)) & o->group_mask]);
            }
            for (int64_t t = start; t < stop; t++) { /* 2 * slot + side */
                if (name[t] < 0) continue;
                top[t] ^= o->displacement[(top[t] >> (o->bits + 1)) & o->group_mask];
                __builtin_prefetch(&o->records[2 * top[t]]);
            }
            for (int64_t t = start; t < stop; t++) {
                const double lower = p[t];
                int64_t follow = -1;
                double follow_weight = 1.0;
                if (name[t] >= 0) {
                    const uint64_t product = ((uint64_t)name[t] * (uint64_t)per_name
                                              + (uint64_t)targets[t] * (uint64_t)per_target)
                                             * (uint64_t)o->mixer;
                    const int64_t *record = &o->records[2 * top[t]];
                    const int listed = record[0] == (int64_t)product;
                    const double value = as_double(record[1]);
                    if (o->kind == 0) {
                        p[t] = (listed ? value : 0.0) + weight[t] * lower;
                    } else if (o->kind == 1) {
                        p[t] = listed ? value : weight[t];
                    } else {
                        p[t] = listed ? value : weight[t] * lower;
                    }
                    if (!last && listed) { /* the other record of the slot: as a context */
                        const int64_t *other = &o->records[2 * (top[t] ^ 1)];
                        if ((other[0] & o->none) != o->none) {
                            follow = other[0] & o->none;
                            follow_weight = as_double(other[1]);
                        }
                    }
                } /* else an unseen context: p[t] stays the order below's */
                if (last) continue;
                /* position t's context of the next order: a sentence or a row starts it,
                   else position t-1's (j+1)-gram hands it on */
                if (near[t] == V || near[t] == end) {
                    name[t] = o->restart_name;
                    weight[t] = o->restart_weight;
                } else if (t % T == 0) {
                    name[t] = o->next_name[near[t]];
                    weight[t] = o->next_weight[near[t]];
                } else {
                    name[t] = handed_name;
                    weight[t] = handed_weight;
                }
                handed_name = follow;
                handed_weight = follow_weight;
            }
        }
    }
}
