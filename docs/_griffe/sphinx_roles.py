"""Griffe extension for this site's build: Sphinx roles in docstrings become Markdown cross-refs.

The package's docstrings are Google style but refer to other objects with Sphinx roles
(``:class:`~asgi_session_sync.Snapshot```), which Markdown would print literally. This turns each
role into an autorefs link (``[`Snapshot`][asgi_session_sync.Snapshot]``); names without a
module (``:meth:`kill```) are resolved from the object's scope (``scoped_crossrefs`` in
mkdocs.yml). It changes only what the site renders, never the package.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj):`(~?)([\w.]+)`")


def _link(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2)
    text = target.rsplit(".", 1)[-1] if short else target
    return f"[`{text}`][{target}]"


class SphinxRoles(griffe.Extension):
    """Rewrites Sphinx cross-reference roles as Markdown links, object by object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite the roles in ``obj``'s docstring, if it has one."""
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_link, obj.docstring.value)
