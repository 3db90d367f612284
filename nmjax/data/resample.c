/* Bilinear (antialiased) resampling of an 8-bit RGB box to an out_w x out_h image, with the
 * arithmetic of Pillow 13's two-pass resampler (nmjax/data/resample.py says which facts of it
 * this follows): per output pixel, double-precision triangle weights over the filter's support
 * (scaled by the shrink factor), normalized, rounded to 22-bit fixed point, accumulated in int32
 * from a half-unit start, shifted and clamped to 0..255 after each pass. Loops are laid out so
 * that the compiler vectorizes them: the horizontal pass four channels of a pixel at a time, the
 * vertical pass whole rows.
 *
 * Input: rows of RGBX pixels (4 bytes each, the 4th ignored), `stride` bytes apart.
 * Output: packed RGB (3 bytes per pixel), rows out_w * 3 bytes apart, mirrored left-right when
 * `mirror`. Returns 0, or -1 when memory runs out.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define PRECISION_BITS (32 - 8 - 2)
#define HALF (1 << (PRECISION_BITS - 1))

/* Per-thread scratch memory kept between calls (a fresh malloc of a few hundred KB is an mmap
 * whose pages fault in on every call): SCRATCH_POOLS buffers, each grown on demand and kept for
 * the thread's life. */
#define SCRATCH_POOLS 4
static __thread uint8_t *scratch_memory[SCRATCH_POOLS];
static __thread size_t scratch_bytes[SCRATCH_POOLS];

static uint8_t *scratch(size_t bytes, int pool) {
  if (bytes > scratch_bytes[pool]) {
    free(scratch_memory[pool]);
    scratch_bytes[pool] = 0;
    scratch_memory[pool] = malloc(bytes);
    if (!scratch_memory[pool]) return NULL;
    scratch_bytes[pool] = bytes;
  }
  return scratch_memory[pool];
}

static inline uint8_t clip8(int32_t v) {
  v >>= PRECISION_BITS;
  return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
}

/* Taps per output pixel: twice the (shrink-scaled) support, rounded up, plus one. */
static int tap_count(float in0, float in1, int out_size) {
  double scale = (double)(in1 - in0) / out_size;
  double support = scale < 1.0 ? 1.0 : scale;
  return (int)ceil(support) * 2 + 1;
}

/* bounds[2i] = first input index of output i, bounds[2i + 1] = how many; kk[i * taps + j] the
 * fixed-point weight of input bounds[2i] + j. */
static void weights(int in_size, float in0, float in1, int out_size, int taps, int *bounds,
                    int32_t *kk) {
  double scale = (double)(in1 - in0) / out_size;
  double filterscale = scale < 1.0 ? 1.0 : scale;
  double support = filterscale;  /* the triangle's support, 1, times the shrink */
  double inv = 1.0 / filterscale;
  double w[taps];
  for (int o = 0; o < out_size; o++) {
    double center = in0 + (o + 0.5) * scale;
    int lo = (int)(center - support + 0.5);
    int hi = (int)(center + support + 0.5);
    if (lo < 0) lo = 0;
    if (hi > in_size) hi = in_size;
    int count = hi - lo;
    double total = 0.0;
    for (int j = 0; j < count; j++) {
      double x = (j + lo - center + 0.5) * inv;
      if (x < 0.0) x = -x;
      w[j] = x < 1.0 ? 1.0 - x : 0.0;
      total += w[j];
    }
    for (int j = 0; j < taps; j++) {
      double v = j < count ? (total != 0.0 ? w[j] / total : w[j]) : 0.0;
      kk[o * taps + j] = (int32_t)(v < 0 ? -0.5 + v * (1 << PRECISION_BITS)
                                         : 0.5 + v * (1 << PRECISION_BITS));
    }
    bounds[2 * o] = lo;
    bounds[2 * o + 1] = count;
  }
}

/* rows x out pixels of RGBX from rows of RGBX: each output pixel a weighted sum along the row
 * (with AVX2, a pixel's four channels in one 128-bit register; shift, then saturating packs,
 * which clamp to 0..255 as clip8 does). */
static void horizontal(const uint8_t *in, long in_stride, int in_width, int rows, int out,
                       int taps, const int *bounds, const int32_t *kk, uint8_t *dst,
                       long dst_stride) {
  for (int r = 0; r < rows; r++) {
    const uint8_t *line = in + r * in_stride;
    uint8_t *o = dst + r * dst_stride;
    for (int x = 0; x < out; x++) {
      const uint8_t *p = line + 4 * bounds[2 * x];
      const int32_t *k = kk + x * taps;
      int count = bounds[2 * x + 1];
#if defined(__AVX2__)
      /* Two output pixels per 256-bit register where both read inside the row: each lane
       * pair's taps beyond its own count have weight 0 (weights pads them). */
      if (x + 1 < out) {
        const uint8_t *q = line + 4 * bounds[2 * x + 2];
        const int32_t *l = kk + (x + 1) * taps;
        int most = count > bounds[2 * x + 3] ? count : bounds[2 * x + 3];
        if (bounds[2 * x] + most <= in_width && bounds[2 * x + 2] + most <= in_width) {
          __m256i s = _mm256_set1_epi32(HALF);
          for (int j = 0; j < most; j++) {
            int32_t a, b;
            memcpy(&a, p + 4 * j, 4);
            memcpy(&b, q + 4 * j, 4);
            __m256i px = _mm256_cvtepu8_epi32(
                _mm_unpacklo_epi32(_mm_cvtsi32_si128(a), _mm_cvtsi32_si128(b)));
            __m256i w = _mm256_set_m128i(_mm_set1_epi32(l[j]), _mm_set1_epi32(k[j]));
            s = _mm256_add_epi32(s, _mm256_mullo_epi32(px, w));
          }
          s = _mm256_srai_epi32(s, PRECISION_BITS);
          __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(s),
                                          _mm256_extracti128_si256(s, 1));
          _mm_storel_epi64((__m128i *)(o + 4 * x), _mm_packus_epi16(words, words));
          x++;
          continue;
        }
      }
      __m128i s = _mm_set1_epi32(HALF);
      for (int j = 0; j < count; j++) {
        int32_t v;
        memcpy(&v, p + 4 * j, 4);
        __m128i px = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(v));
        s = _mm_add_epi32(s, _mm_mullo_epi32(px, _mm_set1_epi32(k[j])));
      }
      s = _mm_srai_epi32(s, PRECISION_BITS);
      s = _mm_packus_epi16(_mm_packs_epi32(s, s), s);
      int32_t packed = _mm_cvtsi128_si32(s);
      memcpy(o + 4 * x, &packed, 4);
#else
      int32_t s[4] = {HALF, HALF, HALF, HALF};
      for (int j = 0; j < count; j++)
        for (int c = 0; c < 4; c++) s[c] += p[4 * j + c] * k[j];
      for (int c = 0; c < 4; c++) o[4 * x + c] = clip8(s[c]);
#endif
    }
  }
}

/* One output row of n bytes: each byte the weighted sum of `count` input rows at `first`. */
static void vertical_row(const uint8_t *in, long in_stride, int n, int first, int count,
                         const int32_t *k, uint8_t *o) {
  int i = 0;
#if defined(__AVX2__)
  for (; i + 8 <= n; i += 8) {
    __m256i s = _mm256_set1_epi32(HALF);
    for (int j = 0; j < count; j++) {
      const uint8_t *row = in + (first + j) * in_stride + i;
      __m256i px = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)row));
      s = _mm256_add_epi32(s, _mm256_mullo_epi32(px, _mm256_set1_epi32(k[j])));
    }
    s = _mm256_srai_epi32(s, PRECISION_BITS);
    __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    _mm_storel_epi64((__m128i *)(o + i), _mm_packus_epi16(words, words));
  }
#endif
  for (; i < n; i++) {
    int32_t s = HALF;
    for (int j = 0; j < count; j++) s += in[(first + j) * in_stride + i] * k[j];
    o[i] = clip8(s);
  }
}

/* out rows of `width` RGBX pixels from rows of RGBX: each a weighted sum of whole rows; written
 * as RGBX (dst_channels 4) or as packed, optionally mirrored RGB (dst_channels 3, through `row`,
 * 4 * width bytes). */
static void vertical(const uint8_t *in, long in_stride, int width, int out, int taps,
                     const int *bounds, const int32_t *kk, uint8_t *dst, long dst_stride,
                     int dst_channels, int mirror, uint8_t *row) {
  int n = 4 * width;
  if (dst_channels == 4) row = NULL;
  for (int y = 0; y < out; y++) {
    uint8_t *o = dst + y * dst_stride;
    vertical_row(in, in_stride, n, bounds[2 * y], bounds[2 * y + 1], kk + y * taps,
                 row ? row : o);
    if (row)
      for (int x = 0; x < width; x++) {
        uint8_t *q = o + 3 * (mirror ? width - 1 - x : x);
        q[0] = row[4 * x];
        q[1] = row[4 * x + 1];
        q[2] = row[4 * x + 2];
      }
  }
}

/* RGBX rows -> packed RGB rows, optionally mirrored (a pass that resizes nothing). */
static void pack(const uint8_t *in, long in_stride, int width, int rows, uint8_t *dst,
                 long dst_stride, int mirror) {
  for (int y = 0; y < rows; y++)
    for (int x = 0; x < width; x++) {
      const uint8_t *p = in + y * in_stride + 4 * x;
      uint8_t *q = dst + y * dst_stride + 3 * (mirror ? width - 1 - x : x);
      q[0] = p[0];
      q[1] = p[1];
      q[2] = p[2];
    }
}

/* Both passes' weights for resizing box (x0, y0, x1, y1) of an in_w x in_h image to
 * out_w x out_h (see weights). */
struct plan {
  int taps_h, taps_v;
  int *bh, *bv;
  int32_t *kh, *kv;
};

static void plan_free(struct plan *p) {
  free(p->bh);
  free(p->bv);
  free(p->kh);
  free(p->kv);
}

/* Returns 0, or -1 (nothing to free) when memory runs out. */
static int plan_make(int in_w, int in_h, float x0, float y0, float x1, float y1, int out_w,
                     int out_h, struct plan *p) {
  p->taps_h = tap_count(x0, x1, out_w);
  p->taps_v = tap_count(y0, y1, out_h);
  p->bh = malloc(sizeof(int) * 2 * out_w);
  p->bv = malloc(sizeof(int) * 2 * out_h);
  p->kh = malloc(sizeof(int32_t) * out_w * p->taps_h);
  p->kv = malloc(sizeof(int32_t) * out_h * p->taps_v);
  if (!p->bh || !p->bv || !p->kh || !p->kv) {
    plan_free(p);
    return -1;
  }
  weights(in_w, x0, x1, out_w, p->taps_h, p->bh, p->kh);
  weights(in_h, y0, y1, out_h, p->taps_v, p->bv, p->kv);
  return 0;
}

/* The input pixels a plan's resize reads: columns [region[0], region[1]) and rows
 * [region[2], region[3]) (those the weights of either pass touch). */
static void plan_region(const struct plan *p, int out_w, int out_h, int *region) {
  region[0] = p->bh[0];
  region[1] = p->bh[2 * out_w - 2] + p->bh[2 * out_w - 1];
  region[2] = p->bv[0];
  region[3] = p->bv[2 * out_h - 2] + p->bv[2 * out_h - 1];
}

/* The resize of a plan (consumed: its bounds are shifted). Returns 0, or -1 when memory runs
 * out. */
static int plan_run(struct plan *p, const uint8_t *in, int in_w, int in_h, long stride,
                    float x0, float y0, float x1, float y1, int out_w, int out_h,
                    int vertical_first, uint8_t *out, int mirror) {
  int need_h = out_w != in_w || x0 != 0.0f || x1 != (float)out_w;
  int need_v = out_h != in_h || y0 != 0.0f || y1 != (float)out_h;
  int taps_h = p->taps_h, taps_v = p->taps_v, *bh = p->bh, *bv = p->bv;
  const int32_t *kh = p->kh, *kv = p->kv;
  /* Every intermediate fits in max(width) x max(height) RGBX pixels (pools 0-2; the decoder
   * keeps its pixels in pool 3). */
  size_t most = 4 * (size_t)(in_w > out_w ? in_w : out_w) * (size_t)(in_h > out_h ? in_h : out_h);
  uint8_t *tmp = scratch(most, 0), *rgbx = scratch(most, 1), *row = scratch(most, 2);
  if (!tmp || !rgbx || !row) return -1;
  long out_stride = 3L * out_w;
  if (!need_h && !need_v) {
    pack(in, stride, in_w, in_h, out, out_stride, mirror);
  } else if (!need_v) {
    horizontal(in, stride, in_w, in_h, out_w, taps_h, bh, kh, tmp, 4L * out_w);
    pack(tmp, 4L * out_w, out_w, in_h, out, out_stride, mirror);
  } else if (!need_h) {
    vertical(in, stride, in_w, out_h, taps_v, bv, kv, out, out_stride, 3, mirror, row);
  } else if (!vertical_first) {
    /* Only the rows the vertical pass reads go through the horizontal one. */
    int first = bv[0], last = bv[2 * out_h - 2] + bv[2 * out_h - 1];
    for (int y = 0; y < out_h; y++) bv[2 * y] -= first;
    horizontal(in + first * stride, stride, in_w, last - first, out_w, taps_h, bh, kh, tmp,
               4L * out_w);
    vertical(tmp, 4L * out_w, out_w, out_h, taps_v, bv, kv, out, out_stride, 3, mirror, row);
  } else {
    /* Only the columns the horizontal pass reads go through the vertical one. */
    int first = bh[0], last = bh[2 * out_w - 2] + bh[2 * out_w - 1];
    for (int x = 0; x < out_w; x++) bh[2 * x] -= first;
    int cols = last - first;
    vertical(in + 4L * first, stride, cols, out_h, taps_v, bv, kv, tmp, 4L * cols, 4, 0, row);
    horizontal(tmp, 4L * cols, cols, out_h, out_w, taps_h, bh, kh, rgbx, 4L * out_w);
    pack(rgbx, 4L * out_w, out_w, out_h, out, out_stride, mirror);
  }
  return 0;
}

int nmjax_resample(const uint8_t *in, int in_w, int in_h, long stride, float x0, float y0,
                   float x1, float y1, int out_w, int out_h, int vertical_first, uint8_t *out,
                   int mirror) {
  struct plan p;
  if (plan_make(in_w, in_h, x0, y0, x1, y1, out_w, out_h, &p)) return -1;
  int rc = plan_run(&p, in, in_w, in_h, stride, x0, y0, x1, y1, out_w, out_h, vertical_first,
                    out, mirror);
  plan_free(&p);
  return rc;
}
