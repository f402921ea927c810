"""User-facing errors and the command line's exit statuses.

Anything a user can fix (bad config, missing data, unreachable store…) is raised as a
:class:`VggflowError`; the CLI prints its message and exits with its ``exit_code`` instead of
showing a traceback. Programming errors stay ordinary exceptions.

Exit statuses: 0 success, 1 another problem the message explains, 2 unusable data, 3 tracking
store, 4 backbone weights, 64 a command-line usage error (sysexits' ``EX_USAGE``), 78 a bad
configuration (``EX_CONFIG``), 130 interrupted.
"""

from __future__ import annotations

#: A command line the parser rejects (unknown option, missing argument): sysexits' EX_USAGE.
EXIT_USAGE = 64


class VggflowError(Exception):
    """An error the user can act on; ``str(err)`` is the whole message."""

    exit_code: int = 1

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(VggflowError):
    """The configuration file or an override is invalid (sysexits' ``EX_CONFIG``)."""

    exit_code = 78


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
