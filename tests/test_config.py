"""Tests of the "attent" config section (attent_scale/config.py)."""
from __future__ import annotations

import copy
import json

import pytest

from attent_scale.config import (AttentConfig, ConfigError, parse_attent,
                                 split_deepspeed_config)


# ---- presets --------------------------------------------------------------------------------------

def test_attent_simple_preset_expands_as_documented():
    cfg = parse_attent({"preset": "attent-simple"})
    assert isinstance(cfg, AttentConfig)
    assert cfg.preset == "attent-simple"
    assert cfg.signal == "loss"
    assert cfg.source == "free"
    assert cfg.warmup_passes == 1
    assert cfg.full_passes_per_round == 0
    assert cfg.ratio.schedule == "constant"
    assert cfg.ratio.value == 0.7
    assert cfg.interval.schedule == "once"
    assert cfg.selection.method == "hard"
    assert cfg.selection.rescale is False
    assert cfg.selection.resample_each_pass is False


def test_attent_complex_preset_expands_as_documented():
    cfg = parse_attent({"preset": "attent-complex"})
    assert cfg.signal == "loss"
    assert cfg.source == "pool"
    assert cfg.pool_size is None
    assert cfg.warmup_passes == 1
    assert cfg.full_passes_per_round == 1
    assert (cfg.ratio.schedule, cfg.ratio.start, cfg.ratio.end) == ("incremental", 0.2, 0.8)
    assert (cfg.interval.schedule, cfg.interval.every, cfg.interval.growth,
            cfg.interval.max) == ("incremental", 1, 1, 5)
    assert cfg.selection.method == "soft"
    assert cfg.selection.temperature == 1.0
    assert cfg.selection.resample_each_pass is True


def test_random_preset_expands_as_documented():
    cfg = parse_attent({"preset": "random"})
    assert cfg.source == "free"
    assert cfg.warmup_passes == 1
    assert (cfg.ratio.schedule, cfg.ratio.value) == ("constant", 0.7)
    assert (cfg.interval.schedule, cfg.interval.every) == ("fixed", 1)
    assert cfg.selection.method == "random"


def test_shipped_default_is_attent_mild_as_documented():
    """configs/*.json and the example ship attent-mild: attent-mix's per-source z-scored soft
    draw, at temperature 2 instead of 0.5 (docs/BENCHMARKS.md §8b)."""
    import json
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    mild, mix = parse_attent({"preset": "attent-mild"}), parse_attent({"preset": "attent-mix"})
    assert (mild.selection.method, mild.selection.temperature, mild.selection.per_source) == \
        ("soft", 2.0, True)
    assert mix.selection.temperature == 0.5
    assert mild.model_dump(exclude={"preset", "selection"}) == \
        mix.model_dump(exclude={"preset", "selection"})
    for path in [*sorted((root / "configs").glob("*.json")), root / "examples/ds_config.json"]:
        section = json.loads(path.read_text()).get("attent")
        if section is not None and "finetune" not in path.name:
            assert section["preset"] == "attent-mild", path


def test_user_keys_override_preset_keys_and_nested_keys_merge():
    cfg = parse_attent({
        "preset": "attent-complex",
        "signal": "fgrad_norm",
        "ratio": {"end": 0.9},                 # nested: start and schedule stay from the preset
        "selection": {"temperature": 0.25},    # nested: method and resample stay from the preset
        "pool_size": 128,
    })
    assert cfg.signal == "fgrad_norm"
    assert (cfg.ratio.schedule, cfg.ratio.start, cfg.ratio.end) == ("incremental", 0.2, 0.9)
    assert cfg.selection.method == "soft"
    assert cfg.selection.temperature == 0.25
    assert cfg.selection.resample_each_pass is True
    assert cfg.pool_size == 128
    assert cfg.source == "pool"  # untouched preset key


def test_override_replaces_interval_schedule_of_preset():
    cfg = parse_attent({"preset": "attent-simple", "interval": {"schedule": "fixed", "every": 2},
                        "ratio": {"value": 0.5}})
    assert (cfg.interval.schedule, cfg.interval.every) == ("fixed", 2)
    assert (cfg.ratio.schedule, cfg.ratio.value) == ("constant", 0.5)


def test_preset_dict_is_not_mutated_by_overrides():
    from attent_scale.config import PRESETS
    before = copy.deepcopy(PRESETS)
    parse_attent({"preset": "attent-complex", "ratio": {"start": 0.3}, "selection": {"temperature": 2.0}})
    assert PRESETS == before


def test_defaults_without_preset():
    cfg = parse_attent({})
    assert cfg.preset is None
    assert cfg.enabled is True
    assert cfg.signal == "loss"
    assert cfg.source == "free"
    assert cfg.warmup_passes == 1
    assert cfg.ratio.value == 0.7
    assert cfg.selection.method == "hard"
    assert cfg.score_chunk_tokens == 2048
    assert cfg.attention.layers == [-1]
    assert cfg.attention.query_chunk == 128


# ---- off switch ----------------------------------------------------------------------------------

def test_missing_section_is_none():
    assert parse_attent(None) is None


def test_enabled_false_is_none():
    assert parse_attent({"enabled": False}) is None
    assert parse_attent({"enabled": False, "preset": "attent-simple"}) is None


def test_non_object_section_is_config_error():
    with pytest.raises(ConfigError, match="JSON object"):
        parse_attent([1, 2])


# ---- errors ----------------------------------------------------------------------------------------

def _problem_lines(exc: ConfigError) -> list[str]:
    return [line.strip() for line in str(exc).splitlines()[1:]]


def test_one_error_lists_all_problems():
    with pytest.raises(ConfigError) as ei:
        parse_attent({
            "preset": "attent-fancy",              # unknown preset
            "ration": 0.5,                          # unknown key (typo)
            "ratio": {"value": 1.5},                # out of range
            "selection": {"method": "greedy"},      # bad enum
            "interval": {"every": 0},               # out of range
        })
    msg = str(ei.value)
    lines = _problem_lines(ei.value)
    assert msg.splitlines()[0] == "invalid 'attent' section (5 problems):"
    assert len(lines) == 5

    def line_for(key: str) -> str:
        hits = [ln for ln in lines if ln.startswith(key + ":")]
        assert len(hits) == 1, (key, lines)
        return hits[0]

    preset = line_for("attent.preset")
    assert "'attent-fancy'" in preset
    for name in ("attent-soft", "attent-simple", "attent-complex", "random"):
        assert name in preset

    typo = line_for("attent.ration")
    assert "unknown key" in typo and "0.5" in typo

    ratio = line_for("attent.ratio.value")
    assert "got 1.5" in ratio and "<= 1" in ratio

    method = line_for("attent.selection.method")
    assert "'greedy'" in method
    for name in ("hard", "soft", "random"):
        assert f"'{name}'" in method

    every = line_for("attent.interval.every")
    assert "got 0" in every and ">= 1" in every


def test_single_problem_is_singular():
    with pytest.raises(ConfigError) as ei:
        parse_attent({"selection": {"temperature": 0.0}})
    assert str(ei.value).splitlines()[0] == "invalid 'attent' section (1 problem):"
    (line,) = _problem_lines(ei.value)
    assert line.startswith("attent.selection.temperature:")
    assert "got 0.0" in line and ">= 0.001" in line


def test_rescale_with_hard_selection_rejected():
    with pytest.raises(ConfigError) as ei:
        parse_attent({"selection": {"method": "hard", "rescale": True}})
    (line,) = _problem_lines(ei.value)
    assert line.startswith("attent.selection.rescale:")
    assert "rescale" in line and "soft" in line
    # the same with soft / random is fine
    assert parse_attent({"selection": {"method": "soft", "rescale": True}}).selection.rescale
    assert parse_attent({"selection": {"method": "random", "rescale": True}}).selection.rescale


def test_rescale_with_preset_hard_selection_rejected():
    with pytest.raises(ConfigError, match="rescale"):
        parse_attent({"preset": "attent-simple", "selection": {"rescale": True}})


def test_free_source_without_warmup_rejected():
    with pytest.raises(ConfigError) as ei:
        parse_attent({"source": "free", "warmup_passes": 0})
    assert "warmup_passes" in str(ei.value)
    # pool source may start selecting at pass 0
    cfg = parse_attent({"source": "pool", "warmup_passes": 0})
    assert cfg.warmup_passes == 0


def test_interval_every_zero_rejected():
    with pytest.raises(ConfigError) as ei:
        parse_attent({"interval": {"schedule": "fixed", "every": 0}})
    (line,) = _problem_lines(ei.value)
    assert line.startswith("attent.interval.every: got 0;")


def test_step_values_out_of_range_rejected():
    with pytest.raises(ConfigError) as ei:
        parse_attent({"ratio": {"schedule": "step", "values": [0.5, 1.5]}})
    (line,) = _problem_lines(ei.value)
    assert line.startswith("attent.ratio.values:") and "1.5" in line


def test_ratio_zero_rejected_and_one_allowed():
    with pytest.raises(ConfigError, match=r"attent\.ratio\.value: got 0\.0"):
        parse_attent({"ratio": {"value": 0.0}})
    assert parse_attent({"ratio": {"value": 1.0}}).ratio.value == 1.0


def test_nested_unknown_key_named_with_dotted_path():
    with pytest.raises(ConfigError) as ei:
        parse_attent({"selection": {"metod": "soft"}})
    (line,) = _problem_lines(ei.value)
    assert line.startswith("attent.selection.metod: unknown key")
    assert "'soft'" in line


def test_non_string_preset_is_config_error():
    with pytest.raises(ConfigError, match=r"attent\.preset"):
        parse_attent({"preset": ["attent-simple"]})


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


# ---- split_deepspeed_config ----------------------------------------------------------------------

DS = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 2,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95]}},
    "zero_optimization": {"stage": 2},
    "bf16": {"enabled": True},
}


def test_split_strips_exactly_attent():
    config = {**copy.deepcopy(DS), "attent": {"preset": "attent-simple"}}
    original = copy.deepcopy(config)
    ds, cfg = split_deepspeed_config(config)
    assert ds == DS
    assert "attent" not in ds
    assert list(ds) == list(DS)  # order kept too
    assert cfg.preset == "attent-simple"
    assert config == original  # input untouched


def test_split_without_section_or_disabled():
    ds, cfg = split_deepspeed_config(copy.deepcopy(DS))
    assert ds == DS and cfg is None
    ds, cfg = split_deepspeed_config({**copy.deepcopy(DS), "attent": {"enabled": False}})
    assert ds == DS and cfg is None


def test_split_from_json_file(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({**DS, "attent": {"preset": "random", "seed": 7}}))
    for arg in (path, str(path)):
        ds, cfg = split_deepspeed_config(arg)
        assert ds == DS
        assert cfg.selection.method == "random"
        assert cfg.seed == 7


def test_split_invalid_json_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"train_micro_batch_size_per_gpu": 4,, }')
    with pytest.raises(ConfigError, match="not valid JSON"):
        split_deepspeed_config(path)


def test_split_json_file_not_an_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        split_deepspeed_config(path)


def test_split_invalid_section_raises_config_error():
    with pytest.raises(ConfigError, match=r"attent\.ratio\.value"):
        split_deepspeed_config({**DS, "attent": {"ratio": {"value": 2}}})


def test_cross_field_problems_are_reported_with_the_rest_and_their_exact_keys():
    with pytest.raises(ConfigError) as ei:
        parse_attent({"warmup_passes": 0, "ratio": {"value": 1.5},
                      "selection": {"rescale": True, "temperature": 0}})
    lines = _problem_lines(ei.value)
    keys = sorted(line.split(":")[0] for line in lines)
    assert keys == ["attent.ratio.value", "attent.selection.rescale",
                    "attent.selection.temperature", "attent.warmup_passes"]


def test_grad_norm_signal_and_its_section():
    cfg = parse_attent({"signal": "grad_norm", "grad_norm": {"last_blocks": 1,
                                                             "modules": ["model.layers.0.*"]}})
    assert cfg.signal == "grad_norm"
    assert (cfg.grad_norm.last_blocks, cfg.grad_norm.include_head, cfg.grad_norm.method) == \
        (1, True, "auto")
    assert cfg.grad_norm.modules == ["model.layers.0.*"]


def test_grad_norm_section_problems_are_reported_together():
    with pytest.raises(ConfigError) as ei:
        parse_attent({"signal": "grad_norm", "grad_norm": {
            "last_blocks": 0, "include_head": False, "method": "exact", "chunk_elements": 10}})
    lines = _problem_lines(ei.value)
    keys = sorted(line.split(":")[0] for line in lines)
    assert keys == ["attent.grad_norm.chunk_elements", "attent.grad_norm.method",
                    "attent.grad_norm.modules"]
    assert any("no layer selected" in line for line in lines)


def test_attent_soft_preset_is_a_fresh_soft_draw_every_pass():
    cfg = parse_attent({"preset": "attent-soft", "seed": 3})
    assert (cfg.signal, cfg.source, cfg.warmup_passes) == ("loss", "free", 1)
    assert (cfg.ratio.schedule, cfg.ratio.value) == ("constant", 0.7)
    assert (cfg.interval.schedule, cfg.interval.every) == ("fixed", 1)
    assert (cfg.selection.method, cfg.selection.temperature) == ("soft", 0.5)
    assert cfg.seed == 3


# ---- new keys: infobatch, per_source, score, final_full_passes, reliability bounds -----------------

def test_infobatch_preset_expands_as_documented():
    cfg = parse_attent({"preset": "infobatch"})
    assert (cfg.signal, cfg.source, cfg.warmup_passes, cfg.final_full_passes) == \
        ("loss", "free", 1, 1)
    assert (cfg.ratio.schedule, cfg.ratio.value) == ("constant", 0.7)
    assert (cfg.interval.schedule, cfg.interval.every) == ("fixed", 1)
    assert (cfg.selection.method, cfg.selection.rescale) == ("infobatch", True)
    assert (cfg.score, cfg.selection.per_source) == ("raw", False)


def test_new_keys_defaults():
    cfg = parse_attent({})
    assert (cfg.score, cfg.final_full_passes, cfg.selection.per_source) == ("raw", 0, False)


def test_rescale_is_allowed_for_infobatch_and_refused_for_hard_with_the_new_wording():
    assert parse_attent({"selection": {"method": "infobatch", "rescale": True}}).selection.rescale
    with pytest.raises(ConfigError) as ei:
        parse_attent({"selection": {"method": "hard", "rescale": True}})
    (line,) = _problem_lines(ei.value)
    assert line.startswith("attent.selection.rescale: rescale=true needs method 'soft', "
                           "'random' or 'infobatch'")


@pytest.mark.parametrize("section, key, words", [
    ({"seed": -1}, "attent.seed", "got -1; allowed: a number >= 0"),
    ({"seed": 2 ** 63}, "attent.seed", "got 9223372036854775808; allowed: a number < "),
    ({"selection": {"temperature": 0.0009}}, "attent.selection.temperature",
     "got 0.0009; allowed: a number >= 0.001"),
    ({"attention": {"layers": []}}, "attent.attention.layers",
     "got []; allowed: a non-empty list of decoder layer indices"),
    ({"final_full_passes": -1}, "attent.final_full_passes", "got -1; allowed: a number >= 0"),
    ({"score": "loss-drop"}, "attent.score", "got 'loss-drop'; allowed: 'raw', 'drop' or "
                                             "'reducible'"),
    ({"selection": {"per_source": 1}}, "attent.selection.per_source", "got 1"),
    ({"selection": {"method": "info"}}, "attent.selection.method", "'infobatch'"),
])
def test_new_validation_errors_name_their_key(section, key, words):
    with pytest.raises(ConfigError) as ei:
        parse_attent(section)
    (line,) = _problem_lines(ei.value)
    assert line.startswith(key + ": "), line
    assert words in line, line
    assert "fix:" in line, line


def test_bounds_are_inclusive_where_documented():
    assert parse_attent({"seed": 2 ** 63 - 1}).seed == 2 ** 63 - 1
    assert parse_attent({"selection": {"temperature": 0.001}}).selection.temperature == 0.001
    assert parse_attent({"attention": {"layers": [0, -1]}}).attention.layers == [0, -1]


def test_drop_score_with_hard_top_k_needs_two_warmup_passes():
    with pytest.raises(ConfigError) as ei:
        parse_attent({"score": "drop"})  # hard, free, one warm-up pass
    (line,) = _problem_lines(ei.value)
    assert line.startswith("attent.score: got 'drop' with selection.method 'hard', source "
                           "'free' and warmup_passes 1:")
    assert "fix: set warmup_passes: 2" in line
    with pytest.raises(ConfigError, match=r"attent\.score: got 'drop'.*source 'pool'"):
        parse_attent({"score": "drop", "source": "pool", "warmup_passes": 3})
    assert parse_attent({"score": "drop", "warmup_passes": 2}).score == "drop"
    for method in ("soft", "infobatch", "random"):
        assert parse_attent({"score": "drop", "selection": {"method": method}}).score == "drop"


def test_all_problems_still_reported_together_with_the_new_keys():
    with pytest.raises(ConfigError) as ei:
        parse_attent({"seed": -3, "score": "x", "attention": {"layers": []},
                      "selection": {"temperature": 1e-6}, "final_full_passes": -1})
    keys = sorted(line.split(":")[0] for line in _problem_lines(ei.value))
    assert keys == ["attent.attention.layers", "attent.final_full_passes", "attent.score",
                    "attent.seed", "attent.selection.temperature"]
