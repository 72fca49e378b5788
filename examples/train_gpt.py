"""Train a small GPT on the Python standard library's source text with zerokit.

    torchrun --nproc-per-node 2 examples/train_gpt.py             # CPU or GPUs, ZeRO-3
    python examples/train_gpt.py --stage 2 --precision bf16       # one process
    torchrun --nproc-per-node 8 examples/train_gpt.py --model medium --precision bf16 --meta-init

Prints the loss, tokens/s and each rank's memory while it trains.

Fault tolerance: with --checkpoint-dir, --save-every and --resume, a job that torchrun restarts
after a rank died (--max-restarts) resumes from the newest complete checkpoint, data position
included, and trains on exactly as if nothing had happened (the variable works around torchrun
re-using stale addresses after a restart, pytorch/pytorch#135712):

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --standalone --nproc-per-node 2 --max-restarts 3 \
        examples/train_gpt.py --checkpoint-dir ckpt --save-every 20 --resume --async-save
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import psutil
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import zerokit  # noqa: E402
from zerokit.checkpoint import complete_tags  # noqa: E402
from gpt import GPT, PRESETS, GPTConfig, cosine_lr, count_parameters, flops_per_token, sample_batch, stdlib_corpus  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--layers", type=int, help="override the preset's number of blocks")
    parser.add_argument("--dim", type=int, help="override the preset's width")
    parser.add_argument("--stage", type=int, choices=(0, 1, 2, 3), default=3)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--meta-init", action="store_true", help="build the model on the meta device; ranks materialize shards")
    parser.add_argument("--checkpoint-activations", action="store_true", help="recompute each block in backward")
    parser.add_argument("--wtacrs", type=float, metavar="KEEP", help="WTA-CRS linear layers keeping this fraction of rows")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--checkpoint-dir", help="save checkpoints into this directory (every --save-every steps)")
    parser.add_argument("--save-every", type=int, default=0, help="save a checkpoint every N steps")
    parser.add_argument("--resume", action="store_true",
                        help="at start, resume from the newest complete checkpoint in --checkpoint-dir, if any")
    parser.add_argument("--async-save", action="store_true", help="write checkpoints in a background thread")
    parser.add_argument("--simulate-failure", type=int, metavar="STEP",
                        help="to try fault tolerance: rank 1 dies after STEP, in the first attempt of a torchrun job only")
    args = parser.parse_args()
    if (args.save_every or args.resume or args.async_save) and not args.checkpoint_dir:
        parser.error("--save-every, --resume and --async-save need --checkpoint-dir")
    return args


def memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return psutil.Process().memory_info().rss


def main() -> None:
    args = parse_args()
    preset = PRESETS[args.model]
    config = GPTConfig(
        layers=args.layers or preset.layers, dim=args.dim or preset.dim, heads=preset.heads, max_seq=max(args.seq_len, 128)
    )
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    with torch.device("meta") if args.meta_init else torch.device("cpu"):
        model = GPT(config)
    params = count_parameters(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    engine = zerokit.initialize(model, optimizer, {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": args.grad_accum,
        "gradient_clipping": args.clip,
        "bf16": {"enabled": args.precision == "bf16"},
        "fp16": {"enabled": args.precision == "fp16"},
        "zero_optimization": {"stage": args.stage},
        **({"wtacrs": {"keep_ratio": args.wtacrs}} if args.wtacrs else {}),
    })
    rank, world, device = engine.rank, engine.world_size, engine.device
    model.checkpoint_blocks = args.checkpoint_activations

    corpus = stdlib_corpus()
    generator = torch.Generator().manual_seed(args.seed * 1000 + rank)  # different data on each rank
    tokens_per_step = args.micro_batch * args.seq_len * args.grad_accum * world
    if rank == 0:
        print(f"zerokit ZeRO-{args.stage} {args.precision}: GPT {config.layers}x{config.dim}, {params / 1e6:.1f}M parameters, "
              f"{world} rank(s) on {device.type}, corpus {corpus.numel() / 1e6:.1f} MB of Python stdlib source", flush=True)

    first_step = 0
    if args.resume and complete_tags(args.checkpoint_dir):
        client_state = engine.load_checkpoint(args.checkpoint_dir, fallback_to_previous=True)
        first_step = client_state["step"]
        generator.set_state(client_state["generator"])  # the data position: the same batches as without the restart
        if rank == 0:
            print(f"resumed from {args.checkpoint_dir} at step {first_step}", flush=True)

    start = last = time.perf_counter()
    last_step = first_step
    for step in range(first_step, args.steps):
        for group in engine.optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.steps, args.lr, warmup=max(1, args.steps // 20))
        total = torch.zeros((), device=device)
        for _ in range(args.grad_accum):
            inputs, targets = sample_batch(corpus, args.micro_batch, args.seq_len, generator)
            loss = engine(inputs.to(device), targets.to(device))
            engine.backward(loss)
            engine.step()
            total += loss.detach() / args.grad_accum
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            report = torch.tensor([total.item(), float(memory_bytes(device))], dtype=torch.float64, device=device)
            gathered = [torch.zeros_like(report) for _ in range(world)] if world > 1 else [report]
            if world > 1:
                dist.all_gather(gathered, report)
            now = time.perf_counter()
            rate = tokens_per_step * (step + 1 - last_step) / (now - last)
            last, last_step = now, step + 1
            if rank == 0:
                loss_mean = sum(g[0].item() for g in gathered) / world
                memory = " ".join(f"r{r}:{g[1].item() / 2**20:.0f}" for r, g in enumerate(gathered))
                tflops = rate * flops_per_token(config, params, args.seq_len) / world / 1e12
                print(f"step {step + 1:>5}/{args.steps} ({100 * (step + 1) / args.steps:3.0f}%)  loss {loss_mean:.4f}  "
                      f"{rate:,.0f} tok/s  {tflops:.2f} TFLOPs/rank  mem MiB {memory}", flush=True)
        if args.save_every and (step + 1) % args.save_every == 0:
            position = {"step": step + 1, "generator": generator.get_state()}
            engine.save_checkpoint(args.checkpoint_dir, client_state=position, async_save=args.async_save)
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if args.simulate_failure == step + 1 and rank == min(1, world - 1) and first_attempt:
            os._exit(1)  # a crash: no cleanup, no exception
    if args.checkpoint_dir:
        engine.wait_for_checkpoint()
    if rank == 0:
        print(f"done: {args.steps} steps in {time.perf_counter() - start:.1f}s", flush=True)
    if dist.is_initialized():
        # Every rank past its last collective before any tears its connections down: a gloo rank
        # whose peer closes a connection it is still reading from aborts at exit.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
