// y = x Wᵀ + b in bf16 for the rows of x a decoding step brings (one sequence, a few beams, a
// batch of up to 8; more rows in groups of 8): W (N × K, bf16) read once from memory, the sums
// kept in fp32 and rounded to bf16 once, at the end, as oneDNN's bf16 kernel does:
//
//     y_mn = bf16( Σ_k x_mk W_nk + b_n )          (fp32 sums; K even)
//
// W is stored *packed* (lmlab.nn.native_packed.pack): columns of y in blocks of 16, and in a
// block, for each pair of inputs (k, k+1), the 16 rows' two weights side by side — one 64-byte
// cache line per pair, 32 bf16:
//
//     block j (rows 16j..16j+15):  [W_{16j,0} W_{16j,1} W_{16j+1,0} W_{16j+1,1} ... W_{16j+15,1}] [W_{16j,2} W_{16j,3} ...] ...
//
// (rows past N, in the last block, are zeros). One AVX-512 BF16 instruction (vdpbf16ps) then
// multiplies a line by the pair (x_mk, x_m,k+1) broadcast to all 16 lanes and adds both
// products into 16 fp32 sums, one per row of W: no horizontal sums, no widening, and each
// thread reads its blocks as one stream front to back. On a 2-core AMD EPYC (Zen 4), cache-cold
// over a Qwen2-0.5B's decoder weights (benchmarks/int8_kernel.py): ~30 GB/s for one row of x,
// ~26 for eight, where oneDNN's bf16 kernel (its own packed layout) streams 19–22 and
// torch.sum reads 31–35.
//
// The loops over blocks and rows are packed_plan.h's (shared with f32_linear.cpp). Built by
// lmlab.nn.native_packed with g++ -O3 -mavx512f -mavx512bw -mavx512vl -mavx512bf16
// -fopenmp; PyTorch's OpenMP threads, as many as torch.get_num_threads().
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include "packed_plan.h"

namespace {

inline __m512bh line(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }

// (x_mk, x_m,k+1) in each of the 16 lanes
inline __m512bh pair(const uint16_t* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return (__m512bh)_mm512_set1_epi32(v);
}

struct Bf16 {
    using T = uint16_t;
    static constexpr int64_t MIN_PARALLEL = 1 << 16;

    // One block against one row of x: four sums per lane (pairs p..p+3 in flight at once: one
    // chain of dependent vdpbf16ps would wait on each result), added at the end.
    static __m512 block_one(const uint16_t* x, const uint16_t* w, int64_t K) {
        const int64_t P = K / 2;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        int64_t p = 0;
        for (; p + 4 <= P; p += 4) {
            a0 = _mm512_dpbf16_ps(a0, line(w + 32 * p), pair(x + 2 * p));
            a1 = _mm512_dpbf16_ps(a1, line(w + 32 * p + 32), pair(x + 2 * p + 2));
            a2 = _mm512_dpbf16_ps(a2, line(w + 32 * p + 64), pair(x + 2 * p + 4));
            a3 = _mm512_dpbf16_ps(a3, line(w + 32 * p + 96), pair(x + 2 * p + 6));
        }
        for (; p < P; p++) a0 = _mm512_dpbf16_ps(a0, line(w + 32 * p), pair(x + 2 * p));
        return _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    }

    // B adjacent blocks against M rows of x: each line read once and used M times (B·M ≤ 16 sums)
    template <int B, int M>
    static void blocks_many(const uint16_t* x, const uint16_t* w, int64_t K, __m512* out /* [B][M] */) {
        const int64_t P = K / 2;
        __m512 a[B][M];
        for (int j = 0; j < B; j++) for (int m = 0; m < M; m++) a[j][m] = _mm512_setzero_ps();
        for (int64_t p = 0; p < P; p++) {
            __m512bh wv[B];
            for (int j = 0; j < B; j++) wv[j] = line(w + j * 16 * K + 32 * p);
            for (int m = 0; m < M; m++) {
                const __m512bh xv = pair(x + m * K + 2 * p);
                for (int j = 0; j < B; j++) a[j][m] = _mm512_dpbf16_ps(a[j][m], wv[j], xv);
            }
        }
        for (int j = 0; j < B; j++) for (int m = 0; m < M; m++) out[j * M + m] = a[j][m];
    }

    // + b, rounded to bf16 (nearest even), the block's rows that exist stored
    static void finish(__m512 s, const uint16_t* b, uint16_t* y, int64_t n0, int64_t N) {
        const int64_t cnt = N - n0 < 16 ? N - n0 : 16;
        const __mmask16 msk = cnt == 16 ? (__mmask16)0xffff : (__mmask16)((1u << cnt) - 1);
        if (b) {  // bf16 → fp32 is a shift: exact
            const __m512i bi = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(msk, b + n0));
            s = _mm512_add_ps(s, _mm512_castsi512_ps(_mm512_slli_epi32(bi, 16)));
        }
        _mm256_mask_storeu_epi16(y + n0, msk, (__m256i)_mm512_cvtneps_pbh(s));
    }
};

// W plain (row-major, N × K) for a layer whose W must stay as it is — an output layer tied to
// the input embedding, whose rows the embedding reads: each row's 64-byte lines multiplied by
// the matching 32 numbers of x (vdpbf16ps adds lane-pair products into 16 fp32 sums), one row
// of W after another (rows side by side would be as many interleaved streams), its sums added
// across lanes at the end. Threads take contiguous stretches of rows: one stream each.
// (PyTorch's bf16 matrix-vector product read Qwen2-0.5B's tied 151,936 × 896 output layer in
// 26–37 ms a token here; this, ~9.)
template <int M>
inline void row_dot(const uint16_t* x, const uint16_t* w, int64_t K, float* out /* [M][16] */) {
    constexpr int C = M == 1 ? 4 : M <= 4 ? 2 : 1;  // chains of sums per row of x: C·M in flight
    __m512 a[M][C];
    for (int m = 0; m < M; m++) for (int c = 0; c < C; c++) a[m][c] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 * C <= K; k += 32 * C)
        for (int c = 0; c < C; c++) {
            const __m512bh wv = line(w + k + 32 * c);
            for (int m = 0; m < M; m++) a[m][c] = _mm512_dpbf16_ps(a[m][c], wv, line(x + m * K + k + 32 * c));
        }
    for (; k < K; k += 32) {  // the rest, the last line's missing numbers zeros
        const __mmask32 msk = K - k >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (K - k)) - 1);
        const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(msk, w + k);
        for (int m = 0; m < M; m++)
            a[m][0] = _mm512_dpbf16_ps(a[m][0], wv, (__m512bh)_mm512_maskz_loadu_epi16(msk, x + m * K + k));
    }
    for (int m = 0; m < M; m++) {
        __m512 t = a[m][0];
        for (int c = 1; c < C; c++) t = _mm512_add_ps(t, a[m][c]);
        out[m * 16] = _mm512_reduce_add_ps(t);
    }
}

// M rows of x (1 ≤ M ≤ 8) against the plain W, 16 rows of W (one vector of sums) at a time
template <int M>
void plain_rows(const uint16_t* x, const uint16_t* w, const uint16_t* b, uint16_t* y, int64_t N, int64_t K, int nt) {
    const int64_t NB = (N + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(nt) if (M * N * K >= Bf16::MIN_PARALLEL)
    for (int64_t j = 0; j < NB; j++) {
        alignas(64) float o[M * 16] = {};
        const int64_t n0 = 16 * j, cnt = N - n0 < 16 ? N - n0 : 16;
        for (int64_t r = 0; r < cnt; r++) row_dot<M>(x, w + (n0 + r) * K, K, o + r);
        for (int m = 0; m < M; m++) Bf16::finish(_mm512_load_ps(o + m * 16), b, y + m * N, n0, N);
    }
}

}  // namespace

// 0 on success; 1 if the shapes are not this kernel's (the caller takes another path).
// x: M rows of K bf16; w: the packed W (above), ⌈N/16⌉·16·K bf16; b: N bf16 or null; y: M rows
// of N bf16.
extern "C" int lmlab_bf16_linear(const uint16_t* x, const uint16_t* w, const uint16_t* b, uint16_t* y, int64_t M,
                                 int64_t N, int64_t K, int64_t threads) {
    if (K < 2 || K % 2 != 0 || M < 1 || N < 1 || threads < 1) return 1;
    packed::run<Bf16>(x, w, b, y, M, N, K, static_cast<int>(threads));
    return 0;
}

// The same product with W plain (N × K, row-major; any K ≥ 1), for up to 8 rows of x at a
// time (more: 8 at a time, each group reading W once more).
extern "C" int lmlab_bf16_plain(const uint16_t* x, const uint16_t* w, const uint16_t* b, uint16_t* y, int64_t M,
                                int64_t N, int64_t K, int64_t threads) {
    if (K < 1 || M < 1 || N < 1 || threads < 1) return 1;
    const int nt = static_cast<int>(threads);
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
        const uint16_t* xm = x + m0 * K;
        uint16_t* ym = y + m0 * N;
        switch (M - m0 < 8 ? M - m0 : 8) {
            case 1: plain_rows<1>(xm, w, b, ym, N, K, nt); break;
            case 2: plain_rows<2>(xm, w, b, ym, N, K, nt); break;
            case 3: plain_rows<3>(xm, w, b, ym, N, K, nt); break;
            case 4: plain_rows<4>(xm, w, b, ym, N, K, nt); break;
            case 5: plain_rows<5>(xm, w, b, ym, N, K, nt); break;
            case 6: plain_rows<6>(xm, w, b, ym, N, K, nt); break;
            case 7: plain_rows<7>(xm, w, b, ym, N, K, nt); break;
            default: plain_rows<8>(xm, w, b, ym, N, K, nt); break;
        }
    }
    return 0;
}
