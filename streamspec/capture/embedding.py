"""Layer family: embedding (work in progress)."""
