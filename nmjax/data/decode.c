/* A JPEG crop decoded and resized in one call: libjpeg decodes, at 1/scale, only the columns
 * and rows the resize reads (jpeg_crop_scanline, jpeg_skip_scanlines, and no row below them),
 * into a buffer laid out as the whole decoded image, so the resize (resample.c) runs exactly as
 * on a whole decode and gives its pixels. libjpeg is Pillow's own where it can be linked
 * (nmjax/data/resample.py says how), with the settings Pillow decodes with (islow IDCT, fancy
 * upsampling, RGBX output).
 *
 * nmjax_decode_resample returns 0, 1 where libjpeg reported anything at all (an error or a
 * warning: the caller lets Pillow decode, and say what is wrong), or -1 when memory runs out.
 */
#include <setjmp.h>
#include <stdio.h>

#include <jpeglib.h>

#include "resample.c"

/* Columns decoded beside those the resize reads: chroma upsampling at a crop's edge sees no
 * neighbour there (libjpeg widens the crop to whole blocks, which usually covers this too). */
#define COLUMN_MARGIN 16

struct failure {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
};

static void fail(j_common_ptr cinfo) { longjmp(((struct failure *)cinfo->err)->jump, 1); }

static void warn(j_common_ptr cinfo, int level) {
  if (level < 0) fail(cinfo); /* a warning: corrupt data, which Pillow should judge */
}

int nmjax_decode_resample(const uint8_t *data, unsigned long size, int scale, float x0,
                          float y0, float x1, float y1, int out_size, int mirror,
                          uint8_t *out) {
  struct jpeg_decompress_struct cinfo;
  struct failure failure;
  /* Thread-local storage, not a local: what a local holds after longjmp is unspecified. */
  static __thread struct plan plan;
  int region[4];
  memset(&plan, 0, sizeof plan);
  cinfo.err = jpeg_std_error(&failure.pub);
  failure.pub.error_exit = fail;
  failure.pub.emit_message = warn;
  if (setjmp(failure.jump)) {
    jpeg_destroy_decompress(&cinfo);
    plan_free(&plan);
    return 1;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, size);
  jpeg_read_header(&cinfo, TRUE);
  if (cinfo.num_components != 1 && cinfo.num_components != 3) longjmp(failure.jump, 1);
  cinfo.out_color_space = JCS_EXT_RGBX;
  cinfo.scale_num = 1;
  cinfo.scale_denom = scale;
  jpeg_start_decompress(&cinfo);
  int width = cinfo.output_width, height = cinfo.output_height;
  if (!(0 <= x0 && x0 < x1 && x1 <= width && 0 <= y0 && y0 < y1 && y1 <= height))
    longjmp(failure.jump, 1); /* a box outside the image: Pillow says so */
  if (plan_make(width, height, x0, y0, x1, y1, out_size, out_size, &plan)) {
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  plan_region(&plan, out_size, out_size, region);
  JDIMENSION left = region[0] > COLUMN_MARGIN ? region[0] - COLUMN_MARGIN : 0;
  JDIMENSION right = region[1] + COLUMN_MARGIN < width ? region[1] + COLUMN_MARGIN : width;
  JDIMENSION columns = right - left;
  if (left > 0 || columns < (JDIMENSION)width) jpeg_crop_scanline(&cinfo, &left, &columns);
  long stride = 4L * width;
  uint8_t *pixels = scratch(stride * height + 64, 3);
  if (!pixels) {
    jpeg_destroy_decompress(&cinfo);
    plan_free(&plan);
    return -1;
  }
  if (region[2] > 0) jpeg_skip_scanlines(&cinfo, region[2]);
  while ((int)cinfo.output_scanline < region[3]) {
    JSAMPROW row = pixels + cinfo.output_scanline * stride + 4L * left;
    jpeg_read_scanlines(&cinfo, &row, 1);
  }
  jpeg_abort_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  /* Pillow 13's pass order (nmjax.data.resample.vertical_first). */
  int vertical_first = height - out_size > 2 * (width > out_size ? width - out_size : 0);
  int rc = plan_run(&plan, pixels, width, height, stride, x0, y0, x1, y1, out_size, out_size,
                    vertical_first, out, mirror);
  plan_free(&plan);
  return rc;
}
