"""Artifacts: folders of files with a ``MANIFEST.json`` written last, in local folders or S3.

- ``local_input(uri)``: a local Path holding the artifact (downloaded and verified for s3://);
- ``shared_local_input(uri)``: the same, downloaded once per machine for all its processes;
- ``local_output(uri)``: an empty staging Path to write into; published on clean exit with the
  manifest last, nothing published on error;
- ``upload_dir`` / ``download_dir`` / ``read_manifest`` / ``artifact_exists`` / ``artifact_digest``;
  ``read_bytes`` / ``read_text`` / ``fetch_file`` / ``put_file`` / ``list_files`` / ``delete_file``
  for single files (configs, tokenizer files, checkpoints), so any file may be s3:// too.

Modules: ``uris`` (schemes, splitting, joining), ``manifest`` (build, digest, verify), ``store``
(the ``ArtifactStore`` interface, its local and S3 implementations, the operations above),
``s3`` (client from the settings, errors, the outage retry policy, transfers), ``shared_input``.
S3 settings (endpoint, keys, retries, outage window) come from ``gpt2core.platform.settings``.
"""

from gpt2core.platform.artifacts.manifest import MANIFEST, manifest_digest, sha256_file
from gpt2core.platform.artifacts.s3 import export_s3_env, s3_configured
from gpt2core.platform.artifacts.shared_input import shared_local_input
from gpt2core.platform.artifacts.store import (NotFound, artifact_digest, artifact_exists, delete_file,
                                               download_dir, fetch_file, list_files, local_input,
                                               local_output, put_file, read_bytes, read_manifest, read_text,
                                               upload_dir)
from gpt2core.platform.artifacts.uris import is_s3

__all__ = [
    "MANIFEST", "NotFound", "artifact_digest", "artifact_exists", "delete_file", "download_dir",
    "export_s3_env", "fetch_file", "is_s3", "list_files", "local_input", "local_output",
    "manifest_digest", "put_file", "read_bytes", "read_manifest", "read_text", "s3_configured",
    "sha256_file", "shared_local_input", "upload_dir",
]
