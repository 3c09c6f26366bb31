"""clip-supervisor's master: process management, signals, recovery, daemon, CLI."""

__version__ = "0.1.0"
