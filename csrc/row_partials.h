// The last step of the per-row reductions (iso_sums), shared by the CPU and CUDA kernels,
// header-only, for host (g++) and device (nvcc).
#pragma once

#include <cstdint>

#include "philox.h"  // ISOFAST_HD

namespace isofast {

// sse[b] and ssq[b] from row b's partial sums in part, laid out (B, splits, 2) as (sum (p - eps)^2,
// sum p^2) per split: the splits added in order in float64, so that the result depends on the
// split of the rows only, not on how the partials were scheduled.
template <typename P, typename A>
ISOFAST_HD void add_row_partials(const P* part, int64_t b, int64_t splits, A* sse, A* ssq) {
  double s_err = 0, s_sq = 0;
  for (int64_t k = 0; k < splits; ++k) {
    s_err += part[2 * (b * splits + k)];
    s_sq += part[2 * (b * splits + k) + 1];
  }
  sse[b] = static_cast<A>(s_err);
  ssq[b] = static_cast<A>(s_sq);
}

}  // namespace isofast
