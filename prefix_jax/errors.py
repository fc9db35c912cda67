"""The one exception type for mistakes a user can make (bad flag, file, data row, checkpoint).

`main` turns it into a single line on stderr and exit status 2; everything else is a bug and keeps
its traceback. Messages name the thing that is wrong and how to fix it.
"""


class UserError(Exception):
    """A problem in the user's input, reported as one line and exit status 2."""
