"""stepsearch.rollout."""
