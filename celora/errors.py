"""User-facing errors: one line that names the field, file or package at fault."""


class CeloraError(Exception):
    """An error caused by user input (config, data, missing package, hostile payload).

    The CLI prints ``str(err)`` on one line and exits with a non-zero code, without a traceback.
    """
