// An experiment, not product code: does a Hopper-native INT8 GEMM from CUTLASS 3 (TMA loads, wgmma, warp-specialized
// persistent kernels, nvidia-cutlass's headers) beat our Triton INT8 GEMM at BERT's shapes? It computes the engine's
// quantized epilogues (namespace ep), so the two are timed on equal terms: built with nvcc on any machine (no GPU
// needed), then benchmarks/cutlass_int8_probe.py checks and times both in one run.
//
//   nvcc -std=c++17 -O3 -DNDEBUG -arch=sm_90a --expt-relaxed-constexpr -shared -Xcompiler -fPIC \
//        -I $CUTLASS/include -I $CUTLASS/tools/util/include \   (CUTLASS=<cutlass_library>/source, nvidia-cutlass)
//        benchmarks/cutlass_int8_probe.cu -o .cprobe/cutlass_int8_probe.so
//
// -DNDEBUG is not optional: CUTLASS's device asserts are function calls inside the main loop, and ptxas then
// serializes every wgmma ("C7510 ... wgmma pipeline crossing function boundary"): a slow kernel, not CUTLASS's.
// The build must print no C7510 line.
#include <cuda_runtime.h>
#include <cutlass/cutlass.h>
#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp>
#include <cutlass/util/packed_stride.hpp>

using namespace cute;
namespace fusion = cutlass::epilogue::fusion;

namespace ep {
// The engine's three INT8 GEMM epilogues (plugins/int8_linear.py's math, float32 throughout):
//   Plain:    out = fp16(acc * s[n] + b[n])                                    QKV
//   Residual: out = fp16((acc * s[n] + b[n]) + float(res[m, n]) * rs[n])      attention-out, FC2 under -iln
//   GeluCodes: out = int8 codes of gelu_tanh(acc * s[n] + b[n]) * recip        FC1, its codes FC2's input
// GELU_taylor is the tanh form on the hardware's tanh.approx, and the int8 conversion is cvt.rni.sat (round half
// to even, saturating), as our Triton kernels; res is read as C, the epilogue's source (int8 codes).
constexpr auto Round = cutlass::FloatRoundStyle::round_to_nearest;
template <class Tile>
using Y = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, float, float, Round>,
                          fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, float, float, Round>,
                                          fusion::Sm90AccFetch, fusion::Sm90RowBroadcast<0, Tile, float>>,
                          fusion::Sm90RowBroadcast<0, Tile, float>>;
template <class Tile>
struct Plain {
  using C = void;
  using D = cutlass::half_t;
  using Tree = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::epilogue::thread::Identity, D, float, Round>, Y<Tile>>;
  static typename Tree::Arguments args(const float* s, const float* b, const float*, float) {
    return {{{{}, {s}, {}}, {b}, {}}, {}};
  }
};
template <class Tile>
struct Residual {
  using C = int8_t;
  using D = cutlass::half_t;
  using Res = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, float, float, Round>, fusion::Sm90SrcFetch<C>,
                             fusion::Sm90RowBroadcast<0, Tile, float>>;
  using Tree = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, D, float, Round>, Y<Tile>, Res>;
  static typename Tree::Arguments args(const float* s, const float* b, const float* rs, float) {
    return {{{{}, {s}, {}}, {b}, {}}, {{}, {rs}, {}}, {}};
  }
};
template <class Tile>
struct GeluCodes {
  using C = void;
  using D = int8_t;
  using Gelu = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::epilogue::thread::GELU_taylor, float, float, Round>,
                               Y<Tile>>;
  using Tree = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, D, float, Round>, Gelu,
                               fusion::Sm90ScalarBroadcast<float>>;
  static typename Tree::Arguments args(const float* s, const float* b, const float*, float recip) {
    return {{{{{}, {s}, {}}, {b}, {}}, {}}, {{recip}}, {}};
  }
};
}  // namespace ep

template <template <class> class Epi, class TileShape, class ClusterShape, class MainloopSchedule,
          class EpilogueSchedule>
struct Int8Gemm {
  using E = Epi<TileShape>;
  using ElementA = int8_t;       // activations [M, K], row-major
  using ElementB = int8_t;       // weights [N, K], row-major: B = W^T, column-major
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int AlignC = cute::is_void_v<typename E::C> ? 8 : 16;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float,
      typename E::C, LayoutD, AlignC, typename E::D, LayoutD, 128 / cutlass::sizeof_bits<typename E::D>::value,
      EpilogueSchedule, typename E::Tree>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, LayoutA, 16, ElementB, LayoutB, 16, int32_t,
      TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static int run(const int8_t* a, const int8_t* w, const float* s, const float* b, const void* res, const float* rs,
                 float recip, void* d, int m, int n, int k, void* workspace, size_t workspace_bytes,
                 cudaStream_t stream) {
    using StrideA = typename Gemm::GemmKernel::StrideA;
    using StrideB = typename Gemm::GemmKernel::StrideB;
    using StrideC = typename Gemm::GemmKernel::StrideC;
    using StrideD = typename Gemm::GemmKernel::StrideD;
    using ElementC = cute::conditional_t<cute::is_void_v<typename E::C>, int8_t, typename E::C>;
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, k, 1},
        {a, cutlass::make_cute_packed_stride(StrideA{}, {m, k, 1}),
         w, cutlass::make_cute_packed_stride(StrideB{}, {n, k, 1})},
        {E::args(s, b, rs, recip),
         static_cast<const ElementC*>(res), cutlass::make_cute_packed_stride(StrideC{}, {m, n, 1}),
         static_cast<typename E::D*>(d), cutlass::make_cute_packed_stride(StrideD{}, {m, n, 1})}};
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 1;
    if (Gemm::get_workspace_size(args) > workspace_bytes) return 2;
    if (gemm.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return 3;
    return gemm.run(stream) == cutlass::Status::kSuccess ? 0 : 4;
  }
};

using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Ping = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using PingEpi = cutlass::epilogue::TmaWarpSpecialized;

// Tiles (M x N x K per CTA) and clusters (CTAs sharing each operand tile through TMA multicast).
#define VARIANTS(E)                                                                         \
  Int8Gemm<E, Shape<_128, _128, _128>, Shape<_1, _1, _1>, Coop, CoopEpi>,                   \
  Int8Gemm<E, Shape<_128, _256, _128>, Shape<_1, _1, _1>, Coop, CoopEpi>,                   \
  Int8Gemm<E, Shape<_64, _128, _128>, Shape<_1, _1, _1>, Ping, PingEpi>,                    \
  Int8Gemm<E, Shape<_128, _256, _128>, Shape<_2, _1, _1>, Coop, CoopEpi>,                   \
  Int8Gemm<E, Shape<_128, _128, _128>, Shape<_1, _2, _1>, Ping, PingEpi>
static const char* const NAMES[] = {"cooperative 128x128x128", "cooperative 128x256x128", "ping-pong 64x128x128",
                                    "cooperative 128x256x128, cluster 2x1", "ping-pong 128x128x128, cluster 1x2"};
constexpr int VARIANT_COUNT = sizeof(NAMES) / sizeof(NAMES[0]);

template <class V0, class V1, class V2, class V3, class V4, class... Args>
int dispatch(int v, Args... args) {
  switch (v) {
    case 0: return V0::run(args...);
    case 1: return V1::run(args...);
    case 2: return V2::run(args...);
    case 3: return V3::run(args...);
    case 4: return V4::run(args...);
    default: return 5;
  }
}

extern "C" {
const char* probe_variant_name(int v) { return v >= 0 && v < VARIANT_COUNT ? NAMES[v] : nullptr; }

// epilogue 0: plain (FP16 out), 1: residual codes (FP16 out), 2: GELU and int8 codes out (plugins/int8_linear.py).
// 0 on success; 1 cannot implement, 2 workspace too small, 3 initialize failed, 4 launch failed, 5 no variant.
int probe_gemm(int epilogue, int v, const int8_t* a, const int8_t* w, const float* s, const float* b, const void* res,
               const float* rs, float recip, void* d, int m, int n, int k, void* workspace, size_t workspace_bytes,
               cudaStream_t stream) {
  switch (epilogue) {
    case 0: return dispatch<VARIANTS(ep::Plain)>(v, a, w, s, b, res, rs, recip, d, m, n, k, workspace,
                                                 workspace_bytes, stream);
    case 1: return dispatch<VARIANTS(ep::Residual)>(v, a, w, s, b, res, rs, recip, d, m, n, k, workspace,
                                                    workspace_bytes, stream);
    case 2: return dispatch<VARIANTS(ep::GeluCodes)>(v, a, w, s, b, res, rs, recip, d, m, n, k, workspace,
                                                     workspace_bytes, stream);
    default: return 6;
  }
}
}
