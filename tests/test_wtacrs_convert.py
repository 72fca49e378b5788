"""convert_to_wtacrs: layer selection, parameter identity, LoRA, and a short training run."""
import copy
from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zerokit.nn as znn


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc = nn.Linear(dim, 4 * dim)
        self.proj = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln2, self.mlp = nn.LayerNorm(dim), MLP(dim)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab=16, context=32, dim=48, heads=4, layers=2, tied=False):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight

    def forward(self, tokens):
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


BLOCK_LINEARS = [f"blocks.{i}.{name}" for i in range(2) for name in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]


@pytest.mark.parametrize("tied", [False, True])
def test_default_converts_block_linears_not_the_head_and_keeps_parameters(tied):
    torch.manual_seed(0)
    model = TinyGPT(tied=tied)
    parameters = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    replaced = znn.convert_to_wtacrs(model, keep_ratio=0.5)
    assert sorted(replaced) == sorted(BLOCK_LINEARS)
    assert all(type(m) is nn.Linear for m in replaced.values())
    assert type(model.lm_head) is nn.Linear
    for name, original in replaced.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, znn.WTACRSLinear) and layer.keep_ratio == 0.5
        assert layer.weight is original.weight and layer.bias is original.bias
    assert all(a is b for a, b in zip(model.parameters(), parameters))
    assert len(znn.sampling_states(model)) == 1  # one shared cache and batch for the whole model

    before = model.blocks[0].mlp.fc.weight.detach().clone()
    tokens = torch.randint(0, 16, (4, 32))
    F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    optimizer.step()
    assert not torch.equal(model.blocks[0].mlp.fc.weight, before)


def test_include_and_exclude_patterns():
    model = TinyGPT()
    assert znn.select_linear_layers(model, include=["blocks.0"]) == BLOCK_LINEARS[:4]  # a module name covers its layers
    assert znn.select_linear_layers(model, include="*") == BLOCK_LINEARS  # a wildcard never takes the head
    assert znn.select_linear_layers(model, include=["lm_head"]) == ["lm_head"]  # naming it exactly does
    assert znn.select_linear_layers(model, exclude=["*.mlp.*"]) == [n for n in BLOCK_LINEARS if ".attn." in n]
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        znn.select_linear_layers(model, include=["block.*"])
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        znn.select_linear_layers(model, exclude=["nothing"])
    with pytest.raises(ValueError, match="no nn.Linear layer was selected"):
        znn.convert_to_wtacrs(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="keep_ratio"):
        znn.convert_to_wtacrs(model, keep_ratio=0)


def test_heads_are_recognised_by_name_tying_or_vocabulary():
    model = TinyGPT()
    model.decoder = model.lm_head  # an unusual name: still the last linear, sized to the vocabulary
    del model.lm_head
    assert "decoder" not in znn.select_linear_layers(model, include=["*"])
    model = TinyGPT()
    model.classifier = nn.Sequential(nn.Linear(48, 48), nn.Linear(48, 3))  # a head module of several layers
    assert znn.select_linear_layers(model, include=["*"]) == BLOCK_LINEARS


def test_sequential_of_repeated_blocks_and_shared_layers():
    blocks = nn.Sequential(nn.Embedding(10, 8), *(MLP(8) for _ in range(3)), nn.Linear(8, 10))
    assert znn.select_linear_layers(blocks) == [f"{i}.{n}" for i in (1, 2, 3) for n in ("fc", "proj")]
    model = TinyGPT()
    model.blocks[1].mlp.fc = model.blocks[0].mlp.fc  # one module under two names
    replaced = znn.convert_to_wtacrs(model)
    assert model.blocks[0].mlp.fc is model.blocks[1].mlp.fc
    assert {"blocks.0.mlp.fc", "blocks.1.mlp.fc"} <= replaced.keys()


def test_layers_with_hooks_are_refused():
    model = TinyGPT()
    model.blocks[0].attn.qkv.register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match="hooks"):
        znn.convert_to_wtacrs(model)


class LoraLinear(nn.Module):
    """Mirrors peft's LoRA Linear: base_layer plus lora_A / lora_B ModuleDicts keyed by adapter."""

    def __init__(self, base, rank=4, alpha=8):
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, rank, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, base.out_features, bias=False)})
        nn.init.normal_(self.lora_B["default"].weight)
        self.scaling = alpha / rank
        base.requires_grad_(False)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x)) * self.scaling


def _saved_bytes(module, fn):
    """Bytes of the distinct storages autograd saves while running ``fn``, except ``module``'s parameters."""
    parameter_storage = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameter_storage:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_lora_layers_are_converted_and_save_less():
    torch.manual_seed(0)
    model = TinyGPT()
    for block in model.blocks:
        block.attn.qkv = LoraLinear(block.attn.qkv)
    reference = copy.deepcopy(model)
    replaced = znn.convert_to_wtacrs(model, keep_ratio=1.0)
    for name in ("base_layer", "lora_A.default", "lora_B.default"):
        assert f"blocks.0.attn.qkv.{name}" in replaced

    tokens = torch.randint(0, 16, (4, 32))
    for m in (model, reference):
        F.cross_entropy(m(tokens).flatten(0, 1), tokens.flatten()).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    assert model.blocks[0].attn.qkv.base_layer.weight.grad is None  # frozen stays frozen

    lora = LoraLinear(nn.Linear(64, 64))
    x = torch.randn(8, 32, 64, requires_grad=True)
    full = _saved_bytes(lora, lambda: lora(x))
    znn.convert_to_wtacrs(lora, keep_ratio=0.3, include=["*"])
    sampled = _saved_bytes(lora, lambda: lora(x))
    assert full == 8 * 32 * (64 + 4) * 4  # x for lora_A, A's output for lora_B; the frozen base saves none
    assert sampled < 0.33 * full


def test_peft_lora_model_converts():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(TinyGPT(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc"]))
    replaced = znn.convert_to_wtacrs(model, keep_ratio=0.3)
    names = set(replaced)
    prefix = "base_model.model.blocks.0"
    assert {f"{prefix}.attn.qkv.lora_A.default", f"{prefix}.attn.qkv.lora_B.default", f"{prefix}.mlp.fc.base_layer",
            f"{prefix}.attn.proj"} <= names
    assert not any("lm_head" in n for n in names)
    trainable = [p for p in model.parameters() if p.requires_grad]
    tokens = torch.randint(0, 16, (4, 32))
    F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    assert all(p.grad is not None for p in trainable)


def test_llama_blocks_convert_and_save_less():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=128, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    tokens = torch.randint(0, 128, (4, 64))

    def run():
        return model(tokens, labels=tokens).loss

    loss_before, bytes_before = run(), _saved_bytes(model, run)
    replaced = znn.convert_to_wtacrs(model, keep_ratio=0.3)
    projections = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert sorted(replaced) == sorted(f"model.layers.{i}.{p}" for i in range(2) for p in projections)
    assert torch.equal(run(), loss_before)  # the forward is exact
    # q/k/v (and gate/up) share one sample of their common input; o_proj reads the attention
    # output, which attention keeps anyway, so it saves it as nn.Linear does (no extra sample).
    linear_inputs = 4 * 64 * (64 + 64 + 176) * 4 * 2  # norm outputs and down_proj's input, 2 layers
    saving = bytes_before - _saved_bytes(model, run)
    assert 0.6 * linear_inputs < saving < linear_inputs


def _fibonacci_stream(samples=256, length=33, vocab=16, seed=0):
    """Each token is the sum of the two before it, mod vocab: learnable, but only through attention."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.empty(samples, length, dtype=torch.int64)
    tokens[:, :2] = torch.randint(0, vocab, (samples, 2), generator=generator)
    for t in range(2, length):
        tokens[:, t] = (tokens[:, t - 1] + tokens[:, t - 2]) % vocab
    return tokens


def _train(keep_ratio, use_indices=False, steps=150, batch=64):
    torch.manual_seed(0)
    model = TinyGPT()
    if keep_ratio is not None:
        znn.convert_to_wtacrs(model, keep_ratio=keep_ratio, dataset_size=256 if use_indices else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = _fibonacci_stream()
    held_out = _fibonacci_stream(samples=64, seed=1)
    order = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    for step in range(steps):
        indices = order[(step * batch) % 256:][:batch]
        tokens = data[indices]
        context = znn.sample_indices(model, indices if use_indices else None) if keep_ratio else nullcontext()
        with context:
            logits = model(tokens[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        logits = model(held_out[:, :-1])
        return F.cross_entropy(logits[:, 2:].flatten(0, 1), held_out[:, 3:].flatten()).item()


def test_training_with_keep_ratio_0_3_tracks_exact_training():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is as fast, and immune to a busy machine
    try:
        exact = _train(None)
        sampled = _train(0.3)
        cached = _train(0.3, use_indices=True)
    finally:
        torch.set_num_threads(threads)
    assert exact < 0.5  # from log(16) = 2.77: the task was learnt
    for loss in (sampled, cached):
        assert abs(loss - exact) < 0.1, (exact, sampled, cached)


def test_config_round_trips_into_convert():
    import dataclasses

    config = znn.WTACRSConfig(keep_ratio=0.25, include=["blocks.*"], exclude="*.mlp.proj", dataset_size=100)
    assert config.include == ("blocks.*",) and config.exclude == ("*.mlp.proj",)
    model = TinyGPT()
    replaced = znn.convert_to_wtacrs(model, **dataclasses.asdict(config))
    assert sorted(replaced) == sorted(n for n in BLOCK_LINEARS if not n.endswith("mlp.proj"))
    assert znn.sampling_states(model)[0].cache.dataset_size == 100
    model = TinyGPT()
    znn.convert_to_wtacrs(model)
    with pytest.raises(ValueError, match="already WTA-CRS"):
        znn.convert_to_wtacrs(model)
    for bad in ({"keep_ratio": 2}, {"include": [3]}, {"dataset_size": 0}, {"same_samples_across_ranks": "yes"}):
        with pytest.raises(ValueError):
            znn.WTACRSConfig(**bad)
