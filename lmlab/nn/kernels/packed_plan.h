// The plan the packed kernels share (bf16_linear.cpp, f32_linear.cpp): W in blocks of 16 rows,
// each block's lines read once, in order. One row of x: blocks one at a time, each thread a
// stream of blocks. More rows: blocks two at a time (two streams), rows of x in groups of 8 —
// the second group on reads the pair of blocks (16·K numbers each) from the cache, not memory.
//
// An Op supplies the dtype's arithmetic:
//   using T;                                           the stored number (bf16 bits, or float)
//   static constexpr int64_t MIN_PARALLEL;             N·K (M·N·K) from which the threads share work
//   static __m512 block_one(const T* x, const T* w, int64_t K);        one block · one row of x
//   template <int B, int M> static void blocks_many(const T* x, const T* w, int64_t K, __m512* out);
//   static void finish(__m512 sums, const T* b, T* y, int64_t n0, int64_t N);   + b, stored
#pragma once
#include <immintrin.h>
#include <stdint.h>

namespace packed {

// g rows of x (1 ≤ g ≤ 8) against the B blocks starting at block j
template <class Op, int B>
inline void group(const typename Op::T* x, const typename Op::T* w, const typename Op::T* b, typename Op::T* y,
                  int64_t g, int64_t j, int64_t N, int64_t K) {
    __m512 o[B * 8];
    const typename Op::T* wj = w + j * 16 * K;
    switch (g) {
        case 1: Op::template blocks_many<B, 1>(x, wj, K, o); break;
        case 2: Op::template blocks_many<B, 2>(x, wj, K, o); break;
        case 3: Op::template blocks_many<B, 3>(x, wj, K, o); break;
        case 4: Op::template blocks_many<B, 4>(x, wj, K, o); break;
        case 5: Op::template blocks_many<B, 5>(x, wj, K, o); break;
        case 6: Op::template blocks_many<B, 6>(x, wj, K, o); break;
        case 7: Op::template blocks_many<B, 7>(x, wj, K, o); break;
        default: Op::template blocks_many<B, 8>(x, wj, K, o); break;
    }
    for (int u = 0; u < B; u++)
        for (int64_t m = 0; m < g; m++) Op::finish(o[u * g + m], b, y + m * N, (j + u) * 16, N);
}

// y (M × N) = x (M × K) Wᵀ + b, W packed: ⌈N/16⌉·16·K numbers
template <class Op>
inline void run(const typename Op::T* x, const typename Op::T* w, const typename Op::T* b, typename Op::T* y,
                int64_t M, int64_t N, int64_t K, int nt) {
    const int64_t NB = (N + 15) / 16;
    if (M == 1) {
#pragma omp parallel for schedule(static) num_threads(nt) if (N * K >= Op::MIN_PARALLEL)
        for (int64_t j = 0; j < NB; j++) Op::finish(Op::block_one(x, w + j * 16 * K, K), b, y, 16 * j, N);
        return;
    }
    const int64_t pairs = NB / 2, units = pairs + NB % 2;
#pragma omp parallel for schedule(static) num_threads(nt) if (M * N * K >= Op::MIN_PARALLEL)
    for (int64_t u = 0; u < units; u++) {
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
            const int64_t g = M - m0 < 8 ? M - m0 : 8;
            if (u < pairs) group<Op, 2>(x + m0 * K, w, b, y + m0 * N, g, 2 * u, N, K);
            else group<Op, 1>(x + m0 * K, w, b, y + m0 * N, g, NB - 1, N, K);
        }
    }
}

}  // namespace packed
