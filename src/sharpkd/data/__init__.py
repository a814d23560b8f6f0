"""Data: where HR images come from (sources), how they are degraded (degradation), training batches (datasets)."""
