"""A griffe extension for the API reference: curvdist's docstrings use Sphinx roles (:class:`~curvdist.Problem`,
:func:`...`, :mod:`...`); Markdown has none, so each becomes a code span of the name it shows
(``Problem`` for ``~curvdist.Problem``, the full path otherwise)."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):`(~?)([^`]+)`")


def _replace(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    if "<" in target and target.endswith(">"):  # :class:`text <target>`
        return f"`{target.split('<')[0].strip()}`"
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def strip_roles(text: str) -> str:
    return ROLE.sub(_replace, text)


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = strip_roles(obj.docstring.value)
