"""Statistics over recorded steps: streaming Welch t-tests between groups of samples."""

from streamspec.stats.welch import GroupWelch, Welford, welch_t_test

__all__ = ["GroupWelch", "Welford", "welch_t_test"]
