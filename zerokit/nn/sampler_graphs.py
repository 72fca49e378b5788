"""The row sampler replayed as one CUDA graph per shape.

Sampling one layer's rows (sampling_mass, then choose_rows) is some fifty small kernels on a
few thousand numbers. Launched one by one from Python they cost more host time than the layer's
matmuls take on the GPU, and a training step becomes bound by the host. Captured once per
(stream, rows, budget, with or without cached norms) and replayed, they are one launch. The
uniforms are drawn outside the graph, with the layer's seeded generator, into the graph's input:
a replay runs the very kernels of the eager sampler on the same numbers, so it keeps the same rows.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from zerokit.nn.sampling import RowSample, choose_rows, draw_uniforms, sampling_mass

logger = logging.getLogger("zerokit")

GRAPHS_KEPT = 16  # shapes seen recently; a run with ever-new shapes still captures at most this many


def sample_eagerly(input_norms: Tensor, grad_norms: Optional[Tensor], k: int, generator: torch.Generator) -> RowSample:
    """k rows chosen by WTA-CRS from the rows' input norms and cached ∇Z norms, kernel by kernel."""
    return choose_rows(sampling_mass(input_norms, grad_norms), draw_uniforms(k, generator, input_norms.device))


class _Captured(NamedTuple):
    graph: "torch.cuda.CUDAGraph"
    input_norms: Tensor  # the graph's inputs, written before each replay
    grad_norms: Optional[Tensor]
    uniforms: Tensor
    sample: RowSample  # the graph's outputs, overwritten by each replay


class SamplerGraphs:
    """Samples rows as sample_eagerly does; on CUDA by replaying a captured graph."""

    def __init__(self) -> None:
        self._captured: OrderedDict[tuple, _Captured] = OrderedDict()
        self._broken = False  # a capture failed: sample eagerly from then on

    def sample(
        self, input_norms: Tensor, grad_norms: Optional[Tensor], k: int, generator: torch.Generator
    ) -> RowSample:
        device = input_norms.device
        if device.type != "cuda" or self._broken or torch.cuda.is_current_stream_capturing():
            return sample_eagerly(input_norms, grad_norms, k, generator)
        # Per stream: a replay on one stream must not overwrite inputs another stream has yet to read.
        stream = torch.cuda.current_stream(device)
        key = (device, stream.cuda_stream, input_norms.numel(), k, grad_norms is not None)
        captured = self._captured.get(key)
        if captured is None:
            captured = self._capture(input_norms, grad_norms, k, stream)
            if captured is None:
                return sample_eagerly(input_norms, grad_norms, k, generator)
            self._captured[key] = captured
            if len(self._captured) > GRAPHS_KEPT:
                self._captured.popitem(last=False)
        self._captured.move_to_end(key)
        captured.input_norms.copy_(input_norms)
        if grad_norms is not None:
            captured.grad_norms.copy_(grad_norms)
        torch.rand(k, dtype=torch.float64, generator=generator, out=captured.uniforms)
        captured.graph.replay()
        return RowSample(captured.sample.indices.clone(), captured.sample.weights.clone())

    def _capture(
        self, input_norms: Tensor, grad_norms: Optional[Tensor], k: int, stream: torch.cuda.Stream
    ) -> Optional[_Captured]:
        device = input_norms.device
        inputs = (
            torch.ones_like(input_norms),
            None if grad_norms is None else torch.ones_like(grad_norms),
            torch.zeros(k, dtype=torch.float64, device=device),
        )
        side = torch.cuda.Stream(device)
        side.wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.stream(side):
                choose_rows(sampling_mass(inputs[0], inputs[1]), inputs[2])  # lazy initialisations happen here
                # thread_local: other threads (copy engines, a background optimizer step) go on meanwhile.
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    sample = choose_rows(sampling_mass(inputs[0], inputs[1]), inputs[2])
                finally:
                    graph.capture_end()
        except RuntimeError as error:
            self._broken = True
            logger.warning("WTA-CRS samples without CUDA graphs (slower): capturing the sampler failed: %s", error)
            return None
        finally:
            stream.wait_stream(side)
        return _Captured(graph, *inputs, sample)
