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

/* A serial block quantizer: n blocks of x into y, returning the first block it cannot store
 * (with *why > 0) or -1. */
typedef int64_t (*zp_block_fn)(int type, const float *x, int64_t n, uint8_t *y, int *why);

/* fn over n blocks (in_floats floats in, out_bytes bytes out each) in ranges of `grain` blocks
 * on up to `threads` threads. Ranges finish in any order; returns the first failing block over
 * all of them, with its *why, or -1. */
int64_t zp_parallel_blocks(int threads, int64_t grain, zp_block_fn fn, int type, const float *x,
                           int64_t in_floats, uint8_t *y, int64_t out_bytes, int64_t n, int *why);

/* A serial worker over items [begin, end) of ctx: returns the first position it cannot store
 * (in the caller's numbering, increasing with the items; *why > 0) or -1. */
typedef int64_t (*zp_span_fn)(void *ctx, int64_t begin, int64_t end, int *why);

/* fn over n items in ranges of `grain` on up to `threads` threads; returns the lowest failing
 * position over all ranges, with its *why (1..3), or -1. */
int64_t zp_parallel_spans(int threads, int64_t n, int64_t grain, zp_span_fn fn, void *ctx,
                          int *why);

#endif
