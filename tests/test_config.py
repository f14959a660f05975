"""Config sections load into typed objects; a missing or bad setting fails, naming its key.

Every default lives in configs/ssl_medsam2.yaml only, so a config that lacks a key must fail loudly
instead of falling back to a second default written in code. Pure: no volumes, no models.
"""

from __future__ import annotations

import copy

import pytest
from ssl_medsam2.config import load_config, merge
from ssl_medsam2.engines.atlas_engine import AtlasEngine
from ssl_medsam2.nnunet.settings import NnUNetSettings
from ssl_medsam2.preprocess import InputSettings
from ssl_medsam2.protocol import ProtocolSettings


def _without(cfg: dict, section: str, key: str) -> dict:
    out = copy.deepcopy(cfg)
    del out[section][key]
    return out


def test_the_yaml_loads_into_every_typed_section():
    cfg = load_config()
    nn = NnUNetSettings.from_config(cfg)
    assert nn.configuration == "2d" and nn.fold_id == "all" and nn.gate_mode == "holdout" and nn.max_rounds == 3
    assert set(NnUNetSettings.keys()) == set(cfg["nnunet"])  # one field per YAML key, no more, no less
    inputs = InputSettings.from_config(cfg)
    assert inputs.class_name(1) == "class_1" and inputs.label_ids is None  # neutral: no dataset's organs by default
    named = InputSettings.from_config(load_config(overrides=["input.class_names={1: liver, 4: spleen}"]))
    assert named.class_name(1) == "liver" and named.class_name(9) == "class_9" and named.label_ids == {0, 1, 4}
    assert ProtocolSettings.from_config(cfg).boundary_band == 2
    assert AtlasEngine.from_config(cfg).settings.histogram_levels == 128  # from the preset, not from code


def test_a_missing_nnunet_key_fails_naming_it():
    with pytest.raises(KeyError, match=r"nnunet\.max_rounds"):
        NnUNetSettings.from_config(_without(load_config(), "nnunet", "max_rounds"))


def test_a_bad_nnunet_value_fails_naming_the_key():
    with pytest.raises(ValueError, match=r"nnunet\.configuration.*'3d'"):
        NnUNetSettings.from_config(load_config(overrides=["nnunet.configuration=3d"]))
    for override, key in (("nnunet.schedule=fast", "nnunet.schedule"), ("nnunet.fold=7", "nnunet.fold"),
                          ("nnunet.epochs=0", "nnunet.epochs"), ("nnunet.quality_gate=maybe", "nnunet.quality_gate"),
                          ("nnunet.num_gpus=two", "nnunet.num_gpus")):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            NnUNetSettings.from_config(load_config(overrides=[override]))


def test_schedule_keeps_the_configured_values_and_fills_the_trainer():
    from ssl_medsam2.nnunet import runstate, schedule

    nn = NnUNetSettings.from_config(load_config())
    filled = nn.with_schedule(schedule.resolve(nn, "cpu"))
    assert filled.trainer_name == "nnUNetTrainerSSL_20ep_25it_5val" and nn.epochs is None
    # state.json's fingerprint is the settings as configured (a resumed run compares exactly these)
    assert runstate.settings(nn, "atlas")["schedule"] == "auto" and runstate.settings(nn, "atlas")["epochs"] is None


def test_other_sections_name_what_is_missing():
    cfg = load_config()
    with pytest.raises(KeyError, match=r"input\.class_names"):
        InputSettings.from_config(_without(cfg, "input", "class_names"))
    with pytest.raises(ValueError, match=r"input\.slice_axis"):
        InputSettings.from_config(merge(cfg, ["input.slice_axis=3"]))
    no_levels = copy.deepcopy(cfg)
    del no_levels["atlas"]["presets"]["cpu_fast"]["histogram_levels"]
    with pytest.raises(ValueError, match=r"atlas\.histogram_levels"):
        AtlasEngine.from_config(no_levels)
    with pytest.raises(KeyError, match="no 'nnunet:' section"):
        NnUNetSettings.from_config({k: v for k, v in cfg.items() if k != "nnunet"})
