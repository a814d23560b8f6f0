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


def brief(text: str, limit: int = 120) -> str:
    """`text` as a short reason kept in outputs (eval.json, the model card, MLflow params): its first non-empty
    line, spaces collapsed, and if still longer than `limit`, cut at a word boundary with "...", never mid-word."""
    line = next((s for s in (" ".join(raw.split()) for raw in text.splitlines()) if s), "")
    if len(line) <= limit:
        return line
    cut = line[: limit - 3].rsplit(" ", 1)[0].rstrip(" ,;:(")
    return cut + "..."
