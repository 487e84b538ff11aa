// lmlab::int4_mm(x, packed, scale_zero, group_size): y [M, N] = x [M, K] W^T in bf16, with
// W [N, K] in 4 bits, W[n, k] = (q[n, k] - 8) * s[n, k / G] + z[n, k / G] (lmlab/quant/int4.py).
//
// Layout (Int4Matmul packs it):
//   packed [N/16, K/32, 256] uint8: for each block of 16 outputs and each 32 inputs k0..k0+31,
//     8 chunks of 32 bytes; in chunk c, byte b = 2 r + e holds output r's weights at
//     k0 + 4c + e (low nibble) and k0 + 4c + 2 + e (high nibble);
//   scale_zero [K/G, 2, N] bf16: each group's scales s, then its zeros z, by output.
//
// A nibble q widens to the 16-bit pattern 0x43qq, which is the bf16 number 128 + q exactly,
// so one AVX-512 BF16 dot product (vdpbf16ps: 16 lanes, each a sum of two bf16 products,
// accumulated in float32) multiplies 16 outputs by two inputs. A lane pairs outputs with
// inputs (r, e) so the x side is one broadcast 32-bit pair. Per group:
//     sum_k ((q - 8) s + z) x = s * sum_k (128 + q) x + (z - 136 s) * sum_k x.
// The products are exact in float32; the sums round as float32 (a different order from
// torch's kernel, so an output may differ from it in its last bf16 bit), the result once
// to bf16 (nearest even). Rows of x are taken four at a time, sharing each widened chunk,
// with the same summation order as a row alone.
// Threads: torch's own pool (at::parallel_for through the stable ABI), over blocks of 16
// outputs. The CPU needs AVX-512 F, BW, VL and BF16 (int4.py checks before loading).
#include <immintrin.h>
#include <stdint.h>
#include <vector>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

namespace {

#define LMLAB_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// Outputs 16 nb .. 16 nb + 15 (w, sz and y point at them) for MT rows of x.
template <int MT>
LMLAB_TARGET void block(const uint16_t *x, int64_t K, const uint8_t *w, const uint16_t *sz,
                        const float *xsum, int64_t groups, int64_t sub, uint16_t *y, int64_t N) {
    // four independent chains of dot products per row (chunk parity x low/high nibbles),
    // summed (d0 + d1) + (d2 + d3) per group, whatever MT: a row gets the same bits alone
    // as in a batch
    constexpr int CH = 4;
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m512i high = _mm512_set1_epi16(0x4300);  // bf16 0x43qq = 128 + q
    __m512 acc[MT];
    for (int r = 0; r < MT; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512 d[MT][CH];
        for (int r = 0; r < MT; r++)
            for (int h = 0; h < CH; h++) d[r][h] = _mm512_setzero_ps();
        for (int64_t s = 0; s < sub; s++) {
            const uint8_t *wc = w + (g * sub + s) * 256;
            const int64_t k0 = (g * sub + s) * 32;
#pragma GCC unroll 8
            for (int c = 0; c < 8; c++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(wc + 32 * c));
                __m512i a = _mm512_or_si512(_mm512_cvtepu8_epi16(_mm256_and_si256(v, low)), high);
                __m512i b = _mm512_or_si512(
                    _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), low)), high);
                const int h = 2 * (c & 1);
#pragma GCC unroll 4
                for (int r = 0; r < MT; r++) {
                    const uint32_t *xr = (const uint32_t *)(x + r * K + k0);
                    d[r][h] = _mm512_dpbf16_ps(d[r][h], (__m512bh)a,
                                               (__m512bh)_mm512_set1_epi32(xr[2 * c]));
                    d[r][h + 1] = _mm512_dpbf16_ps(d[r][h + 1], (__m512bh)b,
                                                   (__m512bh)_mm512_set1_epi32(xr[2 * c + 1]));
                }
            }
        }
        const uint16_t *sg = sz + g * 2 * N;
        __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)sg)), 16));
        __m512 zero = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(sg + N))), 16));
        // sum_k (q - 8) s x + z x = s * sum_k (128 + q) x + (z - 136 s) * sum_k x
        __m512 shift = _mm512_sub_ps(zero, _mm512_mul_ps(_mm512_set1_ps(136.0f), scale));
        for (int r = 0; r < MT; r++) {
            __m512 dot = _mm512_add_ps(d[r][0], d[r][1]);
            dot = _mm512_add_ps(dot, _mm512_add_ps(d[r][2], d[r][3]));
            acc[r] = _mm512_fmadd_ps(dot, scale, acc[r]);
            acc[r] = _mm512_fmadd_ps(shift, _mm512_set1_ps(xsum[r * groups + g]), acc[r]);
        }
    }
    for (int r = 0; r < MT; r++)
        _mm256_storeu_si256((__m256i *)(y + r * N), (__m256i)_mm512_cvtneps_pbh(acc[r]));
}

float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
}

using torch::stable::Tensor;

Tensor int4_mm(Tensor x, Tensor packed, Tensor scale_zero, int64_t group_size) {
    using torch::headeronly::ScalarType;
    STD_TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == ScalarType::BFloat16,
                    "lmlab::int4_mm: x must be a contiguous bf16 [M, K] tensor");
    STD_TORCH_CHECK(packed.dim() == 3 && packed.is_contiguous() && packed.size(2) == 256 &&
                        packed.scalar_type() == ScalarType::Byte,
                    "lmlab::int4_mm: packed must be a contiguous uint8 [N/16, K/32, 256] tensor");
    const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0), N = 16 * blocks;
    STD_TORCH_CHECK(group_size % 32 == 0 && group_size > 0 && K % group_size == 0 &&
                        packed.size(1) * 32 == K,
                    "lmlab::int4_mm: K must be packed.size(1) * 32 and a multiple of group_size, "
                    "itself a multiple of 32");
    const int64_t groups = K / group_size, sub = group_size / 32;
    STD_TORCH_CHECK(scale_zero.dim() == 3 && scale_zero.is_contiguous() &&
                        scale_zero.scalar_type() == ScalarType::BFloat16 &&
                        scale_zero.size(0) == groups && scale_zero.size(1) == 2 &&
                        scale_zero.size(2) == N,
                    "lmlab::int4_mm: scale_zero must be a contiguous bf16 [K/G, 2, N] tensor");
    Tensor y = torch::stable::new_empty(x, {M, N});
    if (M == 0 || N == 0) return y;
    const uint16_t *xp = (const uint16_t *)x.const_data_ptr();
    // each row's sum over each group, in order, in float32
    std::vector<float> xsum(M * groups);
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < groups; g++) {
            float t = 0.0f;
            for (int64_t k = g * group_size; k < (g + 1) * group_size; k++)
                t += bf16_to_float(xp[m * K + k]);
            xsum[m * groups + g] = t;
        }
    const uint8_t *wp = (const uint8_t *)packed.const_data_ptr();
    const uint16_t *szp = (const uint16_t *)scale_zero.const_data_ptr();
    uint16_t *yp = (uint16_t *)y.mutable_data_ptr();
    const float *xs = xsum.data();
    torch::stable::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) {
        for (int64_t nb = b0; nb < b1; nb++) {
            const uint8_t *w = wp + nb * (K / 32) * 256;
            const uint16_t *sz = szp + nb * 16;
            uint16_t *yb = yp + nb * 16;
            int64_t m = 0;
            for (; m + 4 <= M; m += 4)
                block<4>(xp + m * K, K, w, sz, xs + m * groups, groups, sub, yb + m * N, N);
            for (; m < M; m++)
                block<1>(xp + m * K, K, w, sz, xs + m * groups, groups, sub, yb + m * N, N);
        }
    });
    return y;
}

}  // namespace

// a fragment: other lmlab operator files may add to the namespace
STABLE_TORCH_LIBRARY_FRAGMENT(lmlab, m) {
    m.def("int4_mm(Tensor x, Tensor packed, Tensor scale_zero, int group_size) -> Tensor");
}

STABLE_TORCH_LIBRARY_IMPL(lmlab, CPU, m) { m.impl("int4_mm", TORCH_BOX(&int4_mm)); }
