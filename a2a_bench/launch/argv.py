"""Command lines passed on: to launched ranks, to the command that resumes a sweep."""

from __future__ import annotations


def without_options(argv: list[str], valued: tuple[str, ...] = (), flags: tuple[str, ...] = ()) -> list[str]:
    """``argv`` without each option of ``valued`` and its value (``--opt v`` or ``--opt=v``) and without
    each flag of ``flags``."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in valued:
            skip = True
        elif not word.startswith(tuple(f"{option}=" for option in valued)) and word not in flags:
            kept.append(word)
    return kept
