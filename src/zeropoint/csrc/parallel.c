#include "parallel.h"
#include "zeropoint.h"

#ifdef _OPENMP
#include <omp.h>
#endif

int zp_openmp(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

void zp_parallel(int threads, int64_t n, int64_t grain, zp_range_fn fn, void *ctx) {
  (void)threads; /* read only by the OpenMP pragma */
  if (grain < 1) grain = 1;
  int64_t next = 0; /* first element not yet claimed */
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1 && n > grain)
#endif
  {
    int thread = 0;
#ifdef _OPENMP
    thread = omp_get_thread_num();
#endif
    for (;;) {
      const int64_t begin = __atomic_fetch_add(&next, grain, __ATOMIC_RELAXED);
      if (begin >= n) break;
      fn(ctx, begin, begin + grain < n ? begin + grain : n, thread);
    }
  }
}

typedef struct {
  zp_block_fn fn;
  int type;
  const float *x;
  uint8_t *y;
  int64_t in_floats, out_bytes;
  int64_t failure; /* atomic: lowest block * 4 + why seen (why is 1..3), or INT64_MAX */
} blocks_job;

static void blocks_range(void *ctx, int64_t begin, int64_t end, int thread) {
  (void)thread;
  blocks_job *j = ctx;
  int why = 0;
  const int64_t i = j->fn(j->type, j->x + j->in_floats * begin, end - begin,
                          j->y + j->out_bytes * begin, &why);
  if (i < 0) return;
  const int64_t failure = (begin + i) * 4 + why;
  int64_t seen = __atomic_load_n(&j->failure, __ATOMIC_RELAXED);
  while (failure < seen && !__atomic_compare_exchange_n(&j->failure, &seen, failure, 0,
                                                        __ATOMIC_RELAXED, __ATOMIC_RELAXED))
    ;
}

int64_t zp_parallel_blocks(int threads, int64_t grain, zp_block_fn fn, int type, const float *x,
                           int64_t in_floats, uint8_t *y, int64_t out_bytes, int64_t n, int *why) {
  blocks_job j = {fn, type, x, y, in_floats, out_bytes, INT64_MAX};
  zp_parallel(threads, n, grain, blocks_range, &j);
  if (j.failure == INT64_MAX) return -1;
  *why = (int)(j.failure % 4);
  return j.failure / 4;
}

typedef struct {
  zp_span_fn fn;
  void *ctx;
  int64_t failure; /* atomic: lowest position * 4 + why seen, or INT64_MAX */
} spans_job;

static void record_failure(int64_t *slot, int64_t failure) {
  int64_t seen = __atomic_load_n(slot, __ATOMIC_RELAXED);
  while (failure < seen &&
         !__atomic_compare_exchange_n(slot, &seen, failure, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
    ;
}

static void spans_range(void *ctx, int64_t begin, int64_t end, int thread) {
  (void)thread;
  spans_job *j = ctx;
  int why = 0;
  const int64_t i = j->fn(j->ctx, begin, end, &why);
  if (i >= 0) record_failure(&j->failure, i * 4 + why);
}

int64_t zp_parallel_spans(int threads, int64_t n, int64_t grain, zp_span_fn fn, void *ctx,
                          int *why) {
  spans_job j = {fn, ctx, INT64_MAX};
  zp_parallel(threads, n, grain, spans_range, &j);
  if (j.failure == INT64_MAX) return -1;
  *why = (int)(j.failure % 4);
  return j.failure / 4;
}
