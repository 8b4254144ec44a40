"""stepsearch.rewards."""
