// One LSTM layer over all timesteps as one CPU call, forward and backward (XLA FFI handlers).
//
// Layout (row-major, gates i, f, g, o along the last axis, as lstm_jax.recurrence):
//   forward   xproj (T, B, 4H), w_rec (H, 4H), h0 (B, H), c0 (B, H)
//             -> h_all (T+1, B, H) = h_0..h_T, c_all (T+1, B, H) = c_0..c_T,
//                act (T, B, 4H) = the gate activations sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)
//   backward  w_rec, c_all, act, d_hs (T, B, H), dh_T (B, H), dc_T (B, H)
//             -> dgates (T, B, 4H) (= d xproj), dh0 (B, H), dc0 (B, H)
// The weight gradient dW_rec = h_all[:-1]^T . dgates is one large GEMM, left to XLA by the caller.
//
// The SIMD path (AVX-512: hidden_size a multiple of 16; AVX2 with FMA: a multiple of 8): W_rec
// is packed once per call into panels (forward: the i, f, g, o columns of one vector's worth of
// units side by side, so one register tile holds whole cells; backward: rows of W_rec, i.e. W^T,
// for 1-4 vectors of units) and reused at every timestep. Each timestep runs a register-blocked
// microkernel (`mac`: rows x vectors of float32 accumulators, FMA with a broadcast, sized to the
// register file: up to 6x4 on AVX-512, 3x4 or 6x2 on AVX2; for bfloat16, AVX-512 only, the
// AVX512-BF16 dot product on pairs of the inner dimension, float32 accumulation) and applies the
// gate math to the tile while it is still in registers: no (B, 4H) gate array goes through memory
// between the matmul and the cell update. Panels are split over `threads` OpenMP threads; the
// timesteps are sequential.
// Elsewhere (no AVX2, or another hidden_size) each timestep is one sgemm of the BLAS the
// loader hands over (scipy's OpenBLAS) followed by one fused pass of scalar gate math.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <vector>

#include "xla/ffi/api/ffi.h"

#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#define LSTM_JAX_SIMD 16
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LSTM_JAX_SIMD 8
#else
#define LSTM_JAX_SIMD 0
#endif
#if LSTM_JAX_SIMD == 16 && defined(__AVX512BF16__)
#define LSTM_JAX_HAVE_BF16 1
#else
#define LSTM_JAX_HAVE_BF16 0
#endif

namespace ffi = xla::ffi;

using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*,
                          const float*, const float*, const int*, const float*, const int*,
                          const float*, float*, const int*);
using set_threads_fn = int (*)(int);

static sgemm_fn g_sgemm = nullptr;
static set_threads_fn g_set_threads_local = nullptr;

extern "C" __attribute__((visibility("default"))) int lstm_jax_native_init(void* sgemm, void* set_threads_local) {
  g_sgemm = reinterpret_cast<sgemm_fn>(sgemm);
  g_set_threads_local = reinterpret_cast<set_threads_fn>(set_threads_local);
  return g_sgemm != nullptr;
}

extern "C" __attribute__((visibility("default"))) int lstm_jax_native_has_bf16() { return LSTM_JAX_HAVE_BF16; }
extern "C" __attribute__((visibility("default"))) int lstm_jax_native_simd_width() { return LSTM_JAX_SIMD; }

namespace {

// exp for float32, vectorisable (Cephes' expf: Cody-Waite reduction, degree-6 polynomial,
// ~1 ulp). NaN stays NaN (the comparisons below are false for NaN), so a diverged step still
// shows a NaN loss.
inline float exp_f(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float sigmoid_f(float x) { return 1.0f / (1.0f + exp_f(-x)); }
inline float tanh_f(float x) { return 2.0f / (1.0f + exp_f(-2.0f * x)) - 1.0f; }

// Gate math of one timestep over the (B, 4H) tile `a` (pre-activations in, activations out).
void gates_forward(float* a, const float* c_prev, float* c, float* h, int64_t B, int64_t H) {
  for (int64_t b = 0; b < B; ++b) {
    float* ai = a + b * 4 * H;
    float* af = ai + H;
    float* ag = ai + 2 * H;
    float* ao = ai + 3 * H;
    const float* cp = c_prev + b * H;
    float* cb = c + b * H;
    float* hb = h + b * H;
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      const float i = sigmoid_f(ai[j]), f = sigmoid_f(af[j]), g = tanh_f(ag[j]),
                  o = sigmoid_f(ao[j]);
      const float cn = f * cp[j] + i * g;
      ai[j] = i;
      af[j] = f;
      ag[j] = g;
      ao[j] = o;
      cb[j] = cn;
      hb[j] = o * tanh_f(cn);
    }
  }
}

// Gate derivatives of one timestep: dh (B, H) is d loss / d h_t, dc (B, H) holds d loss / d c_t
// from later steps and leaves with d loss / d c_{t-1}; writes d pre-activations into `dg`.
void gates_backward(const float* act, const float* c, const float* c_prev, const float* dh,
                    float* dc, float* dg, int64_t B, int64_t H) {
  for (int64_t b = 0; b < B; ++b) {
    const float* ai = act + b * 4 * H;
    const float* af = ai + H;
    const float* ag = ai + 2 * H;
    const float* ao = ai + 3 * H;
    float* di = dg + b * 4 * H;
    float* df = di + H;
    float* dgg = di + 2 * H;
    float* dO = di + 3 * H;
    const float* cb = c + b * H;
    const float* cp = c_prev + b * H;
    const float* dhb = dh + b * H;
    float* dcb = dc + b * H;
#pragma GCC ivdep
    for (int64_t j = 0; j < H; ++j) {
      const float i = ai[j], f = af[j], g = ag[j], o = ao[j];
      const float tc = tanh_f(cb[j]);
      const float d_h = dhb[j];
      const float d_c = dcb[j] + d_h * o * (1.0f - tc * tc);
      di[j] = d_c * g * i * (1.0f - i);
      df[j] = d_c * cp[j] * f * (1.0f - f);
      dgg[j] = d_c * i * (1.0f - g * g);
      dO[j] = d_h * tc * o * (1.0f - o);
      dcb[j] = d_c * f;
    }
  }
}

// Sets OpenBLAS's thread count for this calling thread for one call's lifetime.
struct BlasThreads {
  int previous = -1;
  explicit BlasThreads(int n) {
    if (g_set_threads_local != nullptr && n > 0) previous = g_set_threads_local(n);
  }
  ~BlasThreads() {
    if (g_set_threads_local != nullptr && previous > 0) g_set_threads_local(previous);
  }
};


#if LSTM_JAX_SIMD
// --- the SIMD path (AVX-512: vectors of 16 floats; AVX2 + FMA: 8): W_rec packed once per call
// into panels, a register-blocked kernel per timestep with the gate math applied to the tile
// while it is still in registers. ------------------------------------------------------------

#if LSTM_JAX_SIMD == 16
using vf = __m512;
constexpr int kW = 16;       // floats per vector
constexpr int kFwdRows = 6;  // forward tile: 6 rows x 4 gates = 24 of the 32 registers
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vset(float x) { return _mm512_set1_ps(x); }
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }    // a*b + c
inline vf vfnma(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a*b
inline vf vround(vf x) {
  return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline vf vscale2(vf p, vf n) { return _mm512_scalef_ps(p, n); }  // p * 2^n
#else
using vf = __m256;
constexpr int kW = 8;
constexpr int kFwdRows = 3;  // forward tile: 3 rows x 4 gates (12 of the 16 registers)
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vset(float x) { return _mm256_set1_ps(x); }
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vfnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }
inline vf vround(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vscale2(vf p, vf n) {  // n is integral in [-126, 127] here: build 2^n's exponent bits
  const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(e, 23)));
}
#endif

inline vf vexp(vf x) {
  // NaN passes through max/min (they return the second operand when either is NaN).
  x = vmax(vset(-87.0f), x);
  x = vmin(vset(88.0f), x);
  const vf n = vround(vmul(x, vset(1.44269504088896341f)));
  vf r = vfnma(n, vset(0.693359375f), x);
  r = vfnma(n, vset(-2.12194440e-4f), r);
  vf p = vset(1.9875691500e-4f);
  p = vfma(p, r, vset(1.3981999507e-3f));
  p = vfma(p, r, vset(8.3334519073e-3f));
  p = vfma(p, r, vset(4.1665795894e-2f));
  p = vfma(p, r, vset(1.6666665459e-1f));
  p = vfma(p, r, vset(5.0000001201e-1f));
  p = vfma(vmul(p, r), r, vadd(r, vset(1.0f)));
  return vscale2(p, n);
}
inline vf vsigmoid(vf x) {
  const vf one = vset(1.0f);
  return vdiv(one, vadd(one, vexp(vsub(vzero(), x))));
}
inline vf vtanh(vf x) {
  const vf one = vset(1.0f);
  return vsub(vdiv(vset(2.0f), vadd(one, vexp(vmul(vset(-2.0f), x)))), one);
}

inline uint16_t to_bf16(float v) {  // round to nearest even
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

// The left operand of one timestep's GEMM, (B, K) rows: float32, or bfloat16 pairs along K.
struct Lhs {
  const float* f32 = nullptr;
  const uint32_t* pairs = nullptr;
  int64_t ld = 0;  // row stride, in elements (float32) or pairs (bfloat16)
};

// Panels of the right operand: panel p holds the NV*kW columns it produces, row k after row k
// (float32: [p][k][NV*kW]; bfloat16 (kW = 16): [p][k/2][NV*16][2], two K rows interleaved as dpbf16ps
// reads them). `col(p, c)` names the source column of W for column c of panel p.
template <typename Col>
std::vector<float> pack_f32(const float* w, int64_t ldw, int64_t K, int64_t panels, int width,
                            bool transposed, Col col) {
  std::vector<float> out(static_cast<size_t>(panels * K * width));
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t k = 0; k < K; ++k)
      for (int c = 0; c < width; ++c) {
        const int64_t n = col(p, c);
        out[(p * K + k) * width + c] = transposed ? w[n * ldw + k] : w[k * ldw + n];
      }
  return out;
}

template <typename Col>
std::vector<uint16_t> pack_bf16(const float* w, int64_t ldw, int64_t K, int64_t panels, int width,
                                bool transposed, Col col) {
  const int64_t K2 = K / 2;  // K is even (H a multiple of 16)
  std::vector<uint16_t> out(static_cast<size_t>(panels * K2 * width * 2));
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t k = 0; k < K; ++k)
      for (int c = 0; c < width; ++c) {
        const int64_t n = col(p, c);
        const float v = transposed ? w[n * ldw + k] : w[k * ldw + n];
        out[((p * K2 + k / 2) * width + c) * 2 + (k % 2)] = to_bf16(v);
      }
  return out;
}

// Rows of x (M, K) as bfloat16 pairs, rows [m0, m1).
void rows_to_pairs(const float* x, int64_t K, int64_t m0, int64_t m1, uint32_t* out) {
  const int64_t K2 = K / 2;
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t k2 = 0; k2 < K2; ++k2)
      out[m * K2 + k2] = static_cast<uint32_t>(to_bf16(x[m * K + 2 * k2])) |
                         (static_cast<uint32_t>(to_bf16(x[m * K + 2 * k2 + 1])) << 16);
}

struct Rhs {
  const float* f32 = nullptr;
  const uint16_t* bf16 = nullptr;
  int64_t K = 0;  // the contraction length (float32 rows)
};

// acc[r][v] += lhs rows [b0, b0+R) . panel p (NV vectors of kW columns).
template <int R, int NV>
inline void mac(const Lhs& a, const Rhs& w, int64_t b0, int64_t p, vf (&acc)[R][NV]) {
  if (w.bf16 == nullptr) {
    const float* wp = w.f32 + p * w.K * NV * kW;
    const float* x = a.f32 + b0 * a.ld;
    for (int64_t k = 0; k < w.K; ++k) {
      vf wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = vload(wp + k * NV * kW + kW * v);
      for (int r = 0; r < R; ++r) {
        const vf xv = vset(x[r * a.ld + k]);
        for (int v = 0; v < NV; ++v) acc[r][v] = vfma(xv, wv[v], acc[r][v]);
      }
    }
    return;
  }
#if LSTM_JAX_HAVE_BF16
  const int64_t K2 = w.K / 2;
  const uint16_t* wp = w.bf16 + p * K2 * NV * 32;
  const uint32_t* x = a.pairs + b0 * a.ld;
  for (int64_t k2 = 0; k2 < K2; ++k2) {
    __m512bh wv[NV];
    for (int v = 0; v < NV; ++v)
      wv[v] = (__m512bh)_mm512_loadu_si512(wp + k2 * NV * 32 + 32 * v);
    for (int r = 0; r < R; ++r) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * a.ld + k2]));
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], xv, wv[v]);
    }
  }
#endif
}

// Calls f(std::integral_constant<int, R>, b0) over row blocks of RMAX rows, then the remainder.
template <int N, typename F>
inline void remainder_block(int n, int64_t b0, F& f) {
  if constexpr (N > 0) {
    if (n == N) f(std::integral_constant<int, N>{}, b0);
    else remainder_block<N - 1>(n, b0, f);
  }
}
template <int RMAX, typename F>
inline void for_row_blocks(int64_t B, F&& f) {
  int64_t b0 = 0;
  for (; b0 + RMAX <= B; b0 += RMAX) f(std::integral_constant<int, RMAX>{}, b0);
  remainder_block<RMAX - 1>(static_cast<int>(B - b0), b0, f);
}

// Forward of one timestep for the kW units of panel p and rows [b0, b0+R): gates = xproj_t +
// h_{t-1} . W, then the cell, all in registers.
template <int R>
inline void forward_block(const Lhs& h_prev, const Rhs& w, int64_t p, int64_t b0, int64_t H,
                          const float* xp_t, const float* c_prev, float* c_next, float* h_next,
                          float* act_t) {
  vf acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < 4; ++g)
      acc[r][g] = vload(xp_t + (b0 + r) * 4 * H + g * H + kW * p);
  mac<R, 4>(h_prev, w, b0, p, acc);
  for (int r = 0; r < R; ++r) {
    const vf i = vsigmoid(acc[r][0]), f = vsigmoid(acc[r][1]), g = vtanh(acc[r][2]),
                 o = vsigmoid(acc[r][3]);
    const int64_t off = (b0 + r) * H + kW * p;
    const vf c = vfma(f, vload(c_prev + off), vmul(i, g));
    float* a = act_t + (b0 + r) * 4 * H + kW * p;
    vstore(a, i);
    vstore(a + H, f);
    vstore(a + 2 * H, g);
    vstore(a + 3 * H, o);
    vstore(c_next + off, c);
    vstore(h_next + off, vmul(o, vtanh(c)));
  }
}

// Backward of one timestep for the NV*kW units of panel q and rows [b0, b0+R): dh_t = d_hs[t]
// (+ dh_T at the last step) + dgates_{t+1} . W^T, then the gate derivatives of step t into
// dg_t and dc (d c_t in, d c_{t-1} out). With t < 0 the tile is dh0 and is stored as is.
struct BackwardStep {
  const Lhs* dg_next;      // null at t = T-1
  const float* dh_ext[2];  // added to the tile (d_hs[t], dh_T), null where absent
  const float* act_t;
  const float* c_t;
  const float* c_prev;
  float* dc;
  float* dg_t;   // null: store the tile into dh0
  float* dh0;
};

template <int R, int NV>
inline void backward_block(const BackwardStep& s, const Rhs& w, int64_t q, int64_t b0, int64_t H) {
  vf acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      const int64_t off = (b0 + r) * H + q * NV * kW + kW * v;
      vf x = vzero();
      for (const float* e : s.dh_ext)
        if (e != nullptr) x = vadd(x, vload(e + off));
      acc[r][v] = x;
    }
  if (s.dg_next != nullptr) mac<R, NV>(*s.dg_next, w, b0, q, acc);
  const vf one = vset(1.0f);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      const int64_t j = q * NV * kW + kW * v, off = (b0 + r) * H + j;
      if (s.dg_t == nullptr) {
        vstore(s.dh0 + off, acc[r][v]);
        continue;
      }
      const float* a = s.act_t + (b0 + r) * 4 * H + j;
      const vf i = vload(a), f = vload(a + H),
                   g = vload(a + 2 * H), o = vload(a + 3 * H);
      const vf tc = vtanh(vload(s.c_t + off));
      const vf d_h = acc[r][v];
      const vf d_c = vfma(vmul(d_h, o), vfnma(tc, tc, one),
                                         vload(s.dc + off));
      float* d = s.dg_t + (b0 + r) * 4 * H + j;
      vstore(d, vmul(vmul(d_c, g), vmul(i, vsub(one, i))));
      vstore(d + H, vmul(vmul(d_c, vload(s.c_prev + off)),
                                            vmul(f, vsub(one, f))));
      vstore(d + 2 * H, vmul(vmul(d_c, i), vfnma(g, g, one)));
      vstore(d + 3 * H, vmul(vmul(d_h, tc),
                                                vmul(o, vsub(one, o))));
      vstore(s.dc + off, vmul(d_c, f));
    }
}

void forward_simd(const float* xproj, const float* w, float* hs, float* cs, float* act,
                    int64_t T, int64_t B, int64_t H, int threads, bool bf16) {
  const int64_t panels = H / kW;
  // Panel p: gate columns i, f, g, o of units kW*p.. kW*p+kW-1, so each tile holds whole cells.
  auto col = [H](int64_t p, int c) { return (c / kW) * H + kW * p + c % kW; };
  std::vector<float> wf;
  std::vector<uint16_t> wb;
  std::vector<uint32_t> hp;
  Rhs rhs;
  rhs.K = H;
  if (bf16) {
    wb = pack_bf16(w, 4 * H, H, panels, 4 * kW, false, col);
    rhs.bf16 = wb.data();
    hp.resize(static_cast<size_t>(B * H / 2));
  } else {
    wf = pack_f32(w, 4 * H, H, panels, 4 * kW, false, col);
    rhs.f32 = wf.data();
  }
#pragma omp parallel num_threads(threads) if (threads > 1)
  for (int64_t t = 0; t < T; ++t) {
    Lhs lhs;
    if (bf16) {
#pragma omp for schedule(static)
      for (int64_t b = 0; b < B; ++b) rows_to_pairs(hs + t * B * H, H, b, b + 1, hp.data());
      lhs.pairs = hp.data();
      lhs.ld = H / 2;
    } else {
      lhs.f32 = hs + t * B * H;
      lhs.ld = H;
    }
#pragma omp for schedule(static)
    for (int64_t p = 0; p < panels; ++p)
      for_row_blocks<kFwdRows>(B, [&](auto R, int64_t b0) {
        forward_block<decltype(R)::value>(lhs, rhs, p, b0, H, xproj + t * B * 4 * H,
                                          cs + t * B * H, cs + (t + 1) * B * H,
                                          hs + (t + 1) * B * H, act + t * B * 4 * H);
      });
  }
}

template <int NV, int RMAX>
void backward_simd_nv(const float* w, const float* cs, const float* act, const float* dhs,
                        const float* dh_T, float* dg, float* dh0, float* dc, int64_t T, int64_t B,
                        int64_t H, int threads, bool bf16) {
  const int64_t panels = H / (kW * NV);
  // Panel q: units q*kW*NV.. of dh, i.e. rows of W read along the 4H gate columns (W^T).
  auto col = [](int64_t q, int c) { return q * kW * NV + c; };
  std::vector<float> wf;
  std::vector<uint16_t> wb;
  std::vector<uint32_t> gp;
  Rhs rhs;
  rhs.K = 4 * H;
  if (bf16) {
    wb = pack_bf16(w, 4 * H, 4 * H, panels, kW * NV, true, col);
    rhs.bf16 = wb.data();
    gp.resize(static_cast<size_t>(B * 2 * H));
  } else {
    wf = pack_f32(w, 4 * H, 4 * H, panels, kW * NV, true, col);
    rhs.f32 = wf.data();
  }
#pragma omp parallel num_threads(threads) if (threads > 1)
  for (int64_t t = T - 1; t >= -1; --t) {
    Lhs lhs;
    BackwardStep s{};
    if (t < T - 1) {
      const float* g = dg + (t + 1) * B * 4 * H;
      if (bf16) {
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; ++b) rows_to_pairs(g, 4 * H, b, b + 1, gp.data());
        lhs.pairs = gp.data();
        lhs.ld = 2 * H;
      } else {
        lhs.f32 = g;
        lhs.ld = 4 * H;
      }
      s.dg_next = &lhs;
    }
    s.dh_ext[0] = t >= 0 ? dhs + t * B * H : nullptr;
    s.dh_ext[1] = t == T - 1 ? dh_T : nullptr;
    if (t >= 0) {
      s.act_t = act + t * B * 4 * H;
      s.c_t = cs + (t + 1) * B * H;
      s.c_prev = cs + t * B * H;
      s.dg_t = dg + t * B * 4 * H;
    }
    s.dc = dc;
    s.dh0 = dh0;
#pragma omp for schedule(static)
    for (int64_t q = 0; q < panels; ++q)
      for_row_blocks<RMAX>(B, [&](auto R, int64_t b0) {
        backward_block<decltype(R)::value, NV>(s, rhs, q, b0, H);
      });
  }
}

// Backward tiles: rows x vectors of accumulators, with the weight vectors and one broadcast, in
// the register file (AVX-512: 32 registers, 6x4 or 12x2; AVX2: 16 registers, 6x2 or 12x1).
void backward_simd(const float* w, const float* cs, const float* act, const float* dhs,
                   const float* dh_T, float* dg, float* dh0, float* dc, int64_t T, int64_t B,
                   int64_t H, int threads, bool bf16) {
#if LSTM_JAX_SIMD == 16
  if (H % 64 == 0)
    backward_simd_nv<4, 6>(w, cs, act, dhs, dh_T, dg, dh0, dc, T, B, H, threads, bf16);
  else if (H % 32 == 0)
    backward_simd_nv<2, 12>(w, cs, act, dhs, dh_T, dg, dh0, dc, T, B, H, threads, bf16);
  else
    backward_simd_nv<1, 12>(w, cs, act, dhs, dh_T, dg, dh0, dc, T, B, H, threads, bf16);
#else
  if (H % 16 == 0)
    backward_simd_nv<2, 6>(w, cs, act, dhs, dh_T, dg, dh0, dc, T, B, H, threads, bf16);
  else
    backward_simd_nv<1, 12>(w, cs, act, dhs, dh_T, dg, dh0, dc, T, B, H, threads, bf16);
#endif
}
#endif  // LSTM_JAX_SIMD

ffi::Error Forward(ffi::Buffer<ffi::F32> xproj, ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> h0,
                   ffi::Buffer<ffi::F32> c0, ffi::ResultBuffer<ffi::F32> h_all,
                   ffi::ResultBuffer<ffi::F32> c_all, ffi::ResultBuffer<ffi::F32> act,
                   int32_t threads, bool bf16) {
  const auto dims = xproj.dimensions();
  const int64_t T = dims[0], B = dims[1], H4 = dims[2], H = H4 / 4;
  float* hs = h_all->typed_data();
  float* cs = c_all->typed_data();
  float* a = act->typed_data();
  std::memcpy(hs, h0.typed_data(), sizeof(float) * B * H);
  std::memcpy(cs, c0.typed_data(), sizeof(float) * B * H);
  if (bf16 && !(LSTM_JAX_HAVE_BF16 && H % 16 == 0))
    return ffi::Error::InvalidArgument("lstm_jax native kernel: bfloat16 needs AVX512-BF16 and "
                                       "hidden_size a multiple of 16");
#if LSTM_JAX_SIMD
  if (H % kW == 0) {
    forward_simd(xproj.typed_data(), w.typed_data(), hs, cs, a, T, B, H, std::max(threads, 1),
                   bf16);
    return ffi::Error::Success();
  }
#endif
  if (g_sgemm == nullptr) return ffi::Error::Internal("lstm_jax native kernel: no sgemm set");
  BlasThreads scope(threads);
  std::memcpy(a, xproj.typed_data(), sizeof(float) * T * B * H4);
  const int m = static_cast<int>(H4), n = static_cast<int>(B), k = static_cast<int>(H);
  const float one = 1.0f;
  for (int64_t t = 0; t < T; ++t) {
    float* at = a + t * B * H4;
    g_sgemm("N", "N", &m, &n, &k, &one, w.typed_data(), &m, hs + t * B * H, &k, &one, at, &m);
    gates_forward(at, cs + t * B * H, cs + (t + 1) * B * H, hs + (t + 1) * B * H, B, H);
  }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::Buffer<ffi::F32> w, ffi::Buffer<ffi::F32> c_all,
                    ffi::Buffer<ffi::F32> act, ffi::Buffer<ffi::F32> d_hs,
                    ffi::Buffer<ffi::F32> dh_T, ffi::Buffer<ffi::F32> dc_T,
                    ffi::ResultBuffer<ffi::F32> dgates, ffi::ResultBuffer<ffi::F32> dh0,
                    ffi::ResultBuffer<ffi::F32> dc0, int32_t threads, bool bf16) {
  const auto dims = act.dimensions();
  const int64_t T = dims[0], B = dims[1], H4 = dims[2], H = H4 / 4;
  const float* cs = c_all.typed_data();
  const float* a = act.typed_data();
  const float* dhs = d_hs.typed_data();
  float* dg = dgates->typed_data();
  float* dc = dc0->typed_data();        // d loss / d c from later steps, then dc0
  std::memcpy(dc, dc_T.typed_data(), sizeof(float) * B * H);
  if (bf16 && !(LSTM_JAX_HAVE_BF16 && H % 16 == 0))
    return ffi::Error::InvalidArgument("lstm_jax native kernel: bfloat16 needs AVX512-BF16 and "
                                       "hidden_size a multiple of 16");
#if LSTM_JAX_SIMD
  if (H % kW == 0) {
    backward_simd(w.typed_data(), cs, a, dhs, dh_T.typed_data(), dg, dh0->typed_data(), dc, T,
                    B, H, std::max(threads, 1), bf16);
    return ffi::Error::Success();
  }
#endif
  if (g_sgemm == nullptr) return ffi::Error::Internal("lstm_jax native kernel: no sgemm set");
  BlasThreads scope(threads);
  float* dh_next = dh0->typed_data();   // d loss / d h from later steps, then dh0
  std::memcpy(dh_next, dh_T.typed_data(), sizeof(float) * B * H);
  std::vector<float> dh(static_cast<size_t>(B * H));
  const int m = static_cast<int>(H), n = static_cast<int>(B), k = static_cast<int>(H4);
  const float one = 1.0f, zero = 0.0f;
  for (int64_t t = T - 1; t >= 0; --t) {
    const float* dht = dhs + t * B * H;
    for (int64_t i = 0; i < B * H; ++i) dh[i] = dht[i] + dh_next[i];
    float* dgt = dg + t * B * H4;
    gates_backward(a + t * B * H4, cs + (t + 1) * B * H, cs + t * B * H, dh.data(), dc, dgt, B,
                   H);
    g_sgemm("T", "N", &m, &n, &k, &one, w.typed_data(), &k, dgt, &k, &zero, dh_next, &m);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmJaxForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("threads")
                                  .Attr<bool>("bf16"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(LstmJaxBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("threads")
                                  .Attr<bool>("bf16"));
