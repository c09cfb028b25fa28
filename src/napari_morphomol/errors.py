"""Errors about the user's input: the message says what is wrong and what to do."""


class InputError(ValueError):
    """Bad or unreadable user input; shown without a traceback by the CLI and the widgets."""
