"""Which container image runs a target, and a Docker client that fails with a message saying what to do.

Images are built by ``python -m containers.build`` (see docs/containers.md), which records what it
built in ``containers/images.json``::

    {"cpu": {"image": "gpt2ops-cpu:0.1.0", "id": "sha256:...", "repo_digest": null, ...}, ...}

Lookup order for a target's image: the environment variable ``GPT2OPS_IMAGE_<TARGET>`` (e.g.
``GPT2OPS_IMAGE_CPU=registry.example.com/gpt2ops-cpu:0.1.0``), then the record file (path in
``GPT2OPS_IMAGES_FILE``, default ``containers/images.json`` of this checkout), then the tag the
build script gives (``gpt2ops-<target>:<version>``).
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from gpt2core.errors import Gpt2opsError
from gpt2core.platform.settings import settings

IMAGE_KINDS = ("cpu", "cuda", "cerebras")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES_FILE = REPO_ROOT / "containers" / "images.json"
BUILD_COMMAND = "python -m containers.build {target}"


class ImageError(Gpt2opsError):
    """A container image or the Docker daemon is missing; the message says how to get it."""


def package_version() -> str:
    try:
        return metadata.version("gpt2ops")
    except metadata.PackageNotFoundError:  # running from a checkout that was never pip-installed
        return "0.0.0"


def default_tag(target: str) -> str:
    return f"gpt2ops-{target}:{package_version()}"


def images_file() -> Path:
    return settings().images_file or DEFAULT_IMAGES_FILE


def read_records(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """The build records, {} when nothing was built yet."""
    path = path or images_file()
    if not path.exists():
        return {}
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ImageError(f"{path} is not valid JSON ({exc}); delete it and rebuild the images "
                         f"with `python -m containers.build`") from exc
    if not isinstance(records, dict):
        raise ImageError(f"{path} must hold a JSON object target -> record; delete it and rebuild")
    return records


def image_for(target: str = "cpu") -> str:
    """The image reference that runs ``target`` (not checked against any daemon or registry)."""
    if target not in IMAGE_KINDS:
        raise ImageError(f"unknown image target {target!r}; expected one of {', '.join(IMAGE_KINDS)}")
    from_env = settings().image(target)
    if from_env:
        return from_env
    record = read_records().get(target)
    if record and record.get("image"):
        return str(record["image"])
    return default_tag(target)


SOURCE_LABEL = "io.gpt2ops.source-digest"
SOURCE_DIRS = ("gpt2core", "components", "pipelines", "configs")


def source_digest() -> str | None:
    """Digest of the code an image is built from, None outside a checkout (installed wheel).

    Steps of `gpt2ops run --runner docker` run the component code inside the image, so an image
    built before the last edit would run old code; build.py stamps this digest on the image.
    """
    if not (REPO_ROOT / "pyproject.toml").is_file():
        return None
    digest = hashlib.sha256()
    for folder in SOURCE_DIRS:
        for path in sorted((REPO_ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".yaml", ".json") and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def docker_client():
    """A connected ``docker.DockerClient``, or an ImageError saying how to start the daemon."""
    try:
        import docker
    except ImportError as exc:  # pragma: no cover - docker is a dependency of gpt2ops
        raise ImageError("the `docker` Python package is missing: pip install docker") from exc
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as exc:
        raise ImageError(
            f"cannot reach the Docker daemon at {host}: it is not running or not accessible. "
            "Start it (`sudo systemctl start docker`, or as root `dockerd &`), add yourself to the "
            "`docker` group, or point DOCKER_HOST at a running daemon."
        ) from exc
    return client


def require_image(image: str, target: str = "cpu", client=None, *,
                  current: bool = False) -> dict[str, Any]:
    """Inspect ``image`` in the local daemon; an ImageError with the build command if it is absent,
    or (``current=True``) if it was built from other sources than this checkout's."""
    import docker

    client = client or docker_client()
    build = BUILD_COMMAND.format(target=target)
    try:
        attrs = client.images.get(image).attrs
    except docker.errors.ImageNotFound:
        raise ImageError(
            f"image {image!r} is not in the local Docker daemon. Build it with `{build}` (from the "
            f"gpt2ops checkout), `docker pull` it from your registry, or name another one with "
            f"GPT2OPS_IMAGE_{target.upper()}."
        ) from None
    built_from = (attrs.get("Config", {}).get("Labels") or {}).get(SOURCE_LABEL)
    checkout = source_digest()
    if current and built_from and checkout and built_from != checkout:
        raise ImageError(
            f"image {image!r} was built from other sources than this checkout (digest {built_from}, "
            f"checkout {checkout}): its steps would run old code. Rebuild it with `{build}` (about "
            "a minute after a source change).")
    return attrs
