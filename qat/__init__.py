"""Quantization-aware training (issue 18): fine-tune with the engine's INT8 rounding in the loop, learn the ranges.

    qat/fakequant.py  the trainable quantizer: the engine's codes (quant.quantizer) in the forward, straight-through
                      gradients, LSQ's rule for amax; why not modelopt's TensorQuantizer
    qat/model.py      qat_model(): a copy of BertQA that computes quant.fakequant.fake_quant_model's function at
                      exactly its sites, with the amax of each site as a parameter; learned_spec()
    qat/train.py      the loop (QAT and plain fine-tuning): span CE, optional distillation, AdamW + linear
                      warm-up/decay, bf16 autocast on CUDA, progress bar, resumable safetensors/JSON checkpoints
    qat/folder.py     the output: a Hugging Face-layout folder + quant_spec.json (learned spec, the flags it was
                      trained for, smoothing vectors); read_qat_scales()/load_qat_spec() for the build
    qat/run.py        run_qat() / run_finetune(): model folder + SQuAD (+ calibration cache) -> model folder

For the CLI:

    from qat import TrainConfig, run_qat, run_finetune
    run_qat(model_dir, squad_json, calib_cache, PrecisionPolicy(int8=True, iln=..., imh=..., fp16_gemms=...),
            TrainConfig(output_dir=out, epochs=..., max_steps=..., lr=..., batch_size=..., distill=...,
                        freeze_scales=...))
    run_finetune(model_dir, squad_json, TrainConfig(output_dir=out, ...))

and for a build taking its scales from such a folder: `read_qat_scales(folder)` (None for a plain folder) gives
the spec, the policy flags it was trained for and the smoothing vectors of its per-channel sites.
"""
from qat.folder import QatScales, load_qat_spec, read_qat_scales, save_qat_folder
from qat.model import learned_spec, qat_model
from qat.run import RunResult, run_finetune, run_qat
from qat.train import TrainConfig, TrainResult, train

__all__ = ["QatScales", "RunResult", "TrainConfig", "TrainResult", "learned_spec", "load_qat_spec", "qat_model",
           "read_qat_scales", "run_finetune", "run_qat", "save_qat_folder", "train"]
