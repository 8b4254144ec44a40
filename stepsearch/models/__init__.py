"""stepsearch.models."""
