"""Every top-level YAML in configs/ parses with the CLI and instantiates with model loading mocked out.

Real-run configs point at /path/to/... placeholders and at GPUs: the policies' loaders are replaced
by the tiny offline builders, and the trainer is moved to one CPU process for instantiation (the
strategy and precision as written are still type-checked by a full parse with ``--print_config``).
"""

import contextlib
import dataclasses
import io
from pathlib import Path

import pytest
import yaml

from sp_grpo.cli import cli_main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
REAL = [c for c in CONFIGS if c.name != "tiny.yaml" and "/path/to/" in c.read_text()]


@pytest.fixture
def mocked_loaders(monkeypatch):
    """Replace every policy loader with its tiny offline builder; record what was asked for."""
    import sp_grpo.policies.hunyuan as hunyuan
    import sp_grpo.policies.ltx as ltx
    import sp_grpo.policies.wan as wan
    from sp_grpo.policies.tiny import tiny_wan_components

    calls = []

    def fake(builder, name):
        def load(path, torch_dtype, *args, **kwargs):
            calls.append((name, path, torch_dtype))
            return builder(0)

        return load

    monkeypatch.setattr(wan, "load_wan_components", fake(tiny_wan_components, "wan"))
    monkeypatch.setattr(hunyuan, "load_hunyuan_components", fake(hunyuan.tiny_hunyuan_components, "hunyuan"))
    monkeypatch.setattr(ltx, "load_ltx_components", fake(ltx.tiny_ltx_components, "ltx"))
    return calls


def print_config(config: Path) -> dict:
    """Parse (and type-check) a config exactly as written, without instantiating anything."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config), "--print_config"], run=True)
    assert exit_info.value.code in (0, None), out.getvalue()[-2000:]
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_instantiates(config, tmp_path, monkeypatch, mocked_loaders):
    parsed = print_config(config)
    assert parsed["model"]["policy"]["class_path"]
    monkeypatch.chdir(tmp_path)  # configs write runs/... relative to the working directory
    cpu = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1", "--trainer.strategy", "auto"]
    cli = cli_main(["--config", str(config), *cpu], run=False)
    assert cli.model.policy.trainable_parameters()
    # The policy's shared settings, flat under init_args in the YAML, reach its PolicySettings as written.
    written, settings = parsed["model"]["policy"]["init_args"], cli.model.policy.settings
    shared = {field.name for field in dataclasses.fields(settings)} & written.keys()
    assert {"torch_dtype", "lora_rank", "cfg_batched"} <= shared
    for name in shared:
        value = written[name]
        assert getattr(settings, name) == (tuple(value) if isinstance(value, list) else value), name
    assert cli.datamodule.train_prompts
    if config in REAL:
        ((_, path, _),) = mocked_loaders
        assert path.startswith("/path/to/")


@pytest.mark.parametrize("config", REAL, ids=lambda p: p.name)
def test_real_configs_are_sized_for_gpus(config):
    parsed = print_config(config)
    trainer, policy = parsed["trainer"], parsed["model"]["policy"]["init_args"]
    assert trainer["accelerator"] == "gpu" and trainer["devices"] >= 1
    # bf16 autocast; parameters keep their dtypes (fp32 LoRA weights, fp32 VAE).
    assert trainer["precision"] == "bf16-mixed"
    assert policy["gradient_checkpointing"] is True
    callbacks = [c["class_path"] for c in trainer["callbacks"]]
    assert "sp_grpo.callbacks.SelfPacedCurriculum" in callbacks
    strategy = trainer["strategy"]
    if isinstance(strategy, dict) and strategy["class_path"].endswith("FSDPStrategy"):
        assert strategy["init_args"]["auto_wrap_policy"], "FSDP must wrap the transformer blocks"
        # FSDP flattens each wrapped block into one tensor of one dtype.
        assert policy["torch_dtype"] == "float32"
    if policy["lora_rank"] is None:
        assert policy["torch_dtype"] == "float32", "full fine-tuning keeps fp32 master weights"
        assert parsed["model"]["kl_coef"] == 0 or policy["reference_copy"]


def test_the_real_configs_cover_both_backbones_and_both_modes():
    names = {c.name for c in REAL}
    assert {"wan2.1_t2v_1.3b_lora.yaml", "wan2.1_t2v_1.3b_full.yaml", "hunyuanvideo_lora.yaml", "hunyuanvideo_full.yaml"} <= names


LAYERS = sorted((ROOT / "configs" / "weighting").glob("*.yaml"))


@pytest.mark.parametrize("layer", LAYERS, ids=lambda p: p.name)
def test_weighting_layer_over_the_demo_trains_with_the_papers_weighting(layer, tmp_path, monkeypatch):
    from sp_grpo.callbacks import GroupRewardWeighting

    monkeypatch.chdir(tmp_path)
    short = ["--trainer.max_steps", "2", "--model.group_size", "2", "--data.batch_size", "2", "--trainer.logger", "false"]
    cli = cli_main(["fit", "--config", str(ROOT / "configs/demo.yaml"), "--config", str(layer), *short])
    (weighting,) = [c for c in cli.trainer.callbacks if isinstance(c, GroupRewardWeighting)]
    assert cli.model.aggregation == "sum_then_normalize"
    assert cli.trainer.global_step == 2 and weighting.state_dict()["batches"] == 2
    assert cli.model.group_weighting is not None and cli.model.group_weighting.thresholds == (0.75, 0.75, 0.75)
