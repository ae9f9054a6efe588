"""Length bucketing: boundaries, batch sizes, the epoch schedule and batch assembly (numpy only)."""
