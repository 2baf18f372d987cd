"""The one exception for what a person must fix: a file, an option or the data.

Its message is one line that names the file or option, what was found and the fix; entry
points print it without a traceback (:func:`cellseg.cli.one_line_errors`). Every other
exception is a bug or a library's failure and keeps its traceback.
"""


class UserError(ValueError):
    """A problem the user fixes (a ValueError, so that callers catching those still do)."""
