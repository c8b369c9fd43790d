import dataclasses
import math

import pytest
import torch
import torch.nn as nn
from torch.nn import functional as F

from altgrad.model import A100_BF16_PEAK_FLOPS, GPT, GPTConfig, H100_BF16_PEAK_FLOPS

SMALL = dict(block_size=16, vocab_size=65, n_layer=2, n_head=4, n_embd=32, dropout=0.0)


def small_gpt(**overrides):
    return GPT(GPTConfig(**{**SMALL, **overrides}))


def random_tokens(batch, t, vocab=SMALL["vocab_size"]):
    return torch.randint(vocab, (batch, t))


# ---------------------------------------------------------------- structure

def test_module_names_match_nanogpt(seeded):
    model = small_gpt()
    names = {name for name, _ in model.named_modules()}
    expected = {"transformer.wte", "transformer.wpe", "transformer.ln_f", "lm_head"}
    for i in range(SMALL["n_layer"]):
        expected |= {f"transformer.h.{i}.{leaf}" for leaf in (
            "ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.gelu", "mlp.c_proj")}
    assert expected <= names
    assert isinstance(model.get_submodule("transformer.h.1.mlp.gelu"), nn.GELU)
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears == {n for n in expected if n.split(".")[-1] in ("c_attn", "c_proj", "c_fc", "lm_head")}


def test_lm_head_is_tied_to_token_embedding(seeded):
    model = small_gpt()
    assert model.lm_head.weight is model.transformer.wte.weight
    _, loss = model(random_tokens(2, 8), random_tokens(2, 8))
    loss.backward()
    # one Parameter, so both uses accumulate into one gradient
    assert model.transformer.wte.weight.grad is model.lm_head.weight.grad
    assert model.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bias", [True, False])
def test_bias_flag(seeded, bias):
    model = small_gpt(bias=bias)
    has_bias = [m.bias is not None for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.Linear))
                and m is not model.lm_head]
    assert all(b == bias for b in has_bias) and has_bias
    assert model.lm_head.bias is None


def test_init_statistics(seeded):
    # big enough that the sample std is within ~2 % of the true one
    model = GPT(GPTConfig(block_size=64, vocab_size=512, n_layer=3, n_head=4, n_embd=128))
    resid_std = 0.02 / math.sqrt(2 * 3)
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(resid_std, rel=0.05), name
        elif p.dim() == 2:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
        elif name.endswith("bias") and ".ln_" not in name:
            assert torch.all(p == 0), name
    for ln in [m for m in model.modules() if isinstance(m, nn.LayerNorm)]:
        assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)


def test_config_validation():
    with pytest.raises(ValueError, match="n_embd .* divisible by n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="n_layer"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        GPTConfig().n_layer = 3
    with pytest.raises(TypeError, match="GPTConfig"):
        GPT(dict(SMALL))


# ---------------------------------------------------------------- forward

@pytest.mark.parametrize("batch,t", [(1, 1), (3, 7), (2, 16)])
def test_forward_shapes(seeded, batch, t):
    model = small_gpt()
    idx = random_tokens(batch, t)
    logits, loss = model(idx, random_tokens(batch, t))
    assert logits.shape == (batch, t, SMALL["vocab_size"]) and loss.dim() == 0
    logits_last, no_loss = model(idx)
    assert no_loss is None and logits_last.shape == (batch, 1, SMALL["vocab_size"])
    torch.testing.assert_close(logits_last[:, 0], logits[:, -1])


def test_sequence_longer_than_block_size_is_an_error(seeded):
    with pytest.raises(ValueError, match="block_size 16"):
        small_gpt()(random_tokens(1, 17))


def test_loss_at_init_is_log_vocab(seeded):
    # init logits have std ~ sqrt(n_embd) * 0.02 ~ 0.1, so loss ~ ln(V) + var/2 ~ ln(V) + 0.006
    model = small_gpt()
    _, loss = model(random_tokens(8, 16), random_tokens(8, 16))
    assert loss.item() == pytest.approx(math.log(SMALL["vocab_size"]), abs=0.05)


def test_loss_ignores_targets_of_minus_one(seeded):
    model = small_gpt()
    idx, targets = random_tokens(2, 9), random_tokens(2, 9)
    logits, _ = model(idx, targets)
    masked = targets.clone()
    masked[:, :4] = -1
    _, loss = model(idx, masked)
    expected = F.cross_entropy(logits[:, 4:].reshape(-1, logits.size(-1)), targets[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_attention_is_causal(seeded):
    model = small_gpt()
    idx = random_tokens(2, 12)
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % SMALL["vocab_size"]
    a, _ = model(idx, idx)
    b, _ = model(changed, changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_attention_matches_explicit_softmax(seeded):
    # SDPA against the textbook masked softmax(QK^T / sqrt(d)) V, in float64
    model = small_gpt().double()
    attn = model.transformer.h[0].attn
    x = torch.randn(3, 11, SMALL["n_embd"], dtype=torch.float64)
    B, T, C = x.shape
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (z.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for z in (q, k, v))
    att = (q @ k.transpose(-2, -1)) / math.sqrt(C // attn.n_head)
    att = att.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    expected = attn.c_proj((att @ v).transpose(1, 2).reshape(B, T, C))
    torch.testing.assert_close(attn(x), expected, rtol=1e-12, atol=1e-12)


def test_dropout_active_only_in_training(seeded):
    model = small_gpt(dropout=0.5)
    idx = random_tokens(2, 10)
    model.train()
    assert not torch.equal(model(idx, idx)[0], model(idx, idx)[0])
    model.eval()
    assert torch.equal(model(idx, idx)[0], model(idx, idx)[0])


def test_training_steps_lower_the_loss(seeded):
    model = small_gpt()
    opt = model.configure_optimizers(0.1, 3e-3, (0.9, 0.95), "cpu")
    idx = random_tokens(4, 16)
    targets = torch.roll(idx, -1, dims=1)
    losses = []
    for _ in range(30):
        _, loss = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------- parameters and optimizer

def expected_num_params(cfg: GPTConfig, non_embedding: bool) -> int:
    d, b = cfg.n_embd, int(cfg.bias)
    per_layer = (
        2 * (d + b * d)  # ln_1, ln_2
        + d * 3 * d + b * 3 * d + d * d + b * d  # c_attn, attn.c_proj
        + d * 4 * d + b * 4 * d + 4 * d * d + b * d  # c_fc, mlp.c_proj
    )
    total = cfg.vocab_size * d + cfg.block_size * d + cfg.n_layer * per_layer + d + b * d
    return total - cfg.block_size * d if non_embedding else total


@pytest.mark.parametrize("bias", [True, False])
def test_get_num_params(bias):
    model = small_gpt(bias=bias)
    for non_embedding in (True, False):
        assert model.get_num_params(non_embedding) == expected_num_params(model.config, non_embedding)


def test_param_groups_split_by_dimension(seeded):
    model = small_gpt()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, nodecay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and nodecay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in nodecay["params"])
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)) == len(list(model.parameters()))
    # the tied embedding is decayed once, embeddings and every matmul weight are decayed
    assert sum(p is model.lm_head.weight for p in decay["params"]) == 1
    assert any(p is model.transformer.wpe.weight for p in decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.get_num_params(False)
    assert not opt.defaults.get("fused")  # fused AdamW only for CUDA


class _WrapsLinear(nn.Module):
    """Stands in for QuantizedLinear's contract: holds the nn.Linear and exposes its Parameters."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x):
        return self.linear(x) * 1.0


def test_param_groups_survive_a_wrapping_swap(seeded):
    model = small_gpt()
    before = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    mlp = model.transformer.h[0].mlp
    mlp.c_fc = _WrapsLinear(mlp.c_fc)
    model.lm_head = _WrapsLinear(model.lm_head)
    after = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    for g_before, g_after in zip(before.param_groups, after.param_groups):
        assert [id(p) for p in g_before["params"]] == [id(p) for p in g_after["params"]]
    assert model.lm_head.weight is model.transformer.wte.weight


def test_estimate_mfu_formula():
    model = small_gpt()
    cfg = model.config
    n = model.get_num_params()
    flops = (6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size) * cfg.block_size * 5
    assert model.estimate_mfu(5, 0.25) == pytest.approx(flops / 0.25 / H100_BF16_PEAK_FLOPS, rel=1e-12)
    ratio = model.estimate_mfu(5, 0.25, peak_flops=A100_BF16_PEAK_FLOPS) / model.estimate_mfu(5, 0.25)
    assert ratio == pytest.approx(989.5 / 312, rel=1e-12)
    with pytest.raises(ValueError, match="dt"):
        model.estimate_mfu(5, 0.0)


# ---------------------------------------------------------------- generate

def test_generate_length_and_range(seeded):
    model = small_gpt().eval()
    idx = random_tokens(3, 5)
    out = model.generate(idx, 20)  # runs past block_size 16: the context is cropped
    assert out.shape == (3, 25) and torch.equal(out[:, :5], idx)
    assert out.min() >= 0 and out.max() < SMALL["vocab_size"]


def test_generate_is_reproducible_with_a_generator(seeded):
    model = small_gpt().eval()
    idx = random_tokens(2, 4)
    a = model.generate(idx, 10, generator=torch.Generator().manual_seed(1))
    b = model.generate(idx, 10, generator=torch.Generator().manual_seed(1))
    c = model.generate(idx, 10, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_generate_top_k_1_is_greedy(seeded):
    model = small_gpt().eval()
    idx = random_tokens(2, 3)
    out = model.generate(idx, 6, temperature=0.7, top_k=1)
    greedy = idx
    for _ in range(6):
        logits, _ = model(greedy)
        greedy = torch.cat([greedy, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, greedy)


def test_generate_rejects_bad_arguments(seeded):
    model = small_gpt().eval()
    with pytest.raises(ValueError, match="temperature"):
        model.generate(random_tokens(1, 2), 3, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(random_tokens(1, 2), 3, top_k=0)


@pytest.mark.cuda
def test_forward_on_cuda_matches_cpu(seeded):
    model = small_gpt()
    idx = random_tokens(2, 16)
    cpu_logits, cpu_loss = model(idx, idx)
    cuda_logits, cuda_loss = model.cuda()(idx.cuda(), idx.cuda())
    torch.testing.assert_close(cuda_logits.cpu(), cpu_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cuda_loss.cpu(), cpu_loss, rtol=1e-4, atol=1e-4)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cuda")
    assert opt.defaults.get("fused")
