"""User-facing errors.

Anything a user can fix (bad config, missing data, unreachable store…) is raised as a
:class:`VggflowError`; the CLI prints its message and exits with its ``exit_code`` instead of
showing a traceback. Programming errors stay ordinary exceptions.
"""

from __future__ import annotations


class VggflowError(Exception):
    """An error the user can act on; ``str(err)`` is the whole message."""

    exit_code: int = 1

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(VggflowError):
    """The configuration file or an override is invalid."""

    exit_code = 2


class DataError(VggflowError):
    """The dataset is missing or unusable."""

    exit_code = 2


class TrackingError(VggflowError):
    """The MLflow tracking store or registry cannot be used."""

    exit_code = 3


class ServiceError(VggflowError):
    """A server vggflow needs (Prefect's API, a stack service) is down or unreachable."""

    exit_code = 3


class BackboneError(VggflowError):
    """The backbone weights cannot be obtained."""

    exit_code = 4
