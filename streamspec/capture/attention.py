"""Layer family: attention (work in progress)."""
