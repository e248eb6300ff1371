// An experiment, not product code: does a Hopper-native INT8 GEMM from CUTLASS 3 (TMA loads, wgmma, warp-specialized
// persistent kernels, nvidia-cutlass's headers) beat our Triton INT8 GEMM at BERT's shapes? It computes our
// simplest quantized epilogue, out = fp16(float(acc) * scale[n] + bias[n]), so the two can be timed on equal terms
// (benchmarks/cutlass_int8_probe.py builds this file with nvcc and times both in one run).
//
//   nvcc -std=c++17 -O3 -arch=sm_90a --expt-relaxed-constexpr -shared -Xcompiler -fPIC \
//        -I $CUTLASS/include -I $CUTLASS/tools/util/include \   (CUTLASS=<cutlass_library>/source, nvidia-cutlass)
//        benchmarks/cutlass_int8_probe.cu -o cutlass_int8_probe.so
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

template <class TileShape, class ClusterShape, class MainloopSchedule, class EpilogueSchedule>
struct ScaledBiasGemm {
  using ElementA = int8_t;       // activations [M, K], row-major
  using ElementB = int8_t;       // weights [N, K], row-major: B = W^T, column-major
  using ElementD = cutlass::half_t;
  using LayoutA = cutlass::layout::RowMajor;
  using LayoutB = cutlass::layout::ColumnMajor;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr auto Round = cutlass::FloatRoundStyle::round_to_nearest;

  // out = fp16(acc * scale[n] + bias[n]): two roundings in float32, as our reference's separate ops
  using Scale = fusion::Sm90RowBroadcast<0, TileShape, float>;
  using Bias = fusion::Sm90RowBroadcast<0, TileShape, float>;
  using Scaled = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::multiplies, float, float, Round>, fusion::Sm90AccFetch,
                                 Scale>;
  using Output = fusion::Sm90EVT<fusion::Sm90Compute<cutlass::plus, ElementD, float, Round>, Scaled, Bias>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, int32_t, float,
      void, LayoutD, 8, ElementD, LayoutD, 8, EpilogueSchedule, Output>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, ElementA, LayoutA, 16, ElementB, LayoutB, 16, int32_t,
      TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

  static int run(const int8_t* a, const int8_t* w, const float* scale, const float* bias, void* d, int m, int n,
                 int k, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
    using StrideA = typename Gemm::GemmKernel::StrideA;
    using StrideB = typename Gemm::GemmKernel::StrideB;
    using StrideD = typename Gemm::GemmKernel::StrideD;
    typename Gemm::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        {m, n, k, 1},
        {a, cutlass::make_cute_packed_stride(StrideA{}, {m, k, 1}),
         w, cutlass::make_cute_packed_stride(StrideB{}, {n, k, 1})},
        {{{{}, {scale}, {}}, {bias}, {}},  // Output(Scaled(acc, scale), bias)
         nullptr, cutlass::make_cute_packed_stride(StrideD{}, {m, n, 1}),
         static_cast<ElementD*>(d), cutlass::make_cute_packed_stride(StrideD{}, {m, n, 1})}};
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

using V0 = ScaledBiasGemm<Shape<_128, _128, _128>, Shape<_1, _1, _1>, Coop, CoopEpi>;
using V1 = ScaledBiasGemm<Shape<_128, _256, _128>, Shape<_1, _1, _1>, Coop, CoopEpi>;
using V2 = ScaledBiasGemm<Shape<_64, _128, _128>, Shape<_1, _1, _1>, Ping, PingEpi>;
using V3 = ScaledBiasGemm<Shape<_128, _256, _128>, Shape<_2, _1, _1>, Coop, CoopEpi>;

extern "C" {
const char* probe_variant_name(int v) {
  switch (v) {
    case 0: return "cooperative 128x128x128, cluster 1x1";
    case 1: return "cooperative 128x256x128, cluster 1x1";
    case 2: return "ping-pong 64x128x128, cluster 1x1";
    case 3: return "cooperative 128x256x128, cluster 2x1";
    default: return nullptr;
  }
}

// 0 on success; 1 cannot implement, 2 workspace too small, 3 initialize failed, 4 launch failed, 5 no variant.
int probe_gemm(int v, const int8_t* a, const int8_t* w, const float* scale, const float* bias, void* d, int m, int n,
               int k, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  switch (v) {
    case 0: return V0::run(a, w, scale, bias, d, m, n, k, workspace, workspace_bytes, stream);
    case 1: return V1::run(a, w, scale, bias, d, m, n, k, workspace, workspace_bytes, stream);
    case 2: return V2::run(a, w, scale, bias, d, m, n, k, workspace, workspace_bytes, stream);
    case 3: return V3::run(a, w, scale, bias, d, m, n, k, workspace, workspace_bytes, stream);
    default: return 5;
  }
}
}
