"""The README's code blocks are true: commands run as written, Python runs, YAML parses."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
BIN = Path(sys.executable).parent


def _commands():
    for lang, body in BLOCKS:
        if lang != "bash":
            continue
        for line in body.splitlines():
            command = re.split(r"\s+#", line)[0].strip()
            if command:
                yield command


def test_readme_has_exactly_the_two_setup_commands():
    setup = BLOCKS[[lang for lang, _ in BLOCKS].index("bash")][1]
    assert [line.split("#")[0].strip() for line in setup.strip().splitlines()] == ["make demo", "make test"]


@pytest.mark.parametrize("target", ["demo", "test"])
def test_make_targets_exist_and_install_first(target):
    result = subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "pip install" in result.stdout and "torch==2.13.0" in result.stdout
    ci = (ROOT / ".ci/run").read_text()
    assert "make test" in ci


@pytest.mark.parametrize("command", [c for c in _commands() if not c.startswith("make ")])
def test_command_runs_as_written(command, tmp_path):
    # Run from a copy of the configs, so relative paths in the command resolve as in a clone.
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    if "--videos samples/" in command:
        from sp_grpo.data.video import write_video

        (tmp_path / "samples").mkdir()
        for i in range(2):
            write_video(tmp_path / "samples" / f"a red square-{i}.mp4", torch.rand(6, 3, 32, 32), fps=8)
    args = command.split()
    if args[0].startswith(".venv/bin/"):
        args[0] = str(BIN / Path(args[0]).name)
    elif args[0] == "sp-grpo":
        args[0] = str(BIN / "sp-grpo")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()


@pytest.mark.parametrize("index", [i for i, (lang, _) in enumerate(BLOCKS) if lang == "python"])
def test_python_block_runs(index, tmp_path, monkeypatch):
    code = BLOCKS[index][1]
    compile(code, f"README block {index}", "exec")  # every block is valid Python
    if re.search(r"= \.\.\.|^\s*\.\.\.", code, flags=re.M):
        pytest.skip("a sketch with `...` placeholders: compiled, not run")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README block {index}", "exec"), {"__name__": "readme"})


@pytest.mark.parametrize("index", [i for i, (lang, _) in enumerate(BLOCKS) if lang == "yaml"])
def test_yaml_block_parses(index):
    assert yaml.safe_load(BLOCKS[index][1])
