"""``python -m dpagg_core.cli`` (and ``torchrun -m dpagg_core.cli``): the ``dpagg`` command."""

from dpagg_core.cli.parser import main

if __name__ == "__main__":
    raise SystemExit(main())
