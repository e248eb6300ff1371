"""Interop with other runtimes (issue 22): a build as explicit-quantization ONNX (onnx_export), that file run by
ONNX Runtime (ort_runner), and a TensorRT 10 engine built from it where TensorRT imports (tensorrt_backend).

Imports are lazy: nothing here loads onnx, onnxruntime or tensorrt until a function that needs it is called.
"""
