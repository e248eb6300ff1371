"""The QAT model: a copy of the reference BertQA that computes the fake-quant reference's function (quant/fakequant.py)
at exactly its sites, with a trainable amax per site.

quant.fakequant.fake_quant_model bakes its choices into hooks and pre-rounded weights; here the same choices are
made by modules that keep gradients:

  - every GEMM the policy quantizes becomes a `QATLinear` (an nn.Linear with the same parameters, so state-dict
    names stay those of BertQA): its weight is rounded per output channel from the current weights each forward
    (W * s for a smoothed input), its input rounded with the site's quantizer (codes * scale);
  - the -iln/-imh sites are rounded where they are produced, through the model's `tap` (`SiteTap`), so the
    residual stream and attention see the rounded tensor; a GEMM reading such a site re-expresses its codes;
  - GELU is the engine's (PrecisionPolicy.gelu_tanh);
  - each site's quantizer (qat.fakequant.SiteQuantizer) is registered under `model.quantizers`, so an optimizer
    sees the amax parameters (`quantizers.<site with _ for .>.amax`).

With the initial amax the output equals fake_quant_model's exactly (tests/test_qat_model.py). The copy shares
nothing with the reference; do not deepcopy it while `tap`/`QATLinear` refer to its quantizers from outside a
deepcopy of the whole model (a whole-model deepcopy keeps them consistent).
"""
from __future__ import annotations

from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from model.bert import BertQA
from qat.fakequant import SiteQuantizer, fake_quant_weight
from quant.formats import INT8, QuantFormat
from quant.fakequant import engine_function_copy
from quant.policy import PrecisionPolicy
from quant.smoothing import smoothed_weight
from quant.spec import PER_CHANNEL, PER_TENSOR, QuantSpec, ScaleSource, SiteSpec


def module_key(site: str) -> str:
    """A site name as a module name (module names cannot hold dots): layer3.fc2_in -> layer3_fc2_in."""
    return site.replace(".", "_")


class SiteQuantizers(nn.ModuleDict):
    """The site quantizers of a QAT model, in forward order, with the policy and weight format they were made for."""

    def __init__(self, quantizers: list[SiteQuantizer], policy: PrecisionPolicy, weight_format: QuantFormat):
        super().__init__({module_key(q.site): q for q in quantizers})
        self.policy = policy
        self.weight_format = weight_format

    def sites(self) -> Iterator[SiteQuantizer]:
        yield from self.values()  # type: ignore[misc]

    def by_site(self) -> dict[str, SiteQuantizer]:
        return {q.site: q for q in self.sites()}


class SiteTap:
    """The model's tap: rounds the sites the policy rounds where they are produced, passes the rest through.
    A plain object (not a Module) holding references to quantizers registered under `model.quantizers`."""

    def __init__(self, quantizers: Mapping[str, SiteQuantizer]):
        self.quantizers = dict(quantizers)

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        q = self.quantizers.get(name)
        return x if q is None else q(x)

    def passes(self, name: str) -> bool:
        """Whether this tap leaves site `name` alone (model.bert.leaves_alone: the forward may then fuse it away)."""
        return name not in self.quantizers


class QATLinear(nn.Linear):
    """An INT8 GEMM: input through its site's quantizer, weight per output channel with a straight-through
    gradient, bias and accumulation in floating point (the engine's int32 accumulation is exact)."""

    def __init__(self, linear: nn.Linear, quantizer: SiteQuantizer, rounded_where_produced: bool,
                 weight_format: QuantFormat):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self._quantizer = [quantizer]  # a list: referenced, not registered twice (it lives in model.quantizers)
        self.rounded_where_produced = rounded_where_produced
        self.weight_format = weight_format

    @property
    def quantizer(self) -> SiteQuantizer:
        return self._quantizer[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantizer
        x = q.regrid(x) if self.rounded_where_produced else q.gemm_input(x)
        w = fake_quant_weight(smoothed_weight(self.weight, q.smooth), self.weight_format)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, input={self.quantizer.site}, weight={self.weight_format.name} per channel"


def qat_model(model: BertQA, policy: PrecisionPolicy, spec: QuantSpec,
              smooth: Mapping[str, torch.Tensor] | None = None, *, learn_scales: bool = True) -> BertQA:
    """A trainable copy of `model` that computes fake_quant_model(model, policy, spec, smooth) (same arguments).

    `spec` holds every site policy.quantized_sites(...) names (PrecisionPolicy.spec); its amax values become the
    initial amax parameters (float32). `smooth` maps smoothed sites to their vectors s. `learn_scales=False`
    freezes the amax parameters. With a policy that quantizes nothing (no --int8) the copy is the plain model
    (BERT's erf GELU unless policy.fp16): what fine-tuning trains. Returned in eval mode, like fake_quant_model.
    """
    smooth = smooth or {}
    layers = model.config.num_layers
    sites = policy.quantized_sites(layers)
    spec.require(sites)
    quantizers = {s: SiteQuantizer(s, spec.sites[s].amax, spec.sites[s].format, smooth.get(s), learn_scales)
                  for s in sites}
    qm = engine_function_copy(model, policy)
    qm.quantizers = SiteQuantizers(list(quantizers.values()), policy, spec.weight_format)
    for i, gemm, site in policy.quantized_gemms(layers):
        setattr(qm.layers[i], gemm, QATLinear(getattr(qm.layers[i], gemm), quantizers[site],
                                              policy.rounded_where_produced(site), spec.weight_format))
    qm.tap = SiteTap({s: q for s, q in quantizers.items() if policy.rounded_where_produced(s)})
    return qm


def site_quantizers(model: BertQA) -> SiteQuantizers:
    quantizers = getattr(model, "quantizers", None)
    if not isinstance(quantizers, SiteQuantizers):
        raise TypeError("not a QAT model (made by qat.model.qat_model)")
    return quantizers


def policy_of(model: BertQA) -> PrecisionPolicy:
    """The precision policy a QAT model was made for."""
    return site_quantizers(model).policy


def smoothing_of(model: BertQA) -> dict[str, torch.Tensor]:
    """The smoothing vectors of a QAT model's smoothed sites (float32, on the CPU)."""
    return {q.site: q.smooth.detach().cpu() for q in site_quantizers(model).sites() if q.smooth is not None}


def learned_spec(model: BertQA) -> QuantSpec:
    """The QAT model's current ranges as a quantization spec: every site with its format, its amax (the float32
    parameter's exact value) and granularity, source "qat"."""
    quantizers = site_quantizers(model)
    source = ScaleSource("qat")
    return QuantSpec({q.site: SiteSpec(q.fmt, float(q.amax.detach().cpu()),
                                       PER_CHANNEL if q.smooth is not None else PER_TENSOR, source)
                      for q in quantizers.sites()}, quantizers.weight_format if len(quantizers) else INT8)


def scale_parameters(model: BertQA) -> list[nn.Parameter]:
    """The amax parameters (empty for a model without fake quantization)."""
    quantizers = getattr(model, "quantizers", None)
    return [q.amax for q in quantizers.sites()] if isinstance(quantizers, SiteQuantizers) else []


def freeze_scales(model: BertQA, frozen: bool = True) -> None:
    """--freeze-scales: the amax parameters get no gradient (and so never move); inputs' gradients are unchanged."""
    for p in scale_parameters(model):
        p.requires_grad_(not frozen)


def clamp_scales_(model: BertQA) -> None:
    """Keep learned ranges positive after an optimizer step."""
    quantizers = getattr(model, "quantizers", None)
    if isinstance(quantizers, SiteQuantizers):
        for q in quantizers.sites():
            q.clamp_()


def reference_state_dict(model: BertQA) -> dict[str, torch.Tensor]:
    """The parameters of the underlying BertQA (no quantizers): what a model folder stores."""
    with torch.device("meta"):  # names only, without allocating a model
        names = set(BertQA(model.config).state_dict())
    return {k: v for k, v in model.state_dict().items() if k in names}
