"""The one exception type for user mistakes.

A `DistilError` carries a message written for the person at the keyboard: what is wrong and how
to fix it. The command line prints it as one paragraph and exits non-zero, with no traceback.
Everything else that escapes is a bug and keeps its traceback.
"""


class DistilError(Exception):
    """A problem with the user's input or environment, explained in plain words."""
