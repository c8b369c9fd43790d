"""altgrad.shadow: the FP32 shadow's gradient cosine and SNR against known answers."""

import math

import pytest
import torch

from altgrad.metrics import DeadNeuronTracker, layer_parameters
from altgrad.model import GPT, GPTConfig
from altgrad.shadow import FP32ShadowModel

CFG = GPTConfig(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=24, dropout=0.0)


def make_batches(n, batch=3, t=11, vocab=CFG.vocab_size):
    return [(torch.randint(0, vocab, (batch, t)), torch.randint(0, vocab, (batch, t))) for _ in range(n)]


def backward(model, batches, grad_accum):
    """What train.py does for one step: loss / grad_accum per micro-batch, accumulated."""
    model.zero_grad(set_to_none=True)
    for x, y in batches:
        _, loss = model(x, y)
        (loss / grad_accum).backward()


def test_identical_model_gives_cosine_one_and_capped_snr(seeded):
    model = GPT(CFG)
    shadow = FP32ShadowModel(model)
    batches = make_batches(2)
    backward(model, batches, grad_accum=2)
    out = shadow.compare(model, batches, grad_accum=2)
    layers = [name for name, _ in layer_parameters(model)]
    # every parameter-owning module; the tied wte/lm_head weight once, under the matmul layer
    assert "lm_head" in layers and "transformer.h.1.mlp.c_fc" in layers and "transformer.wte" not in layers
    for name in layers:
        assert out[f"shadow/{name}/grad_cos"] == pytest.approx(1.0, abs=1e-12)
        assert out[f"shadow/{name}/grad_snr_db"] > 100
    assert out["shadow/grad_cos_mean"] == pytest.approx(1.0, abs=1e-12)
    assert out["perf/shadow_ms"] > 0


def _orthogonal_noise(g, k):
    """Noise n with <n, g> = 0 and |n| = k |g| (float64)."""
    r = torch.randn_like(g)
    n = r - (r @ g) / (g @ g) * g
    return n * (k * g.norm() / n.norm())


@pytest.mark.parametrize("k", [1e-3, 0.1, 0.75, 2.0])
def test_perturbed_gradient_gives_the_analytic_cosine_and_snr(seeded, k):
    model = GPT(CFG).double()  # float64 so the injected noise is the only difference
    shadow = FP32ShadowModel(model)
    batches = make_batches(1)
    backward(model, batches, grad_accum=1)
    # perturb one layer (weight and bias together) by noise orthogonal to its gradient
    layer = model.transformer.h[0].mlp.c_fc
    g = torch.cat([layer.weight.grad.reshape(-1), layer.bias.grad.reshape(-1)])
    n = _orthogonal_noise(g, k)
    nw = layer.weight.numel()
    layer.weight.grad += n[:nw].view_as(layer.weight)
    layer.bias.grad += n[nw:].view_as(layer.bias)
    out = shadow.compare(model, batches)
    # the shadow is float32 and the model float64: agreement to float32 rounding
    assert out["shadow/transformer.h.0.mlp.c_fc/grad_cos"] == pytest.approx(1 / math.sqrt(1 + k * k), rel=1e-5)
    assert out["shadow/transformer.h.0.mlp.c_fc/grad_snr_db"] == pytest.approx(-20 * math.log10(k), abs=1e-3)
    assert out["shadow/transformer.h.0.attn.c_attn/grad_cos"] == pytest.approx(1.0, abs=1e-6)


def test_scaled_gradient_has_cosine_one_and_snr_of_the_scale_error(seeded):
    model = GPT(CFG).double()
    shadow = FP32ShadowModel(model)
    batches = make_batches(1)
    backward(model, batches, grad_accum=1)
    model.transformer.h[1].attn.c_proj.weight.grad *= 1.1  # g = 1.1 g_ref: |g - g_ref| = 0.1 |g_ref|
    model.transformer.h[1].attn.c_proj.bias.grad *= 1.1
    out = shadow.compare(model, batches)
    assert out["shadow/transformer.h.1.attn.c_proj/grad_cos"] == pytest.approx(1.0, abs=1e-9)
    assert out["shadow/transformer.h.1.attn.c_proj/grad_snr_db"] == pytest.approx(20.0, abs=1e-3)


def test_shadow_follows_the_training_weights_and_leaves_the_rng_alone(seeded):
    model = GPT(CFG)
    shadow = FP32ShadowModel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = make_batches(1)
    for _ in range(2):
        backward(model, batches, 1)
        state = torch.random.get_rng_state()
        out = shadow.compare(model, batches)
        assert torch.equal(torch.random.get_rng_state(), state)
        assert out["shadow/grad_cos_mean"] == pytest.approx(1.0, abs=1e-12)  # synced: identical gradients
        opt.step()
    shadow.sync(model)
    for p, q in zip(model.parameters(), shadow.shadow.parameters()):
        assert torch.equal(p, q) and p is not q
    assert shadow.shadow.transformer.wte.weight is shadow.shadow.lm_head.weight  # tying survives the copy


def test_grad_accum_scales_like_train(seeded):
    model = GPT(CFG)
    shadow = FP32ShadowModel(model)
    batches = make_batches(3)
    backward(model, batches, grad_accum=3)
    assert shadow.compare(model, batches, grad_accum=3)["shadow/grad_snr_db_mean"] > 100
    # the wrong accumulation factor is a pure scale error: cosine 1, SNR of |1 - 1/3| relative error
    out = shadow.compare(model, batches, grad_accum=1)
    assert out["shadow/grad_cos_mean"] == pytest.approx(1.0, abs=1e-9)
    assert out["shadow/transformer.h.0.mlp.c_fc/grad_snr_db"] == pytest.approx(20 * math.log10(3 / 2), abs=1e-3)


def test_shadow_does_not_feed_the_models_hooks(seeded):
    model = GPT(CFG)
    tracker = DeadNeuronTracker(model, threshold=1e-8, window=4)
    shadow = FP32ShadowModel(model)
    batches = make_batches(1)
    backward(model, batches, 1)
    before = {k: v.clone() for k, v in tracker._current.items()}
    shadow.compare(model, [(torch.randint(0, CFG.vocab_size, (5, 16)),) * 2])
    assert before.keys() == tracker._current.keys()
    assert all(torch.equal(before[k], tracker._current[k]) for k in before)


def test_quantized_model_is_compared_with_its_unquantized_self(seeded):
    from altgrad.surgery import quantize_model

    batches = make_batches(2)
    snr, init = {}, GPT(CFG).state_dict()
    for fmt in ("E7M0", "E5M2", "E4M3"):
        model = GPT(CFG)
        model.load_state_dict(init)
        quantize_model(model, fmt)
        shadow = FP32ShadowModel(model)
        assert not any(hasattr(m, "stats") for m in shadow.shadow.modules())  # plain nn.Linear inside
        backward(model, batches, 2)
        out = shadow.compare(model, batches, 2)
        assert "shadow/transformer.h.0.mlp.c_fc/grad_cos" in out  # named like the unquantized model
        assert 0.5 < out["shadow/grad_cos_mean"] < 1.0
        snr[fmt] = out["shadow/grad_snr_db_mean"]
    # each extra mantissa bit halves the rounding error: E7M0 (0 bits) < E5M2 (2) < E4M3 (3)
    assert 0 < snr["E7M0"] < snr["E5M2"] < snr["E4M3"] < 60


def test_bad_arguments():
    model = GPT(CFG)
    shadow = FP32ShadowModel(model)
    with pytest.raises(ValueError, match="grad_accum must be an int >= 1"):
        shadow.compare(model, make_batches(1), grad_accum=0)
    with pytest.raises(ValueError, match="at least one"):
        shadow.compare(model, [])


def test_the_shadow_runs_in_true_fp32_even_when_tf32_is_on(seeded):
    # train.py may enable TF32 (train.tf32, nanoGPT's choice); the reference gradients must not use it
    model = GPT(CFG)
    batches = make_batches(1)
    backward(model, batches, 1)
    shadow = FP32ShadowModel(model)
    seen = []
    shadow.shadow.lm_head.register_forward_hook(
        lambda *_: seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)))
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        shadow.compare(model, batches, 1)
        assert seen == [(False, False)]
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # restored after
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
