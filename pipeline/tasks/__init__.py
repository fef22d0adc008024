"""Tasks: model + batch -> (loss, metrics)."""
