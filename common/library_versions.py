"""Is the installed Flower or Opacus the one Confide's compatibility modules were written for?

common/flower_compat.py and common/opacus_compat.py reach into library internals that any release
may change. Each asks here first, so another version means one line naming it and the fix (or the
library's own behaviour, where a module has a fallback), never an AttributeError mid-round.
"""

from __future__ import annotations

import importlib.metadata

REINSTALL = "reinstall Confide (`pip install -e .` pins the versions it was written for)"


class LibraryVersionError(ImportError):
    """An installed library outside the series a compatibility module was written for."""


def installed_version(distribution: str) -> str:
    """The installed version of `distribution`; the one place that asks, so tests can pretend."""
    return importlib.metadata.version(distribution)


def version_problem(distribution: str, series: str, user: str) -> str | None:
    """Why the installed `distribution` cannot serve `user` (a module, a feature), or None when
    it is of `series` (a version prefix such as "1.42.")."""
    installed = installed_version(distribution)
    if installed.startswith(series):
        return None
    return (
        f"{user} relies on internals of {distribution} {series}x but {distribution} {installed} "
        f"is installed; {REINSTALL}, or port {user} to {distribution} {installed}"
    )


def require_version(distribution: str, series: str, user: str) -> None:
    """Raise LibraryVersionError (one line) unless `distribution` is of `series`."""
    problem = version_problem(distribution, series, user)
    if problem is not None:
        raise LibraryVersionError(problem)
