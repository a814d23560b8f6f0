"""The model registry: the aliases export sets, and `models:/` URIs resolved to a local ONNX file.

Aliases (set by `MlflowTracker.log_onnx_model` on the version it registers)
    `challenger`: every export moves it to the version it registered (the newest student);
    `champion`: set by export only while the registered model has none (its first version), then
    moved only by a person: `MlflowClient().set_registered_model_alias("sharpkd-student",
    "champion", "4")` or the MLflow UI. (`latest` is MLflow's own word: `models:/<name>/latest`
    is the newest version.)
    Each version is tagged with the sha256 of its ONNX file (`sharpkd.onnx_sha256`), git.commit
    and dvc.exp_name.

Resolving `models:/<name>/<version>`, `models:/<name>/latest` and `models:/<name>@<alias>`
    The store is the project's (tracking/store.py: tracking.uri of the project's params.yaml, else
    $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the project root); a missing SQLite file is
    an error, never a new empty store. The version's ONNX file (its `onnx` flavor) is downloaded
    into $SHARPKD_MODELS_DIR (default ~/.cache/sharpkd/models)/<name>/<version>/, atomically, and
    reused while its sha256 matches the version's tag (a version without the tag, registered
    before it existed, is downloaded again each time). Anything missing is a UserError naming the
    URI and the store. The version's MLmodel is read as untrusted (docs/reliability.md, round 4): at
    most MLMODEL_MAX_BYTES, through config's strict YAML reader, and its ONNX file must be a relative
    path inside the model folder (no `..`, no absolute path or URI, no link out of a local folder).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import urllib.parse
from pathlib import Path, PurePosixPath

from sharpkd.errors import UserError
from sharpkd.tracking.store import Store, project_root, resolve_store, unreachable

CHALLENGER = "challenger"
CHAMPION = "champion"
SHA_TAG = "sharpkd.onnx_sha256"
MLMODEL_MAX_BYTES = 2**20  # an MLmodel file is a few KB
_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[\w\-]+))/?")


def tag_new_version(client, name: str, version: str, onnx_path: str | Path, tags: dict[str, str]) -> None:
    """Tags and aliases of a version export just registered (`client`: an MlflowClient)."""
    from sharpkd.fetch import file_digest

    for key, value in {SHA_TAG: file_digest(onnx_path), **tags}.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, version)
    if CHAMPION not in client.get_registered_model(name).aliases:
        client.set_registered_model_alias(name, CHAMPION, version)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, version, alias) of a models:/ URI; version is digits or 'latest'."""
    m = _URI.fullmatch(uri)
    if m is None or not (m["alias"] or m["version"].isdigit() or m["version"].lower() == "latest"):
        raise UserError(
            f"{uri}: not a registry model URI; use models:/<name>/<version>, models:/<name>/latest "
            "or models:/<name>@<alias> (e.g. models:/sharpkd-student@champion)"
        )
    return m["name"], m["version"], m["alias"]


def models_dir() -> Path:
    return Path(
        os.environ.get("SHARPKD_MODELS_DIR") or Path.home() / ".cache" / "sharpkd" / "models"
    ).expanduser()


def project_store() -> Store:
    """The project's tracking store, as the stages write it (tracking.uri of params.yaml when valid)."""
    from sharpkd.config import load_params

    params_yaml = project_root() / "params.yaml"
    tracking = None
    if params_yaml.is_file():
        with contextlib.suppress(UserError):
            tracking = load_params(params_yaml).tracking
    return resolve_store(tracking)


def _open(uri: str, store: Store):
    """A client of `store`; UserError when there is no such store or it does not answer."""
    from sharpkd.tracking.store import LockedClient

    where = f"{uri}: the MLflow store {store.uri}"
    if store.lock_path is not None:
        db = Path(store.uri[len("sqlite:///") :].partition("?")[0])
        if not db.is_file():
            raise UserError(
                f"{where} does not exist (run the pipeline, or point tracking.uri / MLFLOW_TRACKING_URI "
                "at the store that holds the model)"
            )
    elif (why := unreachable(store)) is not None:
        raise UserError(f"{where} cannot be reached ({why})")
    try:
        return LockedClient(store)
    except UserError as exc:  # an empty or corrupt SQLite file
        raise UserError(f"{uri}: {exc}") from None
    except Exception as exc:
        raise UserError(f"{where} cannot be opened ({exc})") from None


def _known(client, name: str) -> str:
    """What the registry holds under `name`, for an error message."""
    try:
        model = client.get_registered_model(name)
    except Exception:
        names = sorted(m.name for m in client.search_registered_models(max_results=50))
        return f"no registered model '{name}' (registered: {', '.join(names) or 'none'})"
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    aliases = ", ".join(f"@{a} -> {v}" for a, v in sorted(model.aliases.items()))
    return f"'{name}' has versions {', '.join(map(str, versions)) or 'none'}" + (
        f" and aliases {aliases}" if aliases else ""
    )


def _model_version(client, name: str, version: str | None, alias: str | None):
    """The registered version the URI names, or None when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        if alias:
            return client.get_model_version_by_alias(name, alias)
        if version.lower() != "latest":
            return client.get_model_version(name, version)
        found = client.search_model_versions(f"name = '{name}'")
        return max(found, key=lambda v: int(v.version)) if found else None
    except MlflowException as exc:
        # A missing alias is INVALID_PARAMETER_VALUE, a missing name or version RESOURCE_DOES_NOT_EXIST.
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        return None


def _local_folder(model_uri: str) -> Path | None:
    """The model folder on this machine when `model_uri` is a local one (file:// or a path), else None."""
    if model_uri.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(model_uri).path))
    return Path(model_uri) if model_uri.startswith("/") else None


def _checked_entry(data: object, model_uri: str) -> str:
    """`flavors.onnx.data` when it names a file inside the model folder; UserError otherwise."""
    rel = PurePosixPath(data) if isinstance(data, str) else None
    if (
        rel is None
        or rel.is_absolute()
        or ".." in rel.parts
        or rel.name in ("", ".")
        or "\\" in data
        or ":" in data
    ):
        raise UserError(
            f"the registered model's MLmodel names its ONNX file {data!r}: not a file inside the model folder; "
            "refused"
        )
    local = _local_folder(model_uri)
    if local is not None and not (local / rel).resolve().is_relative_to(local.resolve()):
        raise UserError(
            f"the registered model's ONNX file {data!r} is a link out of the model folder {local}; refused"
        )
    return rel.as_posix()


def _onnx_entry(client, store: Store, model_uri: str, tmp: Path) -> str:
    """The ONNX file's path inside the model folder at `model_uri` (its `onnx` flavor), checked."""
    import yaml
    from mlflow.artifacts import download_artifacts

    from sharpkd.config import load_yaml_text

    mlmodel = Path(
        download_artifacts(artifact_uri=f"{model_uri}/MLmodel", dst_path=str(tmp), tracking_uri=store.uri)
    )
    if mlmodel.stat().st_size > MLMODEL_MAX_BYTES:
        raise UserError(f"the registered model's MLmodel is over {MLMODEL_MAX_BYTES} bytes; refused")
    try:
        meta = load_yaml_text(mlmodel.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:  # YamlRefused too (a duplicate key, a billion laughs)
        raise UserError(f"the registered model's MLmodel cannot be read ({exc})") from None
    flavors = meta.get("flavors") if isinstance(meta, dict) else None
    flavors = flavors if isinstance(flavors, dict) else {}
    onnx = flavors.get("onnx")
    data = onnx.get("data") if isinstance(onnx, dict) else None
    if not data:
        raise UserError(
            f"the registered model has no ONNX file (flavors: {', '.join(map(str, flavors)) or 'none'})"
        )
    return _checked_entry(data, model_uri)


@contextlib.contextmanager
def _no_progress_bars():
    """MLflow draws a progress bar for every artifact it downloads; a one-file fetch needs none."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _download(client, store: Store, mv, dest_dir: Path) -> Path:
    """The version's ONNX file in `dest_dir`: the cached copy when its hash is the registered one."""
    from mlflow.artifacts import download_artifacts

    from sharpkd.fetch import file_digest
    from sharpkd.files import atomic_path

    model_uri = client.get_model_version_download_uri(mv.name, mv.version)
    want = mv.tags.get(SHA_TAG)
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest_dir) as tmp:
        entry = _onnx_entry(client, store, model_uri, Path(tmp))
        dest = dest_dir / Path(entry).name
        if want and dest.is_file() and file_digest(dest) == want:
            return dest
        got = Path(
            download_artifacts(artifact_uri=f"{model_uri}/{entry}", dst_path=tmp, tracking_uri=store.uri)
        )
        if want and file_digest(got) != want:
            raise UserError(f"the downloaded {entry} does not have the registered sha256 {want}")
        with atomic_path(dest) as part:
            os.replace(got, part)
    return dest


def fetch_model(uri: str, store: Store | None = None) -> Path:
    """The local ONNX file of a `models:/` URI (see the module docstring)."""
    name, version, alias = parse_model_uri(uri)
    store = store or project_store()
    client = _open(uri, store)
    try:
        mv = _model_version(client, name, version, alias)
        if mv is None:
            raise UserError(f"{uri}: not in the MLflow store {store.uri}: {_known(client, name)}")
        folder = models_dir() / re.sub(r"[^\w.\-]", "_", name).lstrip(".") / str(mv.version)
        with _no_progress_bars():
            return _download(client, store, mv, folder)
    except UserError as exc:
        if str(exc).startswith(uri):
            raise
        raise UserError(f"{uri} (in the MLflow store {store.uri}): {exc}") from None
    except Exception as exc:  # MLflow and HTTP errors: one line, naming the URI and the store
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{uri}: cannot be read from the MLflow store {store.uri} ({first})") from None
