"""QAT's output: a Hugging Face-layout model folder that also holds the learned scales.

    config.json            the source model's (BERT, Hugging Face field names)
    model.safetensors      the trained float weights, Hugging Face tensor names (model.checkpoint.hf_names)
    vocab.txt, tokenizer.json, ...   copied from the source folder (with -v: that file as vocab.txt, no tokenizer.json)
    quant_spec.json        {"format": "bert-int8-workbench/qat-scales", "format_version": 1,
                            "policy": {"int8", "iln", "imh", "fp16_gemms"}: the flags it was trained for,
                            "spec": QuantSpec.to_json() (source "qat"),
                            "smooth": {site: [s...]} for smoothed (per-channel) sites,
                            "training": what produced it (informational)}

The weights are stored unquantized: the build rounds them per output channel from the weights themselves
(quant.quantizer.weight_scales, on W * s for a smoothed GEMM input), exactly as the QAT forward did, so the folder
plus quant_spec.json determine the engine. `model.checkpoint.load_model` reads the folder like any other model
(quant_spec.json is ignored there); `read_qat_scales`/`load_qat_spec` read the scales, so a build can take them
instead of a calibration cache. A fine-tuned (FP) model is the same folder without quant_spec.json.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

from common.errors import WorkbenchError
from common.files import atomic_path, atomic_write_json, atomic_write_text, read_json, sha256_bytes
from model.bert import BertQA, all_sites
from model.checkpoint import SAFETENSORS_NAME, hf_names
from model.config import BertConfig, load_hf_config
from qat.model import learned_spec, policy_of, smoothing_of
from quant.policy import PrecisionPolicy
from quant.smoothing import check_vectors
from quant.spec import PER_CHANNEL, QuantSpec

QUANT_SPEC_NAME = "quant_spec.json"
FORMAT = "bert-int8-workbench/qat-scales"
FORMAT_VERSION = 1
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
POLICY_FLAGS = ("int8", "iln", "imh", "fp16_gemms")


@dataclass(frozen=True)
class QatScales:
    """What quant_spec.json holds: the learned spec, the policy flags it was trained for, the smoothing vectors."""

    spec: QuantSpec
    policy: dict[str, Any]            # {"int8": bool, "iln": bool, "imh": bool, "fp16_gemms": [GEMM names]}
    smooth: dict[str, torch.Tensor]   # smoothed sites -> s (float32)

    def precision_policy(self, **build_flags: Any) -> PrecisionPolicy:
        """The trained-for flags as a PrecisionPolicy (plus build-only flags such as fp16=True)."""
        return PrecisionPolicy(**{**self.policy, "fp16_gemms": tuple(self.policy["fp16_gemms"]), **build_flags})

    def key(self) -> str:
        """sha256 over the scales themselves (spec, trained-for flags, smoothing vectors), as CalibrationCache.key()
        is for a cache: an engine header's calib_digest, so a build (and a sweep's reuse check) knows which scales
        it was made from. The format name keeps it apart from any calibration cache's key."""
        body = {"format": FORMAT, "spec": self.spec.to_json(),
                "policy": {**self.policy, "fp16_gemms": sorted(self.policy["fp16_gemms"])},
                "smooth": {site: [float(v) for v in s.tolist()] for site, s in sorted(self.smooth.items())}}
        return sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())

    def describe(self) -> str:
        """For reports and engine headers, as CalibrationCache.describe is: "QAT (learned, +smooth)"."""
        return "QAT (learned" + (", +smooth)" if self.smooth else ")")

    def spec_for(self, policy: PrecisionPolicy, num_layers: int,
                 where: str = "the QAT scales") -> tuple[QuantSpec, dict[str, torch.Tensor]]:
        """The learned spec restricted to the sites `policy` quantizes, with their smoothing vectors: a build may
        quantize fewer sites than QAT trained (the rest stay FP), not more (their ranges were never learned)."""
        sites = policy.quantized_sites(num_layers)
        missing = [s for s in sites if s not in self.spec.sites]
        if missing:
            trained = self.precision_policy().describe()
            raise WorkbenchError(f"{where} were trained for {trained} and have no range for {missing[0]} "
                                 f"({len(missing)} sites missing): build with those flags, or calibrate")
        spec = QuantSpec({s: self.spec.sites[s] for s in sites}, self.spec.weight_format)
        return spec, {s: v for s, v in self.smooth.items() if s in spec.sites}


def policy_flags(policy: PrecisionPolicy) -> dict[str, Any]:
    """The flags that decide which sites are quantized (what the scales were trained for)."""
    return {"int8": policy.int8, "iln": policy.iln, "imh": policy.imh, "fp16_gemms": list(policy.fp16_gemms)}


def hf_config_json(cfg: BertConfig) -> dict[str, Any]:
    """A Hugging Face BertForQuestionAnswering config.json for `cfg` (when the source folder has none)."""
    return {"architectures": ["BertForQuestionAnswering"], "model_type": "bert", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
            "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size,
            "max_position_embeddings": cfg.max_position_embeddings, "type_vocab_size": cfg.type_vocab_size,
            "layer_norm_eps": cfg.layer_norm_eps, "hidden_act": cfg.hidden_act,
            "position_embedding_type": "absolute"}


def to_hf_state_dict(state: Mapping[str, torch.Tensor], cfg: BertConfig) -> dict[str, torch.Tensor]:
    """Our BertQA state dict -> Hugging Face tensor names (the inverse of model.checkpoint.from_hf_state_dict:
    the fused QKV weight and bias split back into query, key and value). float32, contiguous, unshared."""
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in hf_names(cfg).items():
        tensor = state[ours].detach().float().cpu()
        parts = tensor.chunk(len(theirs), dim=0) if len(theirs) > 1 else (tensor,)
        for name, part in zip(theirs, parts):
            out[name] = part.contiguous().clone()
    return out


def save_model_folder(folder: str | Path, model: BertQA, source_dir: str | Path | None,
                      vocab_file: str | Path | None = None) -> Path:
    """config.json (the source's, else generated), model.safetensors (HF names) and the source's tokenizer files.
    With `vocab_file` (-v: what the training tokenized with) that file becomes vocab.txt, and tokenizer.json and
    added_tokens.json (the source's vocabulary, which a loader would prefer or add) are neither copied nor left
    from an earlier run, so that `build` and `eval` of the folder tokenize as its training did;
    tokenizer_config.json is still copied: its lower-casing settings are the ones -v was read with.
    Each file is written to a temporary file and renamed. A QAT model's quantizers are not stored here."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    source = Path(source_dir) if source_dir is not None else None
    config_text = None
    if source is not None and (source / "config.json").is_file() and load_hf_config(source / "config.json") == cfg:
        config_text = (source / "config.json").read_text(encoding="utf-8")
    if config_text is None:
        config_text = json.dumps(hf_config_json(cfg), indent=2) + "\n"
    with torch.device("meta"):
        names = set(BertQA(cfg).state_dict())
    state = {k: v for k, v in model.state_dict().items() if k in names}
    with atomic_path(folder / SAFETENSORS_NAME) as tmp:
        save_file(to_hf_state_dict(state, cfg), str(tmp), metadata={"format": "pt"})
    atomic_write_text(folder / "config.json", config_text)
    copies = {name: source / name for name in TOKENIZER_FILES} if source is not None else {}
    if vocab_file is not None:
        bound = ("tokenizer.json", "added_tokens.json")
        copies = {**{n: p for n, p in copies.items() if n not in bound}, "vocab.txt": Path(vocab_file)}
        for name in bound:
            (folder / name).unlink(missing_ok=True)
    for name, path in copies.items():
        if path.is_file() and path.resolve() != (folder / name).resolve():
            with atomic_path(folder / name) as tmp:
                shutil.copyfile(path, tmp)
    return folder


def save_qat_folder(folder: str | Path, model: BertQA, source_dir: str | Path | None,
                    training: Mapping[str, Any] | None = None, vocab_file: str | Path | None = None) -> Path:
    """The QAT model `model` (qat.model.qat_model) as a model folder with its learned scales in quant_spec.json.
    `source_dir`: the folder it was trained from (config and tokenizer files); `training`: provenance to record;
    `vocab_file`: the -v vocabulary it was trained with (save_model_folder)."""
    folder = save_model_folder(folder, model, source_dir, vocab_file)
    save_qat_scales(folder, QatScales(learned_spec(model), policy_flags(policy_of(model)), smoothing_of(model)),
                    training)
    return folder


def save_qat_scales(folder: str | Path, scales: QatScales, training: Mapping[str, Any] | None = None) -> Path:
    """Write `scales` as the quant_spec.json of `folder` (which holds, or will hold, the config.json and weights
    they belong to): save_qat_folder's writer, also used for QAT results imported from elsewhere (qat/imports.py).
    The spec must list exactly the sites of its policy flags, as read_qat_scales checks."""
    path = Path(folder) / QUANT_SPEC_NAME
    body = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "policy": {**scales.policy, "fp16_gemms": list(scales.policy["fp16_gemms"])},
        "spec": scales.spec.to_json(),
        "smooth": {site: [float(v) for v in s.tolist()] for site, s in scales.smooth.items()},
        "training": dict(training or {}),
    }
    atomic_write_json(path, body)
    return path


def read_qat_scales(folder: str | Path) -> QatScales | None:
    """The learned scales of a QAT folder, checked against its config.json; None when it has no quant_spec.json
    (a plain model folder). A malformed file raises one-line WorkbenchErrors naming it."""
    folder = Path(folder)
    path = folder / QUANT_SPEC_NAME
    if not path.exists():
        return None
    raw = read_json(path, "QAT scales file")
    try:
        return _parse(raw, path, folder)
    except WorkbenchError as e:
        message = str(e)
        raise WorkbenchError(message if message.startswith(str(path)) else f"{path}: {message}") from None


def load_qat_spec(folder: str | Path) -> tuple[QuantSpec, dict[str, Any]] | None:
    """(the learned QuantSpec, the policy flags it was trained for) of a QAT folder, or None for a plain folder.
    The smoothing vectors of per-channel sites: read_qat_scales(folder).smooth."""
    scales = read_qat_scales(folder)
    return None if scales is None else (scales.spec, scales.policy)


def _parse(raw: Any, path: Path, folder: Path) -> QatScales:
    if not isinstance(raw, dict):
        raise WorkbenchError(f"{path}: expected a JSON object")
    if raw.get("format") != FORMAT:
        raise WorkbenchError(f"{path}: not a QAT scales file (format is {raw.get('format')!r}, expected {FORMAT!r})")
    if raw.get("format_version") != FORMAT_VERSION:
        raise WorkbenchError(f"{path}: QAT scales format version {raw.get('format_version')!r} is not supported "
                             f"(expected {FORMAT_VERSION})")
    flags = raw.get("policy")
    if not isinstance(flags, dict) or set(flags) != set(POLICY_FLAGS) or \
            not all(isinstance(flags[f], bool) for f in ("int8", "iln", "imh")) or \
            not isinstance(flags["fp16_gemms"], list) or not all(isinstance(g, str) for g in flags["fp16_gemms"]):
        raise WorkbenchError(f"{path}: 'policy' must be an object with booleans int8, iln, imh and a list "
                             "fp16_gemms of GEMM names")
    policy = PrecisionPolicy(**{**flags, "fp16_gemms": tuple(flags["fp16_gemms"])})
    if not policy.int8:
        raise WorkbenchError(f"{path}: 'policy' does not quantize anything (int8 is false)")
    spec = QuantSpec.from_json(raw.get("spec"), f"{path}: spec")
    cfg = load_hf_config(folder / "config.json")
    known = set(all_sites(cfg.num_layers))
    unknown = [s for s in spec.sites if s not in known]
    if unknown:
        raise WorkbenchError(f"{path}: site {unknown[0]!r} is not a site of this {cfg.num_layers}-layer model")
    wanted = policy.quantized_sites(cfg.num_layers)
    if set(spec.sites) != set(wanted):
        missing = [s for s in wanted if s not in spec.sites] or [s for s in spec.sites if s not in wanted]
        raise WorkbenchError(f"{path}: the sites do not match the policy flags ({missing[0]} "
                             f"{'missing' if missing[0] in wanted else 'not quantized by them'})")
    smooth_raw = raw.get("smooth", {})
    if not isinstance(smooth_raw, dict) or not all(
            isinstance(v, list) and v and all(_number(x) for x in v) for v in smooth_raw.values()):
        raise WorkbenchError(f"{path}: 'smooth' must map sites to lists of numbers")
    smooth = {site: torch.tensor(v, dtype=torch.float32) for site, v in smooth_raw.items()}
    check_vectors(smooth, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, str(path))
    per_channel = {s for s, site in spec.sites.items() if site.granularity == PER_CHANNEL}
    if per_channel != set(smooth):
        odd = sorted(per_channel ^ set(smooth))[0]
        raise WorkbenchError(f"{path}: site {odd} is {'per_channel' if odd in per_channel else 'per_tensor'} but "
                             f"{'has no' if odd in per_channel else 'has a'} smoothing vector")
    return QatScales(spec, policy_flags(policy), smooth)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
