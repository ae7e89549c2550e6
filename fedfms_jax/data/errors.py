"""The one exception the data layer raises for missing or unreadable input files."""


class DataError(RuntimeError):
    """A dataset's files are missing, incomplete or unreadable.

    The message is one line naming the file (or the expected layout) and where the data
    can be obtained, so it can be shown to a user as is.
    """
