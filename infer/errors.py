"""The root of idc's own exceptions. Every error idc raises on purpose derives from IdcError (and keeps its
older base, ValueError or RuntimeError, so existing handlers still catch it); commands catch the specific
classes and turn them into usage errors (exit 2) or failures (exit 1) with a message, never a traceback."""


class IdcError(Exception):
    """An error idc raises on purpose, with a message meant for the user."""
