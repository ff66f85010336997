"""A finished run as ``sp-grpo export`` and ``sp-grpo sample`` see it: its config, checkpoint and output folder.

:func:`load_trained_policy` builds the run's generator from the same YAML that ``sp-grpo fit`` read (or
the ``config.yaml`` it saved beside its logs) and loads the trained weights of a Lightning checkpoint
into it: the EMA weights when the run used Lightning's ``EMAWeightAveraging``, unless asked otherwise.
Only the policy is built: rewards, data and the Trainer are not needed to look at or ship a generator,
and a config written for 8 GPUs still loads on a laptop.

Every check runs before anything is written. :func:`replace_folder` then writes an output folder
next to its target and renames it into place, so a failure half-way leaves an existing folder as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from sp_grpo.checkpoint import CheckpointError
from sp_grpo.module import ITERATION_KEY
from sp_grpo.rollout import DenoisingConfig

WeightsChoice = Literal["auto", "ema", "current"]
_WEIGHTS = ("auto", "ema", "current")


class RunInputError(ValueError):
    """A bad command-line input of ``sp-grpo export`` / ``sample``: a missing file, an occupied folder, no prompts."""


@dataclass
class TrainedPolicy:
    """A run's generator with its trained weights loaded, and what a report about it needs.

    Attributes:
        policy: The generator, in eval mode, on the CPU.
        sampler: The run's ``model.sampler`` settings.
        config_path: The YAML it was built from.
        config: The parsed ``fit`` config (a jsonargparse namespace).
        checkpoint_path: The checkpoint its weights came from; ``None`` for the untrained base model.
        weights: ``"ema"`` (the checkpoint's averaged weights), ``"current"`` (the live weights) or
            ``"base"`` (no checkpoint).
        global_step: Optimizer steps the checkpoint was trained for (0 for the base model).
        iterations: GRPO iterations the module counted (``global_step`` divided by the optimizer steps per
            iteration for checkpoints that predate the count).
    """

    policy: nn.Module
    sampler: DenoisingConfig
    config_path: Path
    config: Any
    checkpoint_path: Path | None
    weights: str
    global_step: int
    iterations: int

    @property
    def policy_config(self) -> dict[str, Any]:
        """``model.policy`` of the config as a plain dict (``class_path`` and ``init_args``)."""
        return _to_dict(self.config.model.policy)


def load_run_config(config_path: str | os.PathLike) -> Any:
    """Parse a run's YAML the way ``sp-grpo fit --config`` does, without instantiating anything.

    Relative paths inside it (``rewards: rewards/model_free.yaml``) resolve against the file, as in
    ``fit``. The ``config.yaml`` that ``fit`` saves in its log folder parses too.

    Args:
        config_path: The YAML file.

    Returns:
        The ``fit`` subcommand's namespace (``.model``, ``.trainer``, ``.data``).

    Raises:
        RunInputError: If the file does not exist or does not parse as an ``sp-grpo fit`` config.
    """
    path = Path(config_path)
    if not path.is_file():
        raise RunInputError(
            f"`--config` ({str(config_path)!r}) does not exist: pass the YAML the run was trained with (e.g."
            " configs/demo.yaml) or the config.yaml that `sp-grpo fit` saved in its log folder."
        )
    from lightning.pytorch.cli import LightningCLI

    from sp_grpo.data.prompts import PromptDataModule
    from sp_grpo.module import SelfPacedGRPO

    class _ParseOnly(LightningCLI):
        # LightningCLI's own parser (and so the same checks and path resolution as `fit`), nothing built.
        def instantiate_classes(self) -> None:
            pass

        def _run_subcommand(self, subcommand: str) -> None:
            pass

    try:
        with warnings.catch_warnings():
            # LightningCLI warns when given `args` while sys.argv holds others: here they are `export`/`sample`'s own.
            warnings.filterwarnings("ignore", message=r".*args parameter is intended to run from within Python.*")
            cli = _ParseOnly(
                SelfPacedGRPO,
                PromptDataModule,
                args=["fit", "--config", str(path)],
                seed_everything_default=0,
                auto_configure_optimizers=False,
                parser_kwargs={"exit_on_error": False},
            )
    except Exception as err:  # jsonargparse raises several types; all mean the same to the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunInputError(
            f"`--config` ({str(config_path)!r}) is not an `sp-grpo fit` config: {first[:300]}. Pass the YAML the run"
            " was trained with."
        ) from err
    return cli.config["fit"]


def build_policy(config: Any) -> nn.Module:
    """Instantiate ``model.policy`` of a parsed config, and nothing else.

    Args:
        config: A namespace from :func:`load_run_config`.

    Returns:
        The policy, as ``fit`` would build it before training (LoRA adapters at their initial
        values, which leave the base model unchanged).
    """
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--policy", type=nn.Module)
    parsed = parser.parse_object({"policy": _to_dict(config.model.policy)})
    return parser.instantiate_classes(parsed).policy


def run_sampler(config: Any) -> DenoisingConfig:
    """``model.sampler`` of a parsed config as a :class:`~sp_grpo.rollout.DenoisingConfig`."""
    sampler = _to_dict(config.model.sampler)
    fields = {field.name for field in dataclasses.fields(DenoisingConfig)}
    return DenoisingConfig(**{key: value for key, value in sampler.items() if key in fields})


def read_checkpoint(path: str | os.PathLike) -> Mapping[str, Any]:
    """Read a Lightning checkpoint file written by ``sp-grpo fit``, tensors memory-mapped.

    Raises:
        CheckpointError: If it does not exist, is a sharded folder, cannot be read, or is not a
            Lightning checkpoint; the message names ``--ckpt``.
    """
    file = Path(path)
    if file.is_dir():
        raise CheckpointError(
            f"`--ckpt` ({str(path)!r}) is a folder (a sharded FSDP checkpoint): consolidate it into one file first with"
            f" `python -m lightning.pytorch.utilities.consolidate_checkpoint {path}` and pass the .consolidated file."
        )
    if not file.is_file():
        raise CheckpointError(
            f"`--ckpt` ({str(path)!r}) does not exist: pass a checkpoint file written by `sp-grpo fit` (e.g."
            " runs/<run>/checkpoints/last.ckpt), or leave `--ckpt` out to use the untrained base model."
        )
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"`--ckpt` ({str(path)!r}) cannot be read as a torch checkpoint ({first[:160]}): it is truncated, corrupt"
            " or not a checkpoint. Pass a file written by `sp-grpo fit`."
        ) from err
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint or "global_step" not in checkpoint:
        raise CheckpointError(
            f"`--ckpt` ({str(path)!r}) is not a Lightning training checkpoint (no 'state_dict'/'global_step'): pass a"
            " file written by `sp-grpo fit`, e.g. runs/<run>/checkpoints/last.ckpt."
        )
    return checkpoint


def policy_weights(checkpoint: Mapping[str, Any], weights: WeightsChoice, path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """The policy's weights in a checkpoint: its EMA average or its live (current) weights.

    Lightning's ``EMAWeightAveraging`` saves the average under ``state_dict`` and the live weights
    under ``current_model_state``; without it ``state_dict`` holds the live weights.

    Args:
        checkpoint: A checkpoint from :func:`read_checkpoint`.
        weights: ``"auto"`` (EMA when the checkpoint has it), ``"ema"`` or ``"current"``.
        path: The checkpoint's path, for messages.

    Returns:
        The ``policy.``-prefixed entries without the prefix, and which weights they are
        (``"ema"`` or ``"current"``).

    Raises:
        RunInputError: If ``weights`` is not an allowed value, or ``"ema"`` is asked of a checkpoint without EMA.
    """
    if weights not in _WEIGHTS:
        raise RunInputError(f"`--weights` ({weights!r}) must be one of {list(_WEIGHTS)}.")
    has_ema = "current_model_state" in checkpoint
    if weights == "ema" and not has_ema:
        raise RunInputError(
            f"`--weights ema`: checkpoint {str(path)!r} holds no EMA weights (its run had no EMAWeightAveraging"
            " callback): pass `--weights current` or `auto`."
        )
    use_ema = has_ema and weights != "current"
    state = checkpoint["state_dict"] if use_ema or not has_ema else checkpoint["current_model_state"]
    prefix = "policy."
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}, ("ema" if use_ema else "current")


def check_fits(state: Mapping[str, torch.Tensor], policy: nn.Module, ckpt: str | os.PathLike, config: str | os.PathLike) -> None:
    """Check that a checkpoint's policy weights are exactly the trainable weights ``policy`` expects.

    Raises:
        CheckpointError: With the counts and an example of missing, unexpected and reshaped weights.
    """
    expected = policy.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    reshaped = [
        f"{key} {tuple(state[key].shape)} vs {tuple(expected[key].shape)}"
        for key in sorted(expected.keys() & state.keys())
        if tuple(state[key].shape) != tuple(expected[key].shape)
    ]
    if missing or unexpected or reshaped:
        problems = [f"{len(missing)} weights missing (e.g. {missing[0]})"] if missing else []
        problems += [f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else []
        problems += [f"{len(reshaped)} of another shape (e.g. {reshaped[0]})"] if reshaped else []
        raise CheckpointError(
            f"`--ckpt` ({str(ckpt)!r}) was written by another run than `--config` ({str(config)!r}) describes:"
            f" {'; '.join(problems)}. Pass the config that trained it (the run's log folder holds it as config.yaml)."
        )


def load_trained_policy(
    config_path: str | os.PathLike, checkpoint_path: str | os.PathLike | None = None, weights: WeightsChoice = "auto"
) -> TrainedPolicy:
    """Build a run's policy and load a checkpoint's trained weights into it.

    Args:
        config_path: The run's YAML.
        checkpoint_path: A checkpoint written by ``sp-grpo fit``; ``None`` keeps the base model.
        weights: Which weights of the checkpoint: ``"auto"`` (EMA if the run averaged), ``"ema"``,
            ``"current"``.

    Returns:
        The :class:`TrainedPolicy`, in eval mode.

    Raises:
        RunInputError: If the config is missing or invalid, or ``weights`` does not fit the checkpoint.
        CheckpointError: If the checkpoint is missing, unreadable, or from another run.
    """
    config = load_run_config(config_path)
    checkpoint = read_checkpoint(checkpoint_path) if checkpoint_path is not None else None
    if checkpoint is None and weights == "ema":
        raise RunInputError("`--weights ema` needs a checkpoint: pass `--ckpt`, or leave `--weights` at auto for the base model.")
    policy = build_policy(config)
    per_iteration = max(int(config.model.num_inner_epochs) * int(config.model.num_minibatches), 1)
    global_step, iterations, used = 0, 0, "base"
    if checkpoint is not None:
        state, used = policy_weights(checkpoint, weights, checkpoint_path)
        check_fits(state, policy, checkpoint_path, config_path)
        policy.load_state_dict(state, strict=True)
        global_step = int(checkpoint["global_step"])
        # The module counts its iterations (a skipped minibatch takes no optimizer step); older
        # checkpoints have no count.
        iterations = int(checkpoint.get(ITERATION_KEY, global_step // per_iteration))
    return TrainedPolicy(
        policy=policy.eval(),
        sampler=run_sampler(config),
        config_path=Path(config_path),
        config=config,
        checkpoint_path=None if checkpoint_path is None else Path(checkpoint_path),
        weights=used,
        global_step=global_step,
        iterations=iterations,
    )


def check_output_folder(
    out: str | os.PathLike, overwrite: bool, inputs: dict[str, str | os.PathLike | None] | None = None
) -> Path:
    """Refuse an output path that is a file, an existing non-empty folder unless ``overwrite``, or a
    folder that holds one of the inputs (replacing it would delete the run being read).

    Args:
        out: The ``--out`` folder.
        overwrite: Whether ``--overwrite`` was given.
        inputs: Flag name -> input path (e.g. ``{"--ckpt": ...}``); ``None`` values are skipped.

    Raises:
        RunInputError: Naming ``--out`` and ``--overwrite`` (or the input it would delete).
    """
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise RunInputError(f"`--out` ({str(out)!r}) is a file, not a folder: choose a folder path.")
    target = folder.resolve()
    for flag, path in (inputs or {}).items():
        if path is not None and target in (Path(path).resolve(), *Path(path).resolve().parents):
            raise RunInputError(
                f"`--out` ({str(out)!r}) contains `{flag}` ({str(path)!r}); writing there would replace the run being "
                "read: choose an --out folder outside it."
            )
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise RunInputError(
            f"`--out` ({str(out)!r}) exists and is not empty: choose a new folder, or pass `--overwrite` to replace"
            " its contents."
        )
    return folder


@contextlib.contextmanager
def replace_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Write a folder in a sibling temporary folder, then put it in place of ``out`` in one step.

    Yields the temporary folder. On success an existing ``out`` is replaced by it (check
    :func:`check_output_folder` first); on an exception the temporary folder is removed and ``out``
    is left as it was.
    """
    target = Path(out).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's folder is private; the result should be an ordinary folder
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


def _to_dict(value: Any) -> Any:
    """A jsonargparse namespace (possibly nested) as plain dicts and lists."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if isinstance(value, Mapping):
        return {key: _to_dict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_dict(item) for item in value]
    return value


__all__ = [
    "RunInputError",
    "TrainedPolicy",
    "WeightsChoice",
    "build_policy",
    "check_fits",
    "check_output_folder",
    "load_run_config",
    "load_trained_policy",
    "policy_weights",
    "read_checkpoint",
    "replace_folder",
    "run_sampler",
]
