"""lmflax.evaluate: metrics that aggregate exactly across batches and hosts (`metrics`)."""
