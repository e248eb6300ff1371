"""The QAT and fine-tuning runs end to end: model folder + SQuAD file (+ calibration cache) -> model folder."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch


from calib.cache import load_cache
from calib.sparsity import gemm_sparsity
from calib.spec import spec_from_cache
from common.errors import WorkbenchError
from common.files import check_writable_dir
from data.features import FeatureSettings, Features, featurize
from data.squad import load_squad
from data.tokenizer import load_wordpiece
from model.checkpoint import LoadedModel, load_model
from qat.folder import QUANT_SPEC_NAME, save_model_folder, save_qat_folder
from qat.model import learned_spec, qat_model
from qat.prune import keep_masks, masks_of, prune_2to4
from qat.train import TrainConfig, TrainResult, train
from quant.policy import PrecisionPolicy
from quant.spec import QuantSpec


SPARSEGPT_WINDOWS = 128  # training windows SparseGPT collects its Hessians from (8 batches of 16)


@dataclass
class RunResult:
    folder: Path               # the written model folder
    train: TrainResult
    spec: QuantSpec | None     # the learned spec (QAT), None for fine-tuning


def training_features(loaded: LoadedModel, squad: str | Path, limit: int | None = None,
                      settings: FeatureSettings = FeatureSettings(), progress: bool = True,
                      vocab_file: str | Path | None = None) -> Features:
    """The training windows of a SQuAD file, tokenized with the model folder's tokenizer, or with `vocab_file`
    (-v), which the written folder then holds as vocab.txt (featurization cache). The vocabulary is checked
    against the model here, before the SQuAD file is read and anything trains."""
    if loaded.model_dir is None:
        raise WorkbenchError(f"{loaded.source}: training needs a model folder with its tokenizer, not a preset")
    wordpiece = load_wordpiece(loaded.model_dir, loaded.config.vocab_size, vocab_file=vocab_file)
    return featurize(load_squad(squad, limit).examples, wordpiece, settings, progress=progress)


def run_qat(model: str | Path, squad: str | Path, calib_cache: str | Path, policy: PrecisionPolicy,
            config: TrainConfig, *, limit: int | None = None, settings: FeatureSettings = FeatureSettings(),
            trust_pickle: bool = False, callback: Callable[[int, float], None] | None = None,
            sparse: bool = False, vocab_file: str | Path | None = None) -> RunResult:
    """`cli.py qat`: fake-quantized fine-tuning of the model folder `model` on the SQuAD file `squad`, ranges
    starting from `calib_cache` (and its smoothing), for the sites `policy` quantizes; learned or frozen ranges
    (config.freeze_scales); distillation from the unquantized model (config.distill); with `sparse`, a 2:4-pruned
    model (`cli.py prune`) keeps its pattern; `vocab_file` (-v) tokenizes instead of the folder's tokenizer. Writes
    config.output_dir as a QAT folder (qat/folder.py) and returns it with the training record."""
    loaded = load_model(model, trust_pickle=trust_pickle)
    cache_path = Path(calib_cache)
    if not policy.int8:
        raise WorkbenchError("QAT quantizes on top of --int8: add --int8")
    spec, smooth = spec_from_cache(load_cache(cache_path), policy, loaded.config, loaded.digest, str(cache_path))
    features = training_features(loaded, squad, limit, settings, config.progress, vocab_file)
    student = qat_model(loaded.model, policy, spec, smooth, learn_scales=not config.freeze_scales)
    if sparse:
        keep_masks(student, masks_of(student, _sparse_gemms(loaded)))
    result = train(student, features, config, teacher=loaded.model if config.distill else None,
                   callback=callback, desc="qat")
    folder = save_qat_folder(config.output_dir, student, loaded.model_dir,
                             _provenance(loaded, squad, config, result, calibration=str(cache_path),
                                         start=spec.to_json()["sites"]), vocab_file)
    return RunResult(folder, result, learned_spec(student))


def run_prune(model: str | Path, squad: str | Path, config: TrainConfig, *, method: str = "sparsegpt",
              exclude: Sequence[str] = (), limit: int | None = None, settings: FeatureSettings = FeatureSettings(),
              trust_pickle: bool = False, callback: Callable[[int, float], None] | None = None,
              vocab_file: str | Path | None = None) -> RunResult:
    """`cli.py prune`: the model folder pruned to 2:4 (qat/prune.py; SparseGPT calibrates on the first training
    windows), then fine-tuned with the masks fixed (config.max_steps / epochs; distillation from the dense model
    with config.distill); `vocab_file` as run_qat's. Writes config.output_dir as a plain model folder whose GEMM
    weights are 2:4."""
    loaded = load_model(model, trust_pickle=trust_pickle)
    features = training_features(loaded, squad, limit, settings, config.progress, vocab_file)
    student = qat_model(loaded.model, PrecisionPolicy(), QuantSpec())
    calibration = None
    if method == "sparsegpt":
        ids, types, mask = (torch.from_numpy(getattr(features, f)[:SPARSEGPT_WINDOWS]).long()
                            for f in ("input_ids", "token_type_ids", "attention_mask"))
        calibration = [(ids[i:i + 16], types[i:i + 16], mask[i:i + 16]) for i in range(0, len(ids), 16)]
    keep_masks(student, prune_2to4(student, method, exclude, calibration))
    result = train(student, features, config, teacher=loaded.model if config.distill else None,
                   callback=callback, desc="prune")
    folder = save_model_folder(config.output_dir, student, loaded.model_dir, vocab_file)
    (folder / QUANT_SPEC_NAME).unlink(missing_ok=True)
    return RunResult(folder, result, None)


def _sparse_gemms(loaded: LoadedModel) -> list[str]:
    """The 2:4-sparse GEMM weights of a pruned model; a model with none is refused (prune it first)."""
    check = gemm_sparsity(loaded.model, loaded.config.num_layers)
    if not check.sparse:
        raise WorkbenchError(f"{loaded.source}: --sparse needs a 2:4-pruned model (`cli.py prune`), and none of its "
                             "GEMM weights is 2:4")
    return list(check.sparse)


def run_finetune(model: str | Path, squad: str | Path, config: TrainConfig, *, limit: int | None = None,
                 settings: FeatureSettings = FeatureSettings(), trust_pickle: bool = False,
                 callback: Callable[[int, float], None] | None = None,
                 vocab_file: str | Path | None = None) -> RunResult:
    """`cli.py finetune`: the same loop without fake quantization (BERT's erf GELU), for FP baselines; with
    config.distill the starting model is the teacher; `vocab_file` as run_qat's. Writes config.output_dir as a
    plain model folder."""
    loaded = load_model(model, trust_pickle=trust_pickle)
    features = training_features(loaded, squad, limit, settings, config.progress, vocab_file)
    student = qat_model(loaded.model, PrecisionPolicy(), QuantSpec())
    result = train(student, features, config, teacher=loaded.model if config.distill else None,
                   callback=callback, desc="finetune")
    folder = save_model_folder(config.output_dir, student, loaded.model_dir, vocab_file)
    (folder / QUANT_SPEC_NAME).unlink(missing_ok=True)  # a plain folder: no stale scales from an earlier run
    return RunResult(folder, result, None)


def _provenance(loaded: LoadedModel, squad: str | Path, config: TrainConfig, result: TrainResult,
                **extra: object) -> Mapping[str, object]:
    return {"source_model": loaded.source, "source_digest": loaded.digest, "squad": str(squad),
            "steps": result.step, "final_loss": result.losses[-1] if result.losses else None,
            "config": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("output_dir", "progress")},
            **extra}


EXAMPLES = """examples:
  python cli.py qat --model ../shared/models/minilm-l6-h384-squad11 \\
      --squad ../shared/data/squad/train-v1.1-explorer-reconstruction.json --calib-cache minilm.calib.json \\
      -iln -imh --epochs 1 --distill -o minilm-qat/
  python cli.py build --model minilm-qat --int8 --fp16 -iln -imh -b 64 -s 384 -o engines/qat.engine
      # no --calib-cache: the folder's learned scales are used (and the build says so)
  python cli.py calibrate --model DIR --squad train.json --method mse -o mse.json
  python cli.py qat --model DIR --squad train.json --calib-cache mse.json --epochs 1 --distill --distill-alpha 1 \\
      -o DIR-qat/       # plain --int8, taught by the unquantized model alone (noisy labels play no part)
  python cli.py finetune --model DIR --squad train.json --epochs 1 -o DIR-ft/     # an FP baseline, same loop
  python cli.py qat ... -o minilm-qat/          # run again after an interruption: resumes from its checkpoint
  python cli.py prune --model DIR --squad train.json --method sparsegpt --epochs 1 --distill -o DIR-2to4/
  python cli.py prune ... --distill --distill-alpha 1 --distill-hidden 1 -o DIR-2to4/   # taught layer by layer
  python cli.py qat --model DIR-2to4 --squad train.json --calib-cache C --sparse -o DIR-2to4-qat/  # keeps 2:4
  python cli.py finetune -c DIR -v vocab.txt -sq train.json -o DIR-ft/   # TensorRT demo spellings: trained on
      # that vocabulary, and DIR-ft/ holds it as its vocab.txt (no tokenizer.json), so build and eval use it too"""


def train_config_from_flags(flags) -> TrainConfig:
    """The TrainConfig of `cli.py qat` / `cli.py finetune` flags (output, epochs, max_steps, batch_size, lr,
    distill and its alpha, temperature and hidden-state weight, device, seed, checkpoint_every, restart,
    no_progress; qat also freeze_scales and scale_lr)."""
    shaped = (flags.distill_alpha, flags.distill_temperature, flags.distill_hidden) != (
        TrainConfig.distill_alpha, TrainConfig.distill_temperature, TrainConfig.distill_hidden)
    if shaped and not flags.distill:
        raise WorkbenchError("--distill-alpha, --distill-temperature and --distill-hidden shape the --distill loss: "
                             "add --distill")
    return TrainConfig(output_dir=flags.output, epochs=flags.epochs, max_steps=flags.max_steps,
                       batch_size=flags.batch_size, lr=flags.lr, distill=flags.distill, device=flags.device,
                       seed=flags.seed, checkpoint_every=flags.checkpoint_every, resume=not flags.restart,
                       freeze_scales=getattr(flags, "freeze_scales", False), progress=not flags.no_progress,
                       distill_alpha=flags.distill_alpha, distill_temperature=flags.distill_temperature,
                       distill_hidden=flags.distill_hidden,
                       scale_lr=getattr(flags, "scale_lr", TrainConfig.scale_lr))


def _summary(verb: str, run: RunResult) -> str:
    t = run.train
    resumed = f", resumed at step {t.resumed_from}" if t.resumed_from else ""
    loss = f"loss {t.losses[0]:.3f} -> {t.losses[-1]:.3f}" if t.losses else "no steps"
    return (f"{verb}: wrote {run.folder} after {t.step} steps{resumed} ({loss}, {t.examples_per_second:,.0f} "
            f"examples/s, {t.seconds:.0f} s)")


def qat_from_flags(flags) -> str:
    """`cli.py qat`: run_qat with the flags' policy and TrainConfig; the line that says what was written."""
    from data.squad import parse_question_limit
    from quant.policy import parse_gemm_list

    policy = PrecisionPolicy(int8=True, iln=flags.iln, imh=flags.imh, fp16_gemms=parse_gemm_list(flags.keep_fp16))
    check_writable_dir(flags.output, "QAT output folder")
    run = run_qat(flags.model, flags.squad, flags.calib_cache, policy, train_config_from_flags(flags),
                  limit=parse_question_limit(flags.limit), settings=_feature_settings(flags),
                  trust_pickle=flags.trust_pickle, sparse=flags.sparse, vocab_file=getattr(flags, "vocab_file", None))
    return _summary(f"qat ({policy.describe()})", run)


def finetune_from_flags(flags) -> str:
    """`cli.py finetune`: run_finetune with the flags' TrainConfig."""
    from data.squad import parse_question_limit

    check_writable_dir(flags.output, "fine-tuned model folder")
    run = run_finetune(flags.model, flags.squad, train_config_from_flags(flags), limit=parse_question_limit(
        flags.limit), settings=_feature_settings(flags), trust_pickle=flags.trust_pickle,
        vocab_file=getattr(flags, "vocab_file", None))
    return _summary("finetune", run)


def prune_from_flags(flags) -> str:
    """`cli.py prune`: run_prune with the flags' method, exclusions and TrainConfig."""
    from data.squad import parse_question_limit
    from quant.policy import parse_gemm_list

    check_writable_dir(flags.output, "pruned model folder")
    run = run_prune(flags.model, flags.squad, train_config_from_flags(flags), method=flags.method,
                    exclude=parse_gemm_list(flags.exclude), limit=parse_question_limit(flags.limit),
                    settings=_feature_settings(flags), trust_pickle=flags.trust_pickle,
                    vocab_file=getattr(flags, "vocab_file", None))
    return _summary(f"prune (2:4, {flags.method})", run)


def _feature_settings(flags) -> FeatureSettings:
    return FeatureSettings(flags.max_seq_length, flags.doc_stride, flags.max_query_length)
