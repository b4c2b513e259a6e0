"""The ``dpagg`` command: account, aggregate, train, run, demo, audit, ledger, inspect.

Every command takes ``--json`` (machine-readable output on stdout). Errors are one line on stderr
naming the offending parameter and the fix, with exit status 2; nothing is spent on bad input.

The package: :mod:`~dpagg_core.cli.parser` (the parser and :func:`main`, the ``dpagg`` entry
point), :mod:`~dpagg_core.cli.common` (argument groups, flags -> plan / ledger / trainer /
release options, output), and the commands by group: :mod:`~dpagg_core.cli.release` (account,
aggregate, train, run), :mod:`~dpagg_core.cli.public` (suggest-clip-norm, public-basis),
:mod:`~dpagg_core.cli.records` (ledger, audit, inspect, demo). ``python -m dpagg_core.cli`` runs
:func:`main` (``__main__.py``).
"""

from __future__ import annotations

from dpagg_core.cli.parser import build_parser, main

__all__ = ["build_parser", "main"]
