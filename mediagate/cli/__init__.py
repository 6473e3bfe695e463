"""The `mediagate` command."""
