"""altgrad.runconfig: YAML -> frozen dataclasses, overrides, one-line errors, shipped configs."""

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from altgrad.config import QuantizationConfig
from altgrad.runconfig import (
    ConfigError,
    ModelSection,
    RunConfig,
    TrainSection,
    apply_overrides,
    build_quant_config,
    config_from_dict,
    format_config,
    load_config,
    parse_args,
    save_config,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- the shipped configs ---------------------------------------------------------------------------


def test_every_expected_config_is_shipped():
    names = {p.stem for p in SHIPPED}
    expected = {"baseline", "e5m2_fp8", "e4m3_e5m2_hybrid", "e3m4", "e2m5", "e1m6", "e6m1", "e7m0", "e0m7",
                "attn_bf16_mlp_e5m2", "cpu_quick"}
    assert expected <= names, f"missing: {expected - names}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_config_loads_round_trips_and_overrides_only_what_differs(path):
    """Each shipped config is a short override of the base experiment (the section dataclasses'
    defaults, and QuantizationConfig's for quant): it opens with a comment saying what it runs
    and sets only keys whose value differs from the base, so a diff between two configs is
    the difference between the two runs."""
    cfg = load_config(path)
    assert cfg.log.run_name == path.stem  # each file names its own run
    assert config_from_dict(cfg.to_dict()) == cfg
    text = path.read_text()
    assert text.startswith("# "), f"{path.name}: start with a comment saying what the config runs"
    raw = yaml.safe_load(text)
    base = RunConfig().to_dict()
    for section, keys in raw.items():
        if section == "quant":
            if keys is None:
                continue
            defaults = QuantizationConfig.from_dict({"default_format": None}).to_dict()
            built = QuantizationConfig.from_dict(keys).to_dict()
            for key in keys:
                if key != "default_format":
                    assert built[key] != defaults[key], f"{path.name}: quant.{key} repeats the default"
            continue
        for key in keys:
            assert cfg.to_dict()[section][key] != base[section][key], \
                f"{path.name}: {section}.{key} repeats the base value {base[section][key]!r}; drop it"


@pytest.mark.parametrize("name", ["baseline", "e5m2_fp8"])
def test_original_experiment_settings(name):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    m, t, lg = cfg.model, cfg.train, cfg.log
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout) == (6, 6, 384, 256, 0.0)
    assert (t.batch_size, t.lr, t.max_steps, t.warmup, t.grad_clip, t.seed) == (12, 6e-4, 2000, 100, 1.0, 42)
    assert (t.checkpoint_interval, t.max_checkpoints, t.nan_patience, t.eval_interval) == (100, 3, 10, 100)
    assert (lg.bit_stall_threshold, lg.overflow_threshold) == (0.5, 0.01)
    assert (lg.dead_neuron_threshold, lg.dead_neuron_window) == (1e-8, 100)
    assert (t.betas, t.eval_iters, t.shadow_interval) == ((0.9, 0.99), 100, 10)
    assert lg.wandb_project == "altgrad" and lg.wandb_mode == "offline" and lg.tags


def _roles(cfg, layer):
    lc = build_quant_config(cfg).layer_config(layer)
    return None if lc is None else {r: (f.name if f else None) for r, f in lc.formats.items()}


def test_baseline_has_no_quantization_and_e5m2_quantizes_every_role():
    assert build_quant_config(load_config(CONFIGS / "baseline.yaml")) is None
    e5m2 = load_config(CONFIGS / "e5m2_fp8.yaml")
    for layer in ("transformer.h.0.attn.c_attn", "transformer.h.5.mlp.c_proj", "lm_head"):
        assert _roles(e5m2, layer) == {"input": "E5M2", "weight": "E5M2", "grad_output": "E5M2",
                                       "weight_grad": None}


def test_hybrid_config_is_e4m3_forward_e5m2_grad_output():
    cfg = load_config(CONFIGS / "e4m3_e5m2_hybrid.yaml")
    assert _roles(cfg, "transformer.h.3.mlp.c_fc") == {"input": "E4M3", "weight": "E4M3",
                                                       "grad_output": "E5M2", "weight_grad": None}


@pytest.mark.parametrize("name", ["e3m4", "e2m5", "e1m6", "e6m1", "e7m0", "e0m7"])
def test_exotic_format_configs(name):
    roles = _roles(load_config(CONFIGS / f"{name}.yaml"), "transformer.h.1.attn.c_proj")
    assert set(roles.values()) == {name.upper(), None} and roles["grad_output"] == name.upper()


def test_mixed_precision_config_keeps_attention_and_head_high_precision():
    cfg = load_config(CONFIGS / "attn_bf16_mlp_e5m2.yaml")
    assert _roles(cfg, "transformer.h.2.attn.c_attn") is None
    assert _roles(cfg, "transformer.h.2.attn.c_proj") is None
    assert _roles(cfg, "lm_head") is None
    assert _roles(cfg, "transformer.h.2.mlp.c_proj")["input"] == "E5M2"


def test_cpu_quick_is_small():
    cfg = load_config(CONFIGS / "cpu_quick.yaml")
    assert cfg.train.device == "cpu" and cfg.log.wandb_mode == "disabled"
    assert cfg.model.n_embd <= 192 and cfg.model.n_layer <= 4 and cfg.train.max_steps <= 1000


# ---- overrides -------------------------------------------------------------------------------------


def test_overrides_are_parsed_by_field_type(tmp_path):
    path = write(tmp_path, "train: {lr: 1.0e-3}\n")
    cfg = load_config(path, ["--train.lr=3e-4", "--train.betas=[0.8, 0.9]", "--train.compile=true",
                             "--train.max_steps=7", "--log.tags=[a, b]", "--train.min_lr=null",
                             "--model.dropout=0", "--log.run_name=other"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.betas == (0.8, 0.9) and cfg.train.compile is True and cfg.train.max_steps == 7
    assert cfg.log.tags == ("a", "b") and cfg.train.min_lr is None
    assert cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)
    assert cfg.log.run_name == "other"


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads 6e-4 as the string "6e-4"; a float field must still take it
    cfg = load_config(write(tmp_path, "train: {lr: 6e-4, min_lr: 1e-5}\n"))
    assert cfg.train.lr == 6e-4 and cfg.train.min_lr == 1e-5


def test_quant_overrides_edit_the_mapping_at_any_depth(tmp_path):
    base = write(tmp_path, "quant: null\n")
    cfg = load_config(base, ["--quant.default_format=E4M3", "--quant.grad_output_format=E5M2"])
    assert cfg.quant == QuantizationConfig("E4M3", grad_output_format="E5M2")  # parsed straight into the typed config
    assert build_quant_config(cfg) is cfg.quant
    per_role = load_config(base, ["--quant.default_format=E4M3", "--quant.scaling.grad_output=current",
                                  "--quant.rounding={weight: stochastic}"]).quant.layer_config("x")
    assert (per_role.grad_output.scaling, per_role.input.scaling, per_role.weight.rounding) == \
        ("current", "delayed", "stochastic")
    with pytest.raises(ConfigError, match=r"^quant\.scaling\.grad_output must be one of 'delayed', 'current'"):
        load_config(base, ["--quant.default_format=E4M3", "--quant.scaling.grad_output=dynamic"])
    assert load_config(CONFIGS / "e5m2_fp8.yaml", ["--quant=null"]).quant is None
    raw = apply_overrides({"quant": {"a": {"b": 1}}}, ["--quant.a.c=2", "--quant.d.e=3"])
    assert raw["quant"] == {"a": {"b": 1, "c": 2}, "d": {"e": 3}}


def test_run_name_defaults_to_file_stem_and_overrides_do_not_touch_the_input(tmp_path):
    raw = {"train": {"lr": 0.1}}
    apply_overrides(raw, ["--train.lr=0.2"])
    assert raw == {"train": {"lr": 0.1}}
    assert load_config(write(tmp_path, "", "my_exp.yaml")).log.run_name == "my_exp"
    assert load_config(None).log.run_name == "run"


@pytest.mark.parametrize("overrides, message", [
    (["--train.lrr=1"], "train.lrr: unknown key (did you mean lr?)"),
    (["--train.lr=fast"], "train.lr: expected a number, got 'fast'"),
    (["--train.batch_size=1.5"], "train.batch_size: expected an integer"),
    (["--train.batch_size=true"], "train.batch_size: expected an integer"),
    (["--train.compile=2"], "train.compile: expected true or false"),
    (["--train.betas=[0.9]"], "train.betas: expected a list of 2 values"),
    (["--train.betas=[0.9, x]"], "train.betas[1]: expected a number"),
    (["--log.wandb_mode=cloud"], "log.wandb_mode: expected one of online, offline, disabled"),
    (["--log.tags=solo"], "log.tags: expected a list of strings"),
    (["--train.device=tpu"], "train.device: must be one of auto, cpu, cuda, cuda:N"),
    (["--train.batch_size=0"], "train.batch_size: must be >= 1"),
    (["--model.n_head=5"], "model.n_embd: must be a multiple of model.n_head=5"),
    (["--model.dropout=1.0"], "model.dropout: must be in [0, 1)"),
    (["--train.min_lr=1.0"], "train.min_lr: must be in [0, train.lr=0.0006] or null (null: lr / 10)"),
    (["--train.lr=.inf"], "train.lr: must be a finite number > 0"),
    (["--train.seed=4294967296"], "train.seed: must be in [0, 2**32)"),
    (["--train.seed=-1"], "train.seed: must be in [0, 2**32)"),
    (["--log.run_name=."], "log.run_name: must be a directory name"),
    (["--log.run_name=.."], "log.run_name: must be a directory name"),
    (["--log.run_name=.x"], "log.run_name: must be a directory name"),
    (["--log.bit_stall_threshold=2"], "log.bit_stall_threshold: must be a fraction"),
    (["--log.run_name=a/b"], "log.run_name: must be a directory name"),
    (["--optim.lr=1"], "optim: unknown section"),
    (["--train=1"], "--train=1: name a key"),
    (["--train.lr.x=1"], "train has no nested keys"),
    (["train.lr=1"], "overrides are written --section.key=value"),
    (["--train.lr"], "overrides are written --section.key=value"),
    (["--quant.default_format=E9M9"], "quant.default_format"),
    (["--quant.default_format=E5M2", "--quant.colour=red"], "quant: unknown key 'colour'"),
])
def test_bad_overrides_give_one_line_naming_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "model: {n_layer: 2}\n"), overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("modle: {}\n", "modle: unknown section (did you mean model?)"),
    ("- 1\n- 2\n", "expected a mapping with sections"),
    ("train: [1, 2]\n", "train: expected a mapping of keys"),
    ("train: {lr: [1}\n", "not valid YAML"),
    ("quant: E5M2\n", "quant: expected a mapping"),
    ("quant: {scaling: delayed}\n", "missing key 'default_format'"),
    ("quant: {default_format: E5M2, scaling: later}\n", "quant.scaling must be one of"),
    ("train:\n  lr: 1.0e-3\n  max_steps: 5\n  lr: 2.0e-3\n", "line 4: key 'lr' is given twice in one mapping (first on line 2)"),
    ("train: {lr: 1}\ntrain: {seed: 3}\n", "line 2: key 'train' is given twice"),
])
def test_bad_files_give_one_line(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("log: {run_name: café}\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: not UTF-8 text (byte 19 is 0xe9); save the file as UTF-8"


def test_a_lower_lr_alone_needs_no_other_key():
    # min_lr and lr_decay_steps follow lr and max_steps unless a config sets them
    cfg = load_config(CONFIGS / "cpu_quick.yaml", ["--train.lr=1e-4", "--train.max_steps=50"])
    t = cfg.train
    assert math.isclose(t.lr_at(50), 1e-5) and t.lr_at(49) > t.lr_at(50)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_derive_the_schedule_from_max_steps(path):
    # --train.max_steps=N must end the cosine at N, not at the file's 2000 (the README's example)
    t = load_config(path, ["--train.max_steps=500"]).train
    assert math.isclose(t.lr_at(500), t.lr / 10) and t.lr_at(250) < t.lr


def test_help_lists_every_key_with_type_and_default():
    from altgrad.runconfig import help_text

    text = help_text()
    for section in (ModelSection, TrainSection):
        name = "model" if section is ModelSection else "train"
        for f in dataclasses.fields(section):
            assert f"  {name}.{f.name} (" in text, f.name
    assert "  train.max_steps (an integer; default 2000)" in text
    assert "  train.min_lr (a number or null; default null)  null: lr / 10" in text
    assert "  quant.default_format (required" in text and "  quant.grad_output_format (default: default_format)" in text


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_save_then_load_gives_the_same_config(tmp_path):
    cfg = load_config(CONFIGS / "e4m3_e5m2_hybrid.yaml", ["--train.max_steps=123", "--log.tags=[x]"])
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg
    assert format_config(cfg) == out.read_text()
    assert list(out.parent.iterdir()) == [out]  # no temp file left behind


def test_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0


# ---- command line ------------------------------------------------------------------------------------


def test_parse_args():
    args = parse_args(["configs/x.yaml", "--train.lr=1e-3", "--resume", "--log.run_name=a"])
    assert args.config_paths == ("configs/x.yaml",) and args.resume
    assert args.overrides == ("--train.lr=1e-3", "--log.run_name=a")
    assert not parse_args(["c.yaml"]).resume
    assert parse_args(["a.yaml", "--train.lr=1", "b.yaml"]).config_paths == ("a.yaml", "b.yaml")


def test_config_files_layer_left_to_right(tmp_path):
    base = write(tmp_path, "model: {n_layer: 2, n_head: 2, n_embd: 64}\ntrain: {lr: 1.0e-3, max_steps: 40}\nquant: null\n",
                 "base.yaml")
    fmt = write(tmp_path, "train: {lr: 5.0e-4}\nquant: {default_format: E2M5, granularity: row, scaling: current}\n",
                "e2m5_row.yaml")
    cfg = load_config([base, fmt], ["--train.max_steps=30"])
    assert (cfg.model.n_layer, cfg.model.n_embd) == (2, 64)  # kept from the first file
    assert (cfg.train.lr, cfg.train.max_steps) == (5e-4, 30)  # the later file, then the override, win
    inp = build_quant_config(cfg).layer_config("transformer.h.0.attn.c_attn").input
    assert inp.format.name == "E2M5" and inp.granularity == "row"
    assert cfg.log.run_name == "e2m5_row"  # the last file names the run
    # a later null section replaces the whole section: the baseline
    assert load_config([fmt, base]).quant is None
    # a value is replaced whole, never merged deeper
    hyb = write(tmp_path, "quant: {default_format: E4M3, scaling: {grad_output: current}}\n", "hyb.yaml")
    two = write(tmp_path, "quant: {scaling: {input: current}}\n", "two.yaml")
    lc = build_quant_config(load_config([hyb, two])).layer_config("transformer.h.0.attn.c_attn")
    assert (lc.input.scaling, lc.grad_output.scaling) == ("current", "delayed")
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config([base, tmp_path / "missing.yaml"])


@pytest.mark.parametrize("argv, message", [
    ([], "expected a config file"),
    (["a.yaml", "-v"], "-v: unknown option"),
    (["a.yaml", "--train.lr"], "overrides are written --section.key=value"),
])
def test_parse_args_errors(argv, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        parse_args(argv)


# ---- learning-rate schedule ------------------------------------------------------------------------


def test_lr_schedule_warmup_cosine_floor():
    t = TrainSection(lr=1.0, min_lr=0.1, warmup=4, lr_decay_steps=14, max_steps=20)
    assert [t.lr_at(s) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]  # nanoGPT: lr * (s + 1) / (warmup + 1)
    assert t.lr_at(4) == 1.0
    assert math.isclose(t.lr_at(9), 0.1 + 0.5 * 0.9)  # half-way through the cosine
    assert t.lr_at(14) == 0.1 and t.lr_at(19) == 0.1
    decay = [t.lr_at(s) for s in range(4, 15)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_lr_schedule_defaults_min_lr_and_decay_steps():
    t = TrainSection(lr=6e-4, warmup=0, max_steps=100)
    assert math.isclose(t.lr_at(0), 6e-4) and math.isclose(t.lr_at(100), 6e-5) and math.isclose(t.lr_at(50), 3.3e-4)


def test_model_section_is_gptconfig():
    from altgrad.model import GPTConfig
    from altgrad.runconfig import ModelSection

    # the model section maps 1:1 onto GPTConfig (train.py builds GPTConfig(**section))
    assert [f.name for f in dataclasses.fields(ModelSection)] == [f.name for f in dataclasses.fields(GPTConfig)]
