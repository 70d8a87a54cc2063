// y = x Wᵀ + b in fp32 for the rows of x a decoding step brings, W read once from memory: the
// fp32 twin of bf16_linear.cpp (the same plan, one input per line instead of a pair):
//
//     y_mn = Σ_k x_mk W_nk + b_n                   (fp32 sums)
//
// W is stored *packed* (lmlab.nn.native_packed.pack): rows in blocks of 16, and in a block, for
// each input k, the 16 rows' weights side by side — one 64-byte cache line per input:
//
//     block j (rows 16j..16j+15):  [W_{16j,0} W_{16j+1,0} ... W_{16j+15,0}] [W_{16j,1} ...] ...
//
// (rows past N, in the last block, are zeros). One FMA multiplies a line by x_mk broadcast and
// adds into 16 fp32 sums, one per row of W: no horizontal sums, one stream per thread. On a
// 2-core AMD EPYC, cache-cold over GPT-2's decoder weights: ~31 GB/s for one row of x, ~28 for
// eight, where oneDNN's fp32 kernel (W read in place) streams ~20 and ~15.
//
// The loops over blocks and rows are packed_plan.h's (shared with bf16_linear.cpp). Built by
// lmlab.nn.native_packed with g++ -O3 -mavx512f -mavx512bw -mavx512vl -fopenmp.
#include <immintrin.h>
#include <stdint.h>

#include "packed_plan.h"

namespace {

struct F32 {
    using T = float;
    static constexpr int64_t MIN_PARALLEL = 1 << 15;

    // One block against one row of x: four sums per lane (inputs k..k+3 in flight), added at the end.
    static __m512 block_one(const float* x, const float* w, int64_t K) {
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 4 <= K; k += 4) {
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 16 * k), _mm512_set1_ps(x[k]), a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 16 * k + 16), _mm512_set1_ps(x[k + 1]), a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 16 * k + 32), _mm512_set1_ps(x[k + 2]), a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 16 * k + 48), _mm512_set1_ps(x[k + 3]), a3);
        }
        for (; k < K; k++) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 16 * k), _mm512_set1_ps(x[k]), a0);
        return _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    }

    // B adjacent blocks against M rows of x: each line read once and used M times (B·M ≤ 16 sums)
    template <int B, int M>
    static void blocks_many(const float* x, const float* w, int64_t K, __m512* out /* [B][M] */) {
        __m512 a[B][M];
        for (int j = 0; j < B; j++) for (int m = 0; m < M; m++) a[j][m] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k++) {
            __m512 wv[B];
            for (int j = 0; j < B; j++) wv[j] = _mm512_loadu_ps(w + j * 16 * K + 16 * k);
            for (int m = 0; m < M; m++) {
                const __m512 xv = _mm512_set1_ps(x[m * K + k]);
                for (int j = 0; j < B; j++) a[j][m] = _mm512_fmadd_ps(wv[j], xv, a[j][m]);
            }
        }
        for (int j = 0; j < B; j++) for (int m = 0; m < M; m++) out[j * M + m] = a[j][m];
    }

    // + b, the block's rows that exist stored
    static void finish(__m512 s, const float* b, float* y, int64_t n0, int64_t N) {
        const int64_t cnt = N - n0 < 16 ? N - n0 : 16;
        const __mmask16 msk = cnt == 16 ? (__mmask16)0xffff : (__mmask16)((1u << cnt) - 1);
        if (b) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(msk, b + n0));
        _mm512_mask_storeu_ps(y + n0, msk, s);
    }
};

}  // namespace

// 0 on success; 1 if the shapes are not this kernel's. x: M rows of K; w: the packed W (above),
// ⌈N/16⌉·16·K numbers; b: N or null; y: M rows of N.
extern "C" int lmlab_f32_linear(const float* x, const float* w, const float* b, float* y, int64_t M, int64_t N,
                                int64_t K, int64_t threads) {
    if (K < 1 || M < 1 || N < 1 || threads < 1) return 1;
    packed::run<F32>(x, w, b, y, M, N, K, static_cast<int>(threads));
    return 0;
}
