// Attention for one new query per row (a decoding step), over the keys and values cached so far:
//
//     s_j = scale · q·k_j          (keys the mask allows; j < S)
//     p_j = exp(s_j − max_j s_j)
//     y   = Σ_j p_j v_j / Σ_j p_j   (all in fp32; y rounded to the input's dtype once)
//
// for every batch row b and query head h, the query heads sharing a key/value head (grouped-
// query attention: h reads key/value head h / (n_head / n_kv_head)) done together. q, k, v
// fp32 or bf16 (bf16 widened to fp32 exactly: a shift); k and v read through their strides, so
// the cache's own tensors are read in place, no copy. PyTorch's fused attention for one query
// costs ~100 µs a layer on 2 threads (its blocking and buffers are for many queries); this
// loop ~10–20 µs for the first hundreds of keys.
//
// Built by lmlab.nn.native_attention with g++ -O3 -mavx512f -mavx512bw -mavx512vl -fopenmp.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <vector>

namespace {

// 16 numbers as fp32: fp32 loaded, bf16 widened
template <bool BF16>
inline __m512 load16(const void* p) {
    if (BF16) {
        const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
        return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    }
    return _mm512_loadu_ps(static_cast<const float*>(p));
}

inline uint16_t to_bf16(float f) {  // round to nearest even; NaN stays NaN
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

// one (batch row, key/value head): its R query heads against its S keys and values
template <bool BF16>
void unit(const char* q, const char* k, const char* v, const uint8_t* mask, char* y, int64_t R, int64_t S,
          int64_t hs, int64_t q_head, int64_t k_pos, int64_t v_pos, float scale, std::vector<float>& s) {
    constexpr int64_t E = BF16 ? 2 : 4;  // bytes a number
    const int64_t L = hs / 16;            // 16-lane pieces of a head (hs ≤ 256: L ≤ 16)
    s.resize(static_cast<size_t>(S));
    for (int64_t r = 0; r < R; r++) {
        __m512 qv[16];
        for (int64_t l = 0; l < L; l++) qv[l] = load16<BF16>(q + (r * q_head + 16 * l) * E);
        float top = -INFINITY;
        for (int64_t j = 0; j < S; j++) {
            if (mask && !mask[j]) {
                s[j] = -INFINITY;
                continue;
            }
            const char* kj = k + j * k_pos * E;
            __m512 acc = _mm512_mul_ps(qv[0], load16<BF16>(kj));
            for (int64_t l = 1; l < L; l++) acc = _mm512_fmadd_ps(qv[l], load16<BF16>(kj + 16 * l * E), acc);
            s[j] = scale * _mm512_reduce_add_ps(acc);
            top = s[j] > top ? s[j] : top;
        }
        float total = 0.0f;
        __m512 out[16];
        for (int64_t l = 0; l < L; l++) out[l] = _mm512_setzero_ps();
        for (int64_t j = 0; j < S; j++) {
            if (s[j] == -INFINITY) continue;  // a masked key: p = 0
            const float p = expf(s[j] - top);
            total += p;
            const __m512 pv = _mm512_set1_ps(p);
            const char* vj = v + j * v_pos * E;
            for (int64_t l = 0; l < L; l++) out[l] = _mm512_fmadd_ps(pv, load16<BF16>(vj + 16 * l * E), out[l]);
        }
        // every key masked (not a decoding step's mask, which keeps the query's own): zeros, as
        // PyTorch's attention gives, not 0/0
        const __m512 inv = _mm512_set1_ps(total > 0.0f ? 1.0f / total : 0.0f);
        for (int64_t l = 0; l < L; l++) {
            alignas(64) float o[16];
            _mm512_store_ps(o, _mm512_mul_ps(out[l], inv));
            for (int i = 0; i < 16; i++) {
                if (BF16) reinterpret_cast<uint16_t*>(y)[r * hs + 16 * l + i] = to_bf16(o[i]);
                else reinterpret_cast<float*>(y)[r * hs + 16 * l + i] = o[i];
            }
        }
    }
}

template <bool BF16>
void run(const char* q, const char* k, const char* v, const uint8_t* mask, char* y, int64_t B, int64_t nh,
         int64_t nkv, int64_t S, int64_t hs, const int64_t* st, float scale, int threads) {
    constexpr int64_t E = BF16 ? 2 : 4;
    const int64_t R = nh / nkv;
    // st: q (batch, head), k (batch, head, position), v (batch, head, position), mask (batch): in numbers
#pragma omp parallel num_threads(threads) if (B * nh * S * hs >= (1 << 18))
    {
        std::vector<float> s;
#pragma omp for schedule(static)
        for (int64_t u = 0; u < B * nkv; u++) {
            const int64_t b = u / nkv, g = u % nkv;
            unit<BF16>(q + (b * st[0] + g * R * st[1]) * E, k + (b * st[2] + g * st[3]) * E,
                       v + (b * st[5] + g * st[6]) * E, mask ? mask + b * st[8] : nullptr,
                       y + (b * nh + g * R) * hs * E, R, S, hs, st[1], st[4], st[7], scale, s);
        }
    }
}

}  // namespace

// 0 on success; 1 if the shapes are not this kernel's (the caller takes PyTorch's attention).
// q: (B, nh, 1, hs) with strides st[0] (batch), st[1] (head), its hs numbers contiguous; k, v:
// (B, nkv, S, hs) with strides st[2..4], st[5..7], each position's hs numbers contiguous; mask:
// (B, S) bytes, 1 = may attend, batch stride st[8], or null; y: (B, nh, hs) contiguous, the
// input's dtype. dtype 0: fp32, 1: bf16.
extern "C" int lmlab_attend_one(const void* q, const void* k, const void* v, const uint8_t* mask, void* y,
                                int64_t B, int64_t nh, int64_t nkv, int64_t S, int64_t hs, const int64_t* strides,
                                float scale, int64_t dtype, int64_t threads) {
    if (B < 1 || nkv < 1 || nh % nkv != 0 || S < 1 || hs < 16 || hs > 256 || hs % 16 != 0 || threads < 1) return 1;
    const auto* qc = static_cast<const char*>(q);
    const auto* kc = static_cast<const char*>(k);
    const auto* vc = static_cast<const char*>(v);
    auto* yc = static_cast<char*>(y);
    const int t = static_cast<int>(threads);
    if (dtype == 1) run<true>(qc, kc, vc, mask, yc, B, nh, nkv, S, hs, strides, scale, t);
    else if (dtype == 0) run<false>(qc, kc, vc, mask, yc, B, nh, nkv, S, hs, strides, scale, t);
    else return 1;
    return 0;
}
