"""The quantization core: formats, per-site specs, the quantizer, the precision policy, smoothing and the
fake-quant reference. calib/, qat/, plugins/ and engines/ depend on it; it depends on none of them."""
