"""The demo that ``make demo`` runs: a bank on a local cluster."""
