"""`zerokit export`: a checkpoint's weights as one consolidated state_dict (safetensors or torch
files, sharded by size), loadable by plain PyTorch and Hugging Face `from_pretrained`."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="write a checkpoint's weights as safetensors or torch files (for from_pretrained)"
    )
    parser.add_argument("checkpoint", type=Path, help="a checkpoint directory (its `latest` tag is used) or a tag directory")
    parser.add_argument("out", type=Path, help="the folder to write the weights (and index) into")
    parser.add_argument("--tag", help="the tag to export instead of `latest`")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32",
                        help="dtype of floating-point tensors (default fp32)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest output file, like 5GB, 500MB or 2GiB (default 5GB)")
    parser.add_argument("--format", choices=("safetensors", "torch"), default="safetensors",
                        help="safetensors (model*.safetensors) or torch (pytorch_model*.bin); default safetensors")
    parser.add_argument("--config", type=Path, help="a Hugging Face config.json to copy next to the weights")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from zerokit.checkpoint.errors import CheckpointError
    from zerokit.checkpoint.export import export_checkpoint

    if args.config is not None and not args.config.is_file():
        print(f"zerokit export: --config {args.config} does not exist", file=sys.stderr)
        return 2
    try:
        written = export_checkpoint(args.checkpoint, args.out, tag=args.tag, dtype=_DTYPES[args.dtype],
                                    max_shard_size=args.max_shard_size, format=args.format, config=args.config)
    except CheckpointError as error:
        print(f"zerokit export: {error}", file=sys.stderr)
        return 1
    total = sum(os.path.getsize(path) for path in written)
    print(f"wrote {len(written)} file(s), {total / 2**20:.1f} MiB, to {args.out}:")
    for path in written:
        print(f"  {os.path.basename(path)}")
    return 0
