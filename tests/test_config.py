import pytest

from gptstack.config import list_presets, parse_override
from gptstack.stages import RunConfig
from gptstack.errors import GptstackError


def test_presets_resolve_and_inherit():
    assert {"tiny", "mini", "small", "gpt1", "gpt2", "gpt2-xl", "gpt3-small", "gpt3-175b"} <= set(list_presets())
    xl = RunConfig.resolve("gpt2-xl")
    assert (xl.model.n_layer, xl.model.n_embd, xl.model.n_ctx) == (48, 1600, 1024)  # n_ctx from base gpt2
    g3 = RunConfig.resolve("gpt3-6.7b")
    assert g3.pretrain.batch_size * g3.model.n_ctx == 2 * 1024 * 1024 and g3.pretrain.lr == 1.2e-4


def test_overrides_and_files(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("pretrain: {lr: 5.0e-4}\nmodel: {dropout: 0.1}\n")
    cfg = RunConfig.resolve("tiny", [str(f)], ["pretrain.lr=3e-4", "model.n_layer=6", "data.skip_bad=true"])
    assert cfg.pretrain.lr == 3e-4 and cfg.model.n_layer == 6 and cfg.model.dropout == 0.1 and cfg.data.skip_bad


@pytest.mark.parametrize("bad, message", [
    (dict(preset="tiny-xxl"), "unknown preset 'tiny-xxl'"),
    (dict(preset="tiny", overrides=["pretrain.lrr=1"]), "unknown config key 'pretrain.lrr'"),
    (dict(preset="tiny", overrides=["model.n_layer=two"]), "'model.n_layer': expected an integer"),
    (dict(preset="tiny", overrides=["model.n_head=3"]), "divisible"),
    (dict(preset="tiny", overrides=["pretrain.precision=fp8"]), "pretrain.precision"),
    (dict(preset="tiny", overrides=["lr"]), "key=value"),
])
def test_config_errors_name_the_problem(bad, message):
    with pytest.raises(GptstackError, match=message):
        RunConfig.resolve(bad["preset"], [], bad.get("overrides", []))


def test_parse_override_nests():
    assert parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}


def test_partial_nested_settings_keep_the_sections_own_defaults():
    cfg = RunConfig.resolve("tiny", overrides=["finetune.train.lr=5e-4"])
    assert cfg.finetune.train.lr == 5e-4
    assert (cfg.finetune.train.batch_size, cfg.finetune.train.schedule) == (32, "linear")  # not TrainConfig's 16, cosine
