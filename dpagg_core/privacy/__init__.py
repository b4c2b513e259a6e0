"""The guarantee: privacy plans and their epsilon (accountant, calibration), the Gaussian mean
(mechanism), what a dataset has spent (composition) and the ledger that records it (request_keys,
ledger, ledger_store), plus the empirical audit."""
