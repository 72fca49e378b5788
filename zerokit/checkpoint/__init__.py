"""Checkpoints of sharded training state: saved by every rank in parallel, loaded into any world
size or ZeRO stage, exported as one consolidated state_dict, imported from consolidated weights
or DeepSpeed ZeRO checkpoints.

    save_checkpoint(engine, "ckpt", client_state={"step": step})   # ckpt/global_step<N>/, ckpt/latest
    client_state = load_checkpoint(engine, "ckpt")                  # any world size or stage
    export_checkpoint("ckpt", "out", dtype=torch.bfloat16)          # or: zerokit export ckpt out --dtype bf16
    load_full_state_dict(engine, "out")                             # each rank reads only its shards
    import_deepspeed_checkpoint(engine, "deepspeed_ckpt")
"""
from zerokit.checkpoint.errors import CheckpointError
from zerokit.checkpoint.export import export_checkpoint
from zerokit.checkpoint.full_state import gather_optimizer_state, import_deepspeed_checkpoint, load_full_state_dict
from zerokit.checkpoint.layout import complete_tags, latest_tag
from zerokit.checkpoint.load import load_checkpoint
from zerokit.checkpoint.save import save_checkpoint, wait_for_checkpoint
from zerokit.checkpoint.sources import read_state_dict
from zerokit.checkpoint.writer import SaveHandle

__all__ = [
    "CheckpointError",
    "SaveHandle",
    "complete_tags",
    "export_checkpoint",
    "gather_optimizer_state",
    "import_deepspeed_checkpoint",
    "latest_tag",
    "load_checkpoint",
    "load_full_state_dict",
    "read_state_dict",
    "save_checkpoint",
    "wait_for_checkpoint",
]
