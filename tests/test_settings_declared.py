"""The setting declarations (sd_scripts/core/settings.py) and what is derived from them."""

from __future__ import annotations

import dataclasses

import pytest

from ArgsList import ArgStore
from sd_scripts.core.config import TrainConfig
from sd_scripts.core.setting import Range, Setting, above, at_least, between
from sd_scripts.core.settings import GROUPS, SETTINGS, WIZARD_STEPS, engine_settings, front_settings


def test_names_are_unique_in_each_layer():
    front = [s.name for s in SETTINGS if s.in_front_end]
    engine = [s.kohya_name for s in SETTINGS if s.in_engine]
    assert len(front) == len(set(front)) and len(engine) == len(set(engine))


def test_every_setting_has_a_heading_help_and_section():
    for s in SETTINGS:
        assert s.group in GROUPS, s.name
        assert s.help and "\n" not in s.help, s.name
        assert s.section, s.name


def test_wizard_steps_are_known_and_name_front_end_settings():
    """``wizard=`` names one of the wizard's steps, and only for settings the wizard can write (the front end's)."""
    asked = [s for s in SETTINGS if s.wizard is not None]
    assert asked and all(s.wizard in WIZARD_STEPS and s.in_front_end and s.layer != "none" for s in asked)
    assert {s.wizard for s in asked} == set(WIZARD_STEPS)  # no step without a setting


def test_argstore_and_trainconfig_are_the_declared_settings():
    assert ArgStore.setting_names() == [s.name for s in front_settings()]
    fields = dataclasses.fields(TrainConfig)
    assert [f.name for f in fields] == [s.kohya_name for s in engine_settings()]
    for f, s in zip(fields, engine_settings()):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert default == s.engine_default and type(default) is type(s.engine_default), s.name


def test_the_engine_help_names_the_engine_settings():
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(TrainConfig)}
    assert helps["network_alpha"] == "network alpha: the LoRA is scaled by alpha / network_dim"
    assert "network_train_unet_only" in helps["cache_text_encoder_outputs"]
    assert helps["max_train_epochs"] == "training epochs (overrides max_train_steps)"  # kohya's own meaning


def test_metadata_keys_belong_to_engine_settings():
    keys = [s.metadata for s in SETTINGS if s.metadata]
    assert len(keys) == len(set(keys))
    assert all(s.in_engine for s in SETTINGS if s.metadata)


@pytest.mark.parametrize("rng, value, text", [
    (at_least(1), 0, "must be 1 or more, got 0"),
    (at_least(0), -0.5, "must be 0 or more, got -0.5"),
    (above(0, note="leave it unset to turn it off"), -1.0, "must be above 0 (leave it unset to turn it off), got -1"),
    (between(0, 1), 1.5, "must be between 0 and 1, got 1.5"),
    (Range(0, 1, high_open=True), 1, "must be from 0 to below 1, got 1"),
    (Range(0, 1000, whole=True), 1001, "must be a whole number from 0 to 1000, got 1001"),
    (Range(0, 1000, whole=True), 2.5, "must be a whole number from 0 to 1000, got 2.5"),
    (Range(1, whole=True), 0, "must be a whole number of 1 or more, got 0"),
    (Range(0, 1, low_open=True), 0, "must be above 0 and at most 1, got 0"),
    (at_least(0), "abc", "must be a number, got 'abc'"),
])
def test_range_messages(rng, value, text):
    assert rng.problem(value) == text


def test_ranges_accept_their_bounds():
    assert at_least(1).problem(1) is None and between(0, 1).problem(1) is None
    assert above(0).problem(1e-9) is None and Range(0, 1, high_open=True).problem(0) is None
    assert Range(1, whole=True).problem(3) is None


def test_engine_types_follow_the_engine_defaults():
    s = Setting("x", int | None, None, "help", GROUPS[0], kohya_default=3)
    assert s.engine_type is int and s.engine_default == 3 and s.optional and s.kind == "int"
    s = Setting("y", int, 32, "help", GROUPS[0], kohya="why", kohya_default=None)
    assert s.engine_type == int | None and s.kohya_name == "why" and s.gui_names == ("why",)
    with pytest.raises(ValueError):
        Setting("z", int, 1, "help", layer="sometimes")
