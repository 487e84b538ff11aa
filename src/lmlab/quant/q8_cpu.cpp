// lmlab::q8_0_mm(x, qweight, scale): y [M, N] = x [M, K] W^T in float32, with W [N, K] in
// GGUF's Q8_0 blocks: W[n, k] = q[n, k] * d[n, k / 32], q int8, d fp16 (lmlab/quant/q8.py).
//
// Layout (q8.py packs it):
//   qweight [N/16, K, 16] int8: for each block of 16 outputs, input k's 16 weights together;
//   scale [N/16, K/32, 16] fp16: for each block, each 32 inputs' 16 scales together.
//
// Each weight widens to float32 (exact), and one fused multiply-add per input k multiplies
// it with x[k] for 16 outputs at once. The products q x are exact in float32 (8 by 8 bits
// of mantissa); each group's sum of 32 runs in four chains summed (c0 + c1) + (c2 + c3),
// is multiplied by its scale (fp16, exact in float32) and added to the output in one fused
// step. Rows of x are taken four at a time, sharing each widened weight, with the order of
// a row alone: a row gets the same bits in a batch. The output stays float32: the logits
// of a chat model reach 20-30, where bf16 tells only values 0.125 apart.
// Threads: torch's own pool; each takes 16-output blocks a few at a time from a shared
// counter, so a thread slowed by another tenant does fewer of them. The CPU needs AVX-512 F.
#include <immintrin.h>
#include <stdint.h>

#include <atomic>
#include <vector>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

namespace {

#define LMLAB_TARGET __attribute__((target("avx512f")))

// Outputs 16 nb .. 16 nb + 15 (w, s and y point at them) for MT rows of x (float32).
template <int MT>
LMLAB_TARGET void block(const float *x, int64_t K, const int8_t *w, const uint16_t *s, float *y,
                        int64_t N) {
    constexpr int CH = 4;
    __m512 acc[MT];
    for (int r = 0; r < MT; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < K / 32; g++) {
        __m512 d[MT][CH];
        for (int r = 0; r < MT; r++)
            for (int h = 0; h < CH; h++) d[r][h] = _mm512_setzero_ps();
        const int8_t *wg = w + g * 32 * 16;
        const float *xg = x + g * 32;
#pragma GCC unroll 32
        for (int k = 0; k < 32; k++) {
            __m512 v = _mm512_cvtepi32_ps(
                _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(wg + 16 * k))));
#pragma GCC unroll 4
            for (int r = 0; r < MT; r++)
                d[r][k % CH] = _mm512_fmadd_ps(v, _mm512_set1_ps(xg[r * K + k]), d[r][k % CH]);
        }
        __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + g * 16)));
        for (int r = 0; r < MT; r++) {
            __m512 dot = _mm512_add_ps(_mm512_add_ps(d[r][0], d[r][1]),
                                       _mm512_add_ps(d[r][2], d[r][3]));
            acc[r] = _mm512_fmadd_ps(dot, scale, acc[r]);
        }
    }
    for (int r = 0; r < MT; r++) _mm512_storeu_ps(y + r * N, acc[r]);
}

// x [M, K] bf16 -> float32 (exact: the bf16 bits are a float32's upper half); K % 32 == 0
LMLAB_TARGET void widen(const uint16_t *x, int64_t n, float *out) {
    for (int64_t i = 0; i < n; i += 16) {
        __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + i)));
        _mm512_storeu_ps(out + i, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
    }
}

using torch::stable::Tensor;

Tensor q8_0_mm(Tensor x, Tensor qweight, Tensor scale) {
    using torch::headeronly::ScalarType;
    STD_TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == ScalarType::BFloat16,
                    "lmlab::q8_0_mm: x must be a contiguous bf16 [M, K] tensor");
    STD_TORCH_CHECK(qweight.dim() == 3 && qweight.is_contiguous() && qweight.size(2) == 16 &&
                        qweight.scalar_type() == ScalarType::Char,
                    "lmlab::q8_0_mm: qweight must be a contiguous int8 [N/16, K, 16] tensor");
    const int64_t M = x.size(0), K = x.size(1), blocks = qweight.size(0), N = 16 * blocks;
    STD_TORCH_CHECK(qweight.size(1) == K && K % 32 == 0,
                    "lmlab::q8_0_mm: qweight.size(1) must equal K, a multiple of 32");
    STD_TORCH_CHECK(scale.dim() == 3 && scale.is_contiguous() &&
                        scale.scalar_type() == ScalarType::Half && scale.size(0) == blocks &&
                        scale.size(1) == K / 32 && scale.size(2) == 16,
                    "lmlab::q8_0_mm: scale must be a contiguous fp16 [N/16, K/32, 16] tensor");
    Tensor y = torch::stable::new_empty(x, {M, N}, ScalarType::Float);
    if (M == 0 || N == 0) return y;
    const uint16_t *xp = (const uint16_t *)x.const_data_ptr();
    std::vector<float> xf(M * K);
    widen(xp, M * K, xf.data());
    const int8_t *wp = (const int8_t *)qweight.const_data_ptr();
    const uint16_t *sp = (const uint16_t *)scale.const_data_ptr();
    float *yp = (float *)y.mutable_data_ptr();
    const float *xs = xf.data();
    constexpr int64_t STEP = 8;  // blocks taken at a time
    std::atomic<int64_t> next{0};
    const int64_t threads = torch::stable::get_num_threads();
    torch::stable::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
        for (int64_t b0 = next.fetch_add(STEP); b0 < blocks; b0 = next.fetch_add(STEP)) {
            const int64_t b1 = b0 + STEP < blocks ? b0 + STEP : blocks;
            for (int64_t nb = b0; nb < b1; nb++) {
                const int8_t *w = wp + nb * K * 16;
                const uint16_t *s = sp + nb * (K / 32) * 16;
                float *yb = yp + nb * 16;
                int64_t m = 0;
                for (; m + 4 <= M; m += 4) block<4>(xs + m * K, K, w, s, yb + m * N, N);
                for (; m < M; m++) block<1>(xs + m * K, K, w, s, yb + m * N, N);
            }
        }
    });
    return y;
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(lmlab, m) {
    m.def("q8_0_mm(Tensor x, Tensor qweight, Tensor scale) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(lmlab, CPU, m) { m.impl("q8_0_mm", TORCH_BOX(&q8_0_mm)); }
