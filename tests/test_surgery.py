"""quantize_model / dequantize_model / describe_quantization on GPT, Sequential, nested and foreign trees.

Everything runs QuantizedLinear's torch path on the CPU."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from altgrad.config import LayerPrecisionRule, QuantizationConfig, create_mixed_precision_config
from altgrad.formats import get_format
from altgrad.linear import QuantizedLinear
from altgrad.model import GPT, GPTConfig
from altgrad.surgery import dequantize_model, describe_quantization, quantize_model, quantized_layers

E4M3, E5M2 = get_format("E4M3"), get_format("E5M2")
GPT_LINEAR_SUFFIXES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def tiny_gpt(seed=0, n_layer=2, vocab=37, n_embd=24) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=vocab, n_layer=n_layer, n_head=2, n_embd=n_embd))


def gpt_batch(seed=1, vocab=37, b=3, t=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g), torch.randint(0, vocab, (b, t), generator=g)


def linears(model):
    """qualified name -> nn.Linear (only plain, unwrapped ones)."""
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear}


class Nested(nn.Module):
    """Linear layers in every kind of container, odd sizes, with and without bias."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(7, 13)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(13, 13, bias=False), nn.ReLU()) for _ in range(2)])
        self.heads = nn.ModuleDict({"a": nn.Linear(13, 5), "b": nn.Sequential(nn.Sequential(nn.Linear(13, 3)))})
        self.norm = nn.LayerNorm(13)

    def forward(self, x):
        x = self.norm(self.stem(x))
        for block in self.blocks:
            x = x + block(x)
        return torch.cat([self.heads["a"](x), self.heads["b"](x)], dim=-1)


# -- arguments ---------------------------------------------------------------------------------
def test_exactly_one_of_fmt_and_config():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"exactly one of fmt .* or config .*; got both"):
        quantize_model(model, "E5M2", config=QuantizationConfig("E4M3"))
    with pytest.raises(ValueError, match=r"exactly one of fmt .* or config .*; got neither"):
        quantize_model(model)
    assert type(model[0]) is nn.Linear  # a rejected call changes nothing


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(fmt="E5M3"), ValueError, r"quantize_model fmt: unknown format 'E5M3'.*registered: E5M2"),
    (dict(fmt=8), ValueError, r"quantize_model fmt: format must be a name or FormatSpec"),
    (dict(config="E5M2"), TypeError, r"config must be a QuantizationConfig or a dict \(got str\)"),
    (dict(config={"default_format": "E5M2", "scalng": "current"}), ValueError, r"unknown key 'scalng'"),
    (dict(fmt="E5M2", skip_patterns=["ok", "lm_head["]), ValueError,
     r"quantize_model skip_patterns\[1\]: pattern 'lm_head\[' is not a valid regex"),
    (dict(fmt="E5M2", module_filter_fn=True), TypeError, r"module_filter_fn must be callable \(got bool\)"),
    (dict(fmt="E5M2", backend="cuda"), ValueError, r"backend must be one of 'auto', 'torch', 'fast', 'triton' \(got 'cuda'\)"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        quantize_model(nn.Sequential(nn.Linear(4, 4)), **kwargs)


def test_quantizing_twice_is_an_error():
    model = quantize_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), "E5M2")
    with pytest.raises(ValueError, match=r"already has QuantizedLinear layers \(e.g. '0'\).*dequantize_model"):
        quantize_model(model, "E4M3")


# -- replacing layers --------------------------------------------------------------------------
def test_every_linear_in_nested_containers_is_replaced_with_same_parameters():
    torch.manual_seed(0)
    model = Nested()
    before = linears(model)
    assert len(before) == 5
    x = torch.randn(6, 7)
    ref = model(x)
    out_model = quantize_model(model, "E4M3")
    assert out_model is model and linears(model) == {}
    for name, lin in before.items():
        q = model.get_submodule(name)
        assert isinstance(q, QuantizedLinear) and q.name == name and q.linear is lin
        assert q.weight is lin.weight and q.bias is lin.bias
        assert q.formats["input"] is E4M3 and q.formats["weight"] is E4M3 and q.formats["grad_output"] is E4M3
        assert q.layer_config.input.scaling == "delayed"  # a bare fmt means delayed scaling
    out = model(x)
    # E4M3 has 3 mantissa bits: outputs move, but stay within a few ULP-sized relative errors
    rel = (out - ref).norm() / ref.norm()
    assert 0 < rel < 0.15, rel


def test_weights_and_parameter_set_are_unchanged():
    model = tiny_gpt()
    params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    quantize_model(model, "E5M2")
    after = dict(model.named_parameters())
    for n, (p, saved) in params.items():
        # the same Parameter objects, reachable under the same names, values untouched
        assert any(q is p for q in after.values()), n
        assert torch.equal(p, saved), n
    assert {id(p) for p in model.parameters()} == {id(p) for p, _ in params.values()}


def test_gpt_all_layers_replaced_forward_and_tying():
    model = tiny_gpt()
    idx, tgt = gpt_batch()
    quantize_model(model, "E5M2")
    expected = [f"transformer.h.{i}.{s}" for i in range(2) for s in GPT_LINEAR_SUFFIXES] + ["lm_head"]
    assert [n for n, _ in quantized_layers(model)] == expected
    assert model.transformer.wte.weight is model.lm_head.weight is model.lm_head.linear.weight
    logits, loss = model(idx, tgt)
    assert logits.shape == (3, 11, 37) and torch.isfinite(logits).all()
    assert abs(loss.item() - math.log(37)) < 0.5  # fresh init: near-uniform predictions


@pytest.mark.parametrize("quantize_lm_head", [True, False])
def test_gradients_reach_original_parameters_and_tying_survives_a_step(quantize_lm_head):
    ref_model, model = tiny_gpt(), tiny_gpt()
    idx, tgt = gpt_batch()
    skip = None if quantize_lm_head else [r"^lm_head$"]
    quantize_model(model, "E4M3", skip_patterns=skip)
    assert isinstance(model.lm_head, QuantizedLinear) == quantize_lm_head
    ref_model(idx, tgt)[1].backward()
    model(idx, tgt)[1].backward()
    ref_grads = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        # straight-through gradients follow the fp32 ones closely (E4M3 keeps 3 mantissa bits)
        cos = F.cosine_similarity(p.grad.flatten(), ref_grads[name].grad.flatten(), dim=0)
        assert cos > 0.95, (name, cos.item())
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert model.transformer.wte.weight is model.lm_head.weight
    dequantize_model(model)
    assert type(model.lm_head) is nn.Linear and model.transformer.wte.weight is model.lm_head.weight


def test_dequantize_restores_original_linear_objects_and_outputs():
    model = tiny_gpt()
    idx, tgt = gpt_batch()
    before = linears(model)
    ref_logits, _ = model(idx, tgt)
    quantize_model(model, "E3M4")
    q_logits, _ = model(idx, tgt)
    assert not torch.equal(q_logits, ref_logits)
    assert dequantize_model(model) is model
    after = linears(model)
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert quantized_layers(model) == []
    assert model.transformer.wte.weight is model.lm_head.weight
    assert torch.equal(model(idx, tgt)[0], ref_logits)


def test_skip_patterns_and_module_filter_fn():
    model = tiny_gpt(n_layer=3)
    seen = []

    def only_wide(module, fqn):  # torchao-style filter: sees the nn.Linear and its name
        seen.append((type(module), fqn))
        return module.out_features > 24

    quantize_model(model, "E5M2", skip_patterns=[r"h\.0\.", "lm_head"], module_filter_fn=only_wide)
    got = {n for n, _ in quantized_layers(model)}
    # c_proj layers are 24 -> 24 (filtered out); block 0 and lm_head are skipped by pattern
    assert got == {f"transformer.h.{i}.{s}" for i in (1, 2) for s in ("attn.c_attn", "mlp.c_fc")}
    assert all(t is nn.Linear for t, _ in seen)
    filtered = [fqn for _, fqn in seen]
    assert "lm_head" not in filtered and "transformer.h.0.attn.c_attn" not in filtered  # skips come first
    assert "transformer.h.1.attn.c_proj" in filtered


def test_config_null_rule_combines_with_skip_patterns_argument():
    model = tiny_gpt()
    cfg = QuantizationConfig("E5M2", layer_rules=[LayerPrecisionRule("lm_head", None)])
    quantize_model(model, config=cfg, skip_patterns=[r"h\.1\."])
    assert {n for n, _ in quantized_layers(model)} == {f"transformer.h.0.{s}" for s in GPT_LINEAR_SUFFIXES}


def test_mixed_gpt_attention_high_precision_mlp_e5m2_layer_by_layer():
    model = tiny_gpt(n_layer=3)
    quantize_model(model, config=create_mixed_precision_config(attention_format=None, mlp_format="E5M2"))
    for i in range(3):
        block = model.transformer.h[i]
        assert type(block.attn.c_attn) is nn.Linear and type(block.attn.c_proj) is nn.Linear
        for layer in (block.mlp.c_fc, block.mlp.c_proj):
            assert isinstance(layer, QuantizedLinear)
            assert layer.layer_config.describe() == "i:E5M2 w:E5M2 go:E5M2"
            assert all(layer.formats[r] is E5M2 for r in ("input", "weight", "grad_output"))
    assert type(model.lm_head) is nn.Linear
    idx, tgt = gpt_batch()
    _, loss = model(idx, tgt)
    loss.backward()
    assert torch.isfinite(loss) and model.transformer.h[2].mlp.c_fc.weight.grad is not None
    text = describe_quantization(model)
    lines = text.splitlines()
    assert len(lines) == 1 + 13 + 1  # header, 4 per block + lm_head, summary
    row = {line.split()[0]: line for line in lines[1:-1]}
    assert row["transformer.h.1.mlp.c_fc"].split()[1:] == ["24->96", "i:E5M2", "w:E5M2", "go:E5M2",
                                                            "scaling=delayed"]
    assert row["transformer.h.1.attn.c_attn"].split()[1:] == ["24->72", "high", "precision"]
    assert row["lm_head"].split()[1:] == ["24->37", "high", "precision"]
    assert lines[-1] == "6 of 13 Linear layers quantized"


def test_per_layer_formats_and_roles_from_rules():
    cfg = QuantizationConfig("E4M3", grad_output_format="E5M2", scaling="current", layer_rules=[
        LayerPrecisionRule(r"h\.0\.mlp", "E3M4"),
        LayerPrecisionRule(r"attn\.c_proj", None, grad_output="E5M2"),
    ])
    model = quantize_model(tiny_gpt(), config=cfg)
    assert model.transformer.h[0].mlp.c_fc.layer_config.describe() == "i:E3M4 w:E3M4 go:E3M4"
    assert model.transformer.h[1].mlp.c_fc.layer_config.describe() == "i:E4M3 w:E4M3 go:E5M2"
    proj = model.transformer.h[1].attn.c_proj
    assert proj.formats["input"] is None and proj.formats["weight"] is None and proj.formats["grad_output"] is E5M2
    lines = describe_quantization(model).splitlines()
    row = next(line for line in lines if line.startswith("transformer.h.1.attn.c_proj"))
    assert row.split()[1:] == ["24->24", "i:-", "w:-", "go:E5M2", "scaling=current"]


def test_optimizer_built_before_surgery_updates_the_same_parameters():
    model = tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt_params = [p for g in opt.param_groups for p in g["params"]]
    quantize_model(model, "E5M2")
    assert {id(p) for p in model.parameters()} == {id(p) for p in opt_params}
    snapshot = [p.detach().clone() for p in opt_params]
    idx, tgt = gpt_batch()
    model(idx, tgt)[1].backward()
    opt.step()
    for p, old in zip(opt_params, snapshot):
        assert not torch.equal(p, old)  # Adam moves every parameter with a non-zero gradient
        assert p in opt.state  # state keyed by the very objects the quantized layers use


def test_inplace_false_deep_copies_and_keeps_tying_in_the_copy():
    model = tiny_gpt()
    copy_ = quantize_model(model, "E5M2", inplace=False)
    assert copy_ is not model and quantized_layers(model) == [] and len(quantized_layers(copy_)) == 9
    assert copy_.transformer.wte.weight is copy_.lm_head.weight
    assert copy_.lm_head.weight is not model.lm_head.weight
    assert torch.equal(copy_.lm_head.weight, model.lm_head.weight)


def test_root_linear_shared_modules_and_eval_mode():
    lin = nn.Linear(5, 3)
    q = quantize_model(lin, "E4M3")
    assert isinstance(q, QuantizedLinear) and q.linear is lin and q.name == ""
    assert dequantize_model(q) is lin
    shared = nn.Linear(6, 6)
    seq = nn.Sequential(shared, nn.Tanh(), shared).eval()
    quantize_model(seq, "E5M2")
    assert isinstance(seq[0], QuantizedLinear) and seq[0] is seq[2] and seq[0].name == "0"
    assert not seq[0].training
    out = seq(torch.randn(4, 6))
    assert out.shape == (4, 6) and torch.isfinite(out).all()
    seq.train()
    dequantize_model(seq)
    assert seq[0] is shared and seq[2] is shared
    assert shared.training  # the mode set while quantized carries over to the restored layer


def test_scaling_state_follows_the_weights_device():
    # "meta" stands in for CUDA here: a model moved to a device before surgery keeps it all there
    model = nn.Sequential(nn.Linear(8, 8, device="meta"), nn.Linear(8, 2, device="meta"))
    weight = model[1].weight
    quantize_model(model, "E4M3")
    assert model[1].weight is weight
    for _, q in quantized_layers(model):
        assert {b.device.type for b in q.buffers()} == {"meta"}


def test_linears_that_cannot_be_swapped_stay_high_precision():
    class LoRALinear(nn.Linear):  # a subclass with its own forward must keep it
        def forward(self, x):
            return super().forward(x) * 2

    class Foreign(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
            self.lora = LoRALinear(8, 8)
            self.out = nn.Linear(8, 4)

        def forward(self, x):
            return self.out(self.lora(self.mha(x, x, x, need_weights=False)[0]))

    model = Foreign()
    quantize_model(model, "E4M3")
    assert [n for n, _ in quantized_layers(model)] == ["out"]
    assert type(model.mha.out_proj) is not QuantizedLinear and type(model.lora) is LoRALinear
    assert model(torch.randn(2, 5, 8)).shape == (2, 5, 4)
    text = describe_quantization(model)
    assert "mha.out_proj" in text and "lora" in text and text.endswith("1 of 3 Linear layers quantized")


def test_describe_without_linear_layers_and_baseline_config():
    assert describe_quantization(nn.Sequential(nn.ReLU(), nn.LayerNorm(3))) == "no Linear layers"
    model = quantize_model(tiny_gpt(), config=QuantizationConfig(None))
    assert quantized_layers(model) == []
    assert describe_quantization(model).endswith("0 of 9 Linear layers quantized")


def test_config_as_dict_from_yaml_section():
    model = quantize_model(tiny_gpt(), config={"default_format": "E4M3", "grad_output_format": "E5M2",
                                               "layer_rules": [{"pattern": "lm_head", "format": None}]})
    assert type(model.lm_head) is nn.Linear
    assert model.transformer.h[0].attn.c_attn.layer_config.describe() == "i:E4M3 w:E4M3 go:E5M2"


# -- a model this repo has never seen ----------------------------------------------------------
class _CausalSelfAttention(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class _MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class _Block(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn, self.mlp = _CausalSelfAttention(d, n_head), _MLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class _TinyLM(nn.Module):
    """A nanoGPT look-alike from 'another fork': own class names, own layer names, tied head."""

    def __init__(self, vocab, d, n_layer, n_head, block):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.layers = nn.Sequential(*[_Block(d, n_head) for _ in range(n_layer)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied in the other direction from GPT
        for emb in (self.tok, self.pos):  # small init: the first loss is ~ln(vocab), not huge logits
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        return self.head(self.norm(self.layers(x)))


def test_foreign_nanogpt_like_model_trains_in_e5m2():
    torch.manual_seed(0)
    vocab, block = 11, 16
    model = _TinyLM(vocab, d=32, n_layer=2, n_head=4, block=block)
    quantize_model(model, "E5M2")
    assert len(quantized_layers(model)) == 2 * 4 + 1 and model.head.weight is model.tok.weight
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # a fixed cyclic pattern (0 1 2 ... 10 0 1 ...) at random offsets: the next token is always predictable
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(20):
        start = torch.randint(0, vocab, (8, 1), generator=g)
        seq = (start + torch.arange(block + 1)) % vocab  # (B, T+1)
        logits = model(seq[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), seq[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert abs(losses[0] - math.log(vocab)) < 0.2 and sum(losses[-3:]) / 3 < 0.3 * losses[0], losses
    head = model.head
    assert head.stats["grad_output"]["nonzero"] > 0  # the quantized path really ran, backward included
