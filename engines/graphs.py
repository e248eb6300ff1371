"""CUDA graphs: one captured graph per engine profile, replayed for every batch that fits it.

Batch-1 BERT is launch-bound (hundreds of small kernels), so capturing the whole forward once and replaying it
removes the launch gaps. Inputs smaller than the profile are padded into its static buffers with attention mask 0:
padded keys get no attention weight and padded rows are sliced off, so real outputs do not change.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engines.engine_file import Profile, pick_profile
from engines.runtime import Engine


@dataclass
class CapturedGraph:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    attention_mask: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor


class GraphRunner:
    """Callable like the engine; on CUDA it replays graphs, elsewhere it runs the engine directly.

    With `fuse`, the forward is first compiled by TorchInductor, which fuses the elementwise work around each GEMM
    (quantize, dequantize + bias + GELU, residual + LayerNorm + quantize) into generated Triton kernels, the way
    TensorRT's plugins fuse them; the library GEMMs stay as they are. The graph then captures the fused kernels.
    """

    def __init__(self, engine: Engine, path: str = "engine", fuse: bool = False):
        self.engine, self.path = engine, path
        self.graphs: dict[Profile, CapturedGraph] = {}
        self.use_graphs = engine.device.type == "cuda"
        self.forward = torch.compile(engine, dynamic=False, fullgraph=True) if fuse and self.use_graphs else engine

    def capture(self, profile: Profile) -> CapturedGraph:
        if profile in self.graphs:
            return self.graphs[profile]
        dev, (b, s) = self.engine.device, (profile.batch, profile.seq_len)
        ids = torch.zeros(b, s, dtype=torch.long, device=dev)
        types = torch.zeros_like(ids)
        mask = torch.ones_like(ids)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # warm-up: cuBLAS handles and workspaces, autotuned SDPA choice
                self.forward(ids, types, mask)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            start, end = self.forward(ids, types, mask)
        self.graphs[profile] = CapturedGraph(graph, ids, types, mask, start, end)
        return self.graphs[profile]

    def __call__(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s = input_ids.shape
        profile = pick_profile(self.engine.header, b, s, self.path)
        if not self.use_graphs:
            return self.engine(input_ids, token_type_ids, attention_mask)
        g = self.capture(profile)
        if (b, s) == (profile.batch, profile.seq_len):
            g.input_ids.copy_(input_ids), g.token_type_ids.copy_(token_type_ids), g.attention_mask.copy_(attention_mask)
        else:
            for static, new in ((g.input_ids, input_ids), (g.token_type_ids, token_type_ids),
                                (g.attention_mask, attention_mask)):
                static.zero_()
                static[:b, :s].copy_(new)
        g.graph.replay()
        return g.start[:b, :s], g.end[:b, :s]
