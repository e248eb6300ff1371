// The INT8 GEMM family "cutlass" (plugins/cutlass_int8.py builds, loads and runs it): CUTLASS 3's Hopper kernels
// (TMA loads, wgmma, warp-specialized persistent schedules, optional thread-block clusters) with the engine's
// quantized epilogues written as CUTLASS epilogue visitor trees, so the GEMM and its whole epilogue are one kernel.
//
// Why our own CUDA source and not a library call: no package on the index exposes CUTLASS's sm90 INT8 kernels with
// these epilogues (torch._int_mm is cuBLASLt's INT8 GEMM with an int32 output: the epilogue would be another pass
// over [M, N]). CUTLASS itself is the library: this file only chooses its kernels and states our epilogue math.
//
// One translation unit per epilogue (-DWB_EPILOGUE=0..5) so the build compiles them in parallel, and one with
// -DWB_DISPATCH for the C API below. Built with -DNDEBUG: CUTLASS's device asserts are calls inside the main loop,
// and ptxas then serializes every wgmma (warning C7510), which would make a slow kernel of a fast one. Built with
// -DCUTLASS_ENABLE_GDC_FOR_SM90: launched with programmatic dependent launch (WbGemmArgs.pdl), a kernel's load
// warps wait for the kernel before it to finish before reading global memory (its stores come after its loads),
// and it lets the next kernel launch at its last tile, which waits in turn (plugins/common.py await_inputs): the
// memory order of plain stream order, without the launch gap between kernels.
#include <cuda_runtime.h>
#include <cstddef>
#include <cstdint>

// The arguments of one GEMM, laid out as plugins/cutlass_int8.py's ctypes Structure (wb_cutlass_args_size checks).
//   out[m, n] = epilogue(sum_k a[m, k] * w[n, k]) for int8 a [M, K] (row-major, one scale a_scale) and int8 w [N, K]
//   (row-major, one scale per row w_scale[N]); bias float32 [N]. `res`: the residual [M, N] (INT8 codes or FP16);
//   `vec`: the residual codes' scales (epilogue 1) or the output codes' reciprocal scales (epilogues 4, 5), one per
//   channel, or nullptr for the single value `vec_default`.
struct WbGemmArgs {
  const int8_t* a;
  const int8_t* w;
  const float* w_scale;
  const float* bias;
  const void* res;
  const float* vec;
  void* out;
  void* workspace;
  cudaStream_t stream;
  size_t workspace_bytes;
  float a_scale;
  float vec_default;
  int m, n, k;
  int sm_count;
  int pdl;  // launch with programmatic dependent launch (plugins.common.pdl), as our Triton kernels do
};

// Status codes (plugins/cutlass_int8.py STATUS): 0 done; 1 CUTLASS cannot implement this problem; 2 workspace too
// small; 3 initialize failed; 4 launch failed; 5 no such configuration; 6 no such epilogue.

#if defined(WB_EPILOGUE)
#include <cutlass/cutlass.h>
#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/fast_math.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/util/packed_stride.hpp>

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;
using cutlass::Array;

namespace wb {
// The epilogue math of plugins.int8_linear.quantized_epilogue_reference, op for op in float32 with rounded
// multiplies and adds (no contraction into FMAs, which would round differently from the reference):
//   y = acc * (w_scale[n] * a_scale) + bias[n]
// then, by epilogue: y [FP16]; y + res_codes * vec [FP16] (-iln's INT8 residual); y + res [FP16]; gelu(y) [FP16];
// codes of y * vec; codes of gelu(y) * vec. gelu is the tanh form on the hardware's tanh.approx, as the Triton
// kernels compute it (plugins/int8_linear.py epilogue_gelu); codes clamp at -127 here and saturate at 127 in the
// conversion to int8 (cvt.rni.sat: round half to even), INT8's symmetric range.
CUTLASS_DEVICE float affine(float acc, float ws, float as, float b) {
  return __fadd_rn(__fmul_rn(acc, __fmul_rn(ws, as)), b);
}
CUTLASS_DEVICE float gelu(float y) {
  float u = __fmul_rn(y, fmaf(__fmul_rn(y, y), 0.035677408136300125f, 0.7978845608028654f));
  return 0.5f * fmaf(y, cutlass::fast_tanh(u), y);
}
CUTLASS_DEVICE float codes(float y, float recip) { return fmaxf(__fmul_rn(y, recip), -127.0f); }

#define WB_ELEMENTWISE(NAME, PARAMS, EXPR)                                                       \
  template <class T>                                                                            \
  struct NAME;                                                                                  \
  template <int N>                                                                              \
  struct NAME<Array<float, N>> {                                                                \
    using V = Array<float, N>;                                                                  \
    CUTLASS_DEVICE V operator()PARAMS const {                                                   \
      V y;                                                                                      \
      _Pragma("unroll")                                                                         \
      for (int i = 0; i < N; ++i) y[i] = EXPR;                                                  \
      return y;                                                                                 \
    }                                                                                           \
  };
WB_ELEMENTWISE(Plain, (V const& acc, V const& ws, V const& as, V const& b), affine(acc[i], ws[i], as[i], b[i]))
WB_ELEMENTWISE(PlusResidualCodes, (V const& acc, V const& ws, V const& as, V const& b, V const& r, V const& rs),
               __fadd_rn(affine(acc[i], ws[i], as[i], b[i]), __fmul_rn(r[i], rs[i])))
WB_ELEMENTWISE(PlusResidual, (V const& acc, V const& ws, V const& as, V const& b, V const& r),
               __fadd_rn(affine(acc[i], ws[i], as[i], b[i]), r[i]))
WB_ELEMENTWISE(Gelu, (V const& acc, V const& ws, V const& as, V const& b), gelu(affine(acc[i], ws[i], as[i], b[i])))
WB_ELEMENTWISE(Codes, (V const& acc, V const& ws, V const& as, V const& b, V const& recip),
               codes(affine(acc[i], ws[i], as[i], b[i]), recip[i]))
WB_ELEMENTWISE(GeluCodes, (V const& acc, V const& ws, V const& as, V const& b, V const& recip),
               codes(gelu(affine(acc[i], ws[i], as[i], b[i])), recip[i]))
#undef WB_ELEMENTWISE

constexpr auto Round = cutlass::FloatRoundStyle::round_to_nearest;
template <class Tile>
using Vec = fusion::Sm90RowBroadcast<0, Tile, float>;  // one value per output channel, or its null_default
using Scalar = fusion::Sm90ScalarBroadcast<float>;

// Each epilogue: C, the residual's element (void: none); D, the output's; the visitor tree; its arguments.
// Tree arguments list the children's, then the node's own (empty for a compute node).
template <template <class> class Fn, class D_, class C_, bool HasVec>
struct Epilogue {
  using C = C_;
  using D = D_;
  template <class Tile>
  using Tree = cute::conditional_t<
      cute::is_void_v<C>,
      cute::conditional_t<HasVec,
                          fusion::Sm90EVT<fusion::Sm90Compute<Fn, D, float, Round>, fusion::Sm90AccFetch, Vec<Tile>,
                                          Scalar, Vec<Tile>, Vec<Tile>>,
                          fusion::Sm90EVT<fusion::Sm90Compute<Fn, D, float, Round>, fusion::Sm90AccFetch, Vec<Tile>,
                                          Scalar, Vec<Tile>>>,
      cute::conditional_t<HasVec,
                          fusion::Sm90EVT<fusion::Sm90Compute<Fn, D, float, Round>, fusion::Sm90AccFetch, Vec<Tile>,
                                          Scalar, Vec<Tile>, fusion::Sm90SrcFetch<C>, Vec<Tile>>,
                          fusion::Sm90EVT<fusion::Sm90Compute<Fn, D, float, Round>, fusion::Sm90AccFetch, Vec<Tile>,
                                          Scalar, Vec<Tile>, fusion::Sm90SrcFetch<C>>>>;
  template <class Tile>
  static typename Tree<Tile>::Arguments args(WbGemmArgs const& g) {
    typename Vec<Tile>::Arguments ws{g.w_scale}, bias{g.bias}, vec{g.vec, g.vec_default};
    typename Scalar::Arguments as{{g.a_scale}};
    if constexpr (cute::is_void_v<C>) {
      if constexpr (HasVec) return {{}, ws, as, bias, vec, {}};
      else return {{}, ws, as, bias, {}};
    } else {
      if constexpr (HasVec) return {{}, ws, as, bias, {}, vec, {}};
      else return {{}, ws, as, bias, {}, {}};
    }
  }
};

// Index = the epilogue's number in plugins/cutlass_int8.py EPILOGUES.
using Epilogue0 = Epilogue<Plain, cutlass::half_t, void, false>;                  // bias -> fp16
using Epilogue1 = Epilogue<PlusResidualCodes, cutlass::half_t, int8_t, true>;     // bias + residual codes -> fp16
using Epilogue2 = Epilogue<PlusResidual, cutlass::half_t, cutlass::half_t, false>; // bias + fp16 residual -> fp16
using Epilogue3 = Epilogue<Gelu, cutlass::half_t, void, false>;                   // bias + gelu -> fp16
using Epilogue4 = Epilogue<Codes, int8_t, void, true>;                            // bias -> int8 codes
using Epilogue5 = Epilogue<GeluCodes, int8_t, void, true>;                        // bias + gelu -> int8 codes

template <class E, class TileShape, class ClusterShape, class MainloopSchedule, class EpilogueSchedule>
struct Kernel {
  using Tree = typename E::template Tree<TileShape>;
  using LayoutA = cutlass::layout::RowMajor;     // activations [M, K]
  using LayoutB = cutlass::layout::ColumnMajor;  // weights [N, K] row-major: B = W^T [K, N], column-major
  using LayoutD = cutlass::layout::RowMajor;
  using ElementC = cute::conditional_t<cute::is_void_v<typename E::C>, int8_t, typename E::C>;
  static constexpr int AlignC = 128 / cutlass::sizeof_bits<ElementC>::value;
  static constexpr int AlignD = 128 / cutlass::sizeof_bits<typename E::D>::value;
  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float, typename E::C, LayoutD, AlignC,
      typename E::D, LayoutD, AlignD, EpilogueSchedule, Tree>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, int8_t, LayoutA, 16, int8_t, LayoutB, 16, int32_t,
      TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<
      cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, CollectiveEpilogue>>;

  static typename Gemm::Arguments arguments(WbGemmArgs const& g) {
    using K = typename Gemm::GemmKernel;
    cutlass::KernelHardwareInfo hw;
    hw.sm_count = g.sm_count;
    return {cutlass::gemm::GemmUniversalMode::kGemm,
            {g.m, g.n, g.k, 1},
            {g.a, cutlass::make_cute_packed_stride(typename K::StrideA{}, {g.m, g.k, 1}), g.w,
             cutlass::make_cute_packed_stride(typename K::StrideB{}, {g.n, g.k, 1})},
            {E::template args<TileShape>(g), static_cast<ElementC const*>(g.res),
             cutlass::make_cute_packed_stride(typename K::StrideC{}, {g.m, g.n, 1}),
             static_cast<typename E::D*>(g.out),
             cutlass::make_cute_packed_stride(typename K::StrideD{}, {g.m, g.n, 1})},
            hw};
  }
  static size_t workspace(WbGemmArgs const& g) { return Gemm::get_workspace_size(arguments(g)); }
  static int run(WbGemmArgs const& g) {
    auto args = arguments(g);
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
    if (Gemm::get_workspace_size(args) > g.workspace_bytes) return 2;
    if (gemm.initialize(args, g.workspace, g.stream) != cutlass::Status::kSuccess) return 3;
    return gemm.run(g.stream, nullptr, g.pdl != 0) == cutlass::Status::kSuccess ? 0 : 4;
  }
};

using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Ping = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using PingEpi = cutlass::epilogue::TmaWarpSpecialized;

// The configurations, in the order of plugins/cutlass_int8.py CONFIGS: tile M x N x K per CTA, schedule, cluster
// (CTAs that share an operand tile through TMA multicast).
template <class E, class F>
int with_config(int config, F f) {
  switch (config) {
    case 0: return f(Kernel<E, Shape<_128, _128, _128>, Shape<_1, _1, _1>, Coop, CoopEpi>{});
    case 1: return f(Kernel<E, Shape<_128, _256, _128>, Shape<_1, _1, _1>, Coop, CoopEpi>{});
    case 2: return f(Kernel<E, Shape<_64, _128, _128>, Shape<_1, _1, _1>, Ping, PingEpi>{});
    case 3: return f(Kernel<E, Shape<_128, _256, _128>, Shape<_2, _1, _1>, Coop, CoopEpi>{});
    case 4: return f(Kernel<E, Shape<_128, _128, _128>, Shape<_1, _2, _1>, Ping, PingEpi>{});
    case 5: return f(Kernel<E, Shape<_128, _128, _128>, Shape<_2, _1, _1>, Ping, PingEpi>{});
    case 6: return f(Kernel<E, Shape<_256, _128, _128>, Shape<_1, _2, _1>, Coop, CoopEpi>{});
    default: return -5;
  }
}
}  // namespace wb

#define WB_CAT2(a, b) a##b
#define WB_CAT(a, b) WB_CAT2(a, b)
extern "C" int WB_CAT(wb_cutlass_gemm_e, WB_EPILOGUE)(int config, const WbGemmArgs* g, size_t* workspace_bytes) {
  using E = WB_CAT(wb::Epilogue, WB_EPILOGUE);
  int rc = wb::with_config<E>(config, [&](auto kernel) {
    using Kern = decltype(kernel);
    if (workspace_bytes) {
      *workspace_bytes = Kern::workspace(*g);
      return 0;
    }
    return Kern::run(*g);
  });
  return rc == -5 ? 5 : rc;
}
#endif  // WB_EPILOGUE

#if defined(WB_DISPATCH)
#define WB_EPILOGUES(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define WB_DECLARE(e) int wb_cutlass_gemm_e##e(int, const WbGemmArgs*, size_t*);
extern "C" {
WB_EPILOGUES(WB_DECLARE)

static const char* const CONFIG_NAMES[] = {"coop-128x128x128", "coop-128x256x128", "ping-64x128x128",
                                           "coop-128x256x128-c2x1", "ping-128x128x128-c1x2",
                                           "ping-128x128x128-c2x1", "coop-256x128x128-c1x2"};

int wb_cutlass_args_size() { return static_cast<int>(sizeof(WbGemmArgs)); }
const char* wb_cutlass_config_name(int config) {
  return config >= 0 && config < static_cast<int>(sizeof(CONFIG_NAMES) / sizeof(CONFIG_NAMES[0]))
             ? CONFIG_NAMES[config] : nullptr;
}

// Runs the GEMM, or with workspace_bytes non-null only stores the workspace it needs there. Returns a status code.
int wb_cutlass_gemm(int epilogue, int config, const WbGemmArgs* g, size_t* workspace_bytes) {
  switch (epilogue) {
#define WB_CASE(e) case e: return wb_cutlass_gemm_e##e(config, g, workspace_bytes);
    WB_EPILOGUES(WB_CASE)
#undef WB_CASE
    default: return 6;
  }
}
}
#endif  // WB_DISPATCH
