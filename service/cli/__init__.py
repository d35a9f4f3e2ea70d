"""The `personalize` command: settings, the launcher of each role, local cluster supervision and the
embedded Valkey of `personalize up`."""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """The console script's entry point (imported lazily so that `personalize_service.cli.settings` stays light)."""
    from personalize_service.cli.commands import main as run

    return run(argv)
