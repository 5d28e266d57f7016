"""Errors a user can act on. The CLI prints them as one line (no traceback) and exits with 2."""


def one_line(detail: object, limit: int = 300) -> str:
    """A library's error text (often several lines: torch, pydantic, urllib3) as one line of at most
    ``limit`` characters, for the detail a Gpt2opsError message quotes."""
    text = " ".join(str(detail).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Gpt2opsError(Exception):
    """Base class: the message names the key, file or URI at fault and what was expected."""


class SettingsError(Gpt2opsError):
    """An environment variable (or a file of the secret folder) has a value of the wrong type or out of
    range (message names the variable and what was expected)."""


class ConfigError(Gpt2opsError):
    """A config value is missing, of the wrong type, unknown or out of range (message names the key path)."""


class DataError(Gpt2opsError):
    """Input data is missing, unreadable or malformed (message names the file or URI)."""


class StorageError(Gpt2opsError):
    """An S3 / local artifact operation failed (message names the URI; never a credential)."""


class TrackingError(Gpt2opsError):
    """MLflow could not be reached or refused a call (message names the tracking URI)."""


class ServiceError(Gpt2opsError):
    """A service other than S3 and MLflow (the Kubeflow Pipelines API) could not be reached or refused a
    call (message names the endpoint and the flag or variable that chose it; never a credential)."""


class TrainingError(Gpt2opsError):
    """Training cannot continue (e.g. a NaN/Inf loss); the last good checkpoint is kept."""


class ValidationError(Gpt2opsError):
    """The validate stage found problems; the message lists all of them and names the report."""


class DiskFullError(Gpt2opsError):
    """A local disk (or quota) has no room for a write: the message names the folder, the space the
    write needed and the space free; the write's temporary files are removed."""


class UntrustedArtifactError(StorageError):
    """An artifact whose files would be unpickled (compiler caches, SDK checkpoints) is not the one a
    stage recorded publishing in MLflow: refused, never loaded (the message names the URI)."""
