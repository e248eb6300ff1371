#!/usr/bin/env bash
# Every CUDA test (`pytest -m cuda`), split into groups that run as parallel pytest processes: Triton compiles each
# kernel variant on the CPU the first time, and one process does not finish within a device call. A group is its
# pytest arguments separated by '|'. Each group logs to /tmp/cuda-tests-N.log; at the end the logs are joined into
# $OUT/cuda-tests.log (a device call returns at most 8 files). ONLY="0 3" runs only those groups; TEST_TIMEOUT (s)
# bounds each process.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
E=tests/test_engines.py
K=$E::test_triton_kernels_agree_with_library_kernels
groups=(
  "tests/test_plugins_int8_linear.py|-k|large"
  "tests/test_plugins_int8_linear.py|-k|not large"
  "tests/test_plugins_layernorm.py|tests/test_plugins_quantize.py|tests/test_plugins_attention.py|tests/test_calib_calibrate.py|tests/test_calib_calibrators.py|tests/test_qat_train.py"
  "$E::test_cuda_engine_agrees_with_cpu_engine_and_graphs|$E::test_cuda_build_times_kernels_once|$E::test_pipelined_batches_give_the_same_logits_in_order|tests/test_engine_file.py|$E::test_dense_batches_replay_the_graph_without_a_mask|$E::test_cublaslt_gelu_is_the_tanh_form"
  "$K[int8]" "$K[int8 -iln]" "$K[int8 -imh]" "$K[int8 -iln -imh]"
  "$K[int8 --keep-fp16 attn_out,layer0.fc2]" "$K[int8 -iln --keep-fp16 layer1.fc1,qkv]"
  "tests/test_plugins_sparse.py|tests/test_qat_prune.py|tests/test_fp8.py|tests/test_interop_tensorrt.py|tests/test_throughput.py"
  "tests/test_plugins_fp8.py"
  "tests/test_varlen.py|tests/test_ray_sweep.py"
)
for i in ${ONLY:-${!groups[@]}}; do
  IFS='|' read -ra argv <<< "${groups[$i]}"
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -m cuda -p no:cacheprovider "${argv[@]}" \
    > "/tmp/cuda-tests-$i.log" 2>&1 &
done
wait
for i in ${ONLY:-${!groups[@]}}; do
  echo "=== group $i: ${groups[$i]}" >> "$OUT/cuda-tests.log"; cat "/tmp/cuda-tests-$i.log" >> "$OUT/cuda-tests.log"
  echo "--- ${groups[$i]}"; tail -2 "/tmp/cuda-tests-$i.log"
done
