"""User-facing errors.

Every problem a user can fix (a bad flag, a missing model, a prompt that does not fit) is raised as a
`CeeGenError`, a `ValueError`, with one line that names the problem and the fix. The CLI prints that
line and exits with status 2; nothing from deep inside torch reaches the user.
"""


class CeeGenError(ValueError):
    """A problem with the user's input, with a one-line message that says how to fix it."""


class ModelLoadError(CeeGenError):
    """The model (or its tokenizer/config) could not be found, fetched or read."""


def one_line(err: object, limit: int = 200) -> str:
    """The first non-empty line of an exception (or message), shortened: errors we raise stay one line."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
