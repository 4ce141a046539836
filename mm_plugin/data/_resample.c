/* Resize + centre crop + normalise of an 8-bit RGB image in one call, equal bit for bit to Pillow's
 * bicubic Image.resize followed by the crop and the normalisation table.
 *
 * Pillow resizes in two separable passes with fixed-point weights: for every output position it
 * computes bicubic (a = -0.5) weights in double precision over the input positions the filter covers,
 * normalises them to sum 1, rounds them to integers with 22 fractional bits, and sums 8-bit samples
 * times weights in 32-bit integers (rounding offset 2^21, result clamped to 0..255). The horizontal
 * pass runs first, over the input rows the vertical pass needs (Pillow 13 runs the vertical pass first
 * when the height shrinks by more than twice what the width does). This file computes the same weights
 * with the same double-precision expressions in the same order, but only for the output columns and
 * rows the crop keeps: each output sample depends on its own weights alone, so skipping the cropped-away
 * ones changes nothing else. Integer sums do not depend on the order of their terms, which lets both
 * passes run as multiply-adds over contiguous bytes that vectorise; the order of the two passes does
 * matter (the first pass rounds to bytes), so the caller says which one Pillow uses.
 *
 * mm_plugin.data.fast_image checks once per process that the results equal Pillow's on the installed
 * Pillow (a different compiler contracting a*b+c into a fused multiply-add could change a weight) and
 * falls back to Pillow otherwise.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FRACTION_BITS 22

/* Integer multiply-adds vectorise; with AVX2 (chosen at run time where there is one) twice as wide. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define VECTORISED __attribute__((target_clones("avx2", "default")))
#else
#define VECTORISED
#endif
#define SUPPORT 2.0 /* bicubic */

static double
bicubic(double x) {
    const double a = -0.5;
    if (x < 0.0) {
        x = -x;
    }
    if (x < 1.0) {
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    }
    if (x < 2.0) {
        return (((x - 5) * x + 8) * x - 4) * a;
    }
    return 0.0;
}

/* Fixed-point weights of output positions start .. start + count - 1 of a resize in_size -> out_size. */
typedef struct {
    int taps;       /* weights per output position */
    int *first;     /* first input position of each output position */
    int *used;      /* input positions it covers */
    int32_t *weight; /* [count][taps] */
} Kernel;

static void
kernel_free(Kernel *kernel) {
    free(kernel->first);
    free(kernel->used);
    free(kernel->weight);
}

static int
kernel_init(Kernel *kernel, int in_size, int out_size, int start, int count) {
    /* Pillow takes the box as floats; a whole-image box (0, in_size) is exact in float. */
    double scale = (double)(float)in_size / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    double support = SUPPORT * filterscale;
    double inverse = 1.0 / filterscale;
    int taps = (int)ceil(support) * 2 + 1;
    double *w = malloc(sizeof(double) * taps);

    kernel->taps = taps;
    kernel->first = malloc(sizeof(int) * count);
    kernel->used = malloc(sizeof(int) * count);
    kernel->weight = malloc(sizeof(int32_t) * (size_t)count * taps);
    if (!w || !kernel->first || !kernel->used || !kernel->weight) {
        free(w);
        kernel_free(kernel);
        return 0;
    }
    for (int i = 0; i < count; i++) {
        int xx = start + i;
        double center = (xx + 0.5) * scale;
        double total = 0.0;
        int lo = (int)(center - support + 0.5);
        int hi = (int)(center + support + 0.5);
        if (lo < 0) {
            lo = 0;
        }
        if (hi > in_size) {
            hi = in_size;
        }
        hi -= lo;
        for (int x = 0; x < hi; x++) {
            w[x] = bicubic((x + lo - center + 0.5) * inverse);
            total += w[x];
        }
        int32_t *fixed = &kernel->weight[(size_t)i * taps];
        for (int x = 0; x < taps; x++) {
            double v = 0.0;
            if (x < hi) {
                v = total != 0.0 ? w[x] / total : w[x];
            }
            fixed[x] = v < 0 ? (int32_t)(-0.5 + v * (1 << FRACTION_BITS))
                             : (int32_t)(0.5 + v * (1 << FRACTION_BITS));
        }
        kernel->first[i] = lo;
        kernel->used[i] = hi;
    }
    free(w);
    return 1;
}

static inline uint8_t
to_byte(int32_t sum) {
    int32_t v = sum >> FRACTION_BITS;
    return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
}

/* Output rows 0 .. rows_out - 1 of a vertical resize: row y sums the `samples` bytes of input rows
 * kernel->first[y] + t (absolute; the band `src` starts at absolute row row_base). */
VECTORISED static void
vertical_pass(const uint8_t *src, size_t src_stride, const Kernel *kernel, int row_base, int samples,
              int rows_out, uint8_t *dst, size_t dst_stride, int32_t *sum) {
    for (int y = 0; y < rows_out; y++) {
        const int32_t *k = &kernel->weight[(size_t)y * kernel->taps];
        const uint8_t *in = src + (size_t)(kernel->first[y] - row_base) * src_stride;
        for (int s = 0; s < samples; s++) {
            sum[s] = 1 << (FRACTION_BITS - 1);
        }
        for (int t = 0; t < kernel->used[y]; t++, in += src_stride) {
            const int32_t weight = k[t];
            for (int s = 0; s < samples; s++) {
                sum[s] += in[s] * weight;
            }
        }
        uint8_t *line = dst + (size_t)y * dst_stride;
        for (int s = 0; s < samples; s++) {
            line[s] = to_byte(sum[s]);
        }
    }
}

/* Output columns 0 .. columns_out - 1 of a horizontal resize of `rows` RGB rows: column x sums input
 * columns kernel->first[x] + t (absolute; the band `src` starts at absolute column column_base).
 * Rows go STRIP at a time: their input columns are first copied column by column, so that an output
 * column is a multiply-add over STRIP * 3 contiguous bytes, which vectorises like the vertical pass. */
#define STRIP 32
VECTORISED static int
horizontal_pass(const uint8_t *src, size_t src_stride, const Kernel *kernel, int column_base, int rows,
                int columns_out, uint8_t *dst, size_t dst_stride) {
    const int first = kernel->first[0] - column_base;
    const int count = kernel->first[columns_out - 1] + kernel->used[columns_out - 1] - column_base - first;
    uint8_t *block = malloc((size_t)count * STRIP * 3);
    int32_t sum[STRIP * 3];
    if (!block) {
        return 0;
    }
    for (int y0 = 0; y0 < rows; y0 += STRIP) {
        const int n = rows - y0 < STRIP ? rows - y0 : STRIP, lanes = n * 3;
        for (int r = 0; r < n; r++) {
            const uint8_t *in = src + (size_t)(y0 + r) * src_stride + (size_t)first * 3;
            uint8_t *cell = block + r * 3;
            for (int c = 0; c < count; c++, in += 3, cell += STRIP * 3) {
                cell[0] = in[0];
                cell[1] = in[1];
                cell[2] = in[2];
            }
        }
        for (int x = 0; x < columns_out; x++) {
            const int32_t *k = &kernel->weight[(size_t)x * kernel->taps];
            const uint8_t *column = block + (size_t)(kernel->first[x] - column_base - first) * STRIP * 3;
            for (int s = 0; s < lanes; s++) {
                sum[s] = 1 << (FRACTION_BITS - 1);
            }
            for (int t = 0; t < kernel->used[x]; t++, column += STRIP * 3) {
                const int32_t weight = k[t];
                for (int s = 0; s < lanes; s++) {
                    sum[s] += column[s] * weight;
                }
            }
            for (int r = 0; r < n; r++) {
                uint8_t *out = dst + (size_t)(y0 + r) * dst_stride + (size_t)x * 3;
                out[0] = to_byte(sum[r * 3 + 0]);
                out[1] = to_byte(sum[r * 3 + 1]);
                out[2] = to_byte(sum[r * 3 + 2]);
            }
        }
    }
    free(block);
    return 1;
}

/* The whole computation; returns 0 when out of memory. Pillow skips the pass of a dimension that does
 * not change, and (from Pillow 13) runs the vertical pass first when the height shrinks by more than
 * twice what the width does: `vertical_first` says which order the installed Pillow uses. */
static int
resize_crop_normalize(const uint8_t *src, int height, int width, int out_width, int out_height, int left,
                      int top, int crop_width, int crop_height, int vertical_first, const float *table,
                      float *out) {
    Kernel columns = {0}, rows = {0};
    uint8_t *middle = NULL, *cropped = NULL;
    int32_t *sum = NULL;
    int ok = 0;
    const int resize_columns = out_width != width, resize_rows = out_height != height;
    const size_t stride = (size_t)width * 3, crop_stride = (size_t)crop_width * 3;
    const uint8_t *result; /* the resized crop's bytes, rows result_stride apart */
    size_t result_stride;

    if ((resize_rows && !kernel_init(&rows, height, out_height, top, crop_height)) ||
        (resize_columns && !kernel_init(&columns, width, out_width, left, crop_width))) {
        goto done;
    }
    cropped = malloc((size_t)crop_height * crop_stride);
    if (!cropped) {
        goto done;
    }
    if (!vertical_first) {
        /* Horizontal pass over the input rows the vertical pass reads. */
        const int row_first = resize_rows ? rows.first[0] : top;
        const int row_count = resize_rows ? rows.first[crop_height - 1] + rows.used[crop_height - 1] - row_first
                                          : crop_height;
        const uint8_t *band = src + left * 3; /* rows from absolute row band_row0, band_stride apart */
        size_t band_stride = stride;
        int band_row0 = 0;
        if (resize_columns) {
            middle = malloc((size_t)row_count * crop_stride);
            if (!middle) {
                goto done;
            }
            if (!horizontal_pass(src + (size_t)row_first * stride, stride, &columns, 0, row_count, crop_width,
                                 middle, crop_stride)) {
                goto done;
            }
            band = middle, band_stride = crop_stride, band_row0 = row_first;
        }
        if (resize_rows) {
            sum = malloc(sizeof(int32_t) * crop_stride);
            if (!sum) {
                goto done;
            }
            vertical_pass(band, band_stride, &rows, band_row0, (int)crop_stride, crop_height, cropped, crop_stride,
                          sum);
            result = cropped, result_stride = crop_stride;
        } else {
            result = band + (size_t)(top - band_row0) * band_stride, result_stride = band_stride;
        }
    } else {
        /* Vertical pass over the input columns the horizontal pass reads. */
        const int column_first = resize_columns ? columns.first[0] : left;
        const int column_count = resize_columns
                                     ? columns.first[crop_width - 1] + columns.used[crop_width - 1] - column_first
                                     : crop_width;
        const uint8_t *band = src + (size_t)top * stride; /* crop rows; columns from absolute band_column0 */
        size_t band_stride = stride;
        int band_column0 = 0;
        if (resize_rows) {
            const size_t middle_stride = (size_t)column_count * 3;
            middle = malloc((size_t)crop_height * middle_stride);
            sum = malloc(sizeof(int32_t) * middle_stride);
            if (!middle || !sum) {
                goto done;
            }
            vertical_pass(src + (size_t)column_first * 3, stride, &rows, 0, (int)middle_stride, crop_height, middle,
                          middle_stride, sum);
            band = middle, band_stride = middle_stride, band_column0 = column_first;
        }
        if (resize_columns) {
            if (!horizontal_pass(band, band_stride, &columns, band_column0, crop_height, crop_width, cropped,
                                 crop_stride)) {
                goto done;
            }
            result = cropped, result_stride = crop_stride;
        } else {
            result = band + (size_t)(left - band_column0) * 3, result_stride = band_stride;
        }
    }

    /* The normalisation table, into [3, crop_height, crop_width]. */
    const size_t plane = (size_t)crop_width * crop_height;
    for (int y = 0; y < crop_height; y++) {
        const uint8_t *line = result + (size_t)y * result_stride;
        float *red = out + (size_t)y * crop_width, *green = red + plane, *blue = green + plane;
        for (int x = 0; x < crop_width; x++) {
            red[x] = table[line[x * 3]];
            green[x] = table[256 + line[x * 3 + 1]];
            blue[x] = table[512 + line[x * 3 + 2]];
        }
    }
    ok = 1;
done:
    kernel_free(&columns);
    kernel_free(&rows);
    free(middle);
    free(cropped);
    free(sum);
    return ok;
}

static PyObject *
py_resize_crop_normalize(PyObject *self, PyObject *args) {
    Py_buffer src, table, out;
    int height, width, out_width, out_height, left, top, crop_width, crop_height, vertical_first, ok;
    if (!PyArg_ParseTuple(args, "y*iiiiiiiipy*w*", &src, &height, &width, &out_width, &out_height, &left, &top,
                          &crop_width, &crop_height, &vertical_first, &table, &out)) {
        return NULL;
    }
    const char *problem = NULL;
    if (height <= 0 || width <= 0 || out_width <= 0 || out_height <= 0 || crop_width <= 0 || crop_height <= 0) {
        problem = "sizes must be positive";
    } else if (src.len != (Py_ssize_t)height * width * 3) {
        problem = "src must hold height * width * 3 bytes (RGB)";
    } else if (left < 0 || top < 0 || left + crop_width > out_width || top + crop_height > out_height) {
        problem = "the crop must lie inside the resized image";
    } else if (table.len != 3 * 256 * (Py_ssize_t)sizeof(float)) {
        problem = "table must hold 3 x 256 float32";
    } else if (out.len != 3 * (Py_ssize_t)crop_width * crop_height * (Py_ssize_t)sizeof(float)) {
        problem = "out must hold 3 x crop_height x crop_width float32";
    }
    if (problem) {
        PyBuffer_Release(&src);
        PyBuffer_Release(&table);
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, problem);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    ok = resize_crop_normalize(src.buf, height, width, out_width, out_height, left, top, crop_width, crop_height,
                               vertical_first, table.buf, out.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&src);
    PyBuffer_Release(&table);
    PyBuffer_Release(&out);
    if (!ok) {
        return PyErr_NoMemory();
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"resize_crop_normalize", py_resize_crop_normalize, METH_VARARGS,
     "resize_crop_normalize(src, height, width, out_width, out_height, left, top, crop_width, crop_height, "
     "vertical_first, table, out): bicubic resize of RGB bytes to out_width x out_height as Pillow does "
     "(vertical pass first if vertical_first), keep the crop, write table[c][value] into out as "
     "[3, crop_height, crop_width] float32."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_resample", NULL, -1, methods};

PyMODINIT_FUNC
PyInit__resample(void) {
    return PyModule_Create(&module);
}
