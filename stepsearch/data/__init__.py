"""stepsearch.data."""
