/* The PMP gradient mask on the CPU: grad[i] *= bit (start + i) of a packed mask, in one pass.

   Bit j of the packed mask is bit j % 8 (least significant first) of byte j / 8 (pmp/bitmask.py). The
   product is the one torch's grad.mul_(bits) gives, bit for bit: x * 1.0f and x * 0.0f, so a NaN or an
   infinity stays NaN and the sign of a zeroed entry is kept. Memory-bound: it reads the gradient and
   1/32 of that in mask bits and writes the gradient once. With AVX2 (checked at run time) 8 entries per
   instruction; otherwise 8 entries per mask byte through a 256 x 8 table of 0.0f / 1.0f.

   Built and loaded by pmp/native.py (ctypes); plain C, no Python or torch headers. */
#include <stdint.h>

static float kBits[256][8];

__attribute__((constructor)) static void init_bits(void) {
    for (int v = 0; v < 256; v++)
        for (int k = 0; k < 8; k++) kBits[v][k] = (float)((v >> k) & 1);
}

/* entries [a, b) one at a time (the ends that do not start on a mask byte) */
static void masked_mul_entries(float *restrict g, const uint8_t *restrict packed, int64_t start,
                               int64_t a, int64_t b) {
    for (int64_t i = a; i < b; i++) {
        int64_t j = start + i;
        g[i] *= kBits[packed[j >> 3]][j & 7];
    }
}

/* 8 entries per mask byte: x[8 b + k] *= bit k of p[b] */
static void masked_mul_bytes(float *restrict x, const uint8_t *restrict p, int64_t num_bytes) {
    for (int64_t b = 0; b < num_bytes; b++) {
        const float *bits = kBits[p[b]];
        float *y = x + 8 * b;
        for (int k = 0; k < 8; k++) y[k] *= bits[k];
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

__attribute__((target("avx2"))) static void masked_mul_bytes_avx2(float *restrict x, const uint8_t *restrict p,
                                                                   int64_t num_bytes) {
    const __m256i shifts = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i one = _mm256_set1_epi32(1);
    for (int64_t b = 0; b < num_bytes; b++) {
        __m256i byte = _mm256_set1_epi32(p[b]);
        __m256 bits = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(byte, shifts), one));
        _mm256_storeu_ps(x + 8 * b, _mm256_mul_ps(_mm256_loadu_ps(x + 8 * b), bits));
    }
}

static int has_avx2(void) { return __builtin_cpu_supports("avx2"); }
#else
static void masked_mul_bytes_avx2(float *x, const uint8_t *p, int64_t num_bytes) {
    masked_mul_bytes(x, p, num_bytes);
}

static int has_avx2(void) { return 0; }
#endif

/* grad[0, n) *= bits [start, start + n) of packed, with AVX2 or the table */
static void masked_mul(float *restrict grad, const uint8_t *restrict packed, int64_t start, int64_t n, int avx2) {
    int64_t head = (8 - (start & 7)) & 7;
    if (head > n) head = n;
    masked_mul_entries(grad, packed, start, 0, head);
    int64_t num_bytes = (n - head) >> 3;
    if (avx2)
        masked_mul_bytes_avx2(grad + head, packed + ((start + head) >> 3), num_bytes);
    else
        masked_mul_bytes(grad + head, packed + ((start + head) >> 3), num_bytes);
    masked_mul_entries(grad, packed, start, head + 8 * num_bytes, n);
}

/* The mask on grad[0, n) (see the top). Returns 1 if the AVX2 path ran, 0 if the table did. */
int pmp_masked_mul_f32(float *restrict grad, const uint8_t *restrict packed, int64_t start, int64_t n) {
    int avx2 = has_avx2();
    masked_mul(grad, packed, start, n, avx2);
    return avx2;
}

/* The same through the table whatever the CPU has (tests compare the two paths). */
int pmp_masked_mul_f32_table(float *restrict grad, const uint8_t *restrict packed, int64_t start, int64_t n) {
    masked_mul(grad, packed, start, n, 0);
    return 0;
}
