"""What every `mediagate` command shares: its one-line error and the home folder."""

from __future__ import annotations

from mediagate.settings import HomeLayout, get_settings


class CommandError(Exception):
    """A failure to report in one line, with exit status 1."""


def _layout() -> HomeLayout:
    return HomeLayout(get_settings().home_dir)
