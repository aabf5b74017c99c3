"""The one error type users see. The CLI prints its message on one line, no traceback."""


class GptstackError(Exception):
    """A problem the user can fix: bad input, bad config, corrupt file."""


def where(path, line=None, field=None) -> str:
    """'file:line: field' prefix for error messages about records."""
    out = str(path)
    if line is not None:
        out += f":{line}"
    if field is not None:
        out += f": field '{field}'"
    return out
