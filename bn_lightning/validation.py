"""Argument checks shared by every floor: one message format for every bad input.

Each check raises ``ValueError`` (a value out of range, an unknown choice) or ``TypeError`` (a value of the wrong
kind) whose message names the owner (a class or function name, or ``Owner.field`` for a config), the argument, what
is allowed and what was given; each returns the value it accepted, so a check reads as an assignment. Booleans are
not ints here: ``True`` for a batch count is a mistake, not a 1. :func:`selected` is the one ``fnmatch`` filter on
qualified module names that the converters, callbacks and plugins share.

Example::

    >>> from bn_lightning.validation import check_int, check_choice
    >>> check_int("PreciseBN", "num_batches", 8)
    8
    >>> check_int("PreciseBN", "num_batches", 0)
    Traceback (most recent call last):
    ...
    ValueError: PreciseBN: num_batches must be an int >= 1, got 0
    >>> check_choice("PreciseBN", "when", "fit_end", ("before_validation", "epoch_end", "fit_end"))
    'fit_end'
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from typing import Any, TypeVar

__all__ = [
    "check_bool",
    "check_callable",
    "check_choice",
    "check_int",
    "check_number",
    "check_patterns",
    "check_probability",
    "selected",
]

T = TypeVar("T")


def _prefix(owner: str) -> str:
    return f"{owner}: " if owner else ""


def check_int(owner: str, name: str, value: Any, minimum: int = 1, *, optional: bool = False) -> Any:
    """An ``int`` (not a ``bool``) ``>= minimum``, or ``None`` when ``optional``.

    Args:
        owner: who takes the argument, for the message (``"PreciseBN"``, ``"FreezePolicy"``).
        name: the argument's name.
        value: the value given.
        minimum: the smallest value allowed.
        optional: whether ``None`` is allowed.

    Returns:
        ``value``.

    Raises:
        ValueError: ``value`` is not such an int.

    Example::

        >>> check_int("BatchNormFreeze", "freeze_at_epoch", None, minimum=0, optional=True) is None
        True
    """
    if optional and value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"{'None or ' if optional else ''}an int >= {minimum}"
        raise ValueError(f"{_prefix(owner)}{name} must be {allowed}, got {value!r}")
    return value


def check_number(
    owner: str, name: str, value: Any, *, low: float = -math.inf, high: float = math.inf, low_open: bool = False
) -> Any:
    """A finite real number (not a ``bool``) in ``[low, high]`` (``(low, high]`` when ``low_open``).

    Args:
        owner: who takes the argument, for the message.
        name: the argument's name.
        value: the value given.
        low: the lower bound.
        high: the upper bound (inclusive).
        low_open: exclude ``low`` itself (``low=0, low_open=True``: strictly positive).

    Returns:
        ``value``.

    Raises:
        ValueError: ``value`` is not such a number.

    Example::

        >>> check_number("RunningStatDrift", "max_drift_kl", 0.0, low=0, low_open=True)
        Traceback (most recent call last):
        ...
        ValueError: RunningStatDrift: max_drift_kl must be a number > 0, got 0.0
    """
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bounds = []
        if low > -math.inf:
            bounds.append(f"> {low:g}" if low_open else f">= {low:g}")
        if high < math.inf:
            bounds.append(f"<= {high:g}")
        allowed = "a number" + (" " + " and ".join(bounds) if bounds else "")
        raise ValueError(f"{_prefix(owner)}{name} must be {allowed}, got {value!r}")
    return value


def check_probability(owner: str, name: str, value: Any) -> Any:
    """A number in ``[0, 1]`` (a fraction or a probability).

    Example::

        >>> check_probability("RunningStatDrift", "max_collapsed_frac", 1.5)
        Traceback (most recent call last):
        ...
        ValueError: RunningStatDrift: max_collapsed_frac must be a number >= 0 and <= 1, got 1.5
    """
    return check_number(owner, name, value, low=0.0, high=1.0)


def check_choice(owner: str, name: str, value: Any, choices: Sequence[T]) -> T:
    """One of ``choices``.

    Example::

        >>> check_choice("BatchNormGuard", "nonfinite", "drop", ("skip", "raise"))
        Traceback (most recent call last):
        ...
        ValueError: BatchNormGuard: nonfinite must be one of ('skip', 'raise'), got 'drop'
    """
    if value not in choices:
        raise ValueError(f"{_prefix(owner)}{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_bool(owner: str, name: str, value: Any, *, optional: bool = False) -> Any:
    """``True`` or ``False`` (or ``None`` when ``optional``); ``0``/``1`` and strings are refused.

    Example::

        >>> check_bool("BatchNormFreeze", "freeze_affine", "yes")
        Traceback (most recent call last):
        ...
        TypeError: BatchNormFreeze: freeze_affine must be True or False, got 'yes'
    """
    if not isinstance(value, bool) and not (optional and value is None):
        allowed = "True, False or None" if optional else "True or False"
        raise TypeError(f"{_prefix(owner)}{name} must be {allowed}, got {value!r}")
    return value


def check_callable(owner: str, name: str, value: Any, signature: str, *, optional: bool = False) -> Any:
    """A callable (or ``None`` when ``optional``); ``signature`` describes the call in the message.

    Example::

        >>> check_callable("recalibrate_bn", "forward_fn", 3, "(model, batch)")
        Traceback (most recent call last):
        ...
        TypeError: recalibrate_bn: forward_fn must be a callable (model, batch), got 3
    """
    if not callable(value) and not (optional and value is None):
        allowed = f"{'None or ' if optional else ''}a callable {signature}"
        raise TypeError(f"{_prefix(owner)}{name} must be {allowed}, got {value!r}")
    return value


def check_patterns(owner: str, name: str, value: Any) -> list[str] | None:
    """``None`` or a sequence of ``fnmatch`` patterns; a bare string is refused (it would match letter by letter).

    Returns:
        The patterns as a list, or ``None``.

    Example::

        >>> check_patterns("BatchNormMonitor", "include", ("net.features.*",))
        ['net.features.*']
        >>> check_patterns("BatchNormMonitor", "include", "net.*")
        Traceback (most recent call last):
        ...
        TypeError: BatchNormMonitor: include must be None or a list of name patterns (['net.features.*']), got 'net.*'
    """
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(p, str) for p in value):
        raise TypeError(
            f"{_prefix(owner)}{name} must be None or a list of name patterns (['net.features.*']), got {value!r}"
        )
    return list(value)


def selected(name: str, include: Sequence[str] | None, exclude: Sequence[str] | None) -> bool:
    """Whether a qualified module name matches ``include`` (``None``: everything) and not ``exclude``.

    Args:
        name: a qualified module name (``"net.features.1"``).
        include: ``fnmatch`` patterns, or ``None`` for every name.
        exclude: ``fnmatch`` patterns, or ``None`` for none.

    Example::

        >>> selected("net.features.1", ["net.*"], ["net.head.*"]), selected("net.head.0", ["net.*"], ["net.head.*"])
        (True, False)
    """
    if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not (exclude is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude))
