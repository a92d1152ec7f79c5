// Runs the per-lane code of the masked_linear serving kernel (csrc/masked_linear_lane.cuh) on the CPU
// for every lane of every warp the launcher would start, sums the 32 lanes, adds the bias and rounds to
// the storage dtype, as the kernel does after its warp reduction. Used by
// tests/test_kernels_masked_linear.py, which writes the inputs and compares the output with the eager op.
//
// usage: masked_linear_host_check DIR DTYPE(0 half, 1 bf16) N K O T(0: one mask) VEC(0/1) BIAS(0/1)
// reads DIR/{x,w,bits,ids,bias}.bin (raw little-endian), writes DIR/y.bin
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

template <typename T> T from_float(float v);
template <> __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T, int TOKENS, int ROWS, bool MULTI>
void run_shape(const T* x, const T* w, const uint8_t* bits, const T* bias, const int32_t* ids, T* y, int n, int64_t K,
               int64_t O, int64_t row_bytes, int64_t n_tasks, bool vec) {
  for (int64_t row0 = 0; row0 < O; row0 += ROWS) {  // one warp per ROWS rows, as the launcher's grid
    float total[ROWS][TOKENS] = {};
    for (int lane = 0; lane < 32; ++lane) {
      float acc[ROWS][TOKENS];
      lane_partial_sums<T, TOKENS, ROWS, MULTI>(x, w, bits, ids, n, K, O, row_bytes, n_tasks, vec, lane, row0, acc);
      for (int r = 0; r < ROWS; ++r)
        for (int t = 0; t < TOKENS; ++t) total[r][t] += acc[r][t];
    }
    for (int r = 0; r < ROWS; ++r) {
      const int64_t row = row0 + r;
      if (row >= O) continue;
      const float b = bias ? to_float(bias[row]) : 0.f;
      for (int t = 0; t < TOKENS && t < n; ++t) y[t * O + row] = from_float<T>(total[r][t] + b);
    }
  }
}

template <typename T, bool MULTI>
void run_tokens(const T* x, const T* w, const uint8_t* bits, const T* bias, const int32_t* ids, T* y, int n, int64_t K,
                int64_t O, int64_t row_bytes, int64_t n_tasks, bool vec) {
#define PET_FAST_ML_CASE(TOK, ROWS) \
  return run_shape<T, TOK, ROWS, MULTI>(x, w, bits, bias, ids, y, n, K, O, row_bytes, n_tasks, vec)
  PET_FAST_MASKED_LINEAR_SHAPES(PET_FAST_ML_CASE)
#undef PET_FAST_ML_CASE
}

template <typename T>
int run(const std::string& dir, int n, int64_t K, int64_t O, int64_t T_tasks, bool vec, bool has_bias) {
  auto x = read_file(dir + "/x.bin"), w = read_file(dir + "/w.bin"), bits = read_file(dir + "/bits.bin");
  auto ids = read_file(dir + "/ids.bin"), bias = read_file(dir + "/bias.bin");
  const int64_t row_bytes = ((K + 31) / 32) * 4;
  if (x.size() != size_t(n * K * sizeof(T)) || w.size() != size_t(O * K * sizeof(T)) ||
      bits.size() != size_t((T_tasks ? T_tasks : 1) * O * row_bytes) ||
      (T_tasks && ids.size() != size_t(n * 4)) || (has_bias && bias.size() != size_t(O * sizeof(T)))) {
    std::fprintf(stderr, "input sizes do not match the arguments\n");
    return 2;
  }
  std::vector<T> y(size_t(n * O));
  const T* xp = reinterpret_cast<const T*>(x.data());
  const T* wp = reinterpret_cast<const T*>(w.data());
  const T* bp = has_bias ? reinterpret_cast<const T*>(bias.data()) : nullptr;
  if (T_tasks)
    run_tokens<T, true>(xp, wp, bits.data(), bp, reinterpret_cast<const int32_t*>(ids.data()), y.data(), n, K, O,
                        row_bytes, T_tasks, vec);
  else
    run_tokens<T, false>(xp, wp, bits.data(), bp, nullptr, y.data(), n, K, O, row_bytes, 1, vec);
  FILE* f = std::fopen((dir + "/y.bin").c_str(), "wb");
  if (!f) return 3;
  std::fwrite(y.data(), sizeof(T), y.size(), f);
  std::fclose(f);
  return 0;
}

int main(int argc, char** argv) {
  if (argc != 9) {
    std::fprintf(stderr, "usage: %s DIR DTYPE N K O T VEC BIAS\n", argv[0]);
    return 1;
  }
  const std::string dir = argv[1];
  const int dtype = std::atoi(argv[2]), n = std::atoi(argv[3]);
  const int64_t K = std::atoll(argv[4]), O = std::atoll(argv[5]), T_tasks = std::atoll(argv[6]);
  const bool vec = std::atoi(argv[7]) != 0, has_bias = std::atoi(argv[8]) != 0;
  if (n < 1 || n > 64 || (vec && K % kLane != 0)) {
    std::fprintf(stderr, "need 1 <= N <= 64, and K %% 8 == 0 with VEC\n");
    return 1;
  }
  return dtype == 0 ? run<__half>(dir, n, K, O, T_tasks, vec, has_bias)
                    : run<__nv_bfloat16>(dir, n, K, O, T_tasks, vec, has_bias);
}
