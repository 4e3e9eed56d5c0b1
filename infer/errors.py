"""The root of idc's own exceptions. Every error idc raises on purpose derives from IdcError (and keeps its
older base, ValueError or RuntimeError, so existing handlers still catch it); commands catch the specific
classes and turn them into usage errors (exit 2) or failures (exit 1) with a message, never a traceback.
The exit codes every idc command shares are here too; a command adds its own above them (idc-export's 3)."""

EXIT_OK = 0
EXIT_FAILED = 1  # the work could not be done (patches not scored under --strict, a full disk, a failed gate)
EXIT_USAGE = 2  # click's own code for a usage error: a bad path, model or option
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports SIGINT


class IdcError(Exception):
    """An error idc raises on purpose, with a message meant for the user."""
