"""BERT shape description, read from a Hugging Face `config.json` or taken from a named preset."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from common.errors import WorkbenchError
from common.files import read_json


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "BertConfig":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


# Random-weight shapes for timing work (uncased vocabulary): latency does not depend on weight values.
PRESETS: dict[str, BertConfig] = {
    "bert-base": BertConfig(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "bert-large": BertConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
}

# Hugging Face field name -> ours. Fields not listed keep their name.
_HF_NAMES = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads"}
_SUPPORTED_ACTS = ("gelu",)


def load_hf_config(path: str | Path) -> BertConfig:
    """Read a Hugging Face BERT `config.json`, refusing shapes and options the reference forward does not implement."""
    path = Path(path)
    raw = read_json(path, "model config")
    if not isinstance(raw, dict):
        raise WorkbenchError(f"{path}: expected a JSON object")
    model_type = raw.get("model_type", "bert")
    if model_type != "bert":
        raise WorkbenchError(f"{path}: model_type is {model_type!r}; only BERT checkpoints are supported")
    fields = {_HF_NAMES.get(k, k): v for k, v in raw.items()}
    missing = [n for n in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size") if n not in fields]
    if missing:
        raise WorkbenchError(f"{path}: missing {', '.join(missing)}")
    cfg = BertConfig.from_json(fields)
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                 "max_position_embeddings", "type_vocab_size"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise WorkbenchError(f"{path}: {name} must be a positive integer, got {value!r}")
    if cfg.hidden_size % cfg.num_heads:
        raise WorkbenchError(f"{path}: hidden_size {cfg.hidden_size} is not divisible by num_attention_heads {cfg.num_heads}")
    if cfg.hidden_act not in _SUPPORTED_ACTS:
        raise WorkbenchError(f"{path}: hidden_act {cfg.hidden_act!r} is not supported (only {', '.join(_SUPPORTED_ACTS)})")
    if raw.get("position_embedding_type", "absolute") != "absolute":
        raise WorkbenchError(f"{path}: position_embedding_type {raw['position_embedding_type']!r} is not supported")
    return cfg
