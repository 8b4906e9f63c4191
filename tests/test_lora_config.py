"""LoraConfig speaks PEFT's names (r, lora_alpha, lora_dropout) and keeps numba_lora's as aliases."""

import copy
import dataclasses
import pickle

import numpy as np
import pytest

from numba_lora import LoraConfig, LoraConfigError


def test_peft_names_and_defaults():
    config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj"])
    assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 32.0, 0.05)
    # PEFT's defaults: LoraConfig(r=8) means what it means in PEFT.
    assert (LoraConfig().r, LoraConfig().lora_alpha, LoraConfig().lora_dropout) == (8, 8.0, 0.0)
    assert LoraConfig(r=4).lora_alpha == 8.0
    assert LoraConfig(4, 2.0) == LoraConfig(r=4, lora_alpha=2.0)  # positional: r, lora_alpha


def test_aliases_read_and_write_the_peft_fields():
    config = LoraConfig(rank=4, alpha=8, dropout=0.1)
    assert config == LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1)
    assert (config.rank, config.alpha, config.dropout) == (4, 8.0, 0.1)
    config.rank, config.alpha, config.dropout = 2, 3.0, 0.2
    assert (config.r, config.lora_alpha, config.lora_dropout) == (2, 3.0, 0.2)
    assert [f.name for f in dataclasses.fields(config)][:3] == ["r", "lora_alpha", "lora_dropout"]


@pytest.mark.parametrize("peft, alias", [
    (dict(r=4), dict(rank=np.int64(4))),
    (dict(lora_alpha=8), dict(alpha=8.0)),
    (dict(lora_dropout=0.5), dict(dropout=np.float32(0.5))),
])
def test_both_names_agreeing_are_accepted(peft, alias):
    assert LoraConfig(**peft, **alias) == LoraConfig(**peft)


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=4, rank=8), r"r=4 and rank=8 disagree: rank is numba_lora's name for PEFT's r"),
    (dict(lora_alpha=4, alpha=8), r"lora_alpha=4 and alpha=8 disagree"),
    (dict(lora_dropout=0.0, dropout=0.1), r"lora_dropout=0.0 and dropout=0.1 disagree"),
    (dict(r=0, rank=0), "rank must be an integer >= 1, got 0"),
    (dict(r=4, rank="4"), "rank must be an integer"),
])
def test_both_names_disagreeing_are_refused(kwargs, match):
    with pytest.raises(LoraConfigError, match=match):
        LoraConfig(**kwargs)


def test_validate_replace_and_equality():
    config = LoraConfig(r=4, lora_alpha=8, rank_pattern={"q": 2})
    assert dataclasses.replace(config, r=6).r == 6
    config.rank = 0
    with pytest.raises(LoraConfigError, match="rank must be"):
        config.validate()
    assert config.r == 0  # a refused validate() changes nothing


@pytest.mark.parametrize("kwargs, match", [
    (dict(task_type="causal_lm"), "task_type must be None or one of PEFT's task types"),
    (dict(base_model_name_or_path=3), "base_model_name_or_path must be a string or None"),
    (dict(revision=b"main"), "revision must be a string or None"),
    (dict(extra=[("a", 1)]), "extra must be a dict"),
    (dict(extra={"r": 4}), "extra must not hold 'r'"),
    (dict(extra={1: 4}), "extra keys must be strings"),
    (dict(extra={"x": object()}), "extra must hold JSON values"),
])
def test_peft_metadata_fields_are_checked(kwargs, match):
    with pytest.raises(LoraConfigError, match=match):
        LoraConfig(**kwargs)


def test_peft_metadata_fields(tmp_path):
    config = LoraConfig(base_model_name_or_path=tmp_path, revision="main", task_type="CAUSAL_LM",
                        extra={"peft_version": "0.17.0"})
    assert config.base_model_name_or_path == str(tmp_path)
    # extra is bookkeeping for the round trip: not compared, not shown.
    assert config == dataclasses.replace(config, extra={})
    assert "peft_version" not in repr(config)


@pytest.mark.parametrize("copier", [copy.copy, copy.deepcopy, lambda c: pickle.loads(pickle.dumps(c))])
def test_pickles_and_copies_keep_every_field(copier):
    config = LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", base_model_name_or_path="m",
                        extra={"peft_version": "x"})
    other = copier(config)
    assert other == config and other.extra == {"peft_version": "x"}


def test_unpickles_a_config_stored_with_the_old_field_names():
    old = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1)
    state = {"rank": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": (), "fan_in_fan_out": False,
             "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}}
    config = object.__new__(LoraConfig)
    config.__setstate__(state)
    assert config == old and config.extra == {} and config.task_type is None
