"""CUDA graphs: captured per engine profile, replayed for every batch that fits it.

Batch-1 BERT is launch-bound (hundreds of small kernels), so capturing the whole forward once and replaying it
removes the launch gaps. Inputs smaller than the profile are padded into its static buffers with attention mask 0:
padded keys get no attention weight and padded rows are sliced off, so real outputs do not change.

A batch that fills its profile with no padding replays a second graph whose attention takes no mask: SDPA's
fastest kernels take none, and a padding bias makes BERT-large's attention at 128 x 384 1.5x slower
(docs/attention-h200.md). Whether a batch is such a "dense" batch is read from its mask on the host (the pipelined
path always knows); for a mask already on the GPU the caller says so, since reading it there would wait for the
GPU. The graphs of one runner share one memory pool: they never run at the same time.

An engine built --varlen runs packed batches (`packed`: model/packing.py, Engine.forward_packed). Its graphs are
captured per token budget: a profile B x S holds B*S tokens in at most B windows, each up to the engine's longest
profile length; cu_seqlens has a fixed B + 1 entries, the windows a batch does not use of length 0, so one graph
replays any batch that fits. The rows past the batch's tokens belong to no window (row-wise ops compute them,
attention leaves them, nothing reads them); a ladder of budgets (--buckets) keeps them few.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from engines.engine_file import Profile, pick_budget, pick_profile
from engines.runtime import Engine


@dataclass
class CapturedGraph:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor
    token_type_ids: torch.Tensor
    attention_mask: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor


@dataclass
class CapturedPacked:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor      # [B*S]
    token_type_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor     # int32 [B + 1]
    start: torch.Tensor          # [B*S]
    end: torch.Tensor


class GraphRunner:
    """Callable like the engine; on CUDA it replays graphs, elsewhere it runs the engine directly.

    With `fuse`, the forward is first compiled by TorchInductor, which fuses the elementwise work around each library
    GEMM (quantize, dequantize + bias + GELU, residual + LayerNorm + quantize) into generated Triton kernels; the
    graph then captures those. It is the faster path for FP16 engines; INT8 engines are faster with our own fused
    kernels (plugins/), which is what runs without `fuse`.
    """

    def __init__(self, engine: Engine, path: str = "engine", fuse: bool = False):
        self.engine, self.path = engine, path
        self.graphs: dict[tuple[Profile, bool], CapturedGraph] = {}  # (profile, dense)
        self.packed_graphs: dict[Profile, CapturedPacked] = {}
        self.runs_packed = engine.runs_packed  # run_logits runs such a runner packed
        self.packing = engine.packing  # and fills each batch to this (tokens, windows)
        self.longest = max(p.seq_len for p in engine.header.profiles)  # the packed graphs' max_seqlen
        self.use_graphs = engine.device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        if fuse and self.use_graphs:
            # Inductor generates its own fused kernels around the library GEMMs; our Triton kernels are opaque to
            # it (and its scalar handling rejects them), so a fused runner uses the reference ops.
            engine.use_triton = False
            self.forward = torch.compile(engine, dynamic=False, fullgraph=True)
        else:
            self.forward = engine

    def capture(self, profile: Profile, dense: bool = False) -> CapturedGraph:
        """The graph of `profile`; `dense`: the one for batches without padding (attention without a mask)."""
        if (profile, dense) in self.graphs:
            return self.graphs[profile, dense]
        dev, (b, s) = self.engine.device, (profile.batch, profile.seq_len)
        ids = torch.zeros(b, s, dtype=torch.long, device=dev)
        types = torch.zeros_like(ids)
        mask = torch.ones_like(ids)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # warm-up: cuBLAS handles and workspaces, autotuned SDPA choice
                self.forward(ids, types, None if dense else mask)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.inference_mode():
            start, end = self.forward(ids, types, None if dense else mask)
        self.graphs[profile, dense] = CapturedGraph(graph, ids, types, mask, start, end)
        return self.graphs[profile, dense]

    def __call__(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor,
                 dense: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and end logits. `dense`: whether the batch has no padding at all (every mask value 1); None reads
        a host mask, and takes a mask on the GPU as padded (the general graph, right for any batch). True for a
        batch with padding would give its real tokens attention over padded keys: only say so when it holds."""
        b, s = input_ids.shape
        profile = pick_profile(self.engine.header, b, s, self.path)
        if not self.use_graphs:
            return self.engine(input_ids, token_type_ids, attention_mask)
        fits = (b, s) == (profile.batch, profile.seq_len)
        if dense is None:
            dense = attention_mask.device.type == "cpu" and bool(attention_mask.all())
        g = self.capture(profile, dense and fits)
        if fits:
            g.input_ids.copy_(input_ids), g.token_type_ids.copy_(token_type_ids), g.attention_mask.copy_(attention_mask)
        else:
            for static, new in ((g.input_ids, input_ids), (g.token_type_ids, token_type_ids),
                                (g.attention_mask, attention_mask)):
                static.zero_()
                static[:b, :s].copy_(new)
        g.graph.replay()
        return g.start[:b, :s], g.end[:b, :s]

    def capture_packed(self, profile: Profile) -> CapturedPacked:
        """The packed graph of `profile`'s token budget (module docstring), captured after two warm-up runs."""
        if profile in self.packed_graphs:
            return self.packed_graphs[profile]
        dev, windows, tokens = self.engine.device, profile.batch, profile.batch * profile.seq_len
        ids = torch.zeros(tokens, dtype=torch.long, device=dev)
        types = torch.zeros_like(ids)
        positions = torch.arange(tokens, device=dev) % profile.seq_len
        cu = (torch.arange(windows + 1, device=dev) * profile.seq_len).to(torch.int32)
        args = (ids, types, positions, cu, self.longest)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):
                self.engine.forward_packed(*args)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.inference_mode():
            start, end = self.engine.forward_packed(*args)
        self.packed_graphs[profile] = CapturedPacked(graph, ids, types, positions, cu, start, end)
        return self.packed_graphs[profile]

    def packed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, position_ids: torch.Tensor,
               cu_seqlens: torch.Tensor, max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and end logits [T] of a packed batch (Engine.forward_packed's arguments); on CUDA the graph of
        the smallest token budget that holds it, replayed."""
        tokens, windows = input_ids.shape[0], cu_seqlens.numel() - 1
        profile = pick_budget(self.engine.header, tokens, windows, max_seqlen, self.path)
        if not self.use_graphs:
            return self.engine.forward_packed(input_ids, token_type_ids, position_ids, cu_seqlens, max_seqlen)
        g = self.capture_packed(profile)
        for static, new in ((g.input_ids, input_ids), (g.token_type_ids, token_type_ids),
                            (g.position_ids, position_ids), (g.cu_seqlens[:windows + 1], cu_seqlens)):
            static[:new.shape[0]].copy_(new)
        g.cu_seqlens[windows + 1:].fill_(tokens)  # the windows this batch leaves unused: length 0
        g.graph.replay()
        return g.start[:tokens], g.end[:tokens]

    def pipelined(self, batches: Iterable[tuple[torch.Tensor, ...]],
                  packed: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Host batches in, host logits out, in order. On CUDA the copies run on a side stream from and to pinned
        host memory, so batch n+1's inputs go up and batch n-1's logits come down while batch n computes.
        `packed`: each batch is a packed one (PackedBatch.tensors), run by `packed`."""
        from model.packing import longest_window

        dev = self.engine.device

        def host_facts(args) -> dict:  # what a call needs to know of its batch, read on the host
            return dict(max_seqlen=longest_window(args[3])) if packed else dict(dense=bool(args[2].all()))

        call = self.packed if packed else self
        if not self.use_graphs:
            for args in batches:
                facts = host_facts(args)
                start, end = call(*(a.to(dev) for a in args), **({} if not packed else facts))
                yield start.cpu(), end.cpu()
            return
        main, side = torch.cuda.current_stream(dev), torch.cuda.Stream(dev)

        def upload(args):
            if args is None:
                return None
            facts = host_facts(args)  # read on the host, before the copy
            with torch.cuda.stream(side):
                on_device = [a.pin_memory().to(dev, non_blocking=True) for a in args]
                ready = torch.cuda.Event()
                ready.record(side)
            return on_device, ready, facts

        batches = iter(batches)
        coming, pending = upload(next(batches, None)), None
        while coming is not None:
            args, ready, facts = coming
            main.wait_event(ready)
            for a in args:
                a.record_stream(main)  # allocated on the side stream, read on the main one
            start, end = call(*args, **facts)
            outs = (start.clone(), end.clone())  # the next replay overwrites the graph's own outputs
            computed = torch.cuda.Event()
            computed.record(main)
            coming = upload(next(batches, None))
            with torch.cuda.stream(side):
                side.wait_event(computed)
                host = tuple(torch.empty(o.shape, dtype=o.dtype, pin_memory=True) for o in outs)
                for h, o in zip(host, outs):
                    h.copy_(o, non_blocking=True)
                    o.record_stream(side)
                downloaded = torch.cuda.Event()
                downloaded.record(side)
            if pending is not None:
                pending[0].synchronize()
                yield pending[1]
            pending = (downloaded, host)
        if pending is not None:
            pending[0].synchronize()
            yield pending[1]
