/* Decoding attention on AVX-512: out = softmax(scale * q K^T + mask) V for a few query tokens per row.

   A decoding step attends T <= 16 new queries a row to the e cached keys of its row. torch's CPU
   flash-attention kernel splits, allocates and re-packs for every call; at these sizes that costs more
   than the arithmetic (SmolLM2, batch 8, ~120 cached positions: 116 us a layer).  Here each (row, query
   head) is one task: fp32 scores against the row's keys (bf16, read in place from the cache with its
   strides), a max-subtracted exp, and the probability-weighted sum of the values, accumulated in fp32 and
   rounded once to bf16.  Grouped-query heads read their shared key/value head (h / (Hq / Hkv)).

   mask (B, T, e) is 1 where a query may see a key; a query that sees no key gets zeros (never NaN).
   out is (B, T, Hq, D) contiguous: the layout the output projection reads. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

static inline __m512 load_bf16(const uint16_t *p) {  /* 16 bf16 -> 16 fp32 (exact) */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* e^x for x <= 0 (scores minus their max), relative error ~2e-7: 2^n * p(r), x = n ln2 + r, |r| <= ln2/2 */
static inline __m512 exp_neg(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

#define MAX_D 256

/* One query vector (D fp32 in q) against keys [0, e) of one head; writes D bf16 to out. s: e floats of scratch. */
static void attend(const float *q, const uint16_t *k, const uint16_t *v, long k_stride, long v_stride,
                   const uint8_t *mask, int e, int D, float *s, uint16_t *out) {
    const int L = D / 16;
    __m512 qv[MAX_D / 16];
    for (int l = 0; l < L; l++) qv[l] = _mm512_loadu_ps(q + 16 * l);
    float m = -INFINITY;
    for (int j = 0; j < e; j++) {
        if (!mask[j]) { s[j] = -INFINITY; continue; }
        const uint16_t *kj = k + j * k_stride;
        __m512 acc = _mm512_mul_ps(qv[0], load_bf16(kj));
        for (int l = 1; l < L; l++) acc = _mm512_fmadd_ps(qv[l], load_bf16(kj + 16 * l), acc);
        s[j] = _mm512_reduce_add_ps(acc);
        if (s[j] > m) m = s[j];
    }
    __m512 o[MAX_D / 16];
    for (int l = 0; l < L; l++) o[l] = _mm512_setzero_ps();
    if (m == -INFINITY) {  /* sees nothing: zeros */
        for (int l = 0; l < L; l++) _mm256_storeu_si256((__m256i *)(out + 16 * l), (__m256i)_mm512_cvtneps_pbh(o[l]));
        return;
    }
    __m512 mv = _mm512_set1_ps(m), sum = _mm512_setzero_ps();
    int j = 0;
    for (; j + 16 <= e; j += 16) {
        __m512 x = _mm512_loadu_ps(s + j);
        __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
        __m512 p = _mm512_maskz_mov_ps(live, exp_neg(_mm512_sub_ps(_mm512_maskz_mov_ps(live, x), mv)));
        _mm512_storeu_ps(s + j, p);
        sum = _mm512_add_ps(sum, p);
    }
    if (j < e) {
        __mmask16 tail = (__mmask16)((1u << (e - j)) - 1);
        __m512 x = _mm512_maskz_loadu_ps(tail, s + j);
        __mmask16 live = _mm512_mask_cmp_ps_mask(tail, x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
        __m512 p = _mm512_maskz_mov_ps(live, exp_neg(_mm512_sub_ps(_mm512_maskz_mov_ps(live, x), mv)));
        _mm512_mask_storeu_ps(s + j, tail, p);
        sum = _mm512_add_ps(sum, p);
    }
    for (j = 0; j < e; j++) {
        if (s[j] == 0.0f) continue;
        const uint16_t *vj = v + j * v_stride;
        __m512 p = _mm512_set1_ps(s[j]);
        for (int l = 0; l < L; l++) o[l] = _mm512_fmadd_ps(p, load_bf16(vj + 16 * l), o[l]);
    }
    __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (int l = 0; l < L; l++)
        _mm256_storeu_si256((__m256i *)(out + 16 * l), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(o[l], inv)));
}

/* q (B, Hq, T, D) bf16 with strides (q_b, q_h, q_t); keys/values (B, Hkv, >=e, D) bf16 with strides
   (k_b, k_h, k_l) and (v_b, v_h, v_l); mask (B, T, e) uint8 with strides (m_b, m_t); out (B, T, Hq, D).
   D must be a multiple of 16 up to MAX_D.  Returns 0, -1 for an unsupported D, -2 without memory. */
int attention_decode(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint8_t *mask, uint16_t *out,
                     int B, int Hq, int Hkv, int T, int e, int D, long q_b, long q_h, long q_t, long k_b, long k_h,
                     long k_l, long v_b, long v_h, long v_l, long m_b, long m_t, float scale, int threads) {
    if (D % 16 || D > MAX_D || D <= 0) return -1;
    const int tasks = B * Hq, rep = Hq / Hkv;
    int failed = 0;
#pragma omp parallel num_threads(threads < tasks ? threads : tasks)
    {
        float *s = malloc(sizeof(float) * (size_t)(e > 0 ? e : 1));
        float qf[MAX_D];
        if (!s) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int task = 0; task < tasks; task++) {
            if (!s) continue;
            const int b = task / Hq, h = task % Hq, g = h / rep;
            for (int t = 0; t < T; t++) {
                const uint16_t *qp = q + b * q_b + h * q_h + t * q_t;
                for (int l = 0; l < D / 16; l++)
                    _mm512_storeu_ps(qf + 16 * l, _mm512_mul_ps(load_bf16(qp + 16 * l), _mm512_set1_ps(scale)));
                attend(qf, k + b * k_b + g * k_h, v + b * v_b + g * v_h, k_l, v_l, mask + b * m_b + t * m_t, e, D, s,
                       out + (((long)b * T + t) * Hq + h) * D);
            }
        }
        free(s);
    }
    return failed ? -2 : 0;
}
