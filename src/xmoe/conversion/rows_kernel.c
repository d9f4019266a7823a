/* xmoe's native decode kernels (xmoe.conversion.rows_kernel builds and loads them). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* out[0, r) = sum over i < n with keep[i] of a[i] * rows[i, :]; rows row-major (n, r).
   Returns -1 when the index buffers cannot be allocated, else 0. */
int xmoe_kept_rows_sum_f32(const float *a, const uint8_t *keep, int64_t n, const float *rows,
                           int64_t r, float *out) {
    int64_t *idx = malloc((n + 1) * sizeof *idx);
    float *w = malloc((n + 1) * sizeof *w);
    if (!idx || !w) { free(idx); free(w); return -1; }
    int64_t count = 0;
    for (int64_t i = 0; i < n; ++i)
        if (keep[i]) { idx[count] = i; w[count] = a[i]; ++count; }
    for (int64_t c = 0; c < r; ++c) out[c] = 0;
    int64_t k = 0;
    for (; k + 8 <= count; k += 8) {  /* eight rows per pass: out is read and written once */
        const float *p[8];
        float v[8];
        for (int j = 0; j < 8; ++j) { p[j] = rows + idx[k + j] * r; v[j] = w[k + j]; }
        for (int64_t c = 0; c < r; ++c)
            out[c] += v[0] * p[0][c] + v[1] * p[1][c] + v[2] * p[2][c] + v[3] * p[3][c]
                    + v[4] * p[4][c] + v[5] * p[5][c] + v[6] * p[6][c] + v[7] * p[7][c];
    }
    for (; k < count; ++k) {
        const float v = w[k], *p = rows + idx[k] * r;
        for (int64_t c = 0; c < r; ++c) out[c] += v * p[c];
    }
    free(idx);
    free(w);
    return 0;
}

/* out[i] = keep[i] ? dot(rows[i, :], x) : 0 for i < n; rows row-major (n, r). Four kept rows
   per pass, each summed in one 8-float vector (GNU C vector extension: the compiler does not
   vectorise a reduction on its own): four row streams in flight keep the memory busy where one
   row at a time waits for each row's first lines. */
typedef float xmoe_v8 __attribute__((vector_size(32)));

static inline xmoe_v8 xmoe_load8(const float *p) {
    xmoe_v8 v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static float xmoe_dot_rest(xmoe_v8 acc, const float *p, const float *x, int64_t from, int64_t r) {
    float sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (int64_t c = from; c < r; ++c) sum += p[c] * x[c];
    return sum;
}

void xmoe_kept_rows_dot_f32(const float *x, const uint8_t *keep, int64_t n, const float *rows,
                            int64_t r, float *out) {
    const int64_t body = r - r % 8;
    int64_t idx[8], count = 0;
    for (int64_t i = 0; i <= n; ++i) {
        if (i < n) {
            out[i] = 0;
            if (!keep[i]) continue;
            idx[count++] = i;
            if (count < 8) continue;
        }
        xmoe_v8 acc[8] = {{0}};
        const float *p[8];
        for (int k = 0; k < count; ++k) p[k] = rows + idx[k] * r;
        if (count == 8) {
            for (int64_t c = 0; c < body; c += 8) {
                const xmoe_v8 v = xmoe_load8(x + c);
                for (int k = 0; k < 8; ++k) acc[k] += xmoe_load8(p[k] + c) * v;
            }
        } else {
            for (int k = 0; k < count; ++k)
                for (int64_t c = 0; c < body; c += 8) acc[k] += xmoe_load8(p[k] + c) * xmoe_load8(x + c);
        }
        for (int k = 0; k < count; ++k) out[idx[k]] = xmoe_dot_rest(acc[k], p[k], x, body, r);
        count = 0;
    }
}

/* One token through a SwiGLU MLP with thresholded inputs, reading the kept rows only: the
   masks, kept-row sums and dot products above in one call (each torch op and ctypes call a
   decode step saves is microseconds, and a layer's whole MLP is a few hundred).
   sites: 1 masks the channels of x (|x_j| * scale_x[j] >= thr_x), 2 the neurons entering down
   (|h_i| * scale_n[i] >= thr_n), 4 the neurons by their gate (gate-first:
   |silu(g_i)| * scale_n[i] >= thr_n, before up). first: (d, 2f) gate then up per channel, or
   gate-first (d, f) gate alone, with up (f, d) per neuron; down (f, d) per neuron. Writes out
   (d), keep_x (d) and keep_n (f) (1 kept), using work (2f + d floats). Returns 0, or -1 when
   the index buffers cannot be allocated. */
int xmoe_neuron_mlp_decode_f32(const float *x, int64_t d, int64_t f, int sites,
                               const float *scale_x, float thr_x, const float *first,
                               const float *up, const float *scale_n, float thr_n,
                               const float *down, float *out, uint8_t *keep_x, uint8_t *keep_n,
                               float *work) {
    const int gate_first = (sites & 4) != 0;
    float *gu = work, *h = work, *xm = work + 2 * f;
    for (int64_t j = 0; j < d; ++j) {
        keep_x[j] = !(sites & 1) || fabsf(x[j]) * scale_x[j] >= thr_x;
        xm[j] = keep_x[j] ? x[j] : 0.0f;
    }
    if (xmoe_kept_rows_sum_f32(x, keep_x, d, first, gate_first ? f : 2 * f, gu) != 0) return -1;
    for (int64_t i = 0; i < f; ++i) {
        const float g = gu[i], act = g / (1.0f + expf(-g));
        if (gate_first) {
            keep_n[i] = fabsf(act) * scale_n[i] >= thr_n;
            h[i] = act;
        } else {
            h[i] = act * gu[f + i];
            keep_n[i] = !(sites & 2) || fabsf(h[i]) * scale_n[i] >= thr_n;
        }
    }
    if (gate_first) {
        float *u = work + f;
        xmoe_kept_rows_dot_f32(xm, keep_n, f, up, d, u);
        for (int64_t i = 0; i < f; ++i) h[i] *= u[i];
    }
    return xmoe_kept_rows_sum_f32(h, keep_n, f, down, d, out);
}
