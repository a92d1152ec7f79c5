// Runs the masked_linear serving kernel's code (csrc/masked_linear_lane.cuh) on the CPU the way the
// launcher would on a GPU with SMS multiprocessors: the same plan, every block of the grid (its x staging
// by each of its threads), every lane of every warp and pass, the warp's reduce-scatter with the shuffles
// emulated lane by lane, the stores of y or of the split-K partials, and the final sum of the partials.
// Used by tests/test_kernels_masked_linear.py, which writes the inputs and compares the output with the
// eager op.
//
// usage: masked_linear_host_check DIR DTYPE(0 half, 1 bf16) N K O T(0: one mask) VEC(0/1) BIAS(0/1) [SMS [MMA]]
// MMA (default 1): a single mask takes the tensor-core kernel as on sm_80+; 0: the fp32 kernel.
// reads DIR/{x,w,bits,ids,bias}.bin (raw little-endian), writes DIR/y.bin; prints the plan on stdout.
// With DIR "--plan" it prints the plan only.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "masked_linear_lane.cuh"

using namespace pet_fast::masked_linear_detail;

static std::vector<uint8_t> read_file(const std::string& path) {
  std::vector<uint8_t> data;
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return data;
  uint8_t buf[65536];
  size_t got;
  while ((got = std::fread(buf, 1, sizeof(buf), f)) > 0) data.insert(data.end(), buf, buf + got);
  std::fclose(f);
  return data;
}

// one stage of the reduce-scatter for all 32 lanes: every lane sends, then every lane keeps and adds
// what its partner (lane ^ offset) sent, as __shfl_xor_sync does
template <int V, int S>
void host_stage(std::vector<std::vector<float>>& v) {
  constexpr int H = rs_half(V, S);
  float send[32][H];
  for (int lane = 0; lane < 32; ++lane) rs_send<V, S>(v[lane].data(), lane, send[lane]);
  for (int lane = 0; lane < 32; ++lane) {
    float recv[H];
    for (int i = 0; i < H; ++i) recv[i] = send[lane ^ (16 >> S)][i];
    rs_keep<V, S>(v[lane].data(), lane, recv);
  }
}

template <typename T, int TOKENS, bool MULTI, bool VEC>
void run_grid(const Plan& plan, const T* x, const T* w, const uint8_t* bits, const T* bias, const int32_t* ids, T* y,
              int64_t n, int64_t K, int64_t O, int64_t row_bytes, int64_t n_tasks) {
  constexpr int R = rows_for(TOKENS, MULTI);
  constexpr int V = R * TOKENS;
  std::vector<float> ws(plan.splits > 1 ? plan.splits * n * O : 0, 0.f);
  std::vector<T> sx(static_cast<size_t>(TOKENS * plan.kc));
  int64_t stask[TOKENS];
  for (int64_t bid = 0; bid < plan.blocks; ++bid) {
    const BlockPos pos = block_pos(bid, plan.groups, plan.splits);
    const int64_t t0 = static_cast<int64_t>(pos.group) * TOKENS;
    const int64_t k0 = pos.split * plan.kc;
    for (size_t i = 0; i < sx.size(); ++i) sx[i] = from_float<T>(1e4f);  // every entry must be overwritten
    for (int t = 0; t < TOKENS; ++t) stask[t] = 12345;
    for (int tid = 0; tid < kThreads; ++tid)
      stage_x<T, TOKENS, MULTI, VEC>(x, ids, sx.data(), stask, n, t0, K, k0, plan.kc, plan.kc, n_tasks, O, row_bytes,
                                     tid);
    for (int warp = 0; warp < kWarps; ++warp) {
      for (int pass = 0; pass < plan.passes; ++pass) {
        const int64_t row0 = warp_row0(pos.tile, plan.rows_per_block, R, pass, warp);
        if (row0 >= O) break;
        std::vector<std::vector<float>> acc(32, std::vector<float>(V));
        for (int lane = 0; lane < 32; ++lane) {
          float a[V];
          Vec16 raw[R];
          unsigned m[R];
          first_loads<T, R, MULTI, VEC>(w, bits, K, O, row_bytes, lane, row0, k0, raw, m);
          lane_chunk_sums<T, TOKENS, MULTI, VEC>(sx.data(), stask, w, bits, K, O, row_bytes, lane, row0, k0, plan.kc,
                                                 raw, m, a);
          for (int i = 0; i < V; ++i) acc[lane][i] = a[i];
        }
        host_stage<V, 0>(acc);
        host_stage<V, 1>(acc);
        host_stage<V, 2>(acc);
        host_stage<V, 3>(acc);
        host_stage<V, 4>(acc);
        for (int lane = 0; lane < 32; ++lane) {
          if (!rs_writer(V, lane)) continue;
          for (int j = 0; j < rs_count(V); ++j)
            store_entry<T, TOKENS>(acc[lane][j], rs_index(V, lane, j), bias, y, ws.data(), n, O, row0, t0, pos.split,
                                   plan.splits);
        }
      }
    }
  }
  if (plan.splits > 1)
    for (int64_t i = 0; i < n * O; ++i) finish_entry<T>(i, ws.data(), bias, y, n, O, plan.splits);
}

// mma.m16n8k16 (fp32 accumulate) of the warp from each lane's fragments, with the element placement of
// the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point type"); acc: one n tile
template <typename T>
void host_mma(float (&acc)[32][4], const uint32_t (&a)[32][4], const uint32_t (&b)[32][2]) {
  float A[16][16], B[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, q = lane & 3;
    unpack2(a[lane][0], static_cast<T*>(nullptr), A[g][2 * q], A[g][2 * q + 1]);
    unpack2(a[lane][1], static_cast<T*>(nullptr), A[g + 8][2 * q], A[g + 8][2 * q + 1]);
    unpack2(a[lane][2], static_cast<T*>(nullptr), A[g][2 * q + 8], A[g][2 * q + 9]);
    unpack2(a[lane][3], static_cast<T*>(nullptr), A[g + 8][2 * q + 8], A[g + 8][2 * q + 9]);
    unpack2(b[lane][0], static_cast<T*>(nullptr), B[2 * q][g], B[2 * q + 1][g]);
    unpack2(b[lane][1], static_cast<T*>(nullptr), B[2 * q + 8][g], B[2 * q + 9][g]);
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, q = lane & 3;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i >> 1), col = 2 * q + (i & 1);
      float d = acc[lane][i];
      for (int k = 0; k < 16; ++k) d += A[row][k] * B[k][col];
      acc[lane][i] = d;
    }
  }
}

// the tensor-core kernel (single mask), lane by lane with the mma emulated
template <typename T, int NT, bool VEC>
void run_mma_grid(const Plan& plan, const T* x, const T* w, const uint8_t* bits, const T* bias, T* y, int64_t n,
                  int64_t K, int64_t O, int64_t row_bytes) {
  std::vector<float> ws(plan.splits > 1 ? plan.splits * n * O : 0, 0.f);
  const int64_t ldx = plan_ldx(plan);
  std::vector<T> sx(static_cast<size_t>(8 * NT * ldx));
  for (int64_t bid = 0; bid < plan.blocks; ++bid) {
    const BlockPos pos = block_pos(bid, plan.groups, plan.splits);
    const int64_t t0 = static_cast<int64_t>(pos.group) * 8 * NT;
    const int64_t k0 = pos.split * plan.kc;
    for (size_t i = 0; i < sx.size(); ++i) sx[i] = from_float<T>(1e4f);  // padding and all: never read
    for (int tid = 0; tid < kThreads; ++tid)
      stage_x<T, 8 * NT, false, VEC>(x, nullptr, sx.data(), nullptr, n, t0, K, k0, plan.kc, ldx, 1, O, row_bytes, tid);
    for (int warp = 0; warp < kWarps; ++warp) {
      const int64_t row0 = pos.tile * plan.rows_per_block + static_cast<int64_t>(warp) * kMmaRows;
      if (row0 >= O) continue;
      float acc[NT][32][4] = {};
      for (int64_t cb = 0; cb < plan.kc; cb += 32 * kMmaSub) {
        std::vector<MmaStep> st(32);
        for (int lane = 0; lane < 32; ++lane) mma_load<T, VEC>(w, bits, K, O, row_bytes, row0, k0 + cb, lane, st[lane]);
        for (int u = 0; u < kMmaSub; ++u)
          for (int hf = 0; hf < 2; ++hf)
            for (int j = 0; j < NT; ++j) {
              uint32_t a[32][4], b[32][2];
              for (int lane = 0; lane < 32; ++lane) {
                mma_a_frag(st[lane], u, hf, a[lane]);
                uint32_t bb[2][2];
                mma_b_frags(sx.data(), ldx, cb, u, j, lane, bb);
                b[lane][0] = bb[hf][0];
                b[lane][1] = bb[hf][1];
              }
              host_mma<T>(acc[j], a, b);
            }
      }
      for (int lane = 0; lane < 32; ++lane)
        for (int j = 0; j < NT; ++j)
          for (int i = 0; i < 4; ++i)
            store_entry<T, 1>(acc[j][lane][i], 0, bias, y, ws.data(), n, O, row0 + mma_c_row(lane, i),
                              t0 + mma_c_token(lane, j, i), pos.split, plan.splits);
    }
  }
  if (plan.splits > 1)
    for (int64_t i = 0; i < n * O; ++i) finish_entry<T>(i, ws.data(), bias, y, n, O, plan.splits);
}

template <typename T, bool MULTI, bool VEC>
void run_tokens(const Plan& plan, const T* x, const T* w, const uint8_t* bits, const T* bias, const int32_t* ids, T* y,
                int64_t n, int64_t K, int64_t O, int64_t row_bytes, int64_t n_tasks) {
#define PET_FAST_ML_CASE(TOK) \
  return run_grid<T, TOK, MULTI, VEC>(plan, x, w, bits, bias, ids, y, n, K, O, row_bytes, n_tasks)
  PET_FAST_MASKED_LINEAR_TOKENS(PET_FAST_ML_CASE)
#undef PET_FAST_ML_CASE
}

static void print_plan(const Plan& plan) {
  std::printf("mma=%d tokens=%d groups=%d passes=%d rows_per_block=%lld tiles=%lld kc=%lld splits=%lld blocks=%lld\n",
              plan.mma, plan.tokens, plan.groups, plan.passes, (long long)plan.rows_per_block, (long long)plan.tiles,
              (long long)plan.kc, (long long)plan.splits, (long long)plan.blocks);
}

template <typename T>
int run(const std::string& dir, int64_t n, int64_t K, int64_t O, int64_t T_tasks, bool vec, bool has_bias, int sms,
        bool mma) {
  auto x = read_file(dir + "/x.bin"), w = read_file(dir + "/w.bin"), bits = read_file(dir + "/bits.bin");
  auto ids = read_file(dir + "/ids.bin"), bias = read_file(dir + "/bias.bin");
  const int64_t row_bytes = ((K + 31) / 32) * 4;
  if (x.size() != size_t(n * K * sizeof(T)) || w.size() != size_t(O * K * sizeof(T)) ||
      bits.size() != size_t((T_tasks ? T_tasks : 1) * O * row_bytes) ||
      (T_tasks && ids.size() != size_t(n * 4)) || (has_bias && bias.size() != size_t(O * sizeof(T)))) {
    std::fprintf(stderr, "input sizes do not match the arguments\n");
    return 2;
  }
  const Plan plan = make_plan(n, K, O, sms, mma && !T_tasks, T_tasks > 0);
  print_plan(plan);
  std::vector<T> y(size_t(n * O), from_float<T>(NAN));  // every entry must be written
  const T* xp = reinterpret_cast<const T*>(x.data());
  const T* wp = reinterpret_cast<const T*>(w.data());
  const T* bp = has_bias ? reinterpret_cast<const T*>(bias.data()) : nullptr;
  const int32_t* ip = T_tasks ? reinterpret_cast<const int32_t*>(ids.data()) : nullptr;
  const int64_t tasks = T_tasks ? T_tasks : 1;
  if (plan.mma && plan.tokens <= 8 && vec) run_mma_grid<T, 1, true>(plan, xp, wp, bits.data(), bp, y.data(), n, K, O, row_bytes);
  if (plan.mma && plan.tokens <= 8 && !vec) run_mma_grid<T, 1, false>(plan, xp, wp, bits.data(), bp, y.data(), n, K, O, row_bytes);
  if (plan.mma && plan.tokens > 8 && vec) run_mma_grid<T, 2, true>(plan, xp, wp, bits.data(), bp, y.data(), n, K, O, row_bytes);
  if (plan.mma && plan.tokens > 8 && !vec) run_mma_grid<T, 2, false>(plan, xp, wp, bits.data(), bp, y.data(), n, K, O, row_bytes);
  if (T_tasks && vec) run_tokens<T, true, true>(plan, xp, wp, bits.data(), bp, ip, y.data(), n, K, O, row_bytes, tasks);
  if (T_tasks && !vec) run_tokens<T, true, false>(plan, xp, wp, bits.data(), bp, ip, y.data(), n, K, O, row_bytes, tasks);
  if (!plan.mma && !T_tasks && vec) run_tokens<T, false, true>(plan, xp, wp, bits.data(), bp, ip, y.data(), n, K, O, row_bytes, tasks);
  if (!plan.mma && !T_tasks && !vec) run_tokens<T, false, false>(plan, xp, wp, bits.data(), bp, ip, y.data(), n, K, O, row_bytes, tasks);
  FILE* f = std::fopen((dir + "/y.bin").c_str(), "wb");
  if (!f) return 3;
  std::fwrite(y.data(), sizeof(T), y.size(), f);
  std::fclose(f);
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 9 || argc > 11) {
    std::fprintf(stderr, "usage: %s DIR DTYPE N K O T VEC BIAS [SMS [MMA]]\n", argv[0]);
    return 1;
  }
  const std::string dir = argv[1];
  const int dtype = std::atoi(argv[2]);
  const int64_t n = std::atoll(argv[3]);
  const int64_t K = std::atoll(argv[4]), O = std::atoll(argv[5]), T_tasks = std::atoll(argv[6]);
  const bool vec = std::atoi(argv[7]) != 0, has_bias = std::atoi(argv[8]) != 0;
  const int sms = argc >= 10 ? std::atoi(argv[9]) : 132;
  const bool mma = argc == 11 ? std::atoi(argv[10]) != 0 : true;  // 0: the fp32 kernel for a single mask too
  if (n < 1 || n > 64 || (vec && K % kLane != 0) || sms < 1) {
    std::fprintf(stderr, "need 1 <= N <= 64, SMS >= 1, and K %% 8 == 0 with VEC\n");
    return 1;
  }
  if (dir == "--plan") {
    print_plan(make_plan(n, K, O, sms, mma && !T_tasks, T_tasks > 0));
    return 0;
  }
  return dtype == 0 ? run<__half>(dir, n, K, O, T_tasks, vec, has_bias, sms, mma)
                    : run<__nv_bfloat16>(dir, n, K, O, T_tasks, vec, has_bias, sms, mma);
}
