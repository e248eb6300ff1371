"""Load a question-answering BERT: a Hugging Face folder (config.json + model.safetensors) or a random preset.

Pickle checkpoints (`pytorch_model.bin`) run code on load, so they are refused unless the user passes
`--trust-pickle`, and even then go through `torch.load(weights_only=True)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from common.errors import WorkbenchError
from common.files import sha256_file
from model.bert import BertQA
from model.config import PRESETS, BertConfig, load_hf_config

SAFETENSORS_NAME = "model.safetensors"
PICKLE_NAME = "pytorch_model.bin"


@dataclass
class LoadedModel:
    model: BertQA                  # FP32 on the CPU; callers cast and move it
    config: BertConfig
    source: str                    # folder path or preset name
    digest: str                    # identifies the weights: sha256 of the weights file, or preset + seed
    model_dir: Path | None         # None for presets (they have no tokenizer)


def load_model(spec: str | Path, *, trust_pickle: bool = False, seed: int = 0) -> LoadedModel:
    """`spec` is a preset name (bert-base, bert-large) or a Hugging Face-layout folder."""
    if str(spec) in PRESETS:
        cfg = PRESETS[str(spec)]
        return LoadedModel(BertQA(cfg).init_random(seed), cfg, str(spec), f"preset:{spec}:seed{seed}", None)
    folder = Path(spec)
    if not folder.is_dir():
        raise WorkbenchError(f"{folder}: model folder not found (or use a preset: {', '.join(PRESETS)})")
    cfg = load_hf_config(folder / "config.json")
    weights_file, state = _read_weights(folder, trust_pickle)
    model = BertQA(cfg)
    model.load_state_dict(from_hf_state_dict(state, cfg, weights_file))
    return LoadedModel(model.float(), cfg, str(folder), sha256_file(weights_file), folder)


def _read_weights(folder: Path, trust_pickle: bool) -> tuple[Path, dict[str, torch.Tensor]]:
    st, pk = folder / SAFETENSORS_NAME, folder / PICKLE_NAME
    if st.exists():
        try:
            return st, load_file(st)
        except (SafetensorError, OSError, ValueError) as e:
            raise WorkbenchError(f"{st}: unreadable safetensors file ({e})") from None
    if pk.exists():
        if not trust_pickle:
            raise WorkbenchError(f"{pk}: pickle checkpoints can run arbitrary code; convert it to {SAFETENSORS_NAME} "
                                 "or pass --trust-pickle (it is then loaded with weights_only=True)")
        try:
            state = torch.load(pk, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for bad or unsafe pickles
            raise WorkbenchError(f"{pk}: cannot load with weights_only=True ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict):
            raise WorkbenchError(f"{pk}: expected a state dict of tensors")
        return pk, state
    raise WorkbenchError(f"{folder}: no weights ({SAFETENSORS_NAME} or {PICKLE_NAME})")


def hf_names(cfg: BertConfig) -> dict[str, tuple[str, ...]]:
    """Our parameter name -> the Hugging Face names it is made of (several are concatenated on dim 0)."""
    names: dict[str, tuple[str, ...]] = {}
    emb = "bert.embeddings."
    for ours, theirs in (("word", "word_embeddings"), ("position", "position_embeddings"),
                         ("token_type", "token_type_embeddings")):
        names[f"embeddings.{ours}.weight"] = (f"{emb}{theirs}.weight",)
    for p in ("weight", "bias"):
        names[f"embeddings.ln.{p}"] = (f"{emb}LayerNorm.{p}",)
        names[f"qa.{p}"] = (f"qa_outputs.{p}",)
        for i in range(cfg.num_layers):
            hf = f"bert.encoder.layer.{i}."
            names[f"layers.{i}.qkv.{p}"] = tuple(f"{hf}attention.self.{n}.{p}" for n in ("query", "key", "value"))
            names[f"layers.{i}.attn_out.{p}"] = (f"{hf}attention.output.dense.{p}",)
            names[f"layers.{i}.ln1.{p}"] = (f"{hf}attention.output.LayerNorm.{p}",)
            names[f"layers.{i}.fc1.{p}"] = (f"{hf}intermediate.dense.{p}",)
            names[f"layers.{i}.fc2.{p}"] = (f"{hf}output.dense.{p}",)
            names[f"layers.{i}.ln2.{p}"] = (f"{hf}output.LayerNorm.{p}",)
    return names


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: BertConfig, source: Path) -> dict[str, torch.Tensor]:
    """Map and check a Hugging Face state dict against the config; any mismatch is a one-line error."""
    if not any(k.startswith("bert.") for k in state):  # a bare BertModel export: add the prefix back
        state = {(k if k.startswith("qa_outputs.") else f"bert.{k}"): v for k, v in state.items()}
    if "qa_outputs.weight" not in state:
        raise WorkbenchError(f"{source}: no question-answering head (qa_outputs.weight): not a SQuAD checkpoint")
    with torch.device("meta"):  # shapes only, without allocating a model
        shapes = {k: tuple(v.shape) for k, v in BertQA(cfg).state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in hf_names(cfg).items():
        parts = []
        for name in theirs:
            if name not in state:
                raise WorkbenchError(f"{source}: missing tensor {name} (config.json says {cfg.num_layers} layers)")
            parts.append(state[name])
        tensor = torch.cat(parts, 0) if len(parts) > 1 else parts[0]
        if tuple(tensor.shape) != shapes[ours]:
            got = " + ".join(str(list(p.shape)) for p in parts)
            raise WorkbenchError(f"{source}: weights do not fit config.json: {theirs[0]} has shape {got}, "
                                 f"the config implies {list(shapes[ours])} for {ours}")
        out[ours] = tensor.float()
    extra_layers = sorted({int(k.split(".")[3]) for k in state if k.startswith("bert.encoder.layer.")
                           and int(k.split(".")[3]) >= cfg.num_layers})
    if extra_layers:
        raise WorkbenchError(f"{source}: weights have layer {extra_layers[0]} but config.json says "
                             f"{cfg.num_layers} layers")
    return out

