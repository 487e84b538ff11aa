// lmlab::decode_attention(q, k, v, scale): one new token's attention over a KV cache, in
// bf16 on a CPU with AVX-512 BF16 (lmlab/models/attention.py checks, and falls back to
// PyTorch's scaled_dot_product_attention elsewhere).
//
//   q [B, Hkv, G, D] bf16, contiguous: the G query heads that share key/value head h;
//   k, v [B, Hkv, S, D] bf16, each row of D contiguous (a view of a longer cache is fine);
//   out [B, Hkv, G, D] bf16 = softmax(scale * q k^T) v, every key visible (no mask).
//
// For each (b, h) and query g, in float32:
//   s_t = scale * (q . k_t): the products of bf16 pairs are exact in float32 (vdpbf16ps),
//     summed 16 lanes wide over D, the lanes then added in a fixed tree;
//   p_t = exp(s_t - max s): a degree-6 polynomial on [-ln2/2, ln2/2] times 2^n (Cephes'
//     expf coefficients), within 2 ulp of exp; arguments below -87 give 2^-126 or less;
//   o = (sum_t p_t v_t) / (sum_t p_t), rounded once to bf16 (round to nearest even).
// The order of every sum is fixed by S, D and G alone: a row gets the same bits in a batch,
// on any number of threads, and in a compiled step as in eager mode. Its numbers are not
// PyTorch's flash kernel's bit for bit (that one sums in another order), so lmlab uses this
// one for a decoding step in both the fast and the plain path.
//
// Why: PyTorch's kernel costs 21-24 us a call for SmolLM2's 9 and 3 heads at a short
// cache (allocations, a thread fork and two small GEMMs), 30 calls a token; this one
// reads the cache once and runs on the calling thread until the work is large (bench/
// attention.py).
#include <immintrin.h>
#include <stdint.h>

#include <cmath>
#include <vector>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

namespace {

#define LMLAB_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// exp(x) for x <= 0 (a score minus the row's max), 16 lanes
LMLAB_TARGET inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln 2, high part
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);    // and low part
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

// The sums of the 16 lanes of a, b, c and d, in that order, each by the same tree.
LMLAB_TARGET inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    const __m512 x = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab),
                                                                      _mm512_castps_pd(cd))),
                                   _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab),
                                                                      _mm512_castps_pd(cd))));
    const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1));
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(x), high);
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// One (b, h): G queries of D = 16 V against S keys and values. scores: room for
// ceil(G / GC) GC rows of S floats (GC queries share each read of a value row).
template <int V>
LMLAB_TARGET void head(const uint16_t *q, const uint16_t *k, int64_t k_row, const uint16_t *v,
                       int64_t v_row, int64_t S, int64_t G, float scale, float *scores,
                       uint16_t *out) {
    constexpr int D = 16 * V, GC = V >= 16 ? 1 : 16 / V;
    const int64_t rows = (G + GC - 1) / GC * GC;
    float total[64];  // each query's sum of weights (G <= 64: the caller checks)
    for (int64_t g = 0; g < G; g++) {
        __m512bh qv[V / 2];
        for (int c = 0; c < V / 2; c++) qv[c] = (__m512bh)_mm512_loadu_si512(q + g * D + 32 * c);
        float *s = scores + g * S;
        for (int64_t t = 0; t < S; t += 4) {
            __m512 acc[4];
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
                // past the end: the last key again, its score not kept
                const uint16_t *kt = k + (t + j < S ? t + j : S - 1) * k_row;
                acc[j] = _mm512_setzero_ps();
#pragma GCC unroll 8
                for (int c = 0; c < V / 2; c++)
                    acc[j] = _mm512_dpbf16_ps(acc[j], qv[c],
                                              (__m512bh)_mm512_loadu_si512(kt + 32 * c));
            }
            const __m128 four =
                _mm_mul_ps(sum4(acc[0], acc[1], acc[2], acc[3]), _mm_set1_ps(scale));
            if (t + 4 <= S) {
                _mm_storeu_ps(s + t, four);
            } else {
                alignas(16) float kept[4];
                _mm_store_ps(kept, four);
                for (int64_t j = 0; t + j < S; j++) s[t + j] = kept[j];
            }
        }
        int64_t t = 0;
        __m512 best = _mm512_set1_ps(-INFINITY);
        for (; t + 16 <= S; t += 16) best = _mm512_max_ps(best, _mm512_loadu_ps(s + t));
        const __mmask16 tail = (__mmask16)((1u << (S - t)) - 1);
        best = _mm512_mask_max_ps(best, tail, best, _mm512_maskz_loadu_ps(tail, s + t));
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(best));
        __m512 sum = _mm512_setzero_ps();
        for (t = 0; t + 16 <= S; t += 16) {
            const __m512 p = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + t), m));
            _mm512_storeu_ps(s + t, p);
            sum = _mm512_add_ps(sum, p);
        }
        if (t < S) {
            const __m512 p = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + t), m));
            _mm512_mask_storeu_ps(s + t, tail, p);
            sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(tail, p));
        }
        total[g] = _mm512_reduce_add_ps(sum);
    }
    for (int64_t g = G; g < rows; g++)  // queries that pad the last group weigh nothing
        for (int64_t t = 0; t < S; t++) scores[g * S + t] = 0.0f;
    for (int64_t g0 = 0; g0 < G; g0 += GC) {
        __m512 o[GC][V];  // GC x V <= 16 registers
#pragma GCC unroll 8
        for (int r = 0; r < GC; r++)
#pragma GCC unroll 16
            for (int c = 0; c < V; c++) o[r][c] = _mm512_setzero_ps();
        for (int64_t t = 0; t < S; t++) {
            const uint16_t *vt = v + t * v_row;
#pragma GCC unroll 16
            for (int c = 0; c < V; c++) {
                // bf16 -> float32: the 16 bits shifted into the high half
                const __m512i w =
                    _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(vt + 16 * c)));
                const __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
#pragma GCC unroll 8
                for (int r = 0; r < GC; r++)
                    o[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[(g0 + r) * S + t]), x, o[r][c]);
            }
        }
        for (int r = 0; r < GC && g0 + r < G; r++) {
            const __m512 inv = _mm512_set1_ps(1.0f / total[g0 + r]);
            for (int c = 0; c < V; c++)
                _mm256_storeu_si256((__m256i *)(out + (g0 + r) * D + 16 * c),
                                    (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(o[r][c], inv)));
        }
    }
}

using torch::stable::Tensor;

Tensor decode_attention(Tensor q, Tensor k, Tensor v, double scale) {
    using torch::headeronly::ScalarType;
    STD_TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && q.scalar_type() == ScalarType::BFloat16,
                    "lmlab::decode_attention: q must be a contiguous bf16 [B, Hkv, G, D] tensor");
    const int64_t B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3);
    for (const Tensor *t : {&k, &v}) {
        STD_TORCH_CHECK(t->dim() == 4 && t->scalar_type() == ScalarType::BFloat16 &&
                            t->size(0) == B && t->size(1) == H && t->size(3) == D &&
                            t->stride(3) == 1 && t->size(2) == k.size(2) && k.size(2) > 0,
                        "lmlab::decode_attention: k and v must be bf16 [B, Hkv, S, D] tensors "
                        "(S > 0) with contiguous rows");
    }
    STD_TORCH_CHECK(D == 32 || D == 64 || D == 128 || D == 256,
                    "lmlab::decode_attention: the head size D must be 32, 64, 128 or 256");
    STD_TORCH_CHECK(G <= 64, "lmlab::decode_attention: at most 64 query heads per key head");
    const int64_t S = k.size(2);
    Tensor out = torch::stable::new_empty(q, {B, H, G, D}, ScalarType::BFloat16);
    if (B == 0 || H == 0 || G == 0) return out;
    const uint16_t *qp = (const uint16_t *)q.const_data_ptr();
    const uint16_t *kp = (const uint16_t *)k.const_data_ptr();
    const uint16_t *vp = (const uint16_t *)v.const_data_ptr();
    uint16_t *op = (uint16_t *)out.mutable_data_ptr();
    const float sc = (float)scale;
    auto run = [&](int64_t begin, int64_t end) {
        thread_local std::vector<float> scores;  // G rounded up to 8 (head's groups) x S
        if ((int64_t)scores.size() < (G + 7) / 8 * 8 * S) scores.resize((G + 7) / 8 * 8 * S);
        for (int64_t i = begin; i < end; i++) {
            const int64_t b = i / H, h = i % H;
            const uint16_t *qi = qp + i * G * D;
            const uint16_t *ki = kp + b * k.stride(0) + h * k.stride(1);
            const uint16_t *vi = vp + b * v.stride(0) + h * v.stride(1);
            uint16_t *oi = op + i * G * D;
            const int64_t kr = k.stride(2), vr = v.stride(2);
            float *sb = scores.data();
            switch (D) {
                case 32: head<2>(qi, ki, kr, vi, vr, S, G, sc, sb, oi); break;
                case 64: head<4>(qi, ki, kr, vi, vr, S, G, sc, sb, oi); break;
                case 128: head<8>(qi, ki, kr, vi, vr, S, G, sc, sb, oi); break;
                default: head<16>(qi, ki, kr, vi, vr, S, G, sc, sb, oi);
            }
        }
    };
    // A short cache is a few microseconds of work: forking threads would cost more.
    if (B * H * G * S * D < (int64_t(1) << 20))
        run(0, B * H);
    else
        torch::stable::parallel_for(0, B * H, 1, run);
    return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(lmlab, m) {
    m.def("decode_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(lmlab, CPU, m) {
    m.impl("decode_attention", TORCH_BOX(&decode_attention));
}
