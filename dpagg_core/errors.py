"""Errors raised by dpagg. Every message names the offending input and how to fix it."""


class DpaggError(ValueError):
    """Bad input or a refused request. Raised before any privacy budget is spent."""


class BudgetExceeded(DpaggError):
    """The release would exceed the dataset's privacy budget; no noise was drawn."""


class LedgerError(DpaggError):
    """The ledger file is unusable (corrupt, locked, read-only); no release was made."""
