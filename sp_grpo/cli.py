"""The ``sp-grpo`` command: LightningCLI's ``fit`` / ``validate`` plus ``score`` for a folder of videos.

Every setting is an ``__init__`` argument of :class:`~sp_grpo.SelfPacedGRPO`,
:class:`~sp_grpo.data.PromptDataModule`, a policy, a reward or a callback; LightningCLI reads the
typed signatures, so ``sp-grpo fit --help`` (and ``--model.help CLASS``) is the configuration
reference.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI


def cli_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the Lightning CLI.

    Args:
        args: Command-line arguments without the program name; ``None`` reads ``sys.argv``.
        run: Run the subcommand (``fit``, ``validate``); ``False`` only parses and instantiates.
    """
    from sp_grpo.data.prompts import PromptDataModule
    from sp_grpo.module import SelfPacedGRPO

    return LightningCLI(
        SelfPacedGRPO,
        PromptDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sp-grpo`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "score":
        from sp_grpo.scoring import score_main

        return score_main(args[1:])
    # Given no list, LightningCLI reads sys.argv itself (and warns when given both).
    cli_main(None if argv is None else args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
