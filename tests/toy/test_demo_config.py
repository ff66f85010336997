"""configs/demo.yaml runs end to end (two GRPO iterations, small evaluation) and writes its outputs."""

from pathlib import Path

import yaml

from sp_grpo.cli import cli_main
from sp_grpo.toy.world import prompts_for_split

CONFIG = Path(__file__).parents[2] / "configs" / "demo.yaml"


def test_demo_prompts_are_the_world_splits():
    config = yaml.safe_load(CONFIG.read_text())
    assert config["data"]["prompts"] == prompts_for_split("train")
    assert config["data"]["val_prompts"] == prompts_for_split("val")


def test_short_demo_fit_writes_samples_gold_table_and_plot(tmp_path, capsys):
    config = yaml.safe_load(CONFIG.read_text())
    config["trainer"]["default_root_dir"] = str(tmp_path)
    for logger in config["trainer"]["logger"]:
        logger["init_args"]["save_dir"] = str(tmp_path)
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("GoldEvaluation"):
            callback["init_args"]["seeds"] = 1  # 16 held-out videos: enough to check the plumbing
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    cli_main(
        [
            "fit",
            "--config", str(path),
            "--trainer.max_steps", "2",
            "--trainer.enable_progress_bar", "false",
            "--model.group_size", "2",
            "--data.batch_size", "2",
        ]
    )
    run = tmp_path / "logs" / "version_0"
    assert (run / "metrics.csv").exists() and (run / "gold.json").exists() and (run / "curriculum.png").exists()
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000000.gif", "step_000002.gif"]
    assert "| all_correct |" in capsys.readouterr().out
