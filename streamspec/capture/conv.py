"""Layer family: conv (work in progress)."""
