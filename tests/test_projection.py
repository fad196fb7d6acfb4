"""`frugal info` from a configuration alone, and the projected compression time (one block measured on
this machine, compression.projection)."""

from __future__ import annotations

import json
import re

import pytest

from frugal.compression.projection import Projection, load_config, meta_model, narrowing, one_block_model, project
from frugal.config import Recipe
from frugal.errors import FrugalError

CFG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
       "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "tie_word_embeddings": False}
RECIPE = Recipe.from_dict({"method": "gptq", "weights": {"bits": 4, "group_size": 32},
                           "calibration": {"num_samples": 16, "seq_len": 32}})


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(CFG))
    return path


def test_stage_seconds_are_fixed_plus_per_sequence_times_blocks():
    p = Projection(blocks=10, samples=8, seq_len=32, fixed={"solve": 2.0, "statistics": 0.5},
                   per_sequence={"solve": 0.0, "statistics": 0.25})
    assert p.stage_seconds() == {"solve": 20.0, "statistics": 10 * (0.5 + 0.25 * 8)}
    p.narrowed = 2  # measured at half width: the solve x 8, the passes over the data x 4
    assert p.stage_seconds() == {"solve": 160.0, "statistics": 10 * (0.5 * 8 + 0.25 * 8 * 4)}


def test_meta_model_has_the_shapes_of_the_real_one(config):
    import transformers

    cfg = load_config(config)
    real = transformers.AutoModelForCausalLM.from_config(cfg)
    meta = meta_model(cfg)
    assert {n: p.shape for n, p in meta.named_parameters()} == {n: p.shape for n, p in real.named_parameters()}
    one = one_block_model(cfg, narrow=2)
    assert one.config.num_hidden_layers == 1 and one.config.hidden_size == 32
    assert one.model.layers[0].self_attn.q_proj.weight.shape == (32, 32)  # 2 heads of the same 16


def test_projection_runs_the_engine_on_one_block(config):
    p = project(load_config(config), RECIPE, samples=16, available=64 * 2**30)
    stages = p.stage_seconds()
    assert p.blocks == 3 and p.narrowed == 1 and {"statistics", "solve", "re-run"} <= set(stages)
    assert all(t >= 0 for t in stages.values()) and p.seconds > 0
    # the line through the two measurements (the slope itself is a timing, too noisy on a shared machine
    # to assert: bench/compress_speed.py measures it)
    assert all(v >= 0 for v in p.per_sequence.values()) and set(p.per_sequence) == set(p.fixed)
    s = p.stage_seconds()["statistics"]
    assert s == pytest.approx(3 * (p.fixed["statistics"] + p.per_sequence["statistics"] * 16))


def test_a_block_too_big_for_memory_is_measured_narrower(config):
    from frugal.compression.preflight import estimate_model

    cfg = load_config(config)

    def need(k: int) -> int:
        return estimate_model(meta_model(cfg, narrow=k), RECIPE, 3).in_memory_ram_bytes

    assert need(2) < need(1)
    assert narrowing(cfg, RECIPE, available=2 * need(1)) == 1
    assert narrowing(cfg, RECIPE, available=2 * need(2)) == 2
    with pytest.raises(FrugalError, match="does not fit in half of the available memory"):
        narrowing(cfg, RECIPE, available=1)


def test_info_from_a_config_alone(config, capsys):
    from frugal.cli.main import main

    assert main(["info", str(config), "--group-size", "32", "--project", "--samples", "4", "--calib-len", "32"]) == 0
    out = capsys.readouterr().out
    n = sum(p.numel() for p in meta_model(load_config(config)).parameters())
    assert f"{n / 1e6:.1f} M parameters" in out and "(configuration only)" in out
    import transformers

    from frugal.evaluation.sizes import model_bytes
    from frugal.report.table import fmt_bytes

    real = transformers.AutoModelForCausalLM.from_config(load_config(config))
    assert re.search(r"float weights\s+" + re.escape(fmt_bytes(model_bytes(real))), out)  # from meta tensors
    assert "projected time of method gptq" in out and "total" in out


def test_info_refuses_a_config_transformers_does_not_know(tmp_path, capsys):
    from frugal.cli.main import main

    path = tmp_path / "odd.json"
    path.write_text(json.dumps({"model_type": "no-such-model"}))
    assert main(["info", str(path)]) == 2
    assert str(path) in capsys.readouterr().err
