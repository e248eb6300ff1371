"""The training loop of QAT and of plain fine-tuning: SQuAD span loss, optional distillation, AdamW, checkpoints.

One loop for both: QAT trains a qat.model.qat_model copy (fake quantization at the engine's sites, learned or
frozen ranges), fine-tuning the plain copy (qat_model with a policy that quantizes nothing).

- Data: `data.features.Features` windows (a long context gives a question several); the labels are each window's
  `start_positions`/`end_positions` (token indices; 0, the [CLS] token, where the answer is not in the window, as
  Hugging Face's run_qa trains). An epoch is one pass over the windows in a fresh order:
  numpy.random.default_rng([seed, epoch]).permutation, so the order is a function of (seed, epoch) and a resumed
  run sees the same batches. The last batch of an epoch may be smaller.
- Loss: (CE(start) + CE(end)) / 2 over all positions (run_qa's loss). With `distill`, the frozen teacher's
  start/end logits as well (Hinton et al. 2015):
      loss = (1 - alpha) * CE + alpha * T^2 * (KL(p_T(teacher) || p_T(student))_start + ..._end) / 2
  with p_T = softmax(logits / T). T = `distill_temperature` (default 2: softens the teacher's peaked span
  distributions so the ranks of the runner-up positions carry signal; the T^2 keeps the gradient's size
  comparable to the CE's as T changes), alpha = `distill_alpha` (default 0.5). With `distill_hidden` = beta > 0,
  also the teacher's hidden states (TinyBERT's intermediate-layer distillation, Jiao et al. 2020): + beta * the
  mean over layers of the mean squared difference of each encoder layer's output, per element of the real
  tokens (padding left out). A model that lost half its weights (2:4) or rounds every activation (QAT) is then
  told, layer by layer, what the dense one computed, not only where its spans end up.
- AdamW: weight decay on matrices only (not biases, LayerNorms, nor the ranges), the amax parameters in their own
  group at `scale_lr` (qat/fakequant.py says why); the learning rate rises linearly over `warmup_ratio` of the
  steps and falls linearly to 0 (Hugging Face's linear schedule); gradients clipped to `max_grad_norm`. Learned
  ranges are kept above qat.fakequant.MIN_AMAX after every step.
- bf16 autocast on CUDA (`bf16`); the fake quantization computes its codes in float32 whatever the autocast, but
  the GEMMs then see bf16-rounded values, so only FP32 training is bit-exact to the engine's function.
  On CUDA, layers whose attention probabilities are not rounded (all but -imh) run their attention fused, the
  teacher's too (model.bert.training_step, fuses_attention: SDPA, the same function without the FP32
  probabilities tensor).
- A tqdm bar with the loss (running mean over the last 50 steps) and examples/s. The losses stay on the GPU and
  are read every LOSS_READ_EVERY steps and before a checkpoint (read_losses), and batches go up through pinned
  memory (to_device), so the host queues the next steps while the GPU runs; a non-finite loss stops the run at
  that read, naming its step, before any checkpoint.
- Checkpoints every `checkpoint_every` steps and at the end, in OUTPUT/checkpoints/step-NNNNNNN/: the model
  (model.safetensors, ranges included), the optimizer's tensors (optimizer.safetensors), the RNG states
  (rng.safetensors) and trainer_state.json (step, per-step losses, the optimizer's hyper-parameters, the
  scheduler's state, a fingerprint of the settings and data). safetensors and JSON only: nothing is pickled or
  unpickled. A checkpoint is written into a temporary folder that is renamed when complete; then
  checkpoints/latest.json (written atomically) points at it and older ones are removed. A run whose output folder
  holds a checkpoint continues from it (`resume`), bit for bit on the CPU, and refuses one made with other
  settings or data.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from common.errors import WorkbenchError
from common.files import atomic_write_json, read_json
from data.features import Features
from model.bert import BertQA, training_step
from qat.model import clamp_scales_, freeze_scales, scale_parameters

CHECKPOINT_FORMAT = "bert-int8-workbench/train-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
LATEST_NAME = "latest.json"
LOSS_READ_EVERY = 25  # steps between reads of the losses from the GPU (read_losses)


@dataclass
class TrainConfig:
    """Every setting of a QAT or fine-tuning run."""

    output_dir: str                    # the model folder written at the end; checkpoints under checkpoints/
    epochs: float = 2.0                # passes over the training windows (fractions allowed)
    max_steps: int | None = None       # optimizer steps; overrides epochs when given (0: no training, e.g. the
    #                                    pruned model before fine-tuning, to measure what fine-tuning recovers)
    batch_size: int = 32
    lr: float = 3e-5                   # peak learning rate of the weights
    scale_lr: float = 1e-3             # peak learning rate of the amax parameters (absolute units of amax)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1          # share of the steps with a linearly rising learning rate
    max_grad_norm: float | None = 1.0  # global gradient-norm clipping; None: off
    freeze_scales: bool = False        # --freeze-scales: ranges stay at the calibration cache's
    distill: bool = False              # also match a frozen teacher's start/end distributions
    distill_temperature: float = 2.0
    distill_alpha: float = 0.5         # weight of the distillation term (1 - alpha: the labels)
    distill_hidden: float = 0.0        # weight of the hidden-state term (0: off)
    bf16: bool = True                  # bf16 autocast (CUDA only; the CPU always trains in FP32)
    device: str | None = None          # default: cuda when present, else cpu
    seed: int = 0
    checkpoint_every: int = 500        # steps between checkpoints (one is also written at the end)
    keep_checkpoints: int = 1
    resume: bool = True                # continue from OUTPUT/checkpoints; False: start over (and remove them)
    progress: bool = True

    def __post_init__(self) -> None:
        checks = (
            (self.epochs > 0, f"--epochs must be > 0, got {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 0, f"--max-steps must be >= 0, got {self.max_steps}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.lr > 0 and self.scale_lr >= 0, "learning rates must be positive"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.warmup_ratio < 1, f"warm-up ratio must be within [0, 1), got {self.warmup_ratio}"),
            (self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be > 0 or None"),
            (self.distill_temperature > 0, f"distillation temperature must be > 0, got {self.distill_temperature}"),
            (0 <= self.distill_alpha <= 1, f"distillation alpha must be within [0, 1], got {self.distill_alpha}"),
            (self.distill_hidden >= 0, f"the hidden-state weight must be >= 0, got {self.distill_hidden}"),
            (self.distill or not self.distill_hidden, "the hidden-state term needs a teacher: add --distill"),
            (self.checkpoint_every >= 1, f"checkpoint interval must be >= 1, got {self.checkpoint_every}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
        )
        for ok, message in checks:
            if not ok:
                raise WorkbenchError(message)

    def trajectory(self) -> dict[str, Any]:
        """The settings a run's weights depend on: a checkpoint made with other values is not resumed."""
        skip = {"output_dir", "device", "checkpoint_every", "keep_checkpoints", "resume", "progress", "bf16"}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip}


@dataclass
class TrainResult:
    step: int                        # optimizer steps done (== total_steps when finished)
    total_steps: int
    losses: list[float]              # the loss of every step, 1..step (those before a resume included)
    resumed_from: int | None         # the checkpoint's step this run continued from
    seconds: float                   # this run's training time
    examples_per_second: float
    checkpoint: Path | None = None   # the last checkpoint written or read
    extra: dict = field(default_factory=dict)


def steps_per_epoch(num_features: int, batch_size: int) -> int:
    return -(-num_features // batch_size)


def total_steps(num_features: int, cfg: TrainConfig) -> int:
    if num_features < 1:
        raise WorkbenchError("no training windows: the SQuAD file gave no features")
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * steps_per_epoch(num_features, cfg.batch_size)))


def linear_schedule(total: int, warmup: int) -> Callable[[int], float]:
    """Hugging Face's get_linear_schedule_with_warmup factor."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def epoch_order(num_features: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_features)


def qa_loss(start: torch.Tensor, end: torch.Tensor, start_positions: torch.Tensor, end_positions: torch.Tensor,
            teacher: tuple[torch.Tensor, torch.Tensor] | None = None, temperature: float = 2.0,
            alpha: float = 0.5) -> torch.Tensor:
    """The span loss of the module docstring (CE, or CE mixed with the teacher's temperature-softened KL)."""
    start, end = start.float(), end.float()
    ce = (F.cross_entropy(start, start_positions) + F.cross_entropy(end, end_positions)) / 2
    if teacher is None:
        return ce
    t = temperature
    kd = sum(F.kl_div(F.log_softmax(s / t, -1), F.log_softmax(tl.float() / t, -1), log_target=True,
                      reduction="batchmean") for s, tl in ((start, teacher[0]), (end, teacher[1]))) / 2
    return (1 - alpha) * ce + alpha * (t * t) * kd


@contextlib.contextmanager
def layer_outputs(model: BertQA, on: bool = True) -> Iterator[list[torch.Tensor]]:
    """A list that collects the output of each encoder layer (model.layers) during the forwards inside the block;
    with `on` False it stays empty."""
    outputs: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda module, args, out: outputs.append(out))
               for layer in (model.layers if on else ())]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def hidden_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], attention_mask: torch.Tensor
                ) -> torch.Tensor:
    """The hidden-state term of the module docstring: per layer, the mean squared difference per element of the
    real tokens' outputs [B, S, H]; the mean over layers."""
    if len(student) != len(teacher) or not student:
        raise WorkbenchError(f"hidden-state distillation compares layer by layer: the student has {len(student)} "
                             f"layers, the teacher {len(teacher)}")
    real = attention_mask[..., None].float()
    per_element = real.sum() * student[0].shape[-1]
    return sum(((s.float() - t.float()) ** 2 * real).sum() / per_element for s, t in zip(student, teacher)) \
        / len(student)


def features_digest(features: Features) -> str:
    h = hashlib.sha256()
    for name in ("input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions"):
        a = np.ascontiguousarray(getattr(features, name))
        h.update(f"{name}:{a.dtype.str}:{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    scales = {id(p) for p in scale_parameters(model)}
    decay, no_decay, amax = [], [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (amax if id(p) in scales else decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"params": amax, "weight_decay": 0.0, "lr": cfg.scale_lr}]
    return [g for g in groups if g["params"]]


def _fingerprint(model: nn.Module, features: Features, cfg: TrainConfig, total: int) -> dict[str, Any]:
    shapes = [f"{k}:{list(v.shape)}" for k, v in model.state_dict().items()]
    return {"config": cfg.trajectory(), "total_steps": total, "data": features_digest(features),
            "model": hashlib.sha256("\n".join(shapes).encode()).hexdigest()}


def train(model: BertQA, features: Features, cfg: TrainConfig, teacher: BertQA | None = None,
          callback: Callable[[int, float], None] | None = None, desc: str = "train") -> TrainResult:
    """Train `model` in place on `features` (moved to cfg.device). `teacher`: the frozen model distillation
    matches (required with cfg.distill). `callback(step, loss)` runs after every step (and its checkpoint)."""
    if cfg.distill and teacher is None:
        raise WorkbenchError("distillation needs a teacher model")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = cfg.bf16 and device.type == "cuda"
    out = Path(cfg.output_dir)
    ckpt_root = out / CHECKPOINTS_DIR
    if not cfg.resume and ckpt_root.exists():
        shutil.rmtree(ckpt_root)

    model.to(device).train()
    freeze_scales(model, cfg.freeze_scales)
    if cfg.distill:
        teacher = teacher.to(device).eval()
        teacher.requires_grad_(False)
    n = len(features)
    total = total_steps(n, cfg)
    per_epoch = steps_per_epoch(n, cfg.batch_size)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total, int(cfg.warmup_ratio * total)))
    fingerprint = _fingerprint(model, features, cfg, total)

    step, losses, resumed_from, last_ckpt = 0, [], None, None
    if cfg.resume:
        found = load_checkpoint(ckpt_root, model, optimizer, scheduler, fingerprint)
        if found is not None:
            step, losses, last_ckpt = found
            resumed_from = step
    arrays = {name: torch.from_numpy(np.ascontiguousarray(getattr(features, name))).long()
              for name in ("input_ids", "token_type_ids", "attention_mask", "start_positions", "end_positions")}

    examples, t0 = 0, time.perf_counter()
    recent: deque[float] = deque(losses[-50:], maxlen=50)
    order_epoch, order = -1, np.empty(0, dtype=np.int64)
    pending: list[torch.Tensor] = []  # the losses of the steps since the last read, on the device
    with tqdm(total=total, initial=step, desc=desc, unit="step", disable=not cfg.progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        while step < total:
            epoch, pos = divmod(step, per_epoch)
            if epoch != order_epoch:
                order_epoch, order = epoch, epoch_order(n, cfg.seed, epoch)
            idx = torch.from_numpy(order[pos * cfg.batch_size:(pos + 1) * cfg.batch_size])
            batch = {k: to_device(v[idx], device) for k, v in arrays.items()}
            pending.append(_step(model, teacher, batch, optimizer, scheduler, cfg, bf16))
            step += 1
            examples += len(idx)
            bar.update(1)
            checkpoint = step % cfg.checkpoint_every == 0 or step == total
            if checkpoint or callback is not None or len(pending) >= LOSS_READ_EVERY:
                read_losses(pending, step, losses, recent)
                rate = examples / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", ex_s=f"{rate:.1f}", refresh=False)
            if checkpoint:
                last_ckpt = save_checkpoint(ckpt_root, step, model, optimizer, scheduler, losses, fingerprint,
                                            cfg.keep_checkpoints)
            if callback is not None:
                callback(step, losses[-1])
    seconds = time.perf_counter() - t0
    return TrainResult(step, total, losses, resumed_from, seconds, examples / seconds if examples else 0.0,
                       last_ckpt)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch onto `device`; to a GPU through pinned memory: a copy from pageable memory first waits for
    the GPU to finish its queue, so the host could not queue the next step while the GPU runs this one."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def read_losses(pending: list[torch.Tensor], step: int, losses: list[float], recent: deque) -> None:
    """Move the device losses of the steps up to `step` to the host lists (one wait for the GPU), refusing a
    non-finite one with the step it came from. Reading each step's loss at once would make the host wait for the
    GPU every step, where it could queue the next step's kernels while the GPU runs this one's."""
    values = torch.stack(pending).tolist()
    pending.clear()
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise WorkbenchError(f"the loss became {value} at step {step - len(values) + 1 + i} (lower --lr?)")
    losses.extend(values)
    recent.extend(values)


def _step(model: BertQA, teacher: BertQA | None, batch: dict[str, torch.Tensor], optimizer, scheduler,
          cfg: TrainConfig, bf16: bool) -> torch.Tensor:
    """One optimizer step on `batch` (span loss, plus distillation against `teacher` with cfg.distill); the
    learned ranges are kept positive after it. Returns the loss, on the device (read_losses reads it)."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    hidden = cfg.distill_hidden > 0
    with autocast, training_step():
        x = (batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        with layer_outputs(model, hidden) as student_h:
            start, end = model(*x)
        target = None
        if cfg.distill:
            with torch.no_grad(), layer_outputs(teacher, hidden) as teacher_h:
                target = teacher(*x)
        loss = qa_loss(start, end, batch["start_positions"], batch["end_positions"], target,
                       cfg.distill_temperature, cfg.distill_alpha)
        if hidden:
            loss = loss + cfg.distill_hidden * hidden_loss(student_h, teacher_h, batch["attention_mask"])
    loss.backward()
    if cfg.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    clamp_scales_(model)
    return loss.detach().float()


# ---- checkpoints: safetensors + JSON ---------------------------------------------------------------------------

def _tensors_for_file(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}


def save_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, losses: list[float],
                    fingerprint: dict[str, Any], keep: int = 1) -> Path:
    """Write checkpoint `step` under `root` (a temporary folder renamed when complete), point latest.json at it,
    and remove all but the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    final = root / name
    tmp = root / f".{name}.{os.getpid()}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(_tensors_for_file(model.state_dict()), str(tmp / "model.safetensors"))
        opt = optimizer.state_dict()
        opt_tensors, opt_scalars = {}, {}
        for idx, entry in opt["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    opt_tensors[f"state.{idx}.{key}"] = value
                else:
                    opt_scalars[f"{idx}.{key}"] = value
        save_file(_tensors_for_file(opt_tensors), str(tmp / "optimizer.safetensors"))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(_tensors_for_file(rng), str(tmp / "rng.safetensors"))
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        state = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "step": step,
                 "losses": losses, "fingerprint": fingerprint, "scheduler": sched,
                 "optimizer": {"param_groups": opt["param_groups"], "scalars": opt_scalars}}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
        if final.exists():  # left by a run that died before pointing latest.json at it
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_json(root / LATEST_NAME, {"step": step, "dir": name})
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in [p for p in done if p.name != name][:max(0, len(done) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(root: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler,
                    fingerprint: dict[str, Any]) -> tuple[int, list[float], Path] | None:
    """Restore the newest checkpoint under `root` into model, optimizer, scheduler and the RNGs; None if there
    is none. (step, losses, folder) otherwise."""
    latest = root / LATEST_NAME
    if not latest.exists():
        return None
    pointer = read_json(latest, "checkpoint pointer")
    if not isinstance(pointer, dict) or not isinstance(pointer.get("dir"), str) or "/" in pointer["dir"]:
        raise WorkbenchError(f"{latest}: malformed checkpoint pointer")
    folder = root / pointer["dir"]
    state_path = folder / "trainer_state.json"
    state = read_json(state_path, "checkpoint state")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or \
            state.get("format_version") != CHECKPOINT_VERSION:
        raise WorkbenchError(f"{state_path}: not a training checkpoint of this workbench (format "
                             f"{state.get('format') if isinstance(state, dict) else None!r})")
    old = state.get("fingerprint", {})
    if old != fingerprint:
        diff = _first_difference(old, fingerprint)
        raise WorkbenchError(f"{folder}: this checkpoint was made with other settings or data ({diff}); use "
                             "another output folder, or start over (resume=False removes the checkpoints)")
    model_state = _read_tensors(folder / "model.safetensors")
    try:
        model.load_state_dict(model_state)
    except RuntimeError as e:
        raise WorkbenchError(f"{folder / 'model.safetensors'}: does not fit the model ({str(e).splitlines()[0]})") \
            from None
    opt_tensors = _read_tensors(folder / "optimizer.safetensors")
    opt_state: dict[int, dict[str, Any]] = {}
    for key, value in opt_tensors.items():
        _, idx, name = key.split(".", 2)
        opt_state.setdefault(int(idx), {})[name] = value
    for key, value in state["optimizer"]["scalars"].items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in state["optimizer"]["param_groups"]]
    optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    rng = _read_tensors(folder / "rng.safetensors")
    torch.set_rng_state(rng["cpu"])
    cuda = [rng[f"cuda.{i}"] for i in range(len(rng) - 1) if f"cuda.{i}" in rng]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    losses = [float(v) for v in state["losses"]]
    return int(state["step"]), losses, folder


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise WorkbenchError(f"{path}: checkpoint file missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise WorkbenchError(f"{path}: unreadable checkpoint file ({e})") from None


def _first_difference(old: Any, new: Any, where: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{where}.{key}" if where else key)
    return f"{where or 'checkpoint'}: {old!r} then, {new!r} now"
