"""Names the harness writes into its results and the report reads back (the report imports this,
not the harness, so the two modules import one way)."""

BASELINE = "none"
"""The method every speed-up is measured against: no speculation."""
CONTROL = "none-control"
"""A second engine without speculation, measured like every method (an A/A control): its ratio
to `none` is what the run cannot tell from 1.00."""
ALL_DATASETS = "all"
"""The pooled row of the unrelated prompt sets."""
