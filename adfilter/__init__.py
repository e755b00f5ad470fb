"""adfilter: finds advertising and spam in user-generated posts and blocks it."""

__version__ = "0.1.0"
