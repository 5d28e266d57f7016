"""Build the gpt2ops container images (cpu, cuda, cerebras), offline if need be.

    python -m containers.build cpu                      # wheelhouse + base image + gpt2ops-cpu
    python -m containers.build cpu cuda --registry ghcr.io/acme --push
    python -m containers.build cuda --wheelhouse-only   # just collect the wheels (on a connected box)

Steps for each target:
1. Wheelhouses (``.build/containers/<environment>/wheelhouse``): every wheel the image installs,
   resolved and collected on the host with ``pip wheel`` (the package index is not reachable from
   inside a build); the image installs exactly these. An image has one main environment (``cpu`` or
   ``cuda``: gpt2ops with that torch build) and the cerebras image a second one, ``cerebras-sdk``
   (requirements/cerebras.txt in its own venv: the SDK pins torch 2.4 and protobuf 4, kfp needs
   protobuf 6). The dependency wheels are reused while their inputs (pyproject.toml, the
   requirements, the torch spec) are unchanged; the gpt2ops wheel is rebuilt every time.
2. Base image: ``--base-image auto`` (default) uses ``python:3.11-slim-bookworm`` when it is present
   or can be pulled, and otherwise a local Debian bookworm base (Python 3.11) made with debootstrap
   and ``docker import``. ``--base-image local`` forces the latter; any other value is used as is.
3. ``docker build`` of containers/Dockerfile, tagged ``[<registry>/]gpt2ops-<target>:<version>`` and
   ``:latest``, optionally pushed.
4. A smoke check in a container of the new image (gpt2ops, kfp and the right torch import; the
   cerebras image's SDK venv imports cerebras.pytorch), so a broken image is never recorded.
5. The record (tag, image id, repo digest, size, base, build time) is merged into
   ``containers/images.json``, which ``gpt2core.images.image_for`` reads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from gpt2core.images import (
    IMAGE_KINDS,
    ImageError,
    docker_client,
    images_file,
    package_version,
    read_records,
    source_digest,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CONTAINERS_DIR = REPO_ROOT / "containers"
BUILD_DIR = REPO_ROOT / ".build" / "containers"
IMAGE_PYTHON = (3, 11)  # the Python of every base image (and of Debian bookworm)
REGISTRY_BASE_IMAGE = "python:3.11-slim-bookworm"
LOCAL_BASE_IMAGE = "gpt2ops-base:bookworm-py3.11"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# What the local base needs beyond a minimal Debian: Python with venv/ensurepip and CA roots for S3.
DEBIAN_PACKAGES = ("python3", "python3-venv", "ca-certificates")

# The Python environments an image holds: its main venv (/opt/gpt2ops) and, for cerebras, the SDK's.
TARGET_ENVIRONMENTS = {"cpu": ("cpu", None), "cuda": ("cuda", None), "cerebras": ("cpu", "cerebras-sdk")}
SDK_PYTHON = "/opt/cerebras-sdk/bin/python"  # where the Dockerfile puts the SDK venv
# torch per environment: cpu and cuda replace the project's plain torch pin with a build of the
# same version; the SDK environment takes the torch its SDK pins (requirements/cerebras.txt).
DEFAULT_TORCH = {
    "cpu": ("torch==2.13.0+cpu", None),  # /opt/wheels or PIP_FIND_LINKS, else --torch-index-url
    # PyPI's Linux torch wheel is the CUDA build (its CUDA libraries come as nvidia-* wheels);
    # `!=+cpu` keeps pip off a CPU build of the same version in a find-links folder.
    "cuda": ("torch==2.13.0,!=2.13.0+cpu", None),
    "cerebras-sdk": (None, None),  # e.g. --torch-spec torch==2.4.0+cpu --torch-index-url .../whl/cpu
}
CEREBRAS_REQUIREMENTS = REPO_ROOT / "requirements" / "cerebras.txt"


def log(message: str) -> None:
    print(f"[containers.build] {message}", flush=True)


# ----------------------------------------------------------------------------------------------
# wheelhouse


def install_requirements(environment: str, torch_spec: str | None) -> str:
    """What pip resolves the environment's wheelhouse from (gpt2ops itself goes in with --no-deps)."""
    if environment == "cerebras-sdk":
        if not CEREBRAS_REQUIREMENTS.exists():
            raise ImageError(f"{CEREBRAS_REQUIREMENTS} is missing: the cerebras image installs the "
                             "Cerebras SDK environment it describes")
        # A torch spec may narrow the SDK's pin to a CPU build (torch==2.4.0+cpu): the appliance
        # does the compute, so the CUDA wheels PyPI's torch 2.4.0 brings (~2.5 GB) are dead weight.
        extra = f"{torch_spec}\n" if torch_spec else ""
        return CEREBRAS_REQUIREMENTS.read_text() + extra
    # The cpu image also serves MLflow in k8s/ (the `server` extra: its Postgres driver).
    extras = "[server]" if environment == "cpu" else ""
    lines = [f"gpt2ops{extras}=={package_version()}"]
    if torch_spec:
        lines.append(torch_spec)
    return "\n".join(lines) + "\n"


def pip_wheel(args: list[str], what: str, hint: str) -> None:
    command = [sys.executable, "-m", "pip", "wheel", "--disable-pip-version-check", *args]
    log(" ".join(command))
    if subprocess.run(command, cwd=REPO_ROOT).returncode != 0:
        raise ImageError(f"pip could not collect {what} (see pip's output above). {hint}")


def build_wheelhouse(environment: str, *, torch_spec: str | None, torch_index_url: str | None,
                     find_links: list[str], rebuild: bool) -> Path:
    """Collect every wheel of ``environment`` into .build/containers/<environment>/wheelhouse."""
    if sys.version_info[:2] != IMAGE_PYTHON:
        raise ImageError(
            f"run the build with Python {'.'.join(map(str, IMAGE_PYTHON))} (this is "
            f"{sys.version.split()[0]}): the wheelhouse is collected for the interpreter that runs "
            "it, and the images have Python 3.11. Use the project venv: .venv/bin/python -m containers.build")
    wheelhouse = BUILD_DIR / environment / "wheelhouse"
    requirements = install_requirements(environment, torch_spec)
    with_project = environment != "cerebras-sdk"  # the SDK venv gets the main wheelhouse's gpt2ops
    inputs = hashlib.sha256("\0".join([
        (REPO_ROOT / "pyproject.toml").read_text() if with_project else "", requirements,
        torch_index_url or "", *sorted(find_links)]).encode()).hexdigest()
    stamp = wheelhouse / ".inputs.sha256"
    fresh = not rebuild and stamp.exists() and stamp.read_text() == inputs
    sources = [arg for link in find_links for arg in ("--find-links", link)]
    if torch_index_url:
        sources += ["--extra-index-url", torch_index_url]
    hint = ("Check that the package index is reachable (or PIP_INDEX_URL / PIP_FIND_LINKS point at a "
            "mirror), or put the missing wheels in a folder and pass --find-links DIR.")
    if torch_spec:
        hint += (f" The {environment} environment needs {torch_spec}: download it where "
                 f"{torch_index_url or 'the package index'} is reachable "
                 "(pip download --no-deps TORCH_SPEC, with --index-url URL for another index) and "
                 "pass --find-links, or set --torch-index-url.")

    if not fresh:
        # Collected beside the old wheelhouse and swapped in when complete: a failed or interrupted
        # collection leaves the previous (possibly multi-GB) wheelhouse as it was.
        partial = wheelhouse.with_name("wheelhouse.partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        started = time.monotonic()
        (partial / "requirements.txt").write_text(requirements)
        try:
            pip_wheel([*sources, "--wheel-dir", str(partial), "-r", str(partial / "requirements.txt"),
                       *([str(REPO_ROOT)] if with_project else [])],
                      f"the wheels of the {environment} environment", hint)
            check_torch_build(environment, partial)
        except ImageError:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        shutil.rmtree(wheelhouse, ignore_errors=True)
        partial.rename(wheelhouse)
        log(f"wheelhouse for {environment}: {time.monotonic() - started:.0f} s")
    if with_project:  # rebuilt each time: the source changes far more often than the dependencies
        for old in wheelhouse.glob("gpt2ops-*.whl"):
            old.unlink()
        pip_wheel(["--no-deps", "--wheel-dir", str(wheelhouse), str(REPO_ROOT)], "the gpt2ops wheel",
                  "Check that the checkout builds: pip wheel --no-deps .")
    stamp.write_text(inputs)
    return wheelhouse


def check_torch_build(environment: str, wheelhouse: Path) -> None:
    """Fail early when a wheelhouse got the wrong torch build: a CUDA torch in cpu (gigabytes of
    nvidia-* wheels for nothing), a CPU torch in cuda (an image that cannot see a GPU)."""
    torch_wheels = [p.name for p in wheelhouse.glob("torch-*.whl")]
    retry = "then rebuild with --rebuild-wheelhouse."
    if environment == "cpu" and any("+cpu" not in name for name in torch_wheels):
        raise ImageError(
            f"the cpu wheelhouse got a torch that is not a CPU build ({torch_wheels[0]}). Pass "
            "--torch-index-url https://download.pytorch.org/whl/cpu or --find-links DIR with "
            f"torch-2.13.0+cpu, {retry}")
    cuda_runtime = list(wheelhouse.glob("nvidia_cuda_runtime*.whl"))
    if environment == "cuda" and (any("+cpu" in name for name in torch_wheels) or not cuda_runtime):
        raise ImageError(
            f"the cuda wheelhouse got no CUDA build of torch ({', '.join(torch_wheels) or 'no torch'}"
            ", no nvidia-cuda-runtime wheel). Pass --torch-spec with a CUDA build (e.g. "
            "torch==2.13.0+cu128 --torch-index-url https://download.pytorch.org/whl/cu128), "
            f"{retry}")


# ----------------------------------------------------------------------------------------------
# base image


def image_exists(client, reference: str) -> bool:
    import docker

    try:
        client.images.get(reference)
        return True
    except docker.errors.ImageNotFound:
        return False


def resolve_base_image(client, choice: str, *, rebuild_local: bool, mirror: str) -> str:
    import docker

    if choice == "local":
        return build_local_base(client, rebuild=rebuild_local, mirror=mirror)
    wanted = REGISTRY_BASE_IMAGE if choice == "auto" else choice
    if image_exists(client, wanted):
        return wanted
    try:
        log(f"pulling {wanted}")
        client.images.pull(wanted)
        return wanted
    except docker.errors.APIError as exc:
        reason = getattr(exc, "explanation", None) or str(exc)
        if choice != "auto":
            raise ImageError(f"base image {wanted!r} is neither local nor pullable ({reason}). "
                             "Pull or load it first, or pass --base-image local to build a Debian "
                             "bookworm base with debootstrap.") from exc
        log(f"cannot pull {wanted} ({reason}); using a local debootstrap base instead")
    return build_local_base(client, rebuild=rebuild_local, mirror=mirror)


def build_local_base(client, *, rebuild: bool, mirror: str) -> str:
    """Debian bookworm (Python 3.11) made with debootstrap and imported as LOCAL_BASE_IMAGE."""
    if image_exists(client, LOCAL_BASE_IMAGE) and not rebuild:
        log(f"reusing the local base image {LOCAL_BASE_IMAGE}")
        return LOCAL_BASE_IMAGE
    if shutil.which("debootstrap") is None:
        raise ImageError("no base image: the registry is unreachable and `debootstrap` is not "
                         "installed. Install it (apt-get install debootstrap) or load a Python 3.11 "
                         "image and pass --base-image IMAGE.")
    if os.geteuid() != 0:
        raise ImageError("debootstrap needs root to build the local base image: rerun the build as "
                         "root, or pass --base-image IMAGE with a Python 3.11 image you have.")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=BUILD_DIR, prefix="rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        command = ["debootstrap", "--variant=minbase", f"--include={','.join(DEBIAN_PACKAGES)}",
                   "bookworm", str(rootfs), mirror]
        log(" ".join(command))
        if subprocess.run(command).returncode != 0:
            raise ImageError(f"debootstrap failed (output above). Check that {mirror} is reachable or "
                             "pass --debian-mirror URL.")
        # Drop what a container never uses: package caches and lists, docs, man pages.
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc",
                         "usr/share/man", "usr/share/info"):
            shutil.rmtree(rootfs / leftover, ignore_errors=True)
        archive = Path(tmp) / "rootfs.tar"
        subprocess.run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(archive), "."], check=True)
        repository, tag = LOCAL_BASE_IMAGE.split(":")
        client.api.import_image_from_file(
            str(archive), repository=repository, tag=tag,
            changes=["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                     "ENV LANG=C.UTF-8", 'CMD ["/bin/bash"]'])
    log(f"local base image {LOCAL_BASE_IMAGE}: {time.monotonic() - started:.0f} s")
    return LOCAL_BASE_IMAGE


# ----------------------------------------------------------------------------------------------
# image


def build_image(client, target: str, *, wheelhouses: list[Path], base_image: str, tag: str) -> str:
    """docker build containers/Dockerfile in a context of exactly what the image needs."""
    context = BUILD_DIR / target / "context"
    if context.exists():
        shutil.rmtree(context)
    context.mkdir(parents=True)
    # The dependency wheels, the SDK's and the project wheel go into separate layers (see the
    # Dockerfile). Hard links keep gigabytes of wheels from being copied (else: copies).
    main, *sdk = wheelhouses
    folders = {"wheelhouse": main, "sdk-wheelhouse": sdk[0] if sdk else None}
    for folder in ("project", *folders):
        (context / folder).mkdir()
    for folder, wheelhouse in folders.items():
        for wheel in wheelhouse.glob("*.whl") if wheelhouse else ():
            project = wheel.name.startswith("gpt2ops-")
            _link_or_copy(str(wheel), str(context / ("project" if project else folder) / wheel.name))
    shutil.copytree(REPO_ROOT / "configs", context / "configs")
    for name in ("Dockerfile", "entrypoint.sh"):
        shutil.copy2(CONTAINERS_DIR / name, context / name)
    (context / "entrypoint.sh").chmod(0o755)

    log(f"docker build {tag} (base {base_image})")
    previous = client.images.get(tag).id if image_exists(client, tag) else None
    image_id = None
    buildargs = {"BASE_IMAGE": base_image, "TARGET": target, "VERSION": package_version(),
                 "CEREBRAS_PYTHON": SDK_PYTHON if sdk else "",
                 "SOURCE_DIGEST": source_digest() or "unknown"}
    for chunk in client.api.build(path=str(context), tag=tag, rm=True, forcerm=True, pull=False,
                                  buildargs=buildargs, decode=True):
        if "stream" in chunk:
            sys.stdout.write(chunk["stream"])
        if "error" in chunk:
            raise ImageError(f"docker build of {tag} failed: {chunk['error'].strip()}")
        image_id = chunk.get("aux", {}).get("ID", image_id)
    shutil.rmtree(context)
    image_id = image_id or client.images.get(tag).id
    client.images.get(image_id).tag(tag.rsplit(":", 1)[0], "latest")
    if previous and previous != image_id:
        remove_if_unused(client, previous)
    return image_id


# What each image must be able to do, checked in a container of it before it is recorded.
SMOKE_CHECKS = {
    "cpu": "import gpt2core.cli, kfp, torch; assert torch.version.cuda is None, torch.__version__",
    "cuda": "import gpt2core.cli, kfp, torch; assert torch.version.cuda, torch.__version__",
    "cerebras": (
        "import subprocess, gpt2core.cli, kfp; from gpt2core import cerebras; "
        "subprocess.run([cerebras.sdk_python(), '-c', 'import cerebras.pytorch, gpt2core.config, torch; "
        "assert torch.__version__.startswith(\"2.4\"), torch.__version__'], check=True)"),
}


def smoke_check(client, target: str, image_id: str) -> None:
    import docker

    try:
        client.containers.run(image_id, ["python", "-c", SMOKE_CHECKS[target]], remove=True,
                              stdout=True, stderr=True)
    except docker.errors.ContainerError as exc:
        output = (exc.stderr or b"").decode(errors="replace")[-3000:]
        raise ImageError(f"the new {target} image ({image_id[:19]}) fails its smoke check "
                         f"`python -c {SMOKE_CHECKS[target]!r}`:\n{output}") from exc
    log(f"smoke check of the {target} image passed")


def remove_if_unused(client, image_id: str) -> None:
    """Drop the image this build replaced, unless a container or another tag still uses it."""
    import docker

    try:
        client.images.remove(image_id, noprune=False)
    except docker.errors.APIError:
        pass


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def push_image(client, tag: str) -> str:
    repository, version = tag.rsplit(":", 1)
    log(f"docker push {tag}")
    for chunk in client.images.push(repository, version, stream=True, decode=True):
        if "error" in chunk:
            raise ImageError(f"docker push {tag} failed: {chunk['error']}. Log in with "
                             "`docker login REGISTRY` and check the repository exists.")
    digests = client.images.get(tag).attrs.get("RepoDigests") or []
    return next((d for d in digests if d.startswith(repository + "@")), "")


def write_record(target: str, record: dict) -> Path:
    path = images_file()
    records = read_records(path)
    records[target] = record
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def build_target(client, target: str, args: argparse.Namespace, base_image: str | None) -> dict:
    started = time.monotonic()
    main_environment, sdk_environment = TARGET_ENVIRONMENTS[target]
    wheelhouses, torch_specs = [], []
    for environment in filter(None, (main_environment, sdk_environment)):
        torch_spec, torch_index_url = DEFAULT_TORCH[environment]
        if environment == (sdk_environment or main_environment):  # the environment --torch-* names
            torch_spec = args.torch_spec or torch_spec
            torch_index_url = args.torch_index_url or torch_index_url
        torch_specs.append(torch_spec or "pinned by requirements/cerebras.txt")
        wheelhouses.append(build_wheelhouse(environment, torch_spec=torch_spec,
                                            torch_index_url=torch_index_url,
                                            find_links=args.find_links, rebuild=args.rebuild_wheelhouse))
    if args.wheelhouse_only:
        log(f"wheelhouses ready: {', '.join(map(str, wheelhouses))}")
        return {}
    name = f"gpt2ops-{target}"
    repository = f"{args.registry.rstrip('/')}/{name}" if args.registry else name
    tag = f"{repository}:{package_version()}"
    image_id = build_image(client, target, wheelhouses=wheelhouses, base_image=base_image, tag=tag)
    smoke_check(client, target, image_id)
    repo_digest = push_image(client, tag) if args.push else ""
    attrs = client.images.get(image_id).attrs
    record = {
        "image": repo_digest or tag,
        "tag": tag,
        "id": image_id,
        "repo_digest": repo_digest or None,
        "size_bytes": attrs.get("Size"),
        "base_image": base_image,
        "torch": " + ".join(torch_specs),
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    path = write_record(target, record)
    log(f"built {tag} ({image_id[:19]}, {record['size_bytes'] / 1e9:.2f} GB) "
        f"in {record['build_seconds']:.0f} s; recorded in {path}")
    return record


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m containers.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", default=["cpu"], metavar="TARGET",
                        help=f"images to build: {', '.join(IMAGE_KINDS)} (default: cpu)")
    parser.add_argument("--base-image", default="auto",
                        help=f"auto (default: {REGISTRY_BASE_IMAGE} if present or pullable, else "
                             "local), local (debootstrap), or an image reference")
    parser.add_argument("--rebuild-base", action="store_true", help="rebuild the local debootstrap base")
    parser.add_argument("--debian-mirror", default=DEBIAN_MIRROR, help="mirror for debootstrap")
    parser.add_argument("--find-links", action="append", default=[], metavar="DIR",
                        help="extra folder of wheels for pip (repeatable), e.g. with a CUDA torch")
    parser.add_argument("--torch-index-url", help="extra index for the torch build, e.g. "
                        "https://download.pytorch.org/whl/cu128")
    parser.add_argument("--torch-spec", help="torch requirement, e.g. torch==2.13.0+cu128 (cuda; "
                        "default: PyPI's CUDA build) or torch==2.4.0+cpu (cerebras: the SDK's pin, "
                        "CPU build)")
    parser.add_argument("--rebuild-wheelhouse", action="store_true", help="collect every wheel again")
    parser.add_argument("--wheelhouse-only", action="store_true", help="collect wheels, build nothing")
    parser.add_argument("--registry", help="registry prefix for the tags, e.g. ghcr.io/acme")
    parser.add_argument("--push", action="store_true", help="push the images (needs --registry)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.targets) - set(IMAGE_KINDS))
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(IMAGE_KINDS)}")
    if args.push and not args.registry:
        parser.error("--push needs --registry (where to push)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        client = None if args.wheelhouse_only else docker_client()
        base_image = None if client is None else resolve_base_image(
            client, args.base_image, rebuild_local=args.rebuild_base, mirror=args.debian_mirror)
        for target in args.targets:
            build_target(client, target, args, base_image)
    except ImageError as exc:
        print(f"containers.build: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
