"""stepsearch.retrieval."""
