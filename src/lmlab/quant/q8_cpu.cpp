// lmlab::q8_0_mm(x, qweight, scale): y [M, N] = x [M, K] W^T in float32, with W [N, K] in
// GGUF's Q8_0 blocks: W[n, k] = q[n, k] * d[n, k / 32], q int8, d fp16 (lmlab/quant/q8.py).
//
// Layout (q8.py packs it):
//   qweight [N/16, K/2, 32] int8: for each block of 16 outputs and each pair of inputs
//     (2p, 2p + 1), byte 2 r + e holds output r's weight at input 2p + e;
//   scale [N/16, K/32, 16] fp16: for each block, each 32 inputs' 16 scales together.
//
// An int8 weight is a bf16 number exactly (8 bits of mantissa), so the weights widen to
// bf16 (int8 -> int32 -> float32 -> bf16, two pairs of inputs per conversion) and one
// AVX-512 BF16 dot product (vdpbf16ps) multiplies 16 outputs by two inputs, as lmlab's
// int4 kernel does. The products q x are exact in float32; each group's sum of 32 runs in
// two chains (even and odd pairs) summed, is multiplied by its scale (fp16, exact in
// float32) and added to the output in one fused step. (Four chains, as the int4 kernel
// has, made a 42-row product 1.2-1.5x slower: four more operations per row and group of
// 16 dot products; eight-row tiles were slower than four.) The output stays float32: the
// logits of a chat model reach 20-30, where bf16 tells only values 0.125 apart.
// One row of x (decoding) widens the weights as it reads them; more rows widen a block
// once into a buffer and take it four rows at a time. Either way each row gets the same
// widened weights and the same order of sums, so a row gets the same bits in a batch.
// Threads: torch's own pool; each takes 16-output blocks a few at a time from a shared
// counter, so a thread slowed by another tenant does fewer of them. The CPU needs AVX-512
// F, BW, VL and BF16 (q8.py checks before loading).
#include <immintrin.h>
#include <stdint.h>

#include <atomic>
#include <vector>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

namespace {

#define LMLAB_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// inputs 2p and 2p + 1 of 16 outputs (32 int8 at w) as 32 bf16, pair by pair per lane
LMLAB_TARGET inline __m512bh widen_pair(const int8_t *w) {
    __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)w)));
    __m512 hi =
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + 16))));
    return _mm512_cvtne2ps_pbh(hi, lo);  // lanes 0-7 from lo (outputs 0-7), 8-15 from hi
}

// One block's weights (16 outputs x K inputs) widened to bf16 at wb, in their own order.
LMLAB_TARGET void widen_block(const int8_t *w, int64_t K, uint16_t *wb) {
    for (int64_t p = 0; p < K / 2; p++)
        _mm512_storeu_si512(wb + 32 * p, (__m512i)widen_pair(w + 32 * p));
}

// Outputs 16 nb .. 16 nb + 15 for MT rows of x (bf16): weights read from w (int8, widened
// here) or, with WIDENED, from wb (bf16, widened before).
template <int MT, bool WIDENED>
LMLAB_TARGET void block(const uint16_t *x, int64_t K, const int8_t *w, const uint16_t *wb,
                        const uint16_t *s, float *y, int64_t N) {
    constexpr int CH = 2;
    __m512 acc[MT];
    for (int r = 0; r < MT; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < K / 32; g++) {
        __m512 d[MT][CH];
        for (int r = 0; r < MT; r++)
            for (int h = 0; h < CH; h++) d[r][h] = _mm512_setzero_ps();
#pragma GCC unroll 16
        for (int p = 0; p < 16; p++) {
            const int64_t pair = g * 16 + p;
            __m512bh v = WIDENED ? (__m512bh)_mm512_loadu_si512(wb + 32 * pair)
                                 : widen_pair(w + 32 * pair);
#pragma GCC unroll 4
            for (int r = 0; r < MT; r++) {
                const uint32_t *xr = (const uint32_t *)(x + r * K);
                d[r][p % CH] = _mm512_dpbf16_ps(d[r][p % CH], v,
                                                (__m512bh)_mm512_set1_epi32(xr[pair]));
            }
        }
        __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + g * 16)));
        for (int r = 0; r < MT; r++) {
            acc[r] = _mm512_fmadd_ps(_mm512_add_ps(d[r][0], d[r][1]), scale, acc[r]);
        }
    }
    for (int r = 0; r < MT; r++) _mm512_storeu_ps(y + r * N, acc[r]);
}

using torch::stable::Tensor;

Tensor q8_0_mm(Tensor x, Tensor qweight, Tensor scale) {
    using torch::headeronly::ScalarType;
    STD_TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == ScalarType::BFloat16,
                    "lmlab::q8_0_mm: x must be a contiguous bf16 [M, K] tensor");
    STD_TORCH_CHECK(qweight.dim() == 3 && qweight.is_contiguous() && qweight.size(2) == 32 &&
                        qweight.scalar_type() == ScalarType::Char,
                    "lmlab::q8_0_mm: qweight must be a contiguous int8 [N/16, K/2, 32] tensor");
    const int64_t M = x.size(0), K = x.size(1), blocks = qweight.size(0), N = 16 * blocks;
    STD_TORCH_CHECK(qweight.size(1) * 2 == K && K % 32 == 0,
                    "lmlab::q8_0_mm: qweight.size(1) must be K / 2, K a multiple of 32");
    STD_TORCH_CHECK(scale.dim() == 3 && scale.is_contiguous() &&
                        scale.scalar_type() == ScalarType::Half && scale.size(0) == blocks &&
                        scale.size(1) == K / 32 && scale.size(2) == 16,
                    "lmlab::q8_0_mm: scale must be a contiguous fp16 [N/16, K/32, 16] tensor");
    Tensor y = torch::stable::new_empty(x, {M, N}, ScalarType::Float);
    if (M == 0 || N == 0) return y;
    const uint16_t *xp = (const uint16_t *)x.const_data_ptr();
    const int8_t *wp = (const int8_t *)qweight.const_data_ptr();
    const uint16_t *sp = (const uint16_t *)scale.const_data_ptr();
    float *yp = (float *)y.mutable_data_ptr();
    constexpr int64_t STEP = 8;  // blocks taken at a time
    std::atomic<int64_t> next{0};
    const int64_t threads = torch::stable::get_num_threads();
    torch::stable::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
        std::vector<uint16_t> widened(M > 1 ? 16 * K : 0);  // one block's weights in bf16
        uint16_t *wb = widened.data();
        for (int64_t b0 = next.fetch_add(STEP); b0 < blocks; b0 = next.fetch_add(STEP)) {
            const int64_t b1 = b0 + STEP < blocks ? b0 + STEP : blocks;
            for (int64_t nb = b0; nb < b1; nb++) {
                const int8_t *w = wp + nb * K * 16;
                const uint16_t *s = sp + nb * (K / 32) * 16;
                float *yb = yp + nb * 16;
                if (M == 1) {
                    block<1, false>(xp, K, w, nullptr, s, yb, N);
                    continue;
                }
                widen_block(w, K, wb);
                int64_t m = 0;
                for (; m + 4 <= M; m += 4) block<4, true>(xp + m * K, K, w, wb, s, yb + m * N, N);
                for (; m < M; m++) block<1, true>(xp + m * K, K, w, wb, s, yb + m * N, N);
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
