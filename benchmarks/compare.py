"""Run llama_step.py for several systems, one torchrun each, and print a markdown table.

    python benchmarks/compare.py --gpus 2 --systems zerokit-3 fsdp2 ddp --out results.jsonl -- --seq 2048

Arguments after `--` go to every llama_step.py run. Each system runs in its own processes so
that no system's memory or state leaks into the next one's figures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def run(system: str, gpus: int, extra: list[str], timeout: int) -> dict:
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}",
        os.path.join(HERE, "llama_step.py"), "--system", system, *extra,
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"system": system, "error": f"timed out after {timeout}s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stdout + done.stderr)[-3000:]
        return {"system": system, "error": f"exit {done.returncode}", "log": tail}
    return json.loads(lines[-1])


def table(results: list[dict]) -> str:
    rows = ["| system | tok/s/GPU | TFLOPs/GPU | peak GiB/GPU | step s | first → last loss |", "|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['system']} | {r['error']} | | | | |")
            continue
        rows.append(
            f"| {r['system']} | {r['tok_s_gpu']:,} | {r['tflops_gpu']} | {r['peak_gib']} | {r['step_s']} | "
            f"{r['losses'][0]:.3f} → {r['losses'][-1]:.3f} |"
        )
    return "\n".join(rows)


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--systems", nargs="+", required=True)
    parser.add_argument("--out", help="append each result as a JSON line to this file")
    parser.add_argument("--timeout", type=int, default=400)
    args = parser.parse_args(argv)
    results = []
    for system in args.systems:
        result = run(system, args.gpus, extra, args.timeout)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "log"}), flush=True)
        if "log" in result:
            print(result["log"], file=sys.stderr, flush=True)
        if args.out:
            with open(args.out, "a") as handle:
                handle.write(json.dumps(result) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
