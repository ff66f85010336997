"""PolicySettings: one frozen dataclass of the settings every backbone shares, checked in one place."""

import dataclasses

import pytest
from jsonargparse import ArgumentParser

from sp_grpo.policies import HunyuanVideoPolicy, LTXVideoPolicy, PolicySettings, TinyWanPolicy, WanPolicy
from sp_grpo.toy.model import ShapesWanPolicy

FIELDS = {field.name for field in dataclasses.fields(PolicySettings)}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"torch_dtype": "float64"}, r"`model.policy.init_args.torch_dtype` \('float64'\) must be one of"),
        ({"lora_rank": 0}, r"`model.policy.init_args.lora_rank` \(0\) must be at least 1, or null"),
        ({"cfg_batched": "sometimes"}, r"`model.policy.init_args.cfg_batched` \('sometimes'\) must be true, false or 'auto'"),
        ({"decode_chunk_size": 0}, r"`model.policy.init_args.decode_chunk_size` \(0\) must be at least 1"),
    ],
)
def test_errors_name_the_setting(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolicySettings(**kwargs)


def test_settings_are_frozen_and_hashable():
    settings = PolicySettings(lora_target_modules=["to_q", "to_v"])
    assert settings.lora_target_modules == ("to_q", "to_v")
    hash(settings)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.lora_rank = 4


@pytest.mark.parametrize(
    "policy_cls, fixed",
    [(WanPolicy, set()), (HunyuanVideoPolicy, set()), (LTXVideoPolicy, set()), (TinyWanPolicy, {"lora_seed"}), (ShapesWanPolicy, set())],
)
def test_every_policy_takes_the_shared_settings_flat(policy_cls, fixed):
    """LightningCLI sees each setting as ``model.policy.init_args.<field>``, with the dataclass's help."""
    parser = ArgumentParser()
    parser.add_class_arguments(policy_cls, "policy")
    keys = {action.dest.split(".", 1)[1] for action in parser._actions if action.dest.startswith("policy.")}
    assert FIELDS - fixed <= keys
    assert not fixed & keys


def test_backbone_defaults_are_stated_where_they_differ():
    parser = ArgumentParser()
    parser.add_class_arguments(HunyuanVideoPolicy, "policy")
    parser.add_class_arguments(TinyWanPolicy, "tiny")
    defaults = parser.get_defaults()
    assert defaults.policy.torch_dtype == "bfloat16" and defaults.policy.lora_rank == 32
    assert defaults.tiny.torch_dtype == "float32" and defaults.tiny.lora_rank == 4


def test_settings_reach_the_policy_and_runtime_changes_are_checked():
    policy = TinyWanPolicy(seed=1, lora_alpha=8.0, negative_prompt="blurry", decode_chunk_size=2, cfg_batched=False)
    assert policy.settings == PolicySettings(
        lora_rank=4, lora_alpha=8.0, lora_seed=1, negative_prompt="blurry", decode_chunk_size=2, cfg_batched=False
    )
    assert policy.lora_rank == 4 and policy.transformer.peft_config["default"].lora_alpha == 8.0
    policy.cfg_batched = True
    assert policy.settings.cfg_batched is True
    with pytest.raises(ValueError, match="decode_chunk_size"):
        policy.decode_chunk_size = 0
    with pytest.raises(TypeError, match="lora_rnk"):
        TinyWanPolicy(lora_rnk=2)
