"""The exception every failed call raises."""


class PsError(Exception):
    """A call to the parameter servers failed, or was refused before it was sent.

    Attributes:
        code: the gRPC status name, e.g. ``"INVALID_ARGUMENT"``,
            ``"NOT_FOUND"``, ``"UNAVAILABLE"``, ``"RESOURCE_EXHAUSTED"``.
        message: what was wrong, in the caller's terms.
    """

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
