// y = (x qᵀ) ⊙ s + b for a few rows of x (decoding): int8 weight codes q (N × K, one fp32
// scale s_n per row) read once from memory and widened to fp32 in registers,
//
//     y_mn = s_n · Σ_k x_mk q_nk + b_n          (fp32 sums; K a multiple of 16)
//
// The codes are stored *blocked* (lmlab.nn.native.block): rows in blocks of 16, and in a
// block, for each group of four inputs k..k+3, the 16 rows' codes of input k, then of k+1,
// k+2, k+3 — one 64-byte cache line per group of four inputs:
//
//     block j (rows 16j..16j+15):  [q_{16j,0} ... q_{16j+15,0} q_{16j,1} ... q_{16j+15,3}] [q_{16j,4} ...] ...
//
// the last N mod 16 rows follow, row-major (the codes keep their N·K bytes). A line is four
// times 16 codes, each widened (vpmovsxbd, vcvtdq2ps) and multiplied by x_mk broadcast into
// 16 fp32 sums, one per row of q: the bf16 and fp32 kernels' plan (packed_plan.h), no
// horizontal sums, one stream per thread. The earlier order (four rows interleaved 16 codes at
// a time, four sums per row added across lanes at the end) read the down projection of a
// Qwen2-0.5B (896 × 4,864) at 25 GB/s; this one at 30, on 2 threads of an AMD EPYC where
// torch.sum reads 31–35.
//
// Built by lmlab.nn.native with g++ -O3 -mavx512f -mavx512bw -fopenmp; the threads are
// PyTorch's own OpenMP pool (its libgomp is loaded first), as many as torch.get_num_threads().
#include <immintrin.h>
#include <stdint.h>

namespace {

inline __m512 widen(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// one block (16 rows) against one row of x: four chains of sums (inputs k..k+3), added at the end
inline __m512 block_one(const float* x, const int8_t* q, int64_t K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 4) {
        const int8_t* p = q + 16 * k;
        a0 = _mm512_fmadd_ps(widen(p), _mm512_set1_ps(x[k]), a0);
        a1 = _mm512_fmadd_ps(widen(p + 16), _mm512_set1_ps(x[k + 1]), a1);
        a2 = _mm512_fmadd_ps(widen(p + 32), _mm512_set1_ps(x[k + 2]), a2);
        a3 = _mm512_fmadd_ps(widen(p + 48), _mm512_set1_ps(x[k + 3]), a3);
    }
    return _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
}

// one block against M rows of x (2 ≤ M ≤ 8): each line's codes widened once and used M times;
// two chains per row of x while there are registers for them (M ≤ 4)
template <int M>
inline void block_many(const float* x, const int8_t* q, int64_t K, __m512* out /* [M] */) {
    constexpr int C = M <= 4 ? 2 : 1;
    __m512 a[M][C];
    for (int m = 0; m < M; m++) for (int c = 0; c < C; c++) a[m][c] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 4) {
        const int8_t* p = q + 16 * k;
        const __m512 w[4] = {widen(p), widen(p + 16), widen(p + 32), widen(p + 48)};
        for (int m = 0; m < M; m++) {
            const float* xm = x + m * K + k;
            for (int i = 0; i < 4; i++) a[m][i % C] = _mm512_fmadd_ps(w[i], _mm512_set1_ps(xm[i]), a[m][i % C]);
        }
    }
    for (int m = 0; m < M; m++) out[m] = C == 2 ? _mm512_add_ps(a[m][0], a[m][C - 1]) : a[m][0];
}

// one plain row of codes against M rows of x (the last N mod 16 rows)
template <int M>
inline void one_row(const float* x, const int8_t* q, int64_t K, float* out) {
    __m512 acc[M];
    for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        const __m512 w = widen(q + k);
        for (int m = 0; m < M; m++) acc[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * K + k), acc[m]);
    }
    for (int m = 0; m < M; m++) out[m] = _mm512_reduce_add_ps(acc[m]);
}

// the block's 16 sums scaled, + b, stored
inline void finish(__m512 sums, const float* s, const float* b, float* y, int64_t n0) {
    __m512 r = _mm512_mul_ps(sums, _mm512_loadu_ps(s + n0));
    if (b) r = _mm512_add_ps(r, _mm512_loadu_ps(b + n0));
    _mm512_storeu_ps(y + n0, r);
}

// M rows of x (1 ≤ M ≤ 8) against every row of q: the blocks shared among the threads, each
// read from memory once
template <int M>
void rows_of(const float* x, const int8_t* q, const float* s, const float* b, float* y, int64_t N, int64_t K,
             int threads) {
    const int64_t blocks = N / 16;
#pragma omp parallel for schedule(static) num_threads(threads) if (N * K >= (1 << 17))
    for (int64_t j = 0; j < blocks; j++) {
        const int8_t* qb = q + j * 16 * K;
        if (M == 1) {
            finish(block_one(x, qb, K), s, b, y, 16 * j);
        } else {
            __m512 o[M];
            block_many<M>(x, qb, K, o);
            for (int m = 0; m < M; m++) finish(o[m], s, b, y + m * N, 16 * j);
        }
    }
    for (int64_t n = 16 * blocks; n < N; n++) {  // the last N mod 16 rows, plain
        float o[M];
        one_row<M>(x, q + n * K, K, o);
        for (int m = 0; m < M; m++) y[m * N + n] = o[m] * s[n] + (b ? b[n] : 0.0f);
    }
}

}  // namespace

// 0 on success; 1 if the shapes are not this kernel's (the caller takes another path).
// q: the blocked codes (above). More than 8 rows of x: 8 at a time, each group reading q
// once more. ``threads``: PyTorch's setting (torch.get_num_threads()), which a thread that
// has not run OpenMP work before would not see.
extern "C" int lmlab_int8_linear(const float* x, const int8_t* q, const float* s, const float* b, float* y,
                                 int64_t M, int64_t N, int64_t K, int64_t threads) {
    if (K <= 0 || K % 16 != 0 || M < 1 || N < 1 || threads < 1) return 1;
    const int nt = static_cast<int>(threads);
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
        const float* xm = x + m0 * K;
        float* ym = y + m0 * N;
        switch (M - m0 < 8 ? M - m0 : 8) {
            case 1: rows_of<1>(xm, q, s, b, ym, N, K, nt); break;
            case 2: rows_of<2>(xm, q, s, b, ym, N, K, nt); break;
            case 3: rows_of<3>(xm, q, s, b, ym, N, K, nt); break;
            case 4: rows_of<4>(xm, q, s, b, ym, N, K, nt); break;
            case 5: rows_of<5>(xm, q, s, b, ym, N, K, nt); break;
            case 6: rows_of<6>(xm, q, s, b, ym, N, K, nt); break;
            case 7: rows_of<7>(xm, q, s, b, ym, N, K, nt); break;
            default: rows_of<8>(xm, q, s, b, ym, N, K, nt); break;
        }
    }
    return 0;
}
