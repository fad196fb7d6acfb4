"""One exception type for every problem a user can fix; the CLI prints it as one line and exits 2."""


class FrugalError(Exception):
    """A user-facing error: bad input, bad option, a file that cannot be used."""
