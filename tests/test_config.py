"""Settings: per-stage values by dotted name, presets and --set, and clear errors for renamed and removed names."""
import dataclasses

import pytest

from fattag.config import Config, StageSettings, make_config, parse_sets, upgrade_settings, with_settings


def test_each_stage_has_its_own_settings():
    cfg = Config()
    assert isinstance(cfg.noisy, StageSettings) and isinstance(cfg.curated, StageSettings)
    assert (cfg.noisy.epochs, cfg.noisy.lr, cfg.noisy.mixup) == (12, 3e-3, 0.0)
    assert (cfg.curated.epochs, cfg.curated.lr, cfg.curated.mixup) == (30, 2e-3, 0.4)
    assert cfg.noisy is not Config().noisy            # no stage settings shared between configs
    demo = make_config("demo")
    assert (demo.noisy.lr, demo.curated.lr, demo.curated.mixup, demo.arch) == (4e-3, 3e-3, 0.2, "xresnet_tiny")
    cpu = make_config("cpu")
    assert (cpu.noisy.union_mix, cpu.curated.union_mix, cpu.curated.top_up, cpu.noisy.top_up) == (0.5, 0.5, 0.5, 0.0)
    assert (cpu.noisy.epochs, cpu.curated.epochs, cpu.arch) == (60, 30, "xresnet_small")
    # stage 1 doubled where the budget gives it (the 8.5 h), not in the hour (docs/budget.md)
    assert (make_config("kaggle-1h").noisy.epochs, make_config("kaggle-9h").noisy.epochs) == (15, 60)


def test_set_reaches_one_stage_only():
    cfg = make_config("demo", sets=["curated.union_mix=0.5", "noisy.epochs=3", "curated.specaug=false",
                                    "noisy.loss=lsoft", "arch=xresnet18"])
    assert cfg.curated.union_mix == 0.5 and cfg.noisy.union_mix == 0.0
    assert (cfg.noisy.epochs, cfg.curated.epochs) == (3, 30)
    assert cfg.curated.specaug is False and cfg.noisy.specaug is True
    assert (cfg.noisy.loss, cfg.curated.loss, cfg.arch) == ("lsoft", "bce", "xresnet18")
    assert isinstance(cfg.noisy.epochs, int) and isinstance(cfg.curated.union_mix, float)
    assert parse_sets(["curated.freq-shift=2", "noisy.top_up=0.2"]) == {"curated.freq_shift": 2, "noisy.top_up": 0.2}


def test_overrides_and_presets_take_dotted_names_in_order():
    cfg = make_config("demo", {"curated.epochs": 2, "folds": 2, "seed": None}, ["curated.lr=0.01"])
    assert (cfg.curated.epochs, cfg.folds, cfg.seed, cfg.curated.lr, cfg.noisy.lr) == (2, 2, 42, 0.01, 4e-3)
    # --set wins over the overrides, which win over the preset
    assert make_config("demo", {"curated.epochs": 2}, ["curated.epochs=5"]).curated.epochs == 5


def test_with_settings_returns_a_new_validated_config():
    cfg = make_config("demo")
    new = with_settings(cfg, {"curated.lr": 1e-3, "noisy.top_up": 0.25, "arch": "xresnet18"})
    assert (new.curated.lr, new.noisy.top_up, new.arch) == (1e-3, 0.25, "xresnet18")
    assert (new.noisy.lr, new.curated.top_up, new.curated.mixup) == (4e-3, 0.0, 0.2)   # the rest kept
    assert (cfg.curated.lr, cfg.noisy.top_up, cfg.arch) == (3e-3, 0.0, "xresnet_tiny")  # the original unchanged
    assert with_settings(cfg, {}) == cfg
    with pytest.raises(ValueError, match="noisy.top_up"):
        with_settings(cfg, {"noisy.top_up": 1.0})
    with pytest.raises(ValueError, match="is now 'curated.lr'"):
        with_settings(cfg, {"lr_curated": 1e-3})
    with pytest.raises(ValueError, match="unknown setting 'curated.nope'"):
        with_settings(cfg, {"curated.nope": 1})


def test_flat_dict_names_every_setting_as_set_does():
    cfg = make_config("demo", sets=["curated.union_mix=0.5"])
    flat = cfg.flat_dict()
    stage_fields = [f.name for f in dataclasses.fields(StageSettings)]
    assert {f"{s}.{k}" for s in ("noisy", "curated") for k in stage_fields} <= set(flat)
    assert "noisy" not in flat and "curated" not in flat
    assert len(flat) == len(dataclasses.fields(Config)) - 2 + 2 * len(stage_fields)
    assert (flat["curated.union_mix"], flat["noisy.union_mix"], flat["noisy.lr"], flat["arch"]) == \
        (0.5, 0.0, 4e-3, "xresnet_tiny")
    assert with_settings(Config(), flat) == cfg       # the flat dict is the whole config
    assert cfg.to_dict()["curated"]["union_mix"] == 0.5


@pytest.mark.parametrize("old, new", [("union_mix_curated", "curated.union_mix"), ("epochs_noisy", "noisy.epochs"),
                                      ("lr_curated", "curated.lr"), ("mixup_noisy", "noisy.mixup"),
                                      ("specaug_curated", "curated.specaug"), ("loss_noisy", "noisy.loss"),
                                      ("time_stretch_noisy", "noisy.time_stretch"),
                                      ("concat_mix_curated", "curated.concat_mix"),
                                      ("freq_shift_noisy", "noisy.freq_shift"),
                                      ("noisy_share_curated", "curated.top_up"),
                                      ("curated_share_noisy", "noisy.top_up")])
def test_an_old_setting_name_is_told_its_new_name(old, new):
    with pytest.raises(ValueError, match=f"setting '{old}' is now '{new}'"):
        make_config("demo", sets=[f"{old}=0.5"])
    with pytest.raises(ValueError, match=f"is now '{new}'"):
        make_config("demo", {old: 1})


@pytest.mark.parametrize("name", ["adapt_bn=true", "background_curated=0.3", "level_eq_noisy=true",
                                  "union_mix_rounds=2", "pseudo_soft=true", "lowpass_p=0.5", "level_gain_db=3"])
def test_a_removed_setting_is_a_clear_error(name):
    with pytest.raises(ValueError, match=f"setting '{name.split('=')[0]}' was removed"):
        make_config(sets=[name])


def test_unknown_setting_and_bad_values():
    with pytest.raises(ValueError, match="unknown setting 'curated.mixupp'"):
        make_config("demo", sets=["curated.mixupp=0.1"])
    with pytest.raises(ValueError, match="unknown setting 'stage3.lr'"):
        make_config("demo", sets=["stage3.lr=0.1"])
    with pytest.raises(ValueError, match="curated.specaug expects true/false"):
        make_config("demo", sets=["curated.specaug=maybe"])
    with pytest.raises(ValueError, match="name=value"):
        make_config("demo", sets=["curated.lr"])
    with pytest.raises(ValueError, match="unknown preset"):
        make_config("nope")
    assert make_config(sets=["time_budget=1h"]).time_budget == 3600


def test_upgrade_settings_renames_old_names_and_drops_removed_ones_that_were_off():
    old = {"noisy_share_curated": 0.5, "curated_share_noisy": 0.1, "union_mix_curated": 0.5, "lr_noisy": 1e-3,
           "epochs_curated": 7, "background_noisy": 0.0, "level_eq_curated": False, "union_mix_rounds": 1,
           "arch": "xresnet18", "pseudo": {"adapt_bn": False, "pseudo_soft": False, "class_balance": True}}
    assert upgrade_settings(old) == {"curated.top_up": 0.5, "noisy.top_up": 0.1, "curated.union_mix": 0.5,
                                     "noisy.lr": 1e-3, "curated.epochs": 7, "arch": "xresnet18",
                                     "pseudo": {"class_balance": True}}
    on = upgrade_settings({"background_noisy": 0.3, "union_mix_rounds": 2, "pseudo": {"pseudo_soft": True}})
    assert on == {"background_noisy": 0.3, "union_mix_rounds": 2, "pseudo": {"pseudo_soft": True}}  # kept: they differ
    new = make_config("demo").flat_dict()
    assert upgrade_settings(new) == new               # today's names pass through


def test_a_bad_set_on_the_command_line_is_one_clear_line(tiny_data, tmp_path):
    from conftest import run_pipeline
    for bad, says in (("union_mix_curated=0.5", "is now 'curated.union_mix'"), ("adapt_bn=true", "was removed"),
                      ("curated.epochs=many", "invalid literal")):
        proc = run_pipeline(["--data-dir", tiny_data, "--work-dir", tmp_path / "w", "--set", bad])
        assert proc.returncode != 0 and says in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
