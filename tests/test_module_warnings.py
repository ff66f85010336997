"""Importing sp_grpo changes no global state: the warning filters are left as they were."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The third-party packages sp_grpo imports come first: some add filters of their own when imported
# (accelerate ignores a torch.optim.lr_scheduler warning), which is not sp_grpo's doing.
CHECK = """
import importlib, pkgutil, warnings
import accelerate.scheduler, diffusers, lightning.pytorch, peft, torch, torchmetrics, transformers
before = list(warnings.filters)
import sp_grpo
for module in pkgutil.walk_packages(sp_grpo.__path__, "sp_grpo."):
    importlib.import_module(module.name)
added = [f for f in warnings.filters if f not in before]
removed = [f for f in before if f not in warnings.filters]
print("added", added, "removed", removed)
raise SystemExit(1 if added or removed else 0)
"""


def test_importing_sp_grpo_leaves_the_warning_filters_unchanged():
    result = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
