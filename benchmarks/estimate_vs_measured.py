"""`zerokit estimate` against the peak memory zerokit really reaches, one configuration after another.

For each configuration the estimate comes from the meta-device model (no GPU needed), then the
same model (benchmarks/llama_step.py's builder, bf16, AdamW, clipping 1.0, random tokens) trains
under zerokit: 2 warm-up steps, then 2 measured steps; "measured" is
torch.cuda.max_memory_allocated() over the measured steps, max over ranks, against the
estimate's allocator peak ("GPU alloc"). Configurations with more than one GPU run under
torchrun, one launch each.

    python benchmarks/estimate_vs_measured.py                  # every configuration below
    python benchmarks/estimate_vs_measured.py --only s2-2k s3-16k-ckpt --json results.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_step  # noqa: E402

MARKER = "ESTIMATE_VS_MEASURED "
GiB = 2**30


@dataclass(frozen=True)
class Case:
    name: str
    model: str  # a key of llama_step.MODELS
    gpus: int
    stage: int
    seq: int
    micro_batch: int
    policy: str = "none"  # none | recompute (Hugging Face's checkpointing) | memo (activation_memory)


CASES = (
    Case("s1-2k", "0.95b", 2, 1, 2048, 4),
    Case("s2-2k", "0.95b", 2, 2, 2048, 4),
    Case("s3-2k", "0.95b", 2, 3, 2048, 4),
    Case("s3-16k", "0.95b", 2, 3, 16384, 1),
    Case("s3-16k-ckpt", "0.95b", 2, 3, 16384, 1, "recompute"),
    Case("s3-16k-memo", "0.95b", 2, 3, 16384, 1, "memo"),
    Case("s2-2k-2.7b-ckpt", "2.7b", 2, 2, 2048, 4, "recompute"),
    Case("1gpu-s0-16k", "0.95b", 1, 0, 16384, 1),
    Case("1gpu-s0-16k-memo", "0.95b", 1, 0, 16384, 1, "memo"),
)


def estimated(case: Case) -> dict:
    config = llama_step.estimated_configuration(case.model, None, case.gpus, case.micro_batch, case.seq, case.stage,
                                                activations=case.policy)  # fmt: skip
    return {"allocated": config.peak_allocated, "total": sum(config.gpu.values()) - config.gpu["runtime"],
            "breakdown": dict(config.gpu), "memo_alpha": config.memo_alpha}  # fmt: skip


def measured(case: Case) -> dict:
    """Launch the worker for `case` and read its result line."""
    worker = [os.path.abspath(__file__), "--worker", json.dumps(asdict(case))]
    if case.gpus > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={case.gpus}"]
        command = [*launcher, *worker]
    else:
        command = [sys.executable, *worker]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    for line in result.stdout.splitlines():
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    return {"error": (result.stderr.strip().splitlines() or ["no output"])[-1]}


def worker(case: Case) -> None:
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    model = llama_step.build_model(case.model, device, case.policy == "recompute")
    memo = {"policy": "memo"} if case.policy == "memo" else None
    runner = llama_step.Runner(f"zerokit-{case.stage}", model, case.micro_batch, device, memo)
    del model
    torch.cuda.empty_cache()
    rank = runner.engine.rank

    def batch(step: int) -> torch.Tensor:
        generator = torch.Generator(device=device).manual_seed(1000 * step + rank)
        return torch.randint(0, 32000, (case.micro_batch, case.seq), device=device, generator=generator)

    for step in range(2):  # memo calibrates in its first step
        runner.step(batch(step))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for step in range(2, 4):
        runner.step(batch(step))
    torch.cuda.synchronize()
    peaks = torch.tensor([torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()], dtype=torch.float64,
                         device=device)  # fmt: skip
    if dist.is_initialized():
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
    if rank == 0:
        result = {"allocated": int(peaks[0].item()), "reserved": int(peaks[1].item()),
                  "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__}  # fmt: skip
        print(MARKER + json.dumps(result), flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="names of the configurations to run (default: all)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Case(**json.loads(args.worker)))
        return
    cases = [c for c in CASES if not args.only or c.name in args.only]
    unknown = set(args.only or ()) - {c.name for c in CASES}
    if unknown:
        raise SystemExit(f"unknown configurations {sorted(unknown)}; choose from {[c.name for c in CASES]}")
    available = torch.cuda.device_count()
    header = (f"{'config':<16} {'model':>6} {'GPUs':>4} {'stage':>5} {'seq x mb':>10} {'policy':>9} "
              f"{'estimated':>10} {'measured':>9} {'error':>7} {'est. total':>10} {'reserved':>9}")  # fmt: skip
    print(header)
    results = []
    for case in cases:
        started = time.perf_counter()
        estimate = estimated(case)
        if case.gpus > available:
            result = {"error": f"needs {case.gpus} GPUs, {available} visible"}
        else:
            result = measured(case)
        row = {"case": asdict(case), "estimate": estimate, "measured": result,
               "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
        results.append(row)
        shape = f"{case.seq}x{case.micro_batch}"
        line = f"{case.name:<16} {case.model:>6} {case.gpus:>4} {case.stage:>5} {shape:>10} {case.policy:>9} "
        line += f"{estimate['allocated'] / GiB:>9.2f}G "
        if "error" in result:
            line += f"  {result['error']}"
        else:
            error = (estimate["allocated"] - result["allocated"]) / result["allocated"]
            row["relative_error"] = error
            line += (f"{result['allocated'] / GiB:>8.2f}G {error * 100:>+6.1f}% "
                     f"{estimate['total'] / GiB:>9.2f}G {result['reserved'] / GiB:>8.2f}G")  # fmt: skip
        print(line, flush=True)
    worst = max((abs(r["relative_error"]) for r in results if "relative_error" in r), default=None)
    if worst is not None:
        print(f"largest error: {worst * 100:.1f}% (target: within 10%)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
