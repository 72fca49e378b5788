"""Training-step throughput with optimizer / parameter offload on one GPU, against zerokit without
offload and DeepSpeed ZeRO-2 with CPU offload (DeepSpeedCPUAdam), and the largest model that
trains with CPU + NVMe offload.

Protocol: llama_step.py's (same models, bf16, AdamW lr 1e-4 betas 0.9/0.95, clipping 1.0, random
tokens, warm-up then timed steps), activation checkpointing always on. Offloaded systems build
the model on the meta device and let zerokit materialize it unit by unit; the others build it on
the GPU. Every measurement prints one JSON line: llama_step.py's fields plus

    host_gib       resident host memory of the process after the timed steps (psutil)
    disk_gib       bytes of zerokit's swap files
    offload_gib    zerokit's own count of offloaded bytes: {"host": ..., "nvme": ...}
    offload_ratio  --ratio, the offload_optimizer.ratio of the run (1.0: the whole optimizer)
    estimated_peak_gib  `zerokit estimate`'s allocator peak for the placement (zerokit systems
                   with an estimator row), from the meta-device model after the measurement

    python benchmarks/offload_step.py --system zerokit-offload-cpu --model 2.7b
    python benchmarks/offload_step.py --system zerokit-offload-nvme --nvme-path /local_nvme
    python benchmarks/offload_step.py --system zerokit-offload-cpu --ratio 0.4   # 60% of it on the GPU
    python benchmarks/offload_step.py --system deepspeed-2-offload-cpu \
        --deepspeed-wheel deepspeed-0.19.8-py3-none-any.whl
    python benchmarks/offload_step.py --largest --nvme-path /local_nvme   # more layers at 2.7b's width

--largest first computes, with zerokit's own arithmetic (zerokit.zero.memory), the most layers
each placement could hold in the host memory and disk space available, then trains one step of
that model in a child process (fewer layers until one trains) and prints its line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import zipfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llama_step import (  # noqa: E402
    add_timing_arguments, build_model, engine_step, estimated_peak_gib, make_optimizer, measure,
)  # fmt: skip

GiB = 2**30
STAGE3 = {"stage": 3, "stage3_param_persistence_threshold": 100_000}


def zerokit_zero(system: str, nvme_path: str | None) -> dict | None:
    """The zero_optimization section of a zerokit system (None for DeepSpeed)."""
    nvme = {"device": "nvme", "nvme_path": nvme_path}
    return {
        "zerokit-none": {"stage": 2},
        "zerokit-offload-cpu": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        # the CPU step on the training thread, after the backward (no overlap with the next forward)
        "zerokit-offload-cpu-serial": {"stage": 2, "offload_optimizer": {"device": "cpu", "overlap_step": False}},
        # ZeRO-Offload's delayed parameter update from the third step on (every timed step)
        "zerokit-offload-cpu-delayed": {"stage": 2, "offload_optimizer": {"device": "cpu",
                                                                          "delayed_parameter_update_after": 2}},
        "zerokit-offload-cpu-params": {**STAGE3, "offload_optimizer": {"device": "cpu"},
                                       "offload_param": {"device": "cpu"}},
        "zerokit-offload-nvme": {"stage": 2, "offload_optimizer": nvme},
        "zerokit-offload-nvme-cpu-params": {**STAGE3, "offload_optimizer": nvme, "offload_param": {"device": "cpu"}},
        "zerokit-offload-nvme-params": {**STAGE3, "offload_optimizer": nvme,
                                        "offload_param": {**nvme, "max_in_cpu": 0}},
    }.get(system)  # fmt: skip


SYSTEMS = (
    "zerokit-none", "zerokit-offload-cpu", "zerokit-offload-cpu-serial", "zerokit-offload-cpu-delayed",
    "zerokit-offload-cpu-params", "zerokit-offload-nvme",
    "zerokit-offload-nvme-cpu-params", "zerokit-offload-nvme-params", "deepspeed-2-offload-cpu",
)  # fmt: skip
# `zerokit estimate`'s (stage, offload) row of each zerokit system.
ESTIMATED_ROWS = {
    "zerokit-none": (2, "none"),
    "zerokit-offload-cpu": (2, "cpu_optimizer"),
    "zerokit-offload-cpu-serial": (2, "cpu_optimizer"),
    "zerokit-offload-cpu-delayed": (2, "cpu_optimizer"),  # its second buffers are host memory
    "zerokit-offload-cpu-params": (3, "cpu_optimizer_params"),
    "zerokit-offload-nvme": (2, "nvme_optimizer"),
    "zerokit-offload-nvme-cpu-params": (3, "nvme_optimizer_cpu_params"),
    "zerokit-offload-nvme-params": (3, "nvme"),
}
# Placements --largest tries: (system, what bounds it).
LARGEST = ("zerokit-offload-cpu-params", "zerokit-offload-nvme-cpu-params", "zerokit-offload-nvme-params")


class ZerokitRunner:
    def __init__(self, zero: dict, model: torch.nn.Module, micro_batch: int):
        import zerokit

        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_clipping": 1.0,
            "bf16": {"enabled": True},
            "zero_optimization": zero,
        }
        # Fused, as without offload: under ratio < 1 the device's units step with it (a foreach
        # step would hold an fp32 temporary as large as their states); the CPU kernel ignores it.
        optimizer = make_optimizer(model.parameters(), fused=True)
        self.engine = zerokit.initialize(model, optimizer, config)

    @staticmethod
    def offloads(zero: dict) -> bool:
        return "offload_optimizer" in zero or "offload_param" in zero

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return engine_step(self.engine, tokens)

    def swap_bytes(self) -> int:
        return sum(directory_bytes(path) for path in self.engine.swap_directories())

    def offloaded_bytes(self) -> dict:
        held = self.engine.memory_breakdown()
        return {
            "host": round(sum(v for k, v in held.items() if k.startswith("host_")) / GiB, 2),
            "nvme": round(sum(v for k, v in held.items() if k.startswith("nvme_")) / GiB, 2),
        }


class DeepSpeedRunner:
    """ZeRO-2 with the optimizer offloaded to the CPU: DeepSpeed builds DeepSpeedCPUAdam (its
    cpu_adam op, JIT-built) from the config's optimizer section."""

    def __init__(self, model: torch.nn.Module, micro_batch: int):
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0,
            "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.0}},
            "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                  "overlap_comm": True, "contiguous_gradients": True},
            "zero_force_ds_cpu_optimizer": True,  # DeepSpeedCPUAdam, as a DeepSpeed user would run it
            "steps_per_print": 10**9,
        }  # fmt: skip
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return engine_step(self.engine, tokens)

    def swap_bytes(self) -> int:
        return 0  # this configuration offloads to host memory only

    def offloaded_bytes(self) -> dict:
        return {}


def use_deepspeed_wheel(wheel: str) -> None:
    """Import deepspeed from a wheel file, unpacked into a temporary directory."""
    target = tempfile.mkdtemp(prefix="deepspeed-wheel-")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    sys.path.insert(0, target)


def directory_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:  # a file removed while walking
                pass
    return total


def run_one(args: argparse.Namespace) -> None:
    import psutil

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    for name in ("RANK", "LOCAL_RANK"):
        os.environ.setdefault(name, "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    if "nvme" in args.system and not args.nvme_path:
        raise SystemExit(f"{args.system} needs --nvme-path")
    zero = zerokit_zero(args.system, args.nvme_path)
    if args.ratio != 1.0:
        if zero is None or "offload_optimizer" not in zero:
            raise SystemExit(f"--ratio is offload_optimizer.ratio: {args.system} does not offload zerokit's optimizer")
        zero = {**zero, "offload_optimizer": {**zero["offload_optimizer"], "ratio": args.ratio}}
    # Offloaded models never exist whole on the GPU: built on meta, materialized by zerokit.
    on_meta = zero is not None and ZerokitRunner.offloads(zero)
    model = build_model(args.model, torch.device("meta") if on_meta else device, True, args.layers)
    n_params = sum(p.numel() for p in model.parameters())
    layers = model.config.num_hidden_layers
    runner = DeepSpeedRunner(model, args.micro_batch) if zero is None else ZerokitRunner(zero, model, args.micro_batch)
    del model
    torch.cuda.empty_cache()
    args.activation_checkpointing = True
    result = measure(args.system, runner.step, args, device, n_params, layers)
    if result:
        result.update(
            layers=layers,
            host_gib=round(psutil.Process().memory_info().rss / GiB, 2),
            disk_gib=round(runner.swap_bytes() / GiB, 2),
            offload_gib=runner.offloaded_bytes(),
            offload_ratio=args.ratio,
        )
        if args.system in ESTIMATED_ROWS:
            stage, offload = ESTIMATED_ROWS[args.system]
            result["estimated_peak_gib"] = estimated_peak_gib(args.model, args.layers, result["gpus"], args.micro_batch,
                                                              args.seq, stage, offload, "recompute",
                                                              offload_ratio=args.ratio)  # fmt: skip
        print(json.dumps(result), flush=True)
    dist.destroy_process_group()


def predicted_layers(system: str, args: argparse.Namespace) -> int:
    """The most decoder layers whose offload plan fits the host memory available (keeping
    --host-headroom GiB) and the disk space at --nvme-path, by zerokit's own arithmetic."""
    import psutil

    from zerokit.config import Config
    from zerokit.zero.memory import model_state_bytes
    from zerokit.zero.policy import OffloadPolicy, ShardingPolicy
    from zerokit.zero.units import plan_units

    zero = Config.load({"zero_optimization": zerokit_zero(system, args.nvme_path)}).zero_optimization
    host = psutil.virtual_memory().available - args.host_headroom * GiB
    disk = psutil.disk_usage(args.nvme_path).free if args.nvme_path else 0

    def fits(layers: int) -> bool:
        model = build_model(args.model, torch.device("meta"), False, layers)
        states = model_state_bytes(plan_units(model), ShardingPolicy.from_config(zero), torch.bfloat16, 1,
                                   offload=OffloadPolicy.from_config(zero), pin=True).offload  # fmt: skip
        return states.host_total <= host and states.nvme_total <= disk

    low, high = 1, 2
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def largest(args: argparse.Namespace) -> None:
    """For each placement: the predicted most layers, then a one-step trial in a child process,
    with 10% fewer layers after each failure."""
    for system in args.largest or LARGEST:
        layers = predicted_layers(system, args)
        print(json.dumps({"system": system, "predicted_layers": layers}), flush=True)
        for _ in range(args.largest_tries):
            command = [sys.executable, os.path.abspath(__file__), "--system", system, "--model", args.model,
                       "--layers", str(layers), "--warmup", "1", "--steps", str(args.largest_steps),
                       "--seq", str(args.seq), "--micro-batch", str(args.micro_batch)]  # fmt: skip
            if args.nvme_path:
                command += ["--nvme-path", args.nvme_path]
            child = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in child.stdout.splitlines() if line.startswith("{")]
            if child.returncode == 0 and lines:
                print(lines[-1], flush=True)
                break
            reason = (child.stderr.strip().splitlines() or ["no output"])[-1]
            print(json.dumps({"system": system, "layers": layers, "failed": reason[-300:]}), flush=True)
            layers = max(1, int(layers * 0.9))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", choices=SYSTEMS)
    parser.add_argument("--largest", nargs="*", choices=LARGEST, metavar="SYSTEM",
                        help=f"find the largest model that trains (see above) with these placements (default: {LARGEST})")
    parser.add_argument("--layers", type=int, help="decoder layers (default: the model's own)")
    parser.add_argument("--nvme-path", help="directory on a local NVMe drive for swap files")
    parser.add_argument("--ratio", type=float, default=1.0,
                        help="offload_optimizer.ratio of a zerokit system: the fraction of the optimizer offloaded")
    parser.add_argument("--deepspeed-wheel", help="import deepspeed from this wheel file")
    parser.add_argument("--host-headroom", type=int, default=16, help="GiB of host memory --largest leaves free")
    parser.add_argument("--largest-tries", type=int, default=4)
    parser.add_argument("--largest-steps", type=int, default=2)
    add_timing_arguments(parser)
    parser.set_defaults(model="2.7b")
    args = parser.parse_args()
    if args.deepspeed_wheel:
        use_deepspeed_wheel(args.deepspeed_wheel)
    if args.largest is not None:
        if args.ratio != 1.0:  # its plans and trials offload the whole optimizer
            parser.error("--ratio applies to --system runs only: --largest offloads the whole optimizer")
        largest(args)
    elif args.system:
        run_one(args)
    else:
        parser.error("give --system or --largest")


if __name__ == "__main__":
    main()
