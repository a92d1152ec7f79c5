// The index math of the masked_linear serving kernels (csrc/masked_linear.cu), shared with a host check
// (tests/csrc/masked_linear_host_check.cpp) that runs it on the CPU for every thread of every block the
// launcher would start (the x staging, each lane's loads and partial sums, the warp's mma or reduce-
// scatter emulated lane by lane, the split-K partials and their final sum) and compares the result with
// the eager op: the indexing of the weight, the mask bytes, the task stack, the chunks and the tails is
// thereby tested without a GPU.
//
// Work split (make_plan): a block of kWarps warps owns a tile of output rows, one K chunk of kc columns
// and one group of up to 16 tokens; K is split until the grid fills the GPU in one wave. The block stages
// its chunk of x (all its tokens) in shared memory once; each warp then streams its weight rows through
// the chunk with 16-byte loads (8 weights of a row per lane, plus the mask byte that covers them), the
// next step's loads issued before the current step's arithmetic, and masks the weights in registers.
// - Single mask, 2 tokens or more, compute capability 8.0+ (mma): a warp owns 16 rows and runs
//   mma.m16n8k16 (fp32 accumulate) on the masked tile against 8 or 16 staged tokens; see "the tensor-core
//   kernel" below.
// - Per-token masks (and single masks on older GPUs or for one token): fp32 FMAs; a warp owns rows_for(TOKENS) rows per
//   pass, keeps rows x TOKENS partial sums per lane, reads x from shared memory once per token and step
//   for all its rows, and ends a pass with a reduce-scatter across its lanes (31 shuffles for 32 sums
//   instead of 5 per sum).
// With one chunk the lanes write y (bias added); with several they write fp32 partials that a second
// kernel sums in a fixed order (deterministic) before adding the bias.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if defined(__CUDACC__)
#define PET_FAST_HD __host__ __device__ __forceinline__
#define PET_FAST_HDC __host__ __device__ constexpr
#else
#define PET_FAST_HD inline
#define PET_FAST_HDC constexpr
#endif

namespace pet_fast {
namespace masked_linear_detail {

constexpr int kLane = 8;                 // consecutive columns per lane and step (16 bytes of fp16/bf16)
constexpr int kStep = 32 * kLane;        // columns per warp and step
constexpr int kWarps = 8;                // warps per block
constexpr int kThreads = kWarps * 32;
constexpr int kGroupTokens = 16;         // tokens per block at most; more tokens take several groups
constexpr int kStageBytes = 32 * 1024;   // shared memory for the staged x chunk, at most (+ padding)
constexpr int kMmaRows = 16;             // tensor-core kernel: weight rows per warp (the m of m16n8k16)
constexpr int kMmaSub = 2;               // tensor-core kernel: 32-column blocks per load step (64 columns)

// fp32 kernel: weight rows per warp and pass: 4 for few tokens (more 16-byte loads in flight per lane),
// 2 for 8 or 16 tokens (2 x 16 fp32 sums per lane, and room for the next step's loads without spilling)
PET_FAST_HDC int rows_for(int tokens, bool /*multi*/) { return tokens >= 8 ? 2 : 4; }

struct alignas(16) Vec16 {
  uint32_t w[4];
};

PET_FAST_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

PET_FAST_HD float to_float(__half v) { return __half2float(v); }
PET_FAST_HD float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> PET_FAST_HD T from_float(float v);
template <> PET_FAST_HD __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> PET_FAST_HD __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T> PET_FAST_HD uint32_t bits16(T v) {
  uint16_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
}

// the two values packed in a 32-bit word (element 0 in the low half, as in memory)
PET_FAST_HD void unpack2(uint32_t u, __nv_bfloat16*, float& lo, float& hi) {
  lo = bits_to_float(u << 16);
  hi = bits_to_float(u & 0xffff0000u);
}
PET_FAST_HD void unpack2(uint32_t u, __half*, float& lo, float& hi) {
  __half_raw a, b;
  a.x = static_cast<unsigned short>(u & 0xffffu);
  b.x = static_cast<unsigned short>(u >> 16);
  lo = __half2float(__half(a));
  hi = __half2float(__half(b));
}

template <typename T>
PET_FAST_HD void unpack8(const Vec16& v, float (&out)[kLane]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) unpack2(v.w[i], static_cast<T*>(nullptr), out[2 * i], out[2 * i + 1]);
}

// 16 bytes at p (16-byte aligned), through the read-only cache for global memory
template <typename T>
PET_FAST_HD Vec16 load16_global(const T* p) {
  Vec16 v;
#if defined(__CUDA_ARCH__)
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  v.w[0] = u.x; v.w[1] = u.y; v.w[2] = u.z; v.w[3] = u.w;
#else
  std::memcpy(&v, p, sizeof(v));
#endif
  return v;
}

template <typename T>
PET_FAST_HD void store16_shared(T* p, const Vec16& v) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(p) = make_uint4(v.w[0], v.w[1], v.w[2], v.w[3]);
#else
  std::memcpy(static_cast<void*>(p), &v, sizeof(v));
#endif
}

template <typename T>
PET_FAST_HD Vec16 load16_shared(const T* p) {
  Vec16 v;
#if defined(__CUDA_ARCH__)
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  v.w[0] = u.x; v.w[1] = u.y; v.w[2] = u.z; v.w[3] = u.w;
#else
  std::memcpy(&v, p, sizeof(v));
#endif
  return v;
}

// 8 bytes at p (8-byte aligned) of shared memory: two packed pairs
template <typename T>
PET_FAST_HD void load8b_shared(const T* p, uint32_t& a, uint32_t& b) {
#if defined(__CUDA_ARCH__)
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  a = u.x;
  b = u.y;
#else
  uint32_t v[2];
  std::memcpy(v, p, sizeof(v));
  a = v[0];
  b = v[1];
#endif
}

PET_FAST_HD unsigned load_byte(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// 8 columns [k, k + 8) of a row, k < K: one 16-byte load with VEC (the launcher checked the alignment and
// K % 8 == 0), else element loads with zeros past K.
template <typename T, bool VEC>
PET_FAST_HD Vec16 load8(const T* __restrict__ row, int64_t k, int64_t K) {
  if constexpr (VEC) {
    return load16_global(row + k);
  } else {
    Vec16 v;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t lo = (k + 2 * i < K) ? bits16(row[k + 2 * i]) : 0u;
      const uint32_t hi = (k + 2 * i + 1 < K) ? bits16(row[k + 2 * i + 1]) : 0u;
      v.w[i] = lo | (hi << 16);
    }
    return v;
  }
}

// ---- the launch plan ---------------------------------------------------------------------------------

struct Plan {
  int mma;                // 1: tensor-core kernel (single mask), 0: fp32 FMA kernel (per-token masks)
  int tokens;             // TOKENS of the instantiation: 1, 2, 4, 8 or 16 (tensor cores: 8 or 16)
  int groups;             // token groups of `tokens` (several only with 16)
  int passes;             // row passes per block
  int64_t rows_per_block; // kWarps * rows per warp * passes
  int64_t tiles;          // row tiles
  int64_t kc;             // columns per K chunk (a multiple of kStep)
  int64_t splits;         // K chunks
  int64_t blocks;         // tiles * splits * groups
};

inline int plan_tokens(int64_t n) { return n <= 1 ? 1 : n <= 2 ? 2 : n <= 4 ? 4 : n <= 8 ? 8 : kGroupTokens; }

// Blocks that fit an SM at once: __launch_bounds__ in masked_linear.cu caps the registers at 128 per
// thread (2 blocks of 256 threads; the instantiations use 64-128 without spilling on sm_80 and sm_90).
PET_FAST_HDC int blocks_per_sm(int) { return 2; }

// sms: multiprocessors of the device. Splits K so that the grid fills the GPU in one wave (no partial
// second wave), in chunks small enough to stage in kStageBytes. Layers with more row tiles than the GPU holds at once keep K whole (as far as
// the staging allows) and run in several waves.
// Fewest tokens a single mask runs on tensor cores with; fewer take the fp32 kernel. One token does: the fp32
// kernel's 1-token form keeps 4 rows' loads in flight per lane where the mma kernel pads the token to 8
// and has 16 rows per warp in one step (H100, bf16, one token: 27.1 against 29.8 us at 4096 x 4096, 50.0
// against 58.8 at 4096 -> 11008; benchmarks/results/h100-2026-11-27c/call1/check_masked_linear_serving.json,
// the fp32 kernel's figures being its multitask_4 column). 2 to 16 tokens are unmeasured both ways
// (benchmarks/check_masked_linear_serving.py times both forms).
constexpr int kMmaMinTokens = 2;

// mma_min_tokens: single masks with fewer tokens take the fp32 kernel (kMmaMinTokens unless a caller
// measures the forms against each other).
inline Plan make_plan(int64_t n, int64_t K, int64_t O, int sms, bool mma, bool multi,
                      int mma_min_tokens = kMmaMinTokens) {
  Plan p;
  if (n < mma_min_tokens) mma = false;
  p.mma = mma ? 1 : 0;
  p.tokens = mma ? (n <= 8 ? 8 : kGroupTokens) : plan_tokens(n);
  p.groups = static_cast<int>((n + p.tokens - 1) / p.tokens);
  p.passes = mma ? 1 : p.tokens >= 8 ? 4 : 1;  // fp32 kernel with 8+ tokens: x staged once per 64 rows
  p.rows_per_block = mma ? static_cast<int64_t>(kWarps) * kMmaRows
                         : static_cast<int64_t>(kWarps) * rows_for(p.tokens, multi) * p.passes;
  p.tiles = (O + p.rows_per_block - 1) / p.rows_per_block;
  const int64_t steps = K > 0 ? (K + kStep - 1) / kStep : 1;
  const int64_t max_chunk_steps = kStageBytes / (2 * kStep * p.tokens);  // 2 bytes per element
  const int64_t slots = static_cast<int64_t>(sms > 0 ? sms : 1) * blocks_per_sm(p.tokens);
  const int64_t others = p.tiles * p.groups;
  int64_t splits = slots / others;
  if (splits < 1) splits = 1;
  int64_t chunk_steps = (steps + splits - 1) / splits;
  if (chunk_steps > max_chunk_steps) chunk_steps = max_chunk_steps;
  p.kc = chunk_steps * kStep;
  p.splits = (steps + chunk_steps - 1) / chunk_steps;
  p.blocks = p.tiles * p.splits * p.groups;
  return p;
}

// row stride of the staged x chunk: the tensor-core kernel reads 8 token rows at the same column per
// load, so its rows are padded by 64 bytes (no shared-memory bank conflicts)
PET_FAST_HD int64_t plan_ldx(const Plan& p) { return p.mma ? p.kc + 32 : p.kc; }

// float32 scratch for the split-K partials: (splits, n, O), none with one chunk
inline int64_t plan_workspace_floats(const Plan& p, int64_t n, int64_t O) { return p.splits > 1 ? p.splits * n * O : 0; }

struct BlockPos {
  int group;
  int64_t split;
  int64_t tile;
};

// the token group varies fastest, so the blocks that read the same weight tile run side by side (L2)
PET_FAST_HD BlockPos block_pos(int64_t bid, int groups, int64_t splits) {
  BlockPos b;
  b.group = static_cast<int>(bid % groups);
  const int64_t rest = bid / groups;
  b.split = rest % splits;
  b.tile = rest / splits;
  return b;
}

// first row of warp `warp` in pass `pass` of tile `tile`
PET_FAST_HD int64_t warp_row0(int64_t tile, int64_t rows_per_block, int rows, int pass, int warp) {
  return tile * rows_per_block + (static_cast<int64_t>(pass) * kWarps + warp) * rows;
}

// ---- staging x -----------------------------------------------------------------------------------------

// Thread `tid`'s share of copying x[t0 + t, k0 + c] (t < TOKENS, c < kc) to sx[t * ldx + c], zeros past n
// and past K; with MULTI, also the byte offset of each token's mask in the stack (-1 past n and for ids
// outside [0, n_tasks)).
template <typename T, int TOKENS, bool MULTI, bool VEC>
PET_FAST_HD void stage_x(const T* __restrict__ x, const int32_t* __restrict__ task_ids, T* sx, int64_t* stask, int64_t n,
                         int64_t t0, int64_t K, int64_t k0, int64_t kc, int64_t ldx, int64_t n_tasks, int64_t O,
                         int64_t row_bytes, int tid) {
  if (VEC) {
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) {
      const int64_t tok = t0 + t;
      for (int64_t c = static_cast<int64_t>(tid) * kLane; c < kc; c += kThreads * kLane) {
        const int64_t k = k0 + c;
        Vec16 v = {{0u, 0u, 0u, 0u}};
        if (tok < n && k < K) v = load16_global(x + tok * K + k);
        store16_shared(sx + t * ldx + c, v);
      }
    }
  } else {
#pragma unroll
    for (int t = 0; t < TOKENS; ++t) {
      const int64_t tok = t0 + t;
      for (int64_t c = tid; c < kc; c += kThreads) {
        const int64_t k = k0 + c;
        sx[t * ldx + c] = (tok < n && k < K) ? x[tok * K + k] : from_float<T>(0.f);
      }
    }
  }
  if (MULTI && tid < TOKENS) {
    const int64_t tok = t0 + tid;
    const int64_t id = tok < n ? static_cast<int64_t>(task_ids[tok]) : -1;
    stask[tid] = (id >= 0 && id < n_tasks) ? id * O * row_bytes : -1;
  }
}

// ---- one lane's partial sums -----------------------------------------------------------------------------

template <typename T, int R, bool MULTI, bool VEC>
PET_FAST_HD void load_step(const T* __restrict__ w, const uint8_t* __restrict__ bits, int64_t K, int64_t O,
                           int64_t row_bytes, int64_t row0, int64_t k, Vec16 (&raw)[R], unsigned (&m)[R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t row = row0 + r;
    if (row < O && k < K) {
      raw[r] = load8<T, VEC>(w + row * K, k, K);
      m[r] = MULTI ? 0u : load_byte(bits + row * row_bytes + (k >> 3));
    } else {
      raw[r] = Vec16{{0u, 0u, 0u, 0u}};
      m[r] = 0u;
    }
  }
}

// Lane `lane`'s partial sums acc[r * TOKENS + t] of y[t0 + t, row0 + r] (r < R = rows_for(TOKENS, MULTI)) over
// the chunk [k0, k0 + kc): the lane takes columns k0 + 256 s + 8 lane .. + 7 of every step s, in two
// halves of 4 columns (fewer live registers: R x 4 weights as floats, 4 x values). sx: the staged chunk
// (TOKENS x kc). With MULTI, token t uses the mask at byte stask[t] of the stack (-1: all zero), applied
// per token to the weights as they are unpacked.
// The first step's weights and bits of a lane (single mask only: the multitask form loads each step as
// it comes). The kernel issues them for its first pass before staging x, so that they are in flight
// while the block waits for the staging.
template <typename T, int R, bool MULTI, bool VEC>
PET_FAST_HD void first_loads(const T* __restrict__ w, const uint8_t* __restrict__ bits, int64_t K, int64_t O,
                             int64_t row_bytes, int lane, int64_t row0, int64_t k0, Vec16 (&raw)[R], unsigned (&m)[R]) {
  if (!MULTI) load_step<T, R, MULTI, VEC>(w, bits, K, O, row_bytes, row0, k0 + lane * kLane, raw, m);
}

template <typename T, int TOKENS, bool MULTI, bool VEC>
PET_FAST_HD void lane_chunk_sums(const T* sx, const int64_t* stask, const T* __restrict__ w,
                                 const uint8_t* __restrict__ bits, int64_t K, int64_t O, int64_t row_bytes,
                                 int lane, int64_t row0, int64_t k0, int64_t kc, Vec16 (&raw)[rows_for(TOKENS, MULTI)],
                                 unsigned (&m)[rows_for(TOKENS, MULTI)],
                                 float (&acc)[rows_for(TOKENS, MULTI) * TOKENS]) {
  constexpr int R = rows_for(TOKENS, MULTI);
#pragma unroll
  for (int i = 0; i < R * TOKENS; ++i) acc[i] = 0.f;
  const int64_t steps = kc / kStep;
  // single mask: the next step's weights and bits are loaded before this step's arithmetic (registers
  // as a double buffer; raw and m hold the first step from first_loads); multitask: no double buffer
  // (its per-token mask bytes need the registers)
  constexpr bool kPrefetch = !MULTI;
  Vec16 next[R];
  unsigned next_m[R];
#pragma unroll 1
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t c = s * kStep + lane * kLane;  // column inside the chunk
    const int64_t k = k0 + c;
    if (!kPrefetch) load_step<T, R, MULTI, VEC>(w, bits, K, O, row_bytes, row0, k, raw, m);
    if (kPrefetch && s + 1 < steps) load_step<T, R, MULTI, VEC>(w, bits, K, O, row_bytes, row0, k + kStep, next, next_m);
    if (MULTI) {
      // byte of this lane's columns in each row's mask, -1 where the row or the columns are past O or K
      int64_t rb[R];
#pragma unroll
      for (int r = 0; r < R; ++r) rb[r] = (row0 + r < O && k < K) ? (row0 + r) * row_bytes + (k >> 3) : -1;
#pragma unroll
      for (int t = 0; t < TOKENS; ++t) {
        const int64_t off = stask[t];
        unsigned mt[R];
#pragma unroll
        for (int r = 0; r < R; ++r) mt[r] = (off >= 0 && rb[r] >= 0) ? load_byte(bits + off + rb[r]) : 0u;
        const Vec16 xr = load16_shared(sx + t * kc + c);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          float x0, x1;
          unpack2(xr.w[i], static_cast<T*>(nullptr), x0, x1);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            float w0, w1;
            unpack2(raw[r].w[i], static_cast<T*>(nullptr), w0, w1);
            float a = acc[r * TOKENS + t];
            a = fmaf(((mt[r] >> (2 * i)) & 1u) ? w0 : 0.f, x0, a);
            a = fmaf(((mt[r] >> (2 * i + 1)) & 1u) ? w1 : 0.f, x1, a);
            acc[r * TOKENS + t] = a;
          }
        }
      }
    } else {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float wv[R][4];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          unpack2(raw[r].w[2 * h], static_cast<T*>(nullptr), wv[r][0], wv[r][1]);
          unpack2(raw[r].w[2 * h + 1], static_cast<T*>(nullptr), wv[r][2], wv[r][3]);
#pragma unroll
          for (int j = 0; j < 4; ++j) wv[r][j] = ((m[r] >> (4 * h + j)) & 1u) ? wv[r][j] : 0.f;
        }
#pragma unroll
        for (int t = 0; t < TOKENS; ++t) {
          uint32_t x01, x23;
          load8b_shared(sx + t * kc + c + 4 * h, x01, x23);
          float xv[4];
          unpack2(x01, static_cast<T*>(nullptr), xv[0], xv[1]);
          unpack2(x23, static_cast<T*>(nullptr), xv[2], xv[3]);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            float a = acc[r * TOKENS + t];
#pragma unroll
            for (int j = 0; j < 4; ++j) a = fmaf(wv[r][j], xv[j], a);
            acc[r * TOKENS + t] = a;
          }
        }
      }
    }
    if (kPrefetch) {
#pragma unroll
      for (int r = 0; r < R; ++r) {
        raw[r] = next[r];
        m[r] = next_m[r];
      }
    }
  }
}

// ---- the tensor-core kernel (single mask) ------------------------------------------------------------
// A warp owns 16 weight rows and multiplies them with 8 or 16 tokens by mma.m16n8k16 (fp32 accumulate):
// A = the masked weight tile (16 rows x 16 columns), B = x^T (16 columns x 8 tokens). The k order inside
// an mma is free as long as A and B agree, so lane (g = lane / 4, q = lane % 4) loads 8 consecutive
// weights [8q, 8q + 8) of rows g and g + 8 of each 32-column block with one 16-byte load each (four
// lanes read 64 contiguous bytes of a row) and the mask byte that covers them; its first 4 columns feed
// the k slots {2q, 2q + 1, 2q + 8, 2q + 9} of the block's first mma, the last 4 those of the second
// (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"). B: the same 8 columns of
// token g (and g + 8 for the second n tile) from the staged x. The masked-out weights become +0.

struct MmaStep {
  Vec16 w[kMmaSub][2];      // [32-column block][row g, row g + 8]
  unsigned m[kMmaSub][2];   // their mask bytes
};

// lane's loads of the columns [kb, kb + 32 kMmaSub) of rows row0 + g and row0 + g + 8 (zeros past O, K)
template <typename T, bool VEC>
PET_FAST_HD void mma_load(const T* __restrict__ w, const uint8_t* __restrict__ bits, int64_t K, int64_t O,
                          int64_t row_bytes, int64_t row0, int64_t kb, int lane, MmaStep& st) {
  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int u = 0; u < kMmaSub; ++u) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = row0 + g + 8 * h;
      const int64_t k = kb + 32 * u + 8 * q;
      if (row < O && k < K) {
        st.w[u][h] = load8<T, VEC>(w + row * K, k, K);
        st.m[u][h] = load_byte(bits + row * row_bytes + (k >> 3));
      } else {
        st.w[u][h] = Vec16{{0u, 0u, 0u, 0u}};
        st.m[u][h] = 0u;
      }
    }
  }
}

// word i (elements 2i, 2i + 1) of a 16-byte weight load with its two mask bits applied
PET_FAST_HD uint32_t masked_word(const Vec16& v, unsigned m, int i) {
  const unsigned b = m >> (2 * i);
  return v.w[i] & (((b & 1u) ? 0x0000ffffu : 0u) | ((b & 2u) ? 0xffff0000u : 0u));
}

// A fragment of 32-column block u, half hf (0: its columns 0-3 per lane, 1: columns 4-7)
PET_FAST_HD void mma_a_frag(const MmaStep& st, int u, int hf, uint32_t (&a)[4]) {
  a[0] = masked_word(st.w[u][0], st.m[u][0], 2 * hf);
  a[1] = masked_word(st.w[u][1], st.m[u][1], 2 * hf);
  a[2] = masked_word(st.w[u][0], st.m[u][0], 2 * hf + 1);
  a[3] = masked_word(st.w[u][1], st.m[u][1], 2 * hf + 1);
}

// B fragments of 32-column block u at chunk column cb (the step's first column), n tile j: the lane's
// 8 columns of token 8 j + g from the staged x (row stride ldx); b[hf] for the two halves
template <typename T>
PET_FAST_HD void mma_b_frags(const T* sx, int64_t ldx, int64_t cb, int u, int j, int lane, uint32_t (&b)[2][2]) {
  const int g = lane >> 2, q = lane & 3;
  const Vec16 v = load16_shared(sx + (8 * j + g) * ldx + cb + 32 * u + 8 * q);
  b[0][0] = v.w[0];
  b[0][1] = v.w[1];
  b[1][0] = v.w[2];
  b[1][1] = v.w[3];
}

// where accumulator i of n tile j of a lane goes: row offset in the warp's 16 rows, token in the group
PET_FAST_HD int mma_c_row(int lane, int i) { return (lane >> 2) + 8 * (i >> 1); }
PET_FAST_HD int mma_c_token(int lane, int j, int i) { return 8 * j + 2 * (lane & 3) + (i & 1); }

// ---- the warp's reduce-scatter ----------------------------------------------------------------------------
// V sums per lane, summed over the 32 lanes in 5 stages (lane offsets 16, 8, 4, 2, 1). At a stage with L
// values left (L >= 2) a lane keeps the half named by its offset bit (the upper half when set), sends the
// other half to its partner and adds the partner's copy of the kept half; with one value left the stage
// is a plain butterfly. After the 5 stages lane l holds the full sums of entries rs_index(V, l, j),
// j < rs_count(V), in v[j]; with V < 32 several lanes hold the same entry and rs_writer picks one.

PET_FAST_HDC int rs_len(int V, int stage) { return (V >> stage) >= 1 ? (V >> stage) : 1; }
PET_FAST_HDC int rs_half(int V, int stage) { return rs_len(V, stage) >= 2 ? rs_len(V, stage) / 2 : 1; }
PET_FAST_HDC int rs_count(int V) { return V >= 32 ? V / 32 : 1; }
PET_FAST_HD int rs_index(int V, int lane, int j) { return V >= 32 ? lane * (V / 32) + j : lane / (32 / V); }
PET_FAST_HD bool rs_writer(int V, int lane) { return V >= 32 || lane % (32 / V) == 0; }

template <int V, int S>
PET_FAST_HD void rs_send(const float* v, int lane, float (&send)[rs_half(V, S)]) {
  constexpr int L = rs_len(V, S);
  const bool upper = (lane & (16 >> S)) != 0;
  if constexpr (L >= 2) {
#pragma unroll
    for (int i = 0; i < L / 2; ++i) send[i] = upper ? v[i] : v[i + L / 2];
  } else {
    send[0] = v[0];
  }
}

template <int V, int S>
PET_FAST_HD void rs_keep(float* v, int lane, const float (&recv)[rs_half(V, S)]) {
  constexpr int L = rs_len(V, S);
  const bool upper = (lane & (16 >> S)) != 0;
  if constexpr (L >= 2) {
#pragma unroll
    for (int i = 0; i < L / 2; ++i) v[i] = (upper ? v[i + L / 2] : v[i]) + recv[i];
  } else {
    v[0] += recv[0];
  }
}

// Where a lane's reduced entry e = r * TOKENS + t goes: y (one chunk, bias added) or the partials.
template <typename T, int TOKENS>
PET_FAST_HD void store_entry(float v, int e, const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ ws,
                             int64_t n, int64_t O, int64_t row0, int64_t t0, int64_t split, int64_t splits) {
  const int64_t row = row0 + e / TOKENS, tok = t0 + e % TOKENS;
  if (row >= O || tok >= n) return;
  if (splits == 1) {
    const float b = bias != nullptr ? to_float(bias[row]) : 0.f;
    y[tok * O + row] = from_float<T>(v + b);
  } else {
    ws[(split * n + tok) * O + row] = v;
  }
}

// y[i] for i = tok * O + row from the partials, summed over the chunks in order, plus the bias
template <typename T>
PET_FAST_HD void finish_entry(int64_t i, const float* __restrict__ ws, const T* __restrict__ bias, T* __restrict__ y,
                              int64_t n, int64_t O, int64_t splits) {
  float v = 0.f;
  for (int64_t s = 0; s < splits; ++s) v += ws[s * n * O + i];
  if (bias != nullptr) v += to_float(bias[i % O]);
  y[i] = from_float<T>(v);
}

// The token counts of the fp32 kernel's instantiations (few keep the build short); the host check uses
// the same.
#define PET_FAST_MASKED_LINEAR_TOKENS(CASE) \
  switch (plan.tokens) {                    \
    case 1: CASE(1);                        \
    case 2: CASE(2);                        \
    case 4: CASE(4);                        \
    case 8: CASE(8);                        \
    default: CASE(16);                      \
  }

}  // namespace masked_linear_detail
}  // namespace pet_fast
