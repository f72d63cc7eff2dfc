/* The lossless coding of a packed expert store (runtime/packed_codec.py has the format and why).
 *
 * A segment codes n 16-bit values (bfloat16 weights): each value's high byte (sign and 7 exponent bits,
 * a handful of distinct values in trained weights) as a 4-bit index into a 16-entry table, code 15 for the
 * rare others, listed as escapes; its low byte as it is. Decoding is one pass, 16 values per table lookup
 * instruction where the CPU has AVX2. Compiled at first use by packed_codec.py; nothing here allocates,
 * and every length and position is checked against the buffer it lies in.
 */
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define ESCAPE 15

/* the code of value i: nibble (i & 1) of codes[i / 2], the low nibble first */
static inline uint8_t code_at(const uint8_t *codes, int64_t i) {
    return (codes[i >> 1] >> ((i & 1) * 4)) & 15;
}

static void decode_plain(const uint8_t *codes, const uint8_t *lows, const uint8_t *table, uint16_t *out,
                         int64_t begin, int64_t n) {
    for (int64_t i = begin; i < n; i++) out[i] = (uint16_t)(table[code_at(codes, i)] << 8 | lows[i]);
}

#if defined(__x86_64__)
__attribute__((target("avx2")))
static int64_t decode_avx2(const uint8_t *codes, const uint8_t *lows, const uint8_t *table, uint16_t *out,
                           int64_t n) {
    const __m256i tab = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)table));
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {  /* 32 code bytes -> 64 values */
        __m256i c = _mm256_loadu_si256((const __m256i *)(codes + i / 2));
        __m256i even = _mm256_shuffle_epi8(tab, _mm256_and_si256(c, nibble));  /* high bytes of 2j */
        __m256i odd = _mm256_shuffle_epi8(tab, _mm256_and_si256(_mm256_srli_epi16(c, 4), nibble));  /* 2j+1 */
        __m256i h0 = _mm256_unpacklo_epi8(even, odd);  /* per 128-bit lane: values in order */
        __m256i h1 = _mm256_unpackhi_epi8(even, odd);
        __m256i hA = _mm256_permute2x128_si256(h0, h1, 0x20);  /* high bytes of values 0..31 */
        __m256i hB = _mm256_permute2x128_si256(h0, h1, 0x31);  /* 32..63 */
        __m256i lA = _mm256_loadu_si256((const __m256i *)(lows + i));
        __m256i lB = _mm256_loadu_si256((const __m256i *)(lows + i + 32));
        __m256i o0 = _mm256_unpacklo_epi8(lA, hA), o1 = _mm256_unpackhi_epi8(lA, hA);
        __m256i o2 = _mm256_unpacklo_epi8(lB, hB), o3 = _mm256_unpackhi_epi8(lB, hB);
        _mm256_storeu_si256((__m256i *)(out + i), _mm256_permute2x128_si256(o0, o1, 0x20));
        _mm256_storeu_si256((__m256i *)(out + i + 16), _mm256_permute2x128_si256(o0, o1, 0x31));
        _mm256_storeu_si256((__m256i *)(out + i + 32), _mm256_permute2x128_si256(o2, o3, 0x20));
        _mm256_storeu_si256((__m256i *)(out + i + 48), _mm256_permute2x128_si256(o2, o3, 0x31));
    }
    return i;
}
#endif

/* 1 where decode() takes the AVX2 path */
int packed_simd(void) {
#if defined(__x86_64__)
    return __builtin_cpu_supports("avx2") ? 1 : 0;
#else
    return 0;
#endif
}

/* out[0..n) from codes [ceil(n/2)], lows [n], table [16] and m escapes (position, high byte).
 * simd 0 forces the plain loop (tests compare the two). Returns 0, or -1 for an escape outside [0, n)
 * or one whose code is not ESCAPE (a torn segment). */
int packed_decode(const uint8_t *codes, const uint8_t *lows, const uint8_t *table, uint16_t *out, int64_t n,
                  const uint32_t *escape_pos, const uint8_t *escape_high, int64_t m, int simd) {
    int64_t done = 0;
#if defined(__x86_64__)
    if (simd && packed_simd()) done = decode_avx2(codes, lows, table, out, n);
#endif
    decode_plain(codes, lows, table, out, done, n);
    for (int64_t j = 0; j < m; j++) {
        uint32_t p = escape_pos[j];
        if ((int64_t)p >= n || code_at(codes, p) != ESCAPE) return -1;
        out[p] = (uint16_t)(escape_high[j] << 8 | lows[p]);
    }
    return 0;
}

/* The coding of values[0..n) with code_of[256] (a high byte's code, ESCAPE for those not in the table):
 * codes [ceil(n/2)] (an odd n's last nibble 0), lows [n], and the escapes' positions and high bytes, at most
 * max_escapes of them. Returns the number of escapes, or -1 when there are more than max_escapes
 * (nothing past max_escapes is written). */
int64_t packed_encode(const uint16_t *values, int64_t n, const uint8_t *code_of, uint8_t *codes, uint8_t *lows,
                      uint32_t *escape_pos, uint8_t *escape_high, int64_t max_escapes) {
    int64_t m = 0;
    memset(codes, 0, (size_t)((n + 1) / 2));
    for (int64_t i = 0; i < n; i++) {
        uint8_t high = (uint8_t)(values[i] >> 8), code = code_of[high];
        lows[i] = (uint8_t)values[i];
        codes[i >> 1] |= (uint8_t)(code << ((i & 1) * 4));
        if (code == ESCAPE) {
            if (m == max_escapes) return -1;
            escape_pos[m] = (uint32_t)i;
            escape_high[m] = high;
            m++;
        }
    }
    return m;
}
