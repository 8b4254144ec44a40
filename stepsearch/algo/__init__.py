"""stepsearch.algo."""
