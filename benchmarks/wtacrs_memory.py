"""WTA-CRS on one GPU: activation memory, throughput, the largest micro-batch, and loss curves.

    python benchmarks/wtacrs_memory.py --model 0.95b --seq 2048 --micro-batch 4 --keep 1 0.3 0.1 --out results/

For each keep ratio (1 = exact nn.Linear) the Llama model of llama_step.py trains in bf16 with
zerokit (one rank) without activation checkpointing. Activation memory = peak allocated during a
step minus what is allocated between steps (model and optimizer states); beside it, `zerokit
estimate`'s figures for the same run (estimated_activation_gib and estimated_peak_gib, from the
meta-device model, no GPU). Then micro-batches grow until one runs out of memory. Finally exact
and the first sampled ratio train `--loss-steps` steps on real text (the Python standard
library's source, as bytes) and their loss curves are plotted. With --rounds R every ratio is
measured R times, in interleaved order and a fresh process each time, and tok/s is the median.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
import zerokit  # noqa: E402
from gpt import stdlib_corpus  # noqa: E402
from llama_step import build_model, estimated_configuration  # noqa: E402


def make_engine(model_name: str, keep: float, micro_batch: int, device: torch.device) -> zerokit.Engine:
    model = build_model(model_name, device, checkpointing=False)
    config = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_clipping": 1.0, "bf16": {"enabled": True}}
    if keep < 1:
        config["wtacrs"] = {"keep_ratio": keep}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), fused=True)
    return zerokit.initialize(model, optimizer, config)


class TextWindows:
    """Fixed windows of the corpus, so each sample has an index the gradient-norm cache can key."""

    def __init__(self, seq: int, device: torch.device):
        corpus = stdlib_corpus(max_bytes=64 << 20).long()
        self.windows = corpus[: corpus.numel() // seq * seq].view(-1, seq)
        self.device = device
        self.generator = torch.Generator().manual_seed(0)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        indices = torch.randint(0, self.windows.shape[0], (size,), generator=self.generator)
        return indices, self.windows[indices].to(self.device)


def train_step(engine: zerokit.Engine, indices: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    if engine.config.wtacrs is not None:
        zerokit.nn.set_sample_indices(engine.module, indices)
    loss = engine(input_ids=tokens, labels=tokens).loss
    engine.backward(loss)
    engine.step()
    return loss.detach()


def measure(args, keep: float, device: torch.device) -> dict:
    engine = make_engine(args.model, keep, args.micro_batch, device)
    data = TextWindows(args.seq, device)
    for _ in range(3):
        train_step(engine, *data.batch(args.micro_batch))
    torch.cuda.synchronize()
    between_steps = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(engine, *data.batch(args.micro_batch))
    torch.cuda.synchronize()
    step_time = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated(device)
    larger = range(args.micro_batch + args.batch_increment, 10 * args.micro_batch, args.batch_increment)
    largest = None if args.skip_largest else args.micro_batch
    for micro_batch in [] if args.skip_largest else larger:
        try:
            train_step(engine, *data.batch(micro_batch))
            torch.cuda.synchronize()
            largest = micro_batch
        except torch.OutOfMemoryError:
            break
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "keep": keep,
        "tok_s": round(args.micro_batch * args.seq / step_time),
        "peak_gib": round(peak / 2**30, 2),
        "activation_gib": round((peak - between_steps) / 2**30, 2),
        "largest_micro_batch": largest,
    }


def estimated(args, keep: float) -> dict:
    """`zerokit estimate`'s counterparts of measure()'s peak and activation memory: stage 0 on one
    GPU, no activation policy, the blocks' linear layers converted to WTA-CRS as the engine
    converts them. What the peak adds to the states held between steps is the activations, the
    gradients and the reduction buffers at the estimated peak."""
    config = estimated_configuration(args.model, None, 1, args.micro_batch, args.seq, 0,
                                     wtacrs_keep_ratio=keep if keep < 1 else None)  # fmt: skip
    added = config.gpu["activations"] + config.gpu["gradients"] + config.gpu["communication"]
    return {
        "estimated_peak_gib": round(config.peak_allocated / 2**30, 2),
        "estimated_activation_gib": round(added / 2**30, 2),
    }


def loss_curve(args, keep: float, device: torch.device) -> list[float]:
    # Peak memory is not read here, so both curves may share this process.
    engine = make_engine(args.model, keep, args.micro_batch, device)
    data = TextWindows(args.seq, device)
    losses = [train_step(engine, *data.batch(args.micro_batch)).item() for _ in range(args.loss_steps)]
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return losses


def plot(curves: dict[str, list[float]], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: plot wtacrs_losses.json elsewhere (--plot-only)", flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for label, losses in curves.items():
        axis.plot(range(1, len(losses) + 1), losses, label=label, linewidth=1)
    axis.set_xlabel("step")
    axis.set_ylabel("training loss")
    axis.set_title("0.95B Llama on Python stdlib text: exact vs WTA-CRS")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def _measure_in_subprocess(keep: float, skip_largest: bool) -> dict:
    """Each keep ratio in its own process: nothing of one run's memory can inflate the next one's peak."""
    command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--measure-only", str(keep)]
    command += ["--skip-largest"] if skip_largest else []
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="0.95b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--batch-increment", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1, help="measure every ratio this many times, interleaved")
    parser.add_argument("--keep", type=float, nargs="+", default=[1.0, 0.3, 0.1])
    parser.add_argument("--loss-steps", type=int, default=200)
    parser.add_argument("--out", default=".")
    parser.add_argument("--plot-only", help="only plot this wtacrs_losses.json into --out")
    parser.add_argument("--measure-only", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--skip-largest", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plot_only:
        with open(args.plot_only) as handle:
            plot(json.load(handle), os.path.join(args.out, "wtacrs_loss_curve.png"))
        return
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    os.makedirs(args.out, exist_ok=True)

    if args.measure_only is not None:  # one measurement in this fresh process
        print(json.dumps(measure(args, args.measure_only, device)), flush=True)
        return
    # Rounds interleave the ratios, so a drift of the machine's speed reaches each of them alike;
    # tok/s is the median over rounds (the memory figures do not vary between rounds).
    rounds = [[_measure_in_subprocess(keep, skip_largest=r > 0) for keep in args.keep] for r in range(args.rounds)]
    results = rounds[0]
    for k, result in enumerate(results):
        result["tok_s_rounds"] = [round_[k]["tok_s"] for round_ in rounds]
        result["tok_s"] = round(statistics.median(result["tok_s_rounds"]))
    for result in results:  # after every measurement, on the meta device
        result.update(estimated(args, result["keep"]))
    for result in results:
        print(json.dumps(result), flush=True)
    if args.loss_steps:
        sampled = next(k for k in args.keep if k < 1)
        curves = {"exact": loss_curve(args, 1.0, device), f"keep {sampled}": loss_curve(args, sampled, device)}
        with open(os.path.join(args.out, "wtacrs_losses.json"), "w") as handle:
            json.dump(curves, handle)
        plot(curves, os.path.join(args.out, "wtacrs_loss_curve.png"))
        for label, losses in curves.items():
            tail = losses[-20:]
            print(f"{label}: first {losses[0]:.3f}, mean of last 20 {sum(tail) / len(tail):.3f}", flush=True)
    print("| keep | tok/s | peak GiB | estimated peak GiB | activation GiB | estimated activation GiB "
          "| largest micro-batch |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['keep']} | {r['tok_s']:,} | {r['peak_gib']} | {r['estimated_peak_gib']} | {r['activation_gib']} "
              f"| {r['estimated_activation_gib']} | {r['largest_micro_batch']} |")


if __name__ == "__main__":
    main()
