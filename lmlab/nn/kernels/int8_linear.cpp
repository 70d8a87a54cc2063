// y = (x qᵀ) ⊙ s + b for a few rows of x (decoding): int8 weight codes q (N × K, row-major,
// one fp32 scale s_n per row) read once from memory and widened to fp32 in registers,
//
//     y_mn = s_n · Σ_k x_mk q_nk + b_n          (fp32 sums; K a multiple of 16)
//
// 16 codes at a time: vpmovsxbd (int8 → int32), vcvtdq2ps (→ fp32), one FMA per row of x.
// The next rows of q are prefetched while these are summed: decoding is a stream of weights
// from memory, and the hardware prefetcher alone left a third of the bandwidth unused.
// Built by lmlab.nn.native with g++ -O3 -mavx512f -mavx512bw -fopenmp; the threads are
// PyTorch's own OpenMP pool (its libgomp is loaded first), as many as torch.get_num_threads().
#include <immintrin.h>
#include <stdint.h>

namespace {

inline __m512 widen(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// four rows of q (rows n..n+3, K apart) against one row of x, read once per 16 columns
inline void four_rows(const float* x, const int8_t* q, int64_t K, float* out) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        if ((k & 63) == 0) {  // the next four rows, one cache line each
            const char* p = reinterpret_cast<const char*>(q + 4 * K + k);
            _mm_prefetch(p, _MM_HINT_T0);
            _mm_prefetch(p + K, _MM_HINT_T0);
            _mm_prefetch(p + 2 * K, _MM_HINT_T0);
            _mm_prefetch(p + 3 * K, _MM_HINT_T0);
        }
        const __m512 xv = _mm512_loadu_ps(x + k);
        a0 = _mm512_fmadd_ps(widen(q + k), xv, a0);
        a1 = _mm512_fmadd_ps(widen(q + K + k), xv, a1);
        a2 = _mm512_fmadd_ps(widen(q + 2 * K + k), xv, a2);
        a3 = _mm512_fmadd_ps(widen(q + 3 * K + k), xv, a3);
    }
    out[0] = _mm512_reduce_add_ps(a0);
    out[1] = _mm512_reduce_add_ps(a1);
    out[2] = _mm512_reduce_add_ps(a2);
    out[3] = _mm512_reduce_add_ps(a3);
}

// one row of q against M rows of x: each code widened once, used M times
template <int M>
inline void one_row(const float* x, const int8_t* q, int64_t K, float* out) {
    __m512 acc[M];
    for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        if ((k & 63) == 0) _mm_prefetch(reinterpret_cast<const char*>(q + K + k), _MM_HINT_T0);  // the next row
        const __m512 w = widen(q + k);
        for (int m = 0; m < M; m++) acc[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * K + k), acc[m]);
    }
    for (int m = 0; m < M; m++) out[m] = _mm512_reduce_add_ps(acc[m]);
}

// two rows of q against M rows of x: each code widened once and used M times, each number
// of x loaded once for both rows
template <int M>
inline void two_rows(const float* x, const int8_t* q, int64_t K, float* out0, float* out1) {
    __m512 a0[M], a1[M];
    for (int m = 0; m < M; m++) a0[m] = a1[m] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        if ((k & 63) == 0) {  // the next two rows
            _mm_prefetch(reinterpret_cast<const char*>(q + 2 * K + k), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(q + 3 * K + k), _MM_HINT_T0);
        }
        const __m512 w0 = widen(q + k), w1 = widen(q + K + k);
        for (int m = 0; m < M; m++) {
            const __m512 xv = _mm512_loadu_ps(x + m * K + k);
            a0[m] = _mm512_fmadd_ps(w0, xv, a0[m]);
            a1[m] = _mm512_fmadd_ps(w1, xv, a1[m]);
        }
    }
    for (int m = 0; m < M; m++) {
        out0[m] = _mm512_reduce_add_ps(a0[m]);
        out1[m] = _mm512_reduce_add_ps(a1[m]);
    }
}

template <int M>
void rows_of(const float* x, const int8_t* q, const float* s, const float* b, float* y, int64_t N, int64_t K,
             int threads) {
    const int64_t pairs = N / 2;
#pragma omp parallel for schedule(static) num_threads(threads) if (N * K >= (1 << 17))
    for (int64_t i = 0; i < pairs; i++) {
        const int64_t n = 2 * i;
        float o0[M], o1[M];
        two_rows<M>(x, q + n * K, K, o0, o1);
        for (int m = 0; m < M; m++) {
            y[m * N + n] = o0[m] * s[n] + (b ? b[n] : 0.0f);
            y[m * N + n + 1] = o1[m] * s[n + 1] + (b ? b[n + 1] : 0.0f);
        }
    }
    if (N % 2) {  // the last row
        float o[M];
        one_row<M>(x, q + (N - 1) * K, K, o);
        for (int m = 0; m < M; m++) y[m * N + N - 1] = o[m] * s[N - 1] + (b ? b[N - 1] : 0.0f);
    }
}

}  // namespace

// 0 on success; 1 if the shapes are not this kernel's (the caller takes another path).
// More than 8 rows of x: 8 at a time, each group reading q once more.
// ``threads``: PyTorch's setting (torch.get_num_threads()), which a thread that has not run
// OpenMP work before would not see.
extern "C" int lmlab_int8_linear(const float* x, const int8_t* q, const float* s, const float* b, float* y,
                                 int64_t M, int64_t N, int64_t K, int64_t threads) {
    if (K <= 0 || K % 16 != 0 || M < 1 || N < 1 || threads < 1) return 1;
    const int nt = static_cast<int>(threads);
    if (M == 1) {
        const int64_t blocks = N / 4;
#pragma omp parallel for schedule(static) num_threads(nt) if (N * K >= (1 << 17))
        for (int64_t i = 0; i < blocks; i++) {
            const int64_t n = 4 * i;
            float o[4];
            four_rows(x, q + n * K, K, o);
            for (int r = 0; r < 4; r++) y[n + r] = o[r] * s[n + r] + (b ? b[n + r] : 0.0f);
        }
        for (int64_t n = 4 * blocks; n < N; n++) {  // the last N mod 4 rows
            float o[1];
            one_row<1>(x, q + n * K, K, o);
            y[n] = o[0] * s[n] + (b ? b[n] : 0.0f);
        }
        return 0;
    }
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
