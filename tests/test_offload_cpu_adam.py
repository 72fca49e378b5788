"""CPU Adam/AdamW (native kernel and Python fallback) against torch.optim.Adam/AdamW."""
import copy

import pytest
import torch

import offload.cpu_adam as cpu_adam_module
from offload.cpu_adam import AdamHyperParams, CPUAdam, adam_step_tile
from offload.extension import extension_status, native_ops
from tests.offload_backends import BACKENDS, use_backend

# Odd sizes, and sizes across the kernel's chunking (16384) and parallel threshold (65536).
SHAPES = [(1,), (7,), (3, 5), (16385,), (257, 257)]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    use_backend(request.param, monkeypatch, cpu_adam_module)
    return request.param


def _run_pair(shape, hyper, steps, grad_dtype=torch.float32, seed=0):
    """Run adam_step_tile and torch's single-tensor Adam/AdamW side by side; return both states."""
    gen = torch.Generator().manual_seed(seed)
    param = torch.randn(shape, generator=gen)
    reference = param.clone().requires_grad_(True)
    torch_cls = torch.optim.AdamW if hyper.adamw_mode else torch.optim.Adam
    optimizer = torch_cls(
        [reference], lr=hyper.lr, betas=(hyper.beta1, hyper.beta2), eps=hyper.eps,
        weight_decay=hyper.weight_decay, foreach=False,
    )  # fmt: skip
    exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    for step in range(1, steps + 1):
        grad = torch.randn(shape, generator=gen).to(grad_dtype)
        reference.grad = grad.float()
        optimizer.step()
        adam_step_tile(param, grad, exp_avg, exp_avg_sq, step=step, hyper=hyper)
    state = optimizer.state[reference]
    return (param, exp_avg, exp_avg_sq), (reference.detach(), state["exp_avg"], state["exp_avg_sq"])


def _assert_matches(ours, theirs, backend):
    for a, b in zip(ours, theirs):
        if backend == "python":
            assert torch.equal(a, b)  # the same torch ops in the same order
        else:
            # fp32 rounding: a correctly rounded sqrt against torch's vectorised one, a few ulps
            torch.testing.assert_close(a, b, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("adamw_mode", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_torch_over_many_steps(backend, shape, weight_decay, adamw_mode):
    hyper = AdamHyperParams(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=weight_decay, adamw_mode=adamw_mode)
    ours, theirs = _run_pair(shape, hyper, steps=50)
    _assert_matches(ours, theirs, backend)
    start = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    assert (ours[0] - start).abs().max() > 1e-3  # it did move


def test_large_beta1_takes_the_other_lerp_branch(backend):
    # 1 - beta1 >= 0.5 makes torch's lerp start from the gradient rather than exp_avg.
    hyper = AdamHyperParams(lr=1e-3, beta1=0.3, beta2=0.99, weight_decay=0.05)
    ours, theirs = _run_pair((4099,), hyper, steps=50)
    _assert_matches(ours, theirs, backend)


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_gradients_are_upcast(backend, grad_dtype):
    hyper = AdamHyperParams(lr=1e-3, weight_decay=0.01)
    ours, theirs = _run_pair((70001,), hyper, steps=50, grad_dtype=grad_dtype)
    _assert_matches(ours, theirs, backend)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_output_equals_the_param_cast(backend, out_dtype):
    gen = torch.Generator().manual_seed(1)
    n = 70001
    param = torch.randn(n, generator=gen) * torch.logspace(-9, 6, n)  # subnormal to overflowing (fp16)
    param[:6] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65519.0, 65520.0])
    param[6:10] = torch.tensor([1.00390625, 1.01171875, 2.0**-24, 2.0**-25])  # bf16/fp16 rounding ties
    exp_avg, exp_avg_sq = torch.zeros(n), torch.zeros(n)
    out = torch.empty(n, dtype=out_dtype)
    hyper = AdamHyperParams(lr=1e-3, weight_decay=0.0)
    for step in (1, 2, 3):
        grad = torch.randn(n, generator=gen)
        adam_step_tile(param, grad, exp_avg, exp_avg_sq, step=step, hyper=hyper, low_precision_out=out)
        expected = param.to(out_dtype)
        finite = torch.isfinite(param) | torch.isinf(param)
        assert torch.equal(out[finite].view(torch.int16), expected[finite].view(torch.int16))
        assert torch.equal(out.isnan(), param.isnan())


def test_nan_params_become_nan_outputs(backend):
    param = torch.tensor([float("nan"), 1.0, -2.0])
    out = torch.empty(3, dtype=torch.bfloat16)
    zeros = torch.zeros(3)
    adam_step_tile(param, torch.ones(3), zeros, zeros.clone(), step=1, hyper=AdamHyperParams(), low_precision_out=out)
    assert torch.equal(out.isnan(), torch.tensor([True, False, False]))


def test_every_simd_level_of_this_cpu_matches():
    if extension_status().path == "python":
        pytest.skip("native extension unavailable")
    ops = native_ops()
    best = ops.adam_simd_level()
    levels = ["default", "avx2", "avx512"]
    levels = levels[: levels.index(best) + 1] if best in levels else ["default"]
    gen = torch.Generator().manual_seed(2)
    n = 100_003
    start = torch.randn(n, generator=gen)
    grads = [torch.randn(n, generator=gen) for _ in range(50)]
    reference = start.clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([reference], lr=1e-3, betas=(0.9, 0.999), weight_decay=0.1, foreach=False)
    for g in grads:
        reference.grad = g
        optimizer.step()
    for level in levels:
        for threads in (1, 2):
            param, m, v = start.clone(), torch.zeros(n), torch.zeros(n)
            for step, g in enumerate(grads, 1):
                ops.adam_step(param, g, m, v, step, 1e-3, 0.9, 0.999, 1e-8, 0.1, True, None, threads, level)
            torch.testing.assert_close(param, reference.detach(), rtol=2e-6, atol=1e-7, msg=f"simd level {level}")
    with pytest.raises(ValueError, match="unknown SIMD level"):
        ops.adam_step(start, grads[0], m, v, 1, 1e-3, 0.9, 0.999, 1e-8, 0.1, True, None, 1, "sse9")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(param=torch.zeros(8, dtype=torch.float64)), "param must have dtype torch.float32"),
        (dict(grad=torch.zeros(9)), "grad has 9 elements but param has 8"),
        (dict(exp_avg=torch.zeros(16)[::2]), "exp_avg must be a dense contiguous tensor"),
        (dict(exp_avg_sq=torch.zeros(8, dtype=torch.int32)), "exp_avg_sq must have dtype"),
        (dict(low_precision_out=torch.zeros(8)), "low_precision_out must have dtype torch.bfloat16 or torch.float16"),
        (dict(step=0), "step must be an int >= 1"),
    ],
)
def test_bad_tile_arguments_are_explained(change, message):
    args = dict(param=torch.zeros(8), grad=torch.zeros(8), exp_avg=torch.zeros(8), exp_avg_sq=torch.zeros(8), step=1)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        adam_step_tile(hyper=AdamHyperParams(), **args)


def test_hyper_params_are_validated():
    with pytest.raises(ValueError, match="beta1 must be in"):
        AdamHyperParams(beta1=1.0)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        CPUAdam([torch.nn.Parameter(torch.zeros(2))], weight_decay=-1.0)


def _models(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.GELU(), torch.nn.Linear(31, 5))
    twin = torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.GELU(), torch.nn.Linear(31, 5))
    twin.load_state_dict(model.state_dict())
    return model, twin


def _train(model, optimizer, steps, seed=3, scheduler=None):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 13, generator=gen), torch.randn(16, 5, generator=gen)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("adamw_mode", [True, False])
def test_cpu_adam_optimizer_trains_like_torch(backend, adamw_mode):
    ours_model, torch_model = _models()
    groups = lambda m: [  # noqa: E731
        {"params": m[0].parameters()},
        {"params": m[2].parameters(), "lr": 3e-3, "weight_decay": 0.0},
    ]
    ours = CPUAdam(groups(ours_model), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, adamw_mode=adamw_mode)
    torch_cls = torch.optim.AdamW if adamw_mode else torch.optim.Adam
    theirs = torch_cls(groups(torch_model), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    _train(ours_model, ours, 50, scheduler=torch.optim.lr_scheduler.StepLR(ours, 10, 0.5))
    _train(torch_model, theirs, 50, scheduler=torch.optim.lr_scheduler.StepLR(theirs, 10, 0.5))
    for a, b in zip(ours_model.parameters(), torch_model.parameters()):
        if backend == "python":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cpu_adam_continues_from_a_torch_adamw_state_dict(backend):
    model_a, model_b = _models()
    torch_opt = torch.optim.AdamW(model_a.parameters(), lr=1e-2, foreach=False)
    _train(model_a, torch_opt, 10)
    model_b.load_state_dict(model_a.state_dict())
    ours = CPUAdam(model_b.parameters(), lr=1e-2)
    ours.load_state_dict(copy.deepcopy(torch_opt.state_dict()))  # torch shares, not copies, state
    _train(model_a, torch_opt, 10, seed=4)
    _train(model_b, ours, 10, seed=4)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ours.state[next(model_b.parameters())]["step"].item() == 20


def test_cpu_adam_rejects_gpu_or_half_params():
    with pytest.raises(ValueError, match="float32 CPU parameters"):
        CPUAdam([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))])


@pytest.mark.parametrize("coefficient", [0.37, 1.0])
def test_grad_scale_is_clippings_multiply_in_the_same_pass(backend, coefficient):
    """grad_scale gives torch's clip-then-step: grad.mul_(coefficient) in fp32, then AdamW; the
    gradient passed in is left unchanged."""
    hyper = AdamHyperParams(lr=1e-2, beta1=0.9, beta2=0.95, weight_decay=0.1)
    gen = torch.Generator().manual_seed(3)
    param = torch.randn(70_001, generator=gen)
    reference = param.clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([reference], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
    exp_avg, exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
    for step in range(1, 6):
        grad = torch.randn(param.shape, generator=gen)
        original = grad.clone()
        reference.grad = grad.clone().mul_(coefficient)
        optimizer.step()
        adam_step_tile(param, grad, exp_avg, exp_avg_sq, step=step, hyper=hyper, grad_scale=coefficient)
        assert torch.equal(grad, original)
    state = optimizer.state[reference]
    _assert_matches((param, exp_avg, exp_avg_sq), (reference.detach(), state["exp_avg"], state["exp_avg_sq"]), backend)
