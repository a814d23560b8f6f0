"""User-facing errors: printed as one clear message, never as a traceback."""


class UserError(Exception):
    """Bad input or a missing file the user can fix; the message says what and where."""


def load_error(exc: BaseException) -> str:
    """Why torch.load(weights_only=True) refused a file, in a few words (its messages run to pages
    and, for a file holding code, suggest loading it unsafely)."""
    text = str(exc).strip()
    if not text:
        return f"{type(exc).__name__}: empty or truncated file"
    if text.startswith("Weights only load failed"):
        return "it holds Python objects besides tensors; these are never loaded, as they could run code"
    # The first sentence: torch goes on about miniz internals and issue trackers.
    return text.splitlines()[0].split(". ")[0][:200]
