"""What every `mediagate` command shares: its one-line error, the home folder and the
state store it names."""

from __future__ import annotations

from mediagate.settings import HomeLayout, get_settings, state_config
from mediagate.stores import StateConfig


class CommandError(Exception):
    """A failure to report in one line, with exit status 1."""


def _layout() -> HomeLayout:
    return HomeLayout(get_settings().home_dir)


def _state() -> StateConfig:
    return state_config(get_settings(), _layout())
