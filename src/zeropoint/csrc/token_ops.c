/* The compact runtime's per-token operations: the small steps of one decoder position at
 * batch 1, float32 (nn/compact_runtime.py): RMSNorm, rotary embedding and attention over the KV
 * cache (with the per-head q/k norms, sliding windows and soft-capping some families have),
 * SiLU or GELU-tanh gating. At one row each is a few thousand flops; as torch calls they cost
 * ~5 us of dispatch apiece, about 20 a layer, which was as long as reading the layer's int4
 * weights. The arithmetic follows transformers' modules in float32 (the order of a sum may
 * differ: tests hold the logits to the HF model's). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "zeropoint.h"

/* e^a for a <= 0 (below -87 taken as -87, e^-87 ~ 1.6e-38), within ~2 ulp: a = k ln2 + r,
 * |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial, times 2^k put in the exponent bits.
 * Plain float arithmetic that gcc vectorizes: libm's expf and tanhf are a call per element,
 * which made the gates 5x slower (tests/nn/test_token_ops_math.py holds both to float64). */
static inline float exp_nonpositive(float a) {
  a = a < -87.0f ? -87.0f : a;
  const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
  const float k = (a * 1.44269504088896341f + shifter) - shifter;
  const float r = (a - k * 0.693145751953125f) - k * 1.428606765330187045e-06f; /* ln2 hi, lo */
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = ((int32_t)k + 127) << 23;
  float two_k;
  memcpy(&two_k, &bits, sizeof two_k);
  return p * two_k;
}

/* sum of a[i] * b[i] in 16 partial sums (a fixed order, which gcc vectorizes): one float sum
 * is a chain of dependent adds, 4 cycles each; at Gemma 3's head_dim 256 that chain made the
 * attention scores as slow as the layer's int4 matmuls. */
static float dot_f32(const float *a, const float *b, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
  float total = 0.0f;
  for (; i < n; i++) total += a[i] * b[i];
  for (int j = 0; j < 16; j++) total += acc[j];
  return total;
}

/* h += delta (when delta is not NULL: the residual add), then x = w * (h * rsqrt(mean(h^2) + eps))
 * as LlamaRMSNorm computes it. */
void zp_add_rmsnorm(float *h, const float *delta, const float *w, float eps, int64_t n,
                    float *x) {
  if (delta)
    for (int64_t i = 0; i < n; i++) h[i] += delta[i];
  const float ss = dot_f32(h, h, n);
  const float r = 1.0f / sqrtf(ss / (float)n + eps);
  for (int64_t i = 0; i < n; i++) x[i] = w[i] * (h[i] * r);
}

/* x * cos + rotate_half(x) * sin for one head vector of d values, in place; rotate_half(x) =
 * (-x2, x1), so with sin_signed = (-sin[:d/2], sin[d/2:]) it is swap_halves(x) * sin_signed. */
static void rotate(float *x, const float *cos, const float *sin_signed, int64_t d) {
  const int64_t half = d / 2;
  for (int64_t i = 0; i < half; i++) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] + b * sin_signed[i];
    x[i + half] = b * cos[i + half] + a * sin_signed[i + half];
  }
}

/* g = silu(g) * u = g * sigmoid(g) * u: LlamaMLP's act_fn(gate) * up. With t = e^-|g|,
 * sigmoid(g) is 1 / (1 + t) for g >= 0 and t / (1 + t) below: e^x never overflows. */
void zp_silu_mul(float *g, const float *u, int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    const float x = g[i], t = exp_nonpositive(-fabsf(x));
    g[i] = x * ((x >= 0.0f ? 1.0f : t) / (1.0f + t)) * u[i];
  }
}

/* ---- the family-general step (nn/compact_runtime.py's CompactDecoder) ---- */

/* x = w * (x * rsqrt(mean(x^2) + eps)) in place over one head of d values: Qwen3's and Gemma 3's
 * per-head q/k norm (w already holds Gemma's 1 + weight). */
static void head_rmsnorm(float *x, const float *w, float eps, int64_t d) {
  const float r = 1.0f / sqrtf(dot_f32(x, x, d) / (float)d + eps);
  for (int64_t i = 0; i < d; i++) x[i] = w[i] * (x[i] * r);
}

/* One position's attention for any of the decoder's families. `qkv` is the q/k/v projection's
 * output at position `pos`: n_heads query heads, then n_kv key heads, then n_kv value heads, d
 * values each; the cache keeps keys and values only, `k_cache` and `v_cache` each (positions,
 * n_kv, d) for this layer. In order, as transformers' attention modules do it:
 * - q_norm / k_norm (NULL: none): each query / key head RMS-normalized (eps) times its weight;
 * - rotary embedding of the first `rot` values of each query and key head (cos, sin_signed:
 *   this position's rot values, sin_signed as rotate() takes it); rot < d leaves the rest as is;
 * - the key and value heads written into the cache at `pos`;
 * - every query head h attends over positions start..pos of kv head h / (n_heads / n_kv), where
 *   start = pos - window + 1 with a sliding window (window > 0: keys within `window` positions,
 *   the query's own included), else 0: scores q . k * scale, with soft-capping (softcap > 0)
 *   tanh(score / softcap) * softcap, then softmax, then the weighted sum of the values -> out[h].
 * The query heads are normalized and rotated in place in qkv. scores: room for pos + 1 floats. */
void zp_decoder_attend(float *qkv, float *k_cache, float *v_cache, int64_t pos, int64_t n_heads,
                       int64_t n_kv, int64_t d, int64_t rot, const float *cos,
                       const float *sin_signed, const float *q_norm, const float *k_norm,
                       float eps, float scale, float softcap, int64_t window, float *scores,
                       float *out) {
  const int64_t group = n_heads / n_kv, row = n_kv * d;
  float *k_now = qkv + n_heads * d, *v_now = k_now + row;
  for (int64_t h = 0; h < n_heads + n_kv; h++) {
    float *x = qkv + h * d;
    const float *w = h < n_heads ? q_norm : k_norm;
    if (w) head_rmsnorm(x, w, eps, d);
    rotate(x, cos, sin_signed, rot);
  }
  for (int64_t i = 0; i < row; i++) {
    k_cache[pos * row + i] = k_now[i];
    v_cache[pos * row + i] = v_now[i];
  }
  const int64_t start = window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0;
  for (int64_t h = 0; h < n_heads; h++) {
    const float *q = qkv + h * d;
    const int64_t kv = h / group;
    float top = -INFINITY;
    for (int64_t t = start; t <= pos; t++) {
      const float *k = k_cache + t * row + kv * d;
      float s = dot_f32(q, k, d) * scale;
      if (softcap > 0.0f) s = tanhf(s / softcap) * softcap;
      scores[t] = s;
      top = s > top ? s : top;
    }
    float total = 0.0f;
    for (int64_t t = start; t <= pos; t++) {
      scores[t] = expf(scores[t] - top);
      total += scores[t];
    }
    float *o = out + h * d;
    for (int64_t i = 0; i < d; i++) o[i] = 0.0f;
    for (int64_t t = start; t <= pos; t++) {
      const float p = scores[t] / total;
      const float *v = v_cache + t * row + kv * d;
      for (int64_t i = 0; i < d; i++) o[i] += p * v[i];
    }
  }
}

/* g = gelu_tanh(g) * u, gelu_tanh(x) = x / 2 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))):
 * Gemma's MLP act_fn(gate) * up with transformers' "gelu_pytorch_tanh" (torch's
 * gelu(approximate="tanh")), tanh from exp_nonpositive. */
void zp_gelu_tanh_mul(float *g, const float *u, int64_t n) {
  const float beta = 0.7978845608028654f, kappa = 0.044715f;
  for (int64_t i = 0; i < n; i++) {
    const float x = g[i], y = beta * (x + kappa * (x * x * x));
    const float t = exp_nonpositive(-2.0f * fabsf(y)); /* tanh|y| = (1 - t) / (1 + t) */
    g[i] = 0.5f * x * (1.0f + copysignf((1.0f - t) / (1.0f + t), y)) * u[i];
  }
}
