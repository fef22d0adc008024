"""Opt-outs a server sends with an image: `X-Robots-Tag` directives such as `noai`.

Semantics follow img2dataset (its `is_disallowed`): each `X-Robots-Tag` value is either
`directive, directive, ...` (for every robot) or `token: directive, ...` (for the robot named by
`token`); a row is dropped when a value addressed to every robot, or to one of our tokens, holds a
disallowed directive. Our tokens are `data-prep` (the product token of our default user agent),
`img2dataset` (sites that opt out of dataset downloaders name it; we are one) and the product token
of a custom `--user-agent`."""
from __future__ import annotations

from typing import Iterable

HEADER = "X-Robots-Tag"
# img2dataset's default list: noai/noimageai opt out of AI training, noindex/noimageindex out of
# being indexed (a dataset is an index of sorts; img2dataset reads them so, and so do we).
DEFAULT_DISALLOWED_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
OUR_TOKENS = ("data-prep", "img2dataset")
# Directives whose own value contains a colon ("unavailable_after: 25 Jun 2010 ..."): the word before
# that colon is the directive, not a robot's name.
_DIRECTIVES_WITH_VALUES = ("unavailable_after", "max-snippet", "max-image-preview", "max-video-preview")


def robots_tokens(user_agent: str) -> tuple[str, ...]:
    """The robot names whose directives we obey: ours plus the user agent's product token
    (`mybot/1.0 (+url)` -> `mybot`)."""
    product = user_agent.strip().split("/", 1)[0].split(" ", 1)[0].strip().lower()
    return tuple(dict.fromkeys([*OUR_TOKENS, *([product] if product else [])]))


def parse_directive_list(text: str) -> tuple[str, ...]:
    """`--disallowed-header-directives noai,noimageai` -> ("noai", "noimageai"); "" -> () (off)."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    bad = [n for n in names if ":" in n or " " in n]
    if bad:
        raise ValueError(f"--disallowed-header-directives: {bad[0]!r} is not a directive name "
                         "(expected a comma-separated list such as noai,noimageai,noindex, or '' for none)")
    return names


def disallowing_directive(header_values: Iterable[str], tokens: Iterable[str],
                          disallowed: Iterable[str]) -> str | None:
    """The first disallowed directive addressed to us, as `directive (X-Robots-Tag: value)`; None
    when every value allows us (or `disallowed` is empty)."""
    disallowed = {d.lower() for d in disallowed}
    tokens = {t.lower() for t in tokens}
    if not disallowed:
        return None
    for value in header_values:
        robot, directives = _split_value(value)
        if robot is not None and robot not in tokens:
            continue  # addressed to another robot
        for directive in directives:
            if directive in disallowed:
                return f"{directive} ({HEADER}: {value.strip()[:200]})"
    return None


def _split_value(value: str) -> tuple[str | None, list[str]]:
    head, sep, rest = value.partition(":")
    robot = head.strip().lower()
    if not sep or "," in robot or " " in robot or robot in _DIRECTIVES_WITH_VALUES:
        return None, [d.strip().lower() for d in value.split(",")]
    return robot, [d.strip().lower() for d in rest.split(",")]
