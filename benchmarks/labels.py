"""Names the harness writes into its results and the report reads back (the report imports this,
not the harness, so the two modules import one way)."""

BASELINE = "none"
"""The method every speed-up is measured against: no speculation."""
ALL_DATASETS = "all"
"""The pooled row of the unrelated prompt sets."""
