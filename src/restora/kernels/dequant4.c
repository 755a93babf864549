/* 4-bit weights dequantized to bf16 from restora's own storage, built and loaded by dequant4.py.

   This is what a 4-bit base costs a training step beyond a bf16 base: every block layer's codes are
   dequantized to bf16 once per micro-batch (compiled blocks keep the result for the backward), and the bf16
   matmuls that follow are the same as the bf16 base's.  torch.compile lowers the torch formula to a scalar pass that writes the unpacked
   codes as int16 and a second pass that scales them; this kernel reads each code byte once and writes each
   bf16 weight once, 32 weights per AVX-512 step.

   Codes: uint8 (rows, in/2), two 4-bit codes per byte; `high_first` says which nibble is the earlier input
   (uniform formats: the low nibble; NF4/FP4, as bitsandbytes: the high one).

   mode UNIFORM (restora's RTN/GPTQ formats): fp16 scale s and uint8 zero z per (row, group):
       w = bf16((q - z) * s)                          (q - z) * s exact in fp32, rounded once
   (q - z has at most 5 significant bits and s 11, so the fp32 product q * s - z * s, fused, is exact), the
   value of UniformWeight.dequantize: the nearest bf16 to the format's weight.
   mode TABLE (NF4/FP4): fp32 absmax a per (row, group) and 16 fp32 levels:
       w = bf16(level[q] * a)                         the product in fp32, rounded once
   as NF4Weight.dequantize computes it.

   Every fp32 -> bf16 rounding is torch's: round to nearest even on the bits, denormals kept (vcvtneps2bf16
   would flush them).  So the output equals the torch formulas bit for bit, NaN payloads aside (torch itself
   writes 0xffff from its vectorized conversion and 0x7fc0 from its scalar one; weights here get 0xffff).
   Needs AVX-512 F/BW.

   Requirements (checked by the caller): in % 32 == 0, group % 32 == 0, in % group == 0, all contiguous. */

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define UNIFORM 0
#define TABLE 1

static inline float half_float(uint16_t h) { return _cvtsh_ss(h); }

/* 16 fp32 -> 16 bf16 (as 16-bit words), as c10::BFloat16 rounds (to nearest even on the bits); NaN as torch's
   vectorized conversion writes it */
static inline __m256i round_bf16(__m512 y) {
    const __m512i u = _mm512_castps_si512(y);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0xffff));
    return _mm512_cvtepi32_epi16(r);
}

/* 16 code bytes -> 32 codes in input order, one per byte */
static inline __m256i unpack32(const uint8_t* src, int high_first) {
    const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)src));  /* byte i in word i */
    const __m256i lo = _mm256_and_si256(w, _mm256_set1_epi16(0x0f));
    const __m256i hi = _mm256_srli_epi16(w, 4);
    /* word i = first code | second code << 8: its two bytes are inputs 2i and 2i+1 */
    return high_first ? _mm256_or_si256(hi, _mm256_slli_epi16(lo, 8)) : _mm256_or_si256(lo, _mm256_slli_epi16(hi, 8));
}

/* Returns 0 (no failure mode; int for the operator's convention). */
int restora_dequant4(const uint8_t* codes, const void* a, const void* b, const float* levels, uint16_t* out,
                     int rows, int in, int group, int mode, int high_first, int nthreads) {
    const int groups = in / group, chunks = group / 32;
    const __m512 lv = _mm512_loadu_ps(levels);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int r = 0; r < rows; r++) {
        const uint8_t* src = codes + (size_t)r * (in / 2);
        uint16_t* dst = out + (size_t)r * in;
        for (int g = 0; g < groups; g++) {
            __m512 scale, offset;
            if (mode == UNIFORM) {
                const float s = half_float(((const uint16_t*)a)[(size_t)r * groups + g]);
                const float z = (float)((const uint8_t*)b)[(size_t)r * groups + g];
                scale = _mm512_set1_ps(s);
                offset = _mm512_set1_ps(-z * s);  /* exact: 4 by 11 significant bits */
            } else {
                scale = _mm512_set1_ps(((const float*)a)[(size_t)r * groups + g]);
                offset = _mm512_setzero_ps();
            }
            for (int c = 0; c < chunks; c++, src += 16, dst += 32) {
                const __m256i q = unpack32(src, high_first);
                for (int h = 0; h < 2; h++) {
                    const __m512i qi = _mm512_cvtepu8_epi32(h ? _mm256_extracti128_si256(q, 1) : _mm256_castsi256_si128(q));
                    const __m512 y = mode == UNIFORM
                                         ? _mm512_fmadd_ps(_mm512_cvtepi32_ps(qi), scale, offset)
                                         : _mm512_mul_ps(_mm512_permutexvar_ps(qi, lv), scale);
                    _mm256_storeu_si256((__m256i*)(dst + 16 * h), round_bf16(y));
                }
            }
        }
    }
    return 0;
}
