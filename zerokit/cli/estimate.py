"""`zerokit estimate`: per-rank memory of every stage x offload x activation policy, and which fits."""
from __future__ import annotations

import argparse
import json
import sys

from zerokit.profiler.activations import KEEP_LAST, RESTORE_BUFFERS
from zerokit.profiler.estimate import (
    DTYPES,
    GPU_CATEGORIES,
    HOST_CATEGORIES,
    NVME_CATEGORIES,
    Configuration,
    Estimate,
    Hardware,
    Workload,
    estimate,
)
from zerokit.profiler.models import ModelSourceError
from zerokit.profiler.presets import PRESETS
from zerokit.profiler.sizes import gib, parse_size


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "estimate",
        help="per-rank memory of every ZeRO stage, offload and activation policy, and the fastest that fits",
        description="Builds the model on the meta device (no weights), traces one training step there and "
        "estimates GPU, host and NVMe memory per rank for stages 0-3 x offload x activation policy.",
    )
    parser.add_argument(
        "--model", required=True,
        help=f"a preset ({', '.join(PRESETS)}), a Hugging Face config.json (or its directory), "
        "or a module:function factory returning an nn.Module",
    )  # fmt: skip
    parser.add_argument("--gpus", type=int, default=1, help="GPUs per node (default 1)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument(
        "--gpu-memory", default="80GB", help="memory of one GPU (default 80GB = 80e9 bytes; 80GiB = 80*2^30)"
    )
    parser.add_argument("--host-memory", default="512GB", help="host memory of one node (default 512GB)")
    parser.add_argument("--nvme", default="0", help="NVMe space of one node (default 0: none)")
    parser.add_argument("--micro-batch", type=int, required=True, help="sequences per GPU per micro-step")
    parser.add_argument("--seq", type=int, required=True, help="tokens per sequence")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="compute dtype (default bf16)")
    parser.add_argument(
        "--attention-kernels", choices=("cuda", "cpu"), default="cuda",
        help="whose fused attention the trace mirrors (default cuda)",
    )  # fmt: skip
    parser.add_argument(
        "--wtacrs", type=float, metavar="KEEP",
        help="estimate with WTA-CRS linear layers in the blocks (zerokit.nn.convert_to_wtacrs) keeping this "
        "fraction of their input rows, in (0, 1]",
    )  # fmt: skip
    parser.add_argument(
        "--chunked-loss", type=int, metavar="TOKENS",
        help="estimate with the loss computed over chunks of this many tokens (the Hugging Face causal LM wrapped "
        "in zerokit.nn.ChunkedLossCausalLM): one chunk's logits at a time instead of the whole sequence's",
    )  # fmt: skip
    parser.add_argument(
        "--keep-last", type=int, metavar="N",
        help="blocks at the end that keep their activations under swap and memo (activation_memory.keep_last; "
        f"default {KEEP_LAST})",
    )  # fmt: skip
    parser.add_argument(
        "--restore-buffers", type=int, metavar="N",
        help="device buffers swapped blocks are restored into under swap and memo, 1 or 2 "
        f"(activation_memory.restore_buffers; default {RESTORE_BUFFERS})",
    )  # fmt: skip
    parser.add_argument(
        "--alpha", type=float, metavar="A",
        help="memo's swapped fraction of tokens, in [0, 1] (activation_memory.alpha; default: planned from host "
        "memory)",
    )  # fmt: skip
    parser.add_argument(
        "--offload-ratio", type=float, default=1.0, metavar="R",
        help="the fraction of the optimizer the offload rows offload, in (0, 1] (offload_optimizer.ratio; "
        "default 1: all of it)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the versioned JSON document instead of tables")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        hardware = Hardware(
            gpus_per_node=args.gpus,
            nodes=args.nodes,
            gpu_memory=parse_size(args.gpu_memory),
            host_memory=parse_size(args.host_memory),
            nvme=parse_size(args.nvme),
        )
        workload = Workload(
            args.micro_batch, args.seq, DTYPES[args.dtype], args.attention_kernels, args.wtacrs,
            chunked_loss=args.chunked_loss, keep_last=args.keep_last, restore_buffers=args.restore_buffers,
            alpha=args.alpha, offload_ratio=args.offload_ratio,
        )  # fmt: skip
        result = estimate(args.model, hardware, workload)
    except (ModelSourceError, ValueError) as error:
        print(f"zerokit estimate: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_json(), indent=2) if args.json else format_estimate(result))
    return 0


def format_estimate(result: Estimate) -> str:
    hw, work = result.hardware, result.workload
    dtype = next(name for name, value in DTYPES.items() if value == work.dtype)
    nvme = f"NVMe {gib(hw.nvme)} GiB per node" if hw.nvme else "no NVMe"
    options = []
    if work.wtacrs_keep_ratio is not None:
        options.append(f"WTA-CRS linear layers keeping {work.wtacrs_keep_ratio:g}")
    if work.chunked_loss is not None:
        options.append(f"loss over chunks of {work.chunked_loss} tokens")
    if work.keep_last is not None:
        options.append(f"swap and memo keep the last {work.keep_last} blocks")
    if work.restore_buffers is not None:
        options.append(f"{work.restore_buffers} restore buffer{'s' if work.restore_buffers > 1 else ''}")
    if work.alpha is not None:
        options.append(f"memo alpha {work.alpha:g}")
    if work.offload_ratio < 1:
        options.append(f"offload rows offload {work.offload_ratio:g} of the optimizer")
    lines = [
        f"{result.model}: {result.parameters / 1e9:.3f} B parameters ({result.trainable_parameters / 1e9:.3f} B "
        f"trainable), {len(result.blocks)} blocks, {result.units} sharding units; micro-batch {work.micro_batch} x "
        f"{work.seq} tokens, {', '.join([dtype, *options])}",
        f"hardware: {hw.nodes} node(s) x {hw.gpus_per_node} GPU(s) (world size {hw.world_size}), "
        f"{gib(hw.gpu_memory)} GiB per GPU, host {gib(hw.host_memory)} GiB per node, {nvme}",
    ]
    if result.blocks:
        block = max(result.blocks, key=lambda b: b.saved)
        lines.append(
            f"activations of the largest block: {gib(block.saved)} GiB saved for backward (attention "
            f"{gib(block.attention)}, inputs {gib(block.inputs)}); saved outside blocks (embedding, head, loss): "
            f"{gib(result.outside_blocks_saved)} GiB"
        )
    lines += [
        "",
        "GiB per rank. GPU alloc: the allocator's peak (torch.cuda.max_memory_allocated); GPU total adds allocator",
        "overhead and the CUDA runtime; host and NVMe are per rank too (a node holds --gpus times that).",
    ]
    header = ("stage", "offload", "activations", "GPU alloc", "GPU total", "host", "NVMe", "fits", "cost")
    rows = []
    recommended = result.recommended
    for config in result.configurations:
        if not config.supported:
            continue
        mark = "*" if config is recommended else " "
        rows.append((
            f"{mark}{config.stage}", config.offload, config.activations, gib(config.peak_allocated),
            gib(sum(config.gpu.values())), gib(sum(config.host.values())), gib(sum(config.nvme.values())),
            _fits(config), f"{config.relative_cost:.2f}",
        ))  # fmt: skip
    lines += _table(header, rows)
    unsupported = sorted({c.note for c in result.configurations if not c.supported})
    lines += ["", "not listed: " + "; ".join(unsupported)] if unsupported else []
    lines.append("")
    if recommended is None:
        smallest = min((c for c in result.configurations if c.supported), key=lambda c: sum(c.gpu.values()))
        lines.append(
            f"nothing fits. The smallest GPU footprint is {smallest.label} at {gib(sum(smallest.gpu.values()))} GiB "
            "per GPU: use more GPUs, a smaller micro-batch or sequence, or GPUs with more memory."
        )
    else:
        lines.append(f"* recommended: {recommended.label} — the fastest that fits (least relative step-time cost)")
        lines += ["", "its breakdown, GiB per rank:"] + _breakdown(recommended)
    return "\n".join(lines)


def _fits(config: Configuration) -> str:
    if config.fits:
        return "yes"
    checks = (("GPU", config.fits_gpu), ("host", config.fits_host), ("NVMe", config.fits_nvme))
    return "no: " + ", ".join(name for name, ok in checks if not ok)


def _breakdown(config: Configuration) -> list[str]:
    lines = []
    devices = (
        ("GPU", config.gpu, GPU_CATEGORIES),
        ("host", config.host, HOST_CATEGORIES),
        ("NVMe", config.nvme, NVME_CATEGORIES),
    )
    for device, values, names in devices:
        parts = ", ".join(f"{name.replace('_', ' ')} {gib(values[name])}" for name in names if values[name])
        lines.append(f"  {device:<5} {gib(sum(values.values()))} total: {parts or 'nothing'}")
    return lines


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    numeric = {3, 4, 5, 6, 8}

    def line(cells: tuple[str, ...]) -> str:
        aligned = (c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "  ".join(aligned)

    return [line(header)] + [line(row) for row in rows]
