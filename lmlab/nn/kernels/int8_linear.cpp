// y = (x qᵀ) ⊙ s + b for a few rows of x (decoding): int8 weight codes q (N × K, one fp32
// scale s_n per row) read once from memory and widened to fp32 in registers,
//
//     y_mn = s_n · Σ_k x_mk q_nk + b_n          (fp32 sums; K a multiple of 16)
//
// 16 codes at a time: vpmovsxbd (int8 → int32), vcvtdq2ps (→ fp32), one FMA per row of x.
//
// The codes are stored *blocked* (lmlab.nn.native.block): rows in blocks of four, and in a
// block, for k = 0, 16, ..., K − 16, the 16 codes of each of the four rows side by side — one
// 64-byte cache line holding what one step of the loop needs:
//
//     block b (rows 4b..4b+3):  [q_{4b,0:16} q_{4b+1,0:16} q_{4b+2,0:16} q_{4b+3,0:16}] [q_{4b,16:32} ...] ...
//
// the last N mod 4 rows follow, row-major. Each thread then reads one stream front to back.
// Reading four plain rows at once is four interleaved streams per thread, short ones where
// K is small (896 codes: 14 cache lines a row), and the hardware prefetcher did not keep up:
// 4,864 × 896 read at 16 GB/s plain and at 33 GB/s blocked, cache-cold, on 2 threads of an
// AMD EPYC where torch.sum reads 35 GB/s.
//
// Built by lmlab.nn.native with g++ -O3 -mavx512f -mavx512bw -fopenmp; the threads are
// PyTorch's own OpenMP pool (its libgomp is loaded first), as many as torch.get_num_threads().
#include <immintrin.h>
#include <stdint.h>

namespace {

inline __m512 widen(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// one block (four rows) against one row of x: each cache line of codes read once, in order
inline void block_one(const float* x, const int8_t* q, int64_t K, float* out) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        const int8_t* p = q + 4 * k;
        const __m512 xv = _mm512_loadu_ps(x + k);
        a0 = _mm512_fmadd_ps(widen(p), xv, a0);
        a1 = _mm512_fmadd_ps(widen(p + 16), xv, a1);
        a2 = _mm512_fmadd_ps(widen(p + 32), xv, a2);
        a3 = _mm512_fmadd_ps(widen(p + 48), xv, a3);
    }
    out[0] = _mm512_reduce_add_ps(a0);
    out[1] = _mm512_reduce_add_ps(a1);
    out[2] = _mm512_reduce_add_ps(a2);
    out[3] = _mm512_reduce_add_ps(a3);
}

// one block (four rows) against M rows of x (M ≤ 4: 16 sums in registers), each code widened
// once and used M times
template <int M>
inline void block_many(const float* x, const int8_t* q, int64_t K, float* out /* [4][M] */) {
    __m512 a[4][M];
    for (int r = 0; r < 4; r++) for (int m = 0; m < M; m++) a[r][m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        const int8_t* p = q + 4 * k;
        const __m512 w0 = widen(p), w1 = widen(p + 16), w2 = widen(p + 32), w3 = widen(p + 48);
        for (int m = 0; m < M; m++) {
            const __m512 xv = _mm512_loadu_ps(x + m * K + k);
            a[0][m] = _mm512_fmadd_ps(w0, xv, a[0][m]);
            a[1][m] = _mm512_fmadd_ps(w1, xv, a[1][m]);
            a[2][m] = _mm512_fmadd_ps(w2, xv, a[2][m]);
            a[3][m] = _mm512_fmadd_ps(w3, xv, a[3][m]);
        }
    }
    for (int r = 0; r < 4; r++) for (int m = 0; m < M; m++) out[r * M + m] = _mm512_reduce_add_ps(a[r][m]);
}

// one plain row of codes against M rows of x (the last N mod 4 rows)
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

inline float finish(float sum, const float* s, const float* b, int64_t n) { return sum * s[n] + (b ? b[n] : 0.0f); }

// M rows of x (1 ≤ M ≤ 8) against every row of q: the blocks shared among the threads, each
// read from memory once (for M > 4, in two passes over x: the second from the L1 cache)
template <int M>
void rows_of(const float* x, const int8_t* q, const float* s, const float* b, float* y, int64_t N, int64_t K,
             int threads) {
    const int64_t blocks = N / 4;
#pragma omp parallel for schedule(static) num_threads(threads) if (N * K >= (1 << 17))
    for (int64_t i = 0; i < blocks; i++) {
        const int8_t* qb = q + i * 4 * K;
        const int64_t n = 4 * i;
        if (M == 1) {
            float o[4];
            block_one(x, qb, K, o);
            for (int r = 0; r < 4; r++) y[n + r] = finish(o[r], s, b, n + r);
        } else {
            constexpr int G = M <= 4 ? M : (M + 1) / 2;  // rows of x per pass: at most 4 (16 sums in registers)
            for (int m0 = 0; m0 < M; m0 += G) {
                float o[4 * G];
                const int g = M - m0 < G ? M - m0 : G;
                if (g == G) block_many<G>(x + m0 * K, qb, K, o);
                else block_many<(G > 1 ? G - 1 : 1)>(x + m0 * K, qb, K, o);
                for (int r = 0; r < 4; r++)
                    for (int m = 0; m < g; m++) y[(m0 + m) * N + n + r] = finish(o[r * g + m], s, b, n + r);
            }
        }
    }
    for (int64_t n = 4 * blocks; n < N; n++) {  // the last N mod 4 rows, plain
        float o[M];
        one_row<M>(x, q + n * K, K, o);
        for (int m = 0; m < M; m++) y[m * N + n] = finish(o[m], s, b, n);
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
