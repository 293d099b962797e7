"""Server paths out of messages to clients: the gateway's folders become names.

A refusal's message is often built deep down (a backend's OSError, a folder that is
missing); whatever it says, the client must not learn where the gateway keeps its data.
``Redactor.for_config`` knows the gateway's folders (data dir, homes, spool, every
``dir://`` backend and metadata namespace) and replaces each, longest first, by a name:
``<backend b03>``, ``<metadata>``, ``<homes>``, ``<spool>``, ``<data>``. The services' own
log keeps the full message. rpc.py applies it to every error status it sends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from services.common.backends.uri import DirURI, parse_uri
from services.common.config import Config
from services.common.errors import InvalidURI


def _dir(uri: str) -> str | None:
    try:
        parsed = parse_uri(uri)
    except InvalidURI:
        return None
    return parsed.path if isinstance(parsed, DirURI) else None


@dataclass(frozen=True)
class Redactor:
    """Replaces known folders in a text by their names; ``Redactor()`` changes nothing."""

    roots: tuple[tuple[str, str], ...] = ()  # (folder, name), longest folder first
    _pattern: re.Pattern[str] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.roots:
            # A folder counts where its name ends: /data is not replaced inside /database.
            alternatives = "|".join(re.escape(root) for root, _ in self.roots)
            object.__setattr__(self, "_pattern", re.compile(f"(?:{alternatives})(?![\\w.-])"))

    @classmethod
    def for_config(cls, cfg: Config) -> Redactor:
        """The folders of the gateway configured by ``cfg``."""
        named: dict[str, str] = {}

        def add(path: str | Path | None, name: str) -> None:
            if path is None:
                return
            text = str(path).rstrip("/")
            if len(text) > 1 and text not in named:
                named[text] = name
                resolved = str(Path(text).resolve())
                named.setdefault(resolved, name)  # a message may name the folder behind a symlink

        for backend in cfg.backends:
            add(_dir(backend.uri), f"<backend {backend.name}>")
        md = cfg.metadata
        for uri in (md.uri, md.index_uri, *md.replicas):
            add(_dir(uri) if uri else None, "<metadata>")
        add(cfg.ssh.homes_dir, "<homes>")
        add(cfg.spool_dir, "<spool>")
        add(cfg.ssh_state_dir, "<ssh state>")
        add(cfg.data_dir, "<data>")
        return cls(tuple(sorted(named.items(), key=lambda item: -len(item[0]))))

    def __call__(self, text: str) -> str:
        if self._pattern is None:
            return text
        names = dict(self.roots)
        return self._pattern.sub(lambda m: names[m.group(0)], text)
