#include "parallel.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* 1 when built with OpenMP: ckernels.py reports which parallel path the library took. */
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
