"""The one exception the data layer raises for missing or unreadable input files."""


class DataError(RuntimeError):
    """A dataset's files are missing, incomplete or unreadable.

    The message is one line naming the file (or the expected layout) and where the data
    can be obtained, so it can be shown to a user as is. `message` keeps that line even
    when a framework adds context to the exception's text.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
