/* The lossless coding of a packed expert store (runtime/packed_codec.py has the format and why).
 *
 * A chunk codes n 16-bit values (bfloat16 weights) of one tensor: each value's high byte (sign and 7 exponent
 * bits, a handful of distinct values in trained weights) as a 4-bit index into a 16-entry table, code 15 for
 * the rare others, listed as escapes; its low byte as it is. A block is pages of whole chunks, so a block read
 * in pieces of whole pages decodes piece by piece (packed_decode_pages). Decoding is one pass, 16 values per
 * table lookup instruction where the CPU has AVX2. Compiled at first use by packed_codec.py; nothing here
 * allocates, and every length and position is checked against the buffer it lies in.
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
/* 64 values per loop: 32 code bytes -> 64 high bytes by two table lookups, interleaved with 64 low bytes.
 * STORE: plain stores, or streaming (non-temporal) ones that skip the caches, for outputs too large to stay
 * in them: the destination is then not read before it is written (measured on a 96 MiB expert: 10.4-10.8 ms
 * a decode against 15.2-15.7). */
#define STORE_PLAIN(p, v) _mm256_storeu_si256((__m256i *)(p), (v))
#define STORE_STREAM(p, v) _mm256_stream_si256((__m256i *)(p), (v))
#define DECODE_AVX2(NAME, STORE)                                                                                  \
    __attribute__((target("avx2"))) static int64_t NAME(const uint8_t *codes, const uint8_t *lows,              \
                                                         const uint8_t *table, uint16_t *out, int64_t n) {       \
        const __m256i tab = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)table));               \
        const __m256i nibble = _mm256_set1_epi8(0x0f);                                                           \
        int64_t i = 0;                                                                                           \
        for (; i + 64 <= n; i += 64) {                                                                           \
            __m256i c = _mm256_loadu_si256((const __m256i *)(codes + i / 2));                                    \
            __m256i even = _mm256_shuffle_epi8(tab, _mm256_and_si256(c, nibble)); /* high bytes of 2j */         \
            __m256i odd = _mm256_shuffle_epi8(tab, _mm256_and_si256(_mm256_srli_epi16(c, 4), nibble)); /* 2j+1 */\
            __m256i h0 = _mm256_unpacklo_epi8(even, odd); /* per 128-bit lane: values in order */               \
            __m256i h1 = _mm256_unpackhi_epi8(even, odd);                                                        \
            __m256i hA = _mm256_permute2x128_si256(h0, h1, 0x20); /* high bytes of values 0..31 */              \
            __m256i hB = _mm256_permute2x128_si256(h0, h1, 0x31); /* 32..63 */                                  \
            __m256i lA = _mm256_loadu_si256((const __m256i *)(lows + i));                                        \
            __m256i lB = _mm256_loadu_si256((const __m256i *)(lows + i + 32));                                   \
            __m256i o0 = _mm256_unpacklo_epi8(lA, hA), o1 = _mm256_unpackhi_epi8(lA, hA);                        \
            __m256i o2 = _mm256_unpacklo_epi8(lB, hB), o3 = _mm256_unpackhi_epi8(lB, hB);                        \
            STORE(out + i, _mm256_permute2x128_si256(o0, o1, 0x20));                                             \
            STORE(out + i + 16, _mm256_permute2x128_si256(o0, o1, 0x31));                                        \
            STORE(out + i + 32, _mm256_permute2x128_si256(o2, o3, 0x20));                                        \
            STORE(out + i + 48, _mm256_permute2x128_si256(o2, o3, 0x31));                                        \
        }                                                                                                        \
        return i;                                                                                                \
    }
DECODE_AVX2(decode_avx2, STORE_PLAIN)
DECODE_AVX2(decode_avx2_stream, STORE_STREAM)
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
 * simd 0 forces the plain loop (tests compare the two); stream 1 takes streaming stores where out is 32-byte
 * aligned (the caller fences). Returns 0, or -1 for an escape outside [0, n) or one whose code is not ESCAPE
 * (a torn chunk). */
static int decode_chunk(const uint8_t *codes, const uint8_t *lows, const uint8_t *table, uint16_t *out, int64_t n,
                        const uint32_t *escape_pos, const uint8_t *escape_high, int64_t m, int simd, int stream) {
    int64_t done = 0;
#if defined(__x86_64__)
    if (simd && packed_simd()) {
        done = stream && ((uintptr_t)out & 31) == 0 ? decode_avx2_stream(codes, lows, table, out, n)
                                                     : decode_avx2(codes, lows, table, out, n);
    }
#else
    (void)stream;
#endif
    decode_plain(codes, lows, table, out, done, n);
    for (int64_t j = 0; j < m; j++) {
        uint32_t p = escape_pos[j];
        if ((int64_t)p >= n || code_at(codes, p) != ESCAPE) return -1;
        out[p] = (uint16_t)(escape_high[j] << 8 | lows[p]);
    }
    return 0;
}

#define ALIGN 64
#define HEADER 64
#define CHUNK_VERSION 2

static inline int64_t round64(int64_t n) { return (n + ALIGN - 1) / ALIGN * ALIGN; }

static inline uint32_t u32_at(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t u64_at(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* Bytes of a chunk of n values with m escapes (packed_codec.chunk_bytes). */
static int64_t chunk_bytes(int64_t n, int64_t m, int coded) {
    if (!coded) return round64(HEADER + 2 * n);
    return round64(round64(round64(HEADER + (n + 1) / 2) + n) + 5 * m);
}

/* Decode the chunks of the pages in buf[0..len): len is whole pages of `page` bytes, but for a block's last
 * (short) page. outs[t] holds numels[t] values of tensor t; cursor[0..1] = (tensor, values done), carried from
 * one call to the next, so a block's pages may come in several calls, in order. Within a page, chunks follow
 * each other until one that does not fit or an all-zero magic (padding to the page's end).
 * stream 1: streaming stores (decode_chunk). Returns 0, or: -1 a header that is not a chunk of this version,
 * -2 a chunk out of order or past its tensor, -3 a chunk past its page, -4 an escape out of place (a torn
 * block). */
static int decode_pages(const uint8_t *buf, int64_t len, int64_t page, uint16_t *const *outs, const int64_t *numels,
                        int64_t n_tensors, int64_t *cursor, int simd, int stream) {
    static const uint8_t zero[4] = {0, 0, 0, 0};
    for (int64_t page_at = 0; page_at < len; page_at += page) {
        int64_t end = page_at + page < len ? page_at + page : len;
        int64_t at = page_at;
        while (at + HEADER <= end) {
            const uint8_t *h = buf + at;
            if (memcmp(h, zero, 4) == 0) break;  /* padding */
            if (memcmp(h, "MOEC", 4) != 0 || u32_at(h + 36) != CHUNK_VERSION) return -1;
            uint32_t t = u32_at(h + 4), coded = u32_at(h + 32);
            uint64_t offset = u64_at(h + 8), n = u64_at(h + 16), m = u64_at(h + 24);
            int64_t ct = cursor[0], done = cursor[1];
            if (ct < n_tensors && done == numels[ct]) { ct += 1; done = 0; }  /* the next tensor starts */
            if (ct >= n_tensors || (int64_t)t != ct || offset != (uint64_t)done || n == 0
                || n > (uint64_t)(numels[ct] - done) || m > n || coded > 1) return -2;
            int64_t size = chunk_bytes((int64_t)n, (int64_t)m, (int)coded);
            if (size > end - at) return -3;
            uint16_t *out = outs[ct] + done;
            if (!coded) {
                memcpy(out, h + HEADER, 2 * n);
            } else {
                const uint8_t *codes = h + HEADER;
                const uint8_t *lows = h + round64(HEADER + (n + 1) / 2);
                const uint8_t *esc = h + round64(round64(HEADER + (n + 1) / 2) + n);
                if (decode_chunk(codes, lows, h + 40, out, (int64_t)n, (const uint32_t *)esc, esc + 4 * m,
                                 (int64_t)m, simd, stream) != 0) return -4;
            }
            cursor[0] = ct;
            cursor[1] = done + (int64_t)n;
            at += size;
        }
    }
    return 0;
}

int packed_decode_pages(const uint8_t *buf, int64_t len, int64_t page, uint16_t *const *outs,
                        const int64_t *numels, int64_t n_tensors, int64_t *cursor, int simd, int stream) {
    int status = decode_pages(buf, len, page, outs, numels, n_tensors, cursor, simd, stream);
#if defined(__x86_64__)
    if (stream) _mm_sfence();  /* streaming stores are visible to other threads once the call returns */
#endif
    return status;
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
