"""Layer family: recurrent (work in progress)."""
