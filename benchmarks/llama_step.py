"""Training-step throughput and peak memory of one system on a Llama-style model.

Protocol (same for every system): a `transformers.LlamaConfig` decoder with random init (seeded,
identical weights for all systems), SDPA attention, bf16 compute with fp32 master weights,
AdamW(lr 1e-4, betas 0.9/0.95), gradient clipping 1.0, random token batches; 3 warm-up steps then
8 timed steps. tok/s/GPU = micro_batch x seq / step time; TFLOPs = (6 N + 12 L h s) tokens / time;
peak = torch.cuda.max_memory_allocated() over the timed steps, max over ranks.

    torchrun --nproc-per-node 2 benchmarks/llama_step.py --system zerokit-3 --model 0.95b

Activation memory (all systems unless noted): --activation-checkpointing (Hugging Face's, per
layer), --save-on-cpu (torch.autograd.graph.save_on_cpu with pinned memory), --activation-memory
POLICY (zerokit's activation_memory section: memo, swap, recompute; zerokit systems only), and
--chunked-loss (zerokit.nn.ChunkedLossCausalLM: the loss over chunks of tokens, never the full
logits, for long sequences).

Prints one JSON line (rank 0) with the figures and the per-step losses (mean over ranks).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import time

import torch
import torch.distributed as dist

MODELS = {
    # hidden, intermediate, layers, heads
    "tiny": (64, 176, 2, 4),
    "0.95b": (2048, 5632, 16, 16),
    "2.7b": (2560, 6912, 32, 20),
}
H100_BF16_TFLOPS = 989  # dense bf16 peak of an H100 SXM, for MFU
SYSTEMS = ("zerokit-1", "zerokit-2", "zerokit-3", "fsdp2", "ddp", "deepspeed-1", "deepspeed-2", "deepspeed-3")


def build_model(name: str, device: torch.device, checkpointing: bool, layers: int | None = None) -> torch.nn.Module:
    """The model `name` of MODELS (with `layers` decoder layers instead of its own, if given)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, default_layers, heads = MODELS[name]
    layers = layers or default_layers
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=32000,
        max_position_embeddings=131072,
        attn_implementation="sdpa",
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def make_optimizer(params, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, **({"fused": True} if fused else {}))


def single_gpu_engine(activation_memory: dict | None, chunked_loss: int | None = None):
    """zerokit on cuda:0 as a world of one (ZeRO-3, bf16, micro-batch 1) around the 0.95 B model,
    its loss over chunks of `chunked_loss` tokens where given: the one-GPU activation benchmarks'
    setup."""
    import zerokit

    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29561"), ("RANK", "0"), ("WORLD_SIZE", "1"),
                        ("LOCAL_RANK", "0")):  # fmt: skip
        os.environ.setdefault(name, value)
    torch.cuda.set_device(0)
    model = build_model("0.95b", torch.device("cuda"), False)
    if chunked_loss:
        from zerokit.nn import ChunkedLossCausalLM

        model = ChunkedLossCausalLM(model, chunk_tokens=chunked_loss)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 1.0, "bf16": {"enabled": True},
              "zero_optimization": {"stage": 3}}  # fmt: skip
    if activation_memory is not None:
        config["activation_memory"] = activation_memory
    return zerokit.initialize(model, make_optimizer(model.parameters(), True), config)


def loss_of(output) -> torch.Tensor:
    """The loss of a model's output: a Hugging Face output's, or the tensor a chunked loss returns."""
    return output if isinstance(output, torch.Tensor) else output.loss


def engine_step(engine, tokens: torch.Tensor) -> torch.Tensor:
    """One step through an engine with DeepSpeed's loop API (zerokit's and DeepSpeed's alike)."""
    loss = loss_of(engine(input_ids=tokens, labels=tokens))
    engine.backward(loss)
    engine.step()
    return loss.detach()


class Runner:
    """forward+backward+step of one system, behind one `train_step(tokens) -> loss`."""

    def __init__(self, system: str, model: torch.nn.Module, micro_batch: int, device: torch.device,
                 activation_memory: dict | None = None):
        self.system = system
        kind, _, stage = system.partition("-")
        if activation_memory and kind != "zerokit":
            raise SystemExit("--activation-memory is zerokit's; other systems take --activation-checkpointing or --save-on-cpu")
        if kind == "zerokit":
            import zerokit

            config = {
                "train_micro_batch_size_per_gpu": micro_batch,
                "gradient_clipping": 1.0,
                "bf16": {"enabled": True},
                "zero_optimization": {"stage": int(stage)},
                **({"activation_memory": activation_memory} if activation_memory else {}),
            }
            self.engine = zerokit.initialize(model, make_optimizer(model.parameters(), fused=True), config)
            self.step = functools.partial(engine_step, self.engine)
        elif kind == "deepspeed":
            import deepspeed

            config = {
                "train_micro_batch_size_per_gpu": micro_batch,
                "gradient_accumulation_steps": 1,
                "gradient_clipping": 1.0,
                "bf16": {"enabled": True},
                "zero_optimization": {"stage": int(stage)},
                "zero_allow_untested_optimizer": True,  # a torch fused AdamW, the same as every other system
                "steps_per_print": 10**9,
            }
            optimizer = make_optimizer(model.parameters(), fused=True)
            self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
            self.step = functools.partial(engine_step, self.engine)
        elif kind == "fsdp2":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            for layer in decoder_layers(model):
                fully_shard(layer, mp_policy=policy)
            fully_shard(model, mp_policy=policy)
            self.model = model
            self.optimizer = make_optimizer(model.parameters(), fused=True)
            self.step = self._plain_step
            self.autocast = contextlib.nullcontext
        elif kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(model.to(device), device_ids=[device.index])
            self.optimizer = make_optimizer(model.parameters(), fused=True)
            self.step = self._plain_step
            self.autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
        else:
            raise SystemExit(f"unknown system {system!r}; choose from {', '.join(SYSTEMS)}")

    def _plain_step(self, tokens: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            loss = loss_of(self.model(input_ids=tokens, labels=tokens))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    lm = model.lm if hasattr(model, "lm") else model  # under a ChunkedLossCausalLM
    return lm.model.layers


KERNEL_CATEGORIES = (  # first match wins; lower-case substrings of kernel names
    ("communication", ("nccl",)),
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "splitk")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copy/fill", ("memcpy", "memset", "copy", "fill", "cat", "chunk")),
)


def kernel_time_by_category(prof, steps: int) -> dict[str, float]:
    """Milliseconds of GPU kernel time per step, by kind of kernel (streams overlap: not wall time)."""
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = event.name.lower()
        category = next((c for c, keys in KERNEL_CATEGORIES if any(k in name for k in keys)), "elementwise/other")
        totals[category] = totals.get(category, 0.0) + event.time_range.elapsed_us() / 1000 / steps
    return {k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


def add_timing_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="0.95b", choices=sorted(MODELS))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--save-on-cpu", action="store_true", help="keep saved activations in pinned host memory")
    parser.add_argument("--activation-memory", choices=("memo", "swap", "recompute"),
                        help="zerokit's activation_memory policy")
    parser.add_argument("--alpha", type=float, help="memo's swapped fraction of tokens (default: planned)")
    parser.add_argument("--keep-last", type=int, help="blocks at the end that keep their activations (default 2)")
    parser.add_argument("--restore-buffers", type=int, choices=(1, 2),
                        help="device buffers swapped blocks are restored into (default 2)")
    parser.add_argument("--chunked-loss", type=int, metavar="TOKENS",
                        help="compute the loss over chunks of this many tokens (zerokit.nn.ChunkedLossCausalLM)")
    parser.add_argument("--profile", help="profile two timed steps: print GPU time by kernel category, and write "
                        "chrome traces to this folder (or 'summary' for the printout only)")


def measure(system: str, step, args: argparse.Namespace, device: torch.device, n_params: int, layers: int) -> dict:
    """Warm-up and timed steps of `step(tokens) -> loss` on every rank; rank 0 gets the result
    line (the others an empty dict)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    hidden = MODELS[args.model][0]

    def batch(index: int) -> torch.Tensor:
        generator = torch.Generator(device=device).manual_seed(1000 * index + rank)
        return torch.randint(0, 32000, (args.micro_batch, args.seq), device=device, generator=generator)

    if args.save_on_cpu:
        plain_step = step

        def step(tokens: torch.Tensor) -> torch.Tensor:
            with torch.autograd.graph.save_on_cpu(pin_memory=True):
                return plain_step(tokens)

    losses = []
    for index in range(args.warmup):
        losses.append(step(batch(index)))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    profiler = contextlib.nullcontext()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile, schedule

        def on_trace_ready(prof) -> None:
            if rank == 0:
                print(json.dumps({"system": system, "gpu_ms_per_step": kernel_time_by_category(prof, steps=2)}))
            if args.profile != "summary":
                prof.export_chrome_trace(os.path.join(args.profile, f"{system}-rank{rank}.json"))

        profiler = profile(
            activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
            schedule=schedule(wait=args.steps - 2, warmup=0, active=2),
            on_trace_ready=on_trace_ready,
        )
    start = time.perf_counter()
    with profiler as prof:
        for index in range(args.warmup, args.warmup + args.steps):
            losses.append(step(batch(index)))
            if args.profile:
                prof.step()
    torch.cuda.synchronize()
    step_time = (time.perf_counter() - start) / args.steps

    peak = torch.tensor([torch.cuda.max_memory_allocated(device)], dtype=torch.float64, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    mean_losses = torch.stack(losses).float()
    dist.all_reduce(mean_losses)
    mean_losses /= world
    tokens = args.micro_batch * args.seq
    tflops = (6 * n_params + 12 * layers * hidden * args.seq) * tokens / step_time / 1e12
    if rank != 0:
        return {}
    return {
        "system": system,
        "gpus": world,
        "gpu": torch.cuda.get_device_name(device),
        "model": args.model,
        "params": n_params,
        "seq": args.seq,
        "micro_batch": args.micro_batch,
        "activations": activation_label(args),
        "warmup": args.warmup,  # memo plans in its first step: its steady state starts at the third
        "steps": args.steps,
        "step_s": round(step_time, 4),
        "tok_s_gpu": round(tokens / step_time),
        "tflops_gpu": round(tflops, 1),
        **({"mfu": round(tflops / H100_BF16_TFLOPS, 3)} if "H100" in torch.cuda.get_device_name(device) else {}),
        "peak_gib": round(peak.item() / 2**30, 2),
        "losses": [round(x, 4) for x in mean_losses.tolist()],
        "torch": torch.__version__,
    }


ACTIVATION_OPTIONS = ("alpha", "keep_last", "restore_buffers")  # activation_memory keys with flags here


def activation_options(args: argparse.Namespace) -> dict:
    """The activation_memory options given on the command line."""
    return {name: getattr(args, name) for name in ACTIVATION_OPTIONS if getattr(args, name) is not None}


def activation_config(args: argparse.Namespace) -> dict | None:
    """zerokit's activation_memory section for the command line's choices."""
    if not args.activation_memory:
        return None
    return {"policy": args.activation_memory} | activation_options(args)


def activation_label(args: argparse.Namespace) -> str:
    parts = [name for name, on in (("checkpointing", args.activation_checkpointing), ("save_on_cpu", args.save_on_cpu))
             if on]  # fmt: skip
    if args.activation_memory:
        options = [f"{name}={value}" for name, value in activation_options(args).items()]
        parts.append(args.activation_memory + (f"({', '.join(options)})" if options else ""))
    if args.chunked_loss:
        parts.append(f"chunked_loss({args.chunked_loss})")
    return "+".join(parts) or "none"


def estimated_configuration(model: str, layers: int | None, gpus: int, micro_batch: int, seq: int, stage: int,
                            offload: str = "none", activations: str = "none", chunked_loss: int | None = None,
                            wtacrs_keep_ratio: float | None = None, offload_ratio: float = 1.0,
                            **activation_options):
    """`zerokit estimate`'s row (a zerokit.profiler.estimate.Configuration) for this model and
    configuration, from the meta device: with the loss over chunks of `chunked_loss` tokens,
    activation_memory's options (ACTIVATION_OPTIONS), WTA-CRS layers keeping `wtacrs_keep_ratio`
    of their rows, where given, and offload_optimizer's `offload_ratio`."""
    from zerokit.profiler.estimate import Hardware, Workload, estimate
    from zerokit.profiler.models import ModelSource

    source = ModelSource(f"llama-{model}", lambda: build_model(model, torch.device("meta"), False, layers))
    workload = Workload(micro_batch, seq, chunked_loss=chunked_loss, wtacrs_keep_ratio=wtacrs_keep_ratio,
                        offload_ratio=offload_ratio, **activation_options)  # fmt: skip
    result = estimate(source, Hardware(gpus_per_node=gpus, gpu_memory=80 * 10**9), workload)
    return result.find(stage, offload, activations)


def estimated_peak_gib(*args, **kwargs) -> float:
    """The allocator peak (GiB) of estimated_configuration(*args, **kwargs)."""
    return round(estimated_configuration(*args, **kwargs).peak_allocated / 2**30, 2)


def estimated_activations(args: argparse.Namespace) -> str | None:
    """The estimator's activation policy for this run, or None where it models none
    (save_on_cpu)."""
    if args.save_on_cpu:
        return None
    if args.activation_memory:
        return args.activation_memory
    return "recompute" if args.activation_checkpointing else "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", required=True, choices=SYSTEMS)
    add_timing_arguments(parser)
    args = parser.parse_args()
    if not args.activation_memory and activation_options(args):
        parser.error("--alpha, --keep-last and --restore-buffers are settings of --activation-memory: give a policy "
                     "with them")

    dist.init_process_group("nccl")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(device)
    # Every system starts from the same weights: built on the GPU under one seed.
    model = build_model(args.model, device, args.activation_checkpointing)
    n_params = sum(p.numel() for p in model.parameters())
    if args.chunked_loss:
        from zerokit.nn import ChunkedLossCausalLM

        model = ChunkedLossCausalLM(model, args.chunked_loss)
    runner = Runner(args.system, model, args.micro_batch, device, activation_config(args))
    del model
    torch.cuda.empty_cache()
    result = measure(args.system, runner.step, args, device, n_params, MODELS[args.model][2])
    kind, _, stage = args.system.partition("-")
    activations = estimated_activations(args)
    if result and kind == "zerokit" and activations:
        layers = MODELS[args.model][2]
        options = activation_options(args)
        manager = runner.engine.activations
        if activations == "memo" and args.alpha is None and manager is not None and manager.alpha is not None:
            options["alpha"] = result["memo_alpha"] = round(manager.alpha, 4)  # the estimate for the alpha it planned
        result["estimated_peak_gib"] = estimated_peak_gib(
            args.model, layers, result["gpus"], args.micro_batch, args.seq, int(stage), activations=activations,
            chunked_loss=args.chunked_loss or None, **options,
        )  # fmt: skip
    if result:
        print(json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
