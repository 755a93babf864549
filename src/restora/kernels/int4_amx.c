/* y = x @ W^T for 4-bit weights on Intel AMX (bf16 tiles), built and loaded by int4_kernel.py.

   W (N, K) is stored as codes q in [0, 15], a table of 16 levels, and a scale s and zero z per output row and
   group of G inputs: w = (level[q] - z) * s.  Uniform formats have level[q] = q; NF4/FP4 have their code
   tables and z = 0 (s is the block's absmax).  Per group the tile unit computes c = sum_k level[q] x[m][k]
   (products exact in fp32, sums in fp32; the levels as bf16, which is exact for integers), then
   y[m][n] += s * (c - z * sum_k x[m][k]) in fp32.  The dequantized weight never exists: codes go from
   memory to a 1 KB tile buffer in L1 as bf16 levels.
   That is for up to EXACT_ROWS rows (decoding steps, speculative verification).  Longer inputs (prompts,
   training) spend most of their time in that per-group work, so for them each output tile's weights are
   dequantized once per call to bf16, w = bf16((level[q] - z) * s) from fp32 levels, and the tile unit
   accumulates over all of K.

   Packed codes (one layer): for output tile t (outputs 16t..16t+15) and input quad p (inputs 4p..4p+3), 32
   bytes; byte 2j+e holds q[16t+j][4p+e] in its low nibble and q[16t+j][4p+2+e] in its high nibble.  Widened
   to 32 words, the low nibbles are one row of an AMX B tile (16 outputs x the input pair 4p, 4p+1, in the
   VNNI pair layout) and the high nibbles the next row (inputs 4p+2, 4p+3).
   Scales and zeros: (N/16, K/G, 2, 16) fp32, the tile's 16 scales then its 16 zeros for each group.

   Requirements (checked by the caller): N % 16 == 0, G % 32 == 0, K % G == 0, x and y bf16, contiguous. */

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define ROWS 16    /* rows of x per A tile */
#define UNIT 4     /* output tiles computed together (C tiles tmm0-3) */
#define EXACT_ROWS 64  /* up to this many rows: exact per-group scaling; more: weights rounded to bf16 once */
/* the tile intrinsics are asm without memory clobbers: order the C-side stores and loads around them */
#define BARRIER() __asm__ volatile("" ::: "memory")

static int amx = 0;  /* the tile unit may be used (int4_amx_init) */

/* Linux only lets a process use AMX tile data after asking for it once.  want: the CPU has AMX-BF16.
   Returns 1 when the tile path is on, 0 when only the vector path is. */
int int4_amx_init(int want) {
    amx = want && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return amx;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* tmm0-3: C of up to UNIT output tiles (R x 16 fp32); tmm4: A (R x 32 bf16); tmm5-7: B (16 pairs x 16 outputs) */
static void configure(int R) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 5; i++) { c.rows[i] = (uint8_t)R; c.colsb[i] = 64; }
    for (int i = 5; i < 8; i++) { c.rows[i] = 16; c.colsb[i] = 64; }
    _tile_loadconfig(&c);
}

/* 8 quads (32 inputs) of one output tile -> 16 B-tile rows of bf16 codes */
static inline void widen(const uint8_t *codes, uint16_t *b, __m512i table) {
    const __m512i low = _mm512_set1_epi16(0x0F);
    for (int i = 0; i < 8; i++) {
        __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(codes + i * 32)));
        _mm512_store_si512(b + (2 * i) * 32, _mm512_permutexvar_epi16(_mm512_and_si512(w, low), table));
        _mm512_store_si512(b + (2 * i + 1) * 32, _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table));
    }
}

/* out (R x 16) += s * (c - z * xsum) for one output tile and group g */
static inline void scale_into(float *out, const float *c, const float *sz, const float *xsum, int groups, int g,
                              int R) {
    __m512 s = _mm512_loadu_ps(sz);
    __m512 z = _mm512_loadu_ps(sz + 16);
    for (int r = 0; r < R; r++) {
        __m512 a = _mm512_fnmadd_ps(z, _mm512_set1_ps(xsum[r * groups + g]), _mm512_load_ps(c + r * 16));
        _mm512_store_ps(out + r * 16, _mm512_fmadd_ps(s, a, _mm512_load_ps(out + r * 16)));
    }
}

/* Long inputs (more than EXACT_ROWS rows: prompts, training): one output tile's weights for all K, dequantized
   once to bf16 (w = (q - z) * s in fp32, rounded to bf16, as a bf16 dequantize + GEMM would use them) in the
   B-tile layout, so every row block multiplies them with no per-group work. */
static void widen_scaled(const uint8_t *codes, const float *sz, uint16_t *dst, int K, int G, __m512 levels) {
    const int groups = K / G, quads = G / 4;
    const __m512i low = _mm512_set1_epi16(0x0F);
    const __m512i first = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);  /* lane -> output j */
    const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
    for (int g = 0; g < groups; g++) {
        __m512 s = _mm512_loadu_ps(sz + g * 32);
        __m512 o = _mm512_mul_ps(_mm512_loadu_ps(sz + g * 32 + 16), s);
        o = _mm512_sub_ps(_mm512_setzero_ps(), o);  /* -z * s */
        const __m512 s0 = _mm512_permutexvar_ps(first, s), s1 = _mm512_permutexvar_ps(second, s);
        const __m512 o0 = _mm512_permutexvar_ps(first, o), o1 = _mm512_permutexvar_ps(second, o);
        for (int p = g * quads; p < (g + 1) * quads; p++) {
            __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(codes + (size_t)p * 32)));
            __m512i half[2] = {_mm512_and_si512(w, low), _mm512_srli_epi16(w, 4)};
            for (int h = 0; h < 2; h++) {  /* words 0-15: outputs 0-7, words 16-31: outputs 8-15 */
                __m512 a = _mm512_permutexvar_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(half[h])), levels);
                __m512 b = _mm512_permutexvar_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(half[h], 1)), levels);
                __m512bh v = _mm512_cvtne2ps_pbh(_mm512_fmadd_ps(b, s1, o1), _mm512_fmadd_ps(a, s0, o0));
                const int chunk = p / 8, row = 2 * (p % 8) + h;
                _mm512_store_si512(dst + (size_t)chunk * 512 + row * 32, (__m512i)v);
            }
        }
    }
}

#define WIDE_STEP(i, tb) do { _tile_loadd(tb, wide + ((size_t)(i) * chunks + chunk) * 512, 64); \
                              _tile_dpbf16ps(i, 4, tb); } while (0)
#define WIDE_OUT(i) do { _tile_stored(i, cbuf, 64); BARRIER(); \
                         for (int r = 0; r < R; r++) \
                             _mm256_storeu_si256((__m256i *)(y + (size_t)r * N + (size_t)(t + (i)) * 16), \
                                                 (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(cbuf + r * 16))); } while (0)

static void unit_scaled(const uint16_t *x, const uint16_t *wide, uint16_t *y, int R, int K, int N, int t, int NT) {
    const int chunks = K / 32;
    float cbuf[ROWS * 16] __attribute__((aligned(64)));
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int chunk = 0; chunk < chunks; chunk++) {
        _tile_loadd(4, x + (size_t)chunk * 32, K * 2);
        WIDE_STEP(0, 5);
        if (NT > 1) WIDE_STEP(1, 6);
        if (NT > 2) WIDE_STEP(2, 7);
        if (NT > 3) WIDE_STEP(3, 5);
    }
    WIDE_OUT(0);
    if (NT > 1) WIDE_OUT(1);
    if (NT > 2) WIDE_OUT(2);
    if (NT > 3) WIDE_OUT(3);
}

/* B rows for output tile i of the unit at 32-input chunk `chunk`: widened now (decode) or from `wide` (prompts) */
#define B_ROWS(i) (wide ? wide + ((size_t)(i) * chunks + chunk) * 512 \
                        : (widen(codes[i] + (size_t)chunk * 8 * 32, buf[(i) % 3], table), buf[(i) % 3]))
#define STEP(i, tb) do { const uint16_t *b_ = B_ROWS(i); BARRIER(); _tile_loadd(tb, b_, 64); \
                         _tile_dpbf16ps(i, 4, tb); } while (0)
#define FLUSH(i) do { _tile_stored(i, cbuf, 64); BARRIER(); \
                      scale_into(out + (i) * ROWS * 16, cbuf, sz[i] + g * 32, xsum, groups, g, R); _tile_zero(i); } while (0)

/* NT (1..UNIT) output tiles for R (<= ROWS) rows of x */
static void unit(const uint16_t *x, const uint8_t *const *codes, const float *const *sz, const uint16_t *wide,
                 const float *xsum, uint16_t *y, int R, int K, int G, int N, int t, int NT, __m512i table) {
    const int groups = K / G, per_group = G / 32, chunks = K / 32;
    uint16_t buf[3][16 * 32] __attribute__((aligned(64)));
    float cbuf[ROWS * 16] __attribute__((aligned(64)));
    float out[UNIT * ROWS * 16] __attribute__((aligned(64)));
    memset(out, 0, sizeof out);
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int g = 0; g < groups; g++) {
        for (int chunk = g * per_group; chunk < (g + 1) * per_group; chunk++) {
            _tile_loadd(4, x + (size_t)chunk * 32, K * 2);
            STEP(0, 5);
            if (NT > 1) STEP(1, 6);
            if (NT > 2) STEP(2, 7);
            if (NT > 3) STEP(3, 5);
        }
        FLUSH(0);
        if (NT > 1) FLUSH(1);
        if (NT > 2) FLUSH(2);
        if (NT > 3) FLUSH(3);
    }
    for (int i = 0; i < NT; i++)
        for (int r = 0; r < R; r++) {
            __m256bh o = _mm512_cvtneps_pbh(_mm512_load_ps(out + i * ROWS * 16 + r * 16));
            _mm256_storeu_si256((__m256i *)(y + (size_t)r * N + (size_t)(t + i) * 16), (__m256i)o);
        }
}

/* The vector path: AVX-512 BF16 dot products instead of tiles, for up to AMX_VEC_ROWS rows on AMX machines (a
   mostly empty tile: decoding at batch 1, short drafts) and for every call on CPUs without AMX (at most EXACT_ROWS
   rows there). The widened low nibbles of a quad are 16 outputs x the input pair (4p, 4p+1) in 32-bit lanes, so one
   vdpbf16ps with that pair of x broadcast adds both products into each output's fp32 lane; the high nibbles do
   (4p+2, 4p+3). No tile buffer and no horizontal sums: the codes go from memory straight into registers. Per group
   the partial sums get the same exact scaling as the tile path: y += s * (c - z * sum_k x[k]). One output tile, R
   rows (a constant after inlining, so the chains stay in registers); R = 1-2: four chains a row, else two. The
   codes are prefetched PREFETCH bytes ahead (SmolLM2's 210 layers, 8 rows, no AMX: 5.6 -> 4.8 ms; none at 1 row). */
#define VEC_ROWS 8      /* rows per pass over a tile's codes */
#define AMX_VEC_ROWS 4  /* with AMX, calls of up to this many rows take the vector path (not measured there) */
#define PREFETCH 2048   /* bytes of codes ahead */
static inline __attribute__((always_inline)) void vec_tile(const uint16_t *x, const uint8_t *codes, const float *sz,
                                                           const float *xsum, uint16_t *y, const int R, int N, int K,
                                                           int G, int t, __m512i table) {
    const int groups = K / G, quads = G / 4;
    const __m512i low = _mm512_set1_epi16(0x0F);
    const int chains = R <= 2 ? 4 : 2;  /* per row: even/odd quad x low/high pair, or low/high only (R rows: ILP) */
    __m512 acc[VEC_ROWS];
    for (int m = 0; m < R; m++) acc[m] = _mm512_setzero_ps();
    for (int g = 0; g < groups; g++) {
        __m512 c[VEC_ROWS][4];
        for (int m = 0; m < R; m++) c[m][0] = c[m][1] = c[m][2] = c[m][3] = _mm512_setzero_ps();
        for (int p = g * quads; p < (g + 1) * quads; p += 2) {  /* quads is a multiple of 8 */
            _mm_prefetch((const char *)(codes + (size_t)p * 32 + PREFETCH), _MM_HINT_T0);
            for (int u = 0; u < 2; u++) {
                __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(codes + (size_t)(p + u) * 32)));
                __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(w, low), table);
                __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table);
                const int k = chains == 4 ? 2 * u : 0;
                for (int m = 0; m < R; m++) {
                    const uint32_t *xp = (const uint32_t *)(x + (size_t)m * K + (size_t)(p + u) * 4);
                    c[m][k] = _mm512_dpbf16_ps(c[m][k], lo, (__m512bh)_mm512_set1_epi32((int)xp[0]));
                    c[m][k + 1] = _mm512_dpbf16_ps(c[m][k + 1], hi, (__m512bh)_mm512_set1_epi32((int)xp[1]));
                }
            }
        }
        const __m512 s = _mm512_loadu_ps(sz + g * 32), z = _mm512_loadu_ps(sz + g * 32 + 16);
        for (int m = 0; m < R; m++) {
            __m512 a = _mm512_add_ps(_mm512_add_ps(c[m][0], c[m][1]), _mm512_add_ps(c[m][2], c[m][3]));
            a = _mm512_fnmadd_ps(z, _mm512_set1_ps(xsum[m * groups + g]), a);
            acc[m] = _mm512_fmadd_ps(s, a, acc[m]);
        }
    }
    for (int m = 0; m < R; m++)
        _mm256_storeu_si256((__m256i *)(y + (size_t)m * N + (size_t)t * 16), (__m256i)_mm512_cvtneps_pbh(acc[m]));
}

/* output tiles [t0, t1) for all M rows, VEC_ROWS rows at a time (a tile's codes stay in L1 between row blocks) */
static void vec_tiles(const uint16_t *x, const uint8_t *packed, const float *scales_zeros, const float *xsum,
                      uint16_t *y, int M, int N, int K, int G, int t0, int t1, __m512i table) {
    const int groups = K / G;
    for (int t = t0; t < t1; t++) {
        const uint8_t *codes = packed + (size_t)t * (K / 4) * 32;
        const float *sz = scales_zeros + (size_t)t * groups * 32;
        for (int m0 = 0; m0 < M; m0 += VEC_ROWS) {
            const uint16_t *xm = x + (size_t)m0 * K;
            const float *sm = xsum + (size_t)m0 * groups;
            uint16_t *ym = y + (size_t)m0 * N;
            switch (M - m0 < VEC_ROWS ? M - m0 : VEC_ROWS) {
            case 1: vec_tile(xm, codes, sz, sm, ym, 1, N, K, G, t, table); break;
            case 2: vec_tile(xm, codes, sz, sm, ym, 2, N, K, G, t, table); break;
            case 3: vec_tile(xm, codes, sz, sm, ym, 3, N, K, G, t, table); break;
            case 4: vec_tile(xm, codes, sz, sm, ym, 4, N, K, G, t, table); break;
            case 5: vec_tile(xm, codes, sz, sm, ym, 5, N, K, G, t, table); break;
            case 6: vec_tile(xm, codes, sz, sm, ym, 6, N, K, G, t, table); break;
            case 7: vec_tile(xm, codes, sz, sm, ym, 7, N, K, G, t, table); break;
            default: vec_tile(xm, codes, sz, sm, ym, 8, N, K, G, t, table); break;
            }
        }
    }
}

/* x (M, K) bf16, packed codes and scales/zeros as above, y (M, N) bf16.
   Returns 0, or -1 when the call could not allocate its row sums or (tiles, long inputs) its widened codes. */
int int4_amx_gemm(const uint16_t *x, const uint8_t *packed, const float *scales_zeros, const float *levels, uint16_t *y,
                  int M, int N, int K, int G, int threads) {
    const int groups = K / G, chunks = K / 32, ntiles = N / 16, units = (ntiles + UNIT - 1) / UNIT;
    if (M == 0) return 0;
    const int exact = M <= EXACT_ROWS || !amx;  /* the tiles' exact path or the vector path: per-row group sums */
    float *xsum = exact ? malloc(sizeof(float) * (size_t)M * groups) : NULL;
    if (exact && xsum == NULL) return -1;
    for (int m = 0; m < (exact ? M : 0); m++)  /* per-row group sums: the exact scaling's zero term */
        for (int g = 0; g < groups; g++) {  /* G is a multiple of 32: two 16-wide fp32 partial sums */
            const uint16_t *xg = x + (size_t)m * K + (size_t)g * G;
            __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
            for (int k = 0; k < G; k += 32) {
                __m512i w = _mm512_loadu_si512((const void *)(xg + k));
                a = _mm512_add_ps(a, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));  /* even bf16s */
                b = _mm512_add_ps(b, _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32((int)0xFFFF0000))));
            }
            xsum[m * groups + g] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
        }
    const __m512 level_values = _mm512_loadu_ps(levels);  /* fp32 levels (the scaled path) */
    uint16_t level_words[32];  /* the levels in bf16 (round to nearest even), twice: a code's value for vpermw */
    _mm256_storeu_si256((__m256i *)level_words, (__m256i)_mm512_cvtneps_pbh(level_values));
    _mm256_storeu_si256((__m256i *)(level_words + 16), (__m256i)_mm512_cvtneps_pbh(level_values));
    const __m512i table = _mm512_loadu_si512(level_words);
    if (M <= AMX_VEC_ROWS || !amx) {  /* the vector path */
        const int nt = threads < ntiles ? threads : ntiles;
#pragma omp parallel num_threads(nt)
        {
            const int i = omp_get_thread_num(), n = omp_get_num_threads();
            vec_tiles(x, packed, scales_zeros, xsum, y, M, N, K, G, (int)((long)ntiles * i / n),
                      (int)((long)ntiles * (i + 1) / n), table);
        }
        free(xsum);
        return 0;
    }
    int failed = 0;
#pragma omp parallel num_threads(threads < units ? threads : units)  /* no idle threads to wake */
    {
        int configured = -1;
        /* more than one A tile of rows: widen each unit's codes once, reuse them for every row block */
        uint16_t *wide = M > ROWS ? aligned_alloc(64, (size_t)UNIT * chunks * 512 * sizeof(uint16_t)) : NULL;
        if (M > ROWS && wide == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int u = 0; u < units; u++) {
            if (M > ROWS && wide == NULL) continue;
            const int t = u * UNIT, NT = ntiles - t < UNIT ? ntiles - t : UNIT;
            const uint8_t *codes[UNIT];
            const float *sz[UNIT];
            for (int i = 0; i < NT; i++) {
                codes[i] = packed + (size_t)(t + i) * (K / 4) * 32;
                sz[i] = scales_zeros + (size_t)(t + i) * groups * 32;
            }
            const int scaled = M > EXACT_ROWS;
            if (wide)
                for (int i = 0; i < NT; i++) {
                    if (scaled) {
                        widen_scaled(codes[i], sz[i], wide + (size_t)i * chunks * 512, K, G, level_values);
                        continue;
                    }
                    for (int chunk = 0; chunk < chunks; chunk++)
                        widen(codes[i] + (size_t)chunk * 8 * 32, wide + ((size_t)i * chunks + chunk) * 512, table);
                }
            BARRIER();
            for (int m0 = 0; m0 < M; m0 += ROWS) {
                const int R = M - m0 < ROWS ? M - m0 : ROWS;
                if (R != configured) { configure(R); configured = R; }
                if (scaled)
                    unit_scaled(x + (size_t)m0 * K, wide, y + (size_t)m0 * N, R, K, N, t, NT);
                else
                    unit(x + (size_t)m0 * K, codes, sz, wide, xsum + (size_t)m0 * groups, y + (size_t)m0 * N, R, K, G,
                         N, t, NT, table);
            }
        }
        if (configured >= 0) _tile_release();
        free(wide);
    }
    free(xsum);
    return failed ? -1 : 0;
}
