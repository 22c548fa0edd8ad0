/* zp_parallel: run fn over [0, n) in chunks of `grain`, on up to `threads` threads.
 *
 * Built with OpenMP, the threads are torch's own: ckernels.py links the library against the
 * libgomp that torch already loaded, so a region here reuses the team that torch's ops just
 * left spinning. Threads of our own would compete with that spinning team for the cores
 * (on 2 cores, a 2-thread quantize that ran right after a torch op took 2x longer). Without
 * OpenMP it runs serially.
 *
 * Chunks are claimed by whichever thread is free, so a thread that the OS delays costs its
 * current chunk, not a fixed share. fn gets the claiming thread's index in [0, threads) for
 * per-thread partial results. */
#ifndef ZP_PARALLEL_H
#define ZP_PARALLEL_H
#include <stdint.h>

typedef void (*zp_range_fn)(void *ctx, int64_t begin, int64_t end, int thread);

void zp_parallel(int threads, int64_t n, int64_t grain, zp_range_fn fn, void *ctx);

/* Atomically lowers *first to `value` if that is smaller: ranges finish in any order, and the
 * caller wants the first failure over all of them. */
static inline void zp_lower(int64_t *first, int64_t value) {
  int64_t seen = __atomic_load_n(first, __ATOMIC_RELAXED);
  while (value < seen &&
         !__atomic_compare_exchange_n(first, &seen, value, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
    ;
}

/* A block kernel's failure as one number that orders by block: block * 4 + why (why 1..3). */
#define ZP_FAILURE(block, why) ((block) * 4 + (why))
#define ZP_NO_FAILURE INT64_MAX

#endif
