"""Errors meant for users: their message says what is wrong and how to fix it."""


class LivediffError(Exception):
    """An error whose message is shown to the user as is (no stack trace)."""


class ConfigError(LivediffError, ValueError):
    """A setting is out of range or inconsistent; the message names the setting."""


class ModelLoadError(LivediffError):
    """A model could not be loaded; the message names the model and how to get it."""


class BackendUnavailable(LivediffError):
    """The requested backend cannot run on this host (missing package or device)."""
