"""The built-in offline corpus: the Wikipedia XML excerpt shipped inside the `gensim` wheel.

Articles are split by title hash into calibration and evaluation sets, so evaluation text is
never seen during calibration and the split does not depend on file order.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.metadata
import json
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from quantcore.errors import QuantcoreError

_EXCERPT = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
EVAL_FRACTION = 0.25
MIN_CHARS = 500


@dataclass(frozen=True)
class Article:
    title: str
    text: str


def excerpt_path() -> Path:
    try:
        dist = importlib.metadata.distribution("gensim")
    except importlib.metadata.PackageNotFoundError as e:
        raise QuantcoreError(
            "the built-in corpus needs the gensim wheel: pip install --no-deps gensim"
        ) from e
    for f in dist.files or []:
        if str(f).endswith(_EXCERPT):
            return Path(str(dist.locate_file(f)))
    raise QuantcoreError(f"gensim is installed but does not ship {_EXCERPT}")


def _clean(wikitext: str) -> str:
    import mwparserfromhell

    code = mwparserfromhell.parse(wikitext)
    # Tables, references and templates are markup, not prose.
    for node in code.filter_tags(recursive=False):
        if str(node.tag) in ("ref", "table", "gallery"):
            try:
                code.remove(node)
            except ValueError:
                pass
    text = code.strip_code(normalize=True, collapse=True)
    lines = [ln.strip() for ln in text.splitlines()]
    # Drop category/file leftovers and list-only lines that strip_code leaves behind.
    lines = [ln for ln in lines if ln and not re.match(r"^(Category|File|Image|thumb)\b", ln)]
    # Markup the parser could not close (an unterminated <ref>, a broken link) is dropped with
    # its line rather than leaking into the text.
    lines = [ln for ln in lines if not re.search(r"\{\{|\}\}|\[\[|\]\]|<ref|</ref", ln)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _parse(path: Path) -> list[Article]:
    articles = []
    with bz2.open(path) as fh:
        for _, el in ET.iterparse(fh):
            if el.tag.rsplit("}", 1)[-1] != "page":
                continue
            ns = el.find("{*}ns")
            redirect = el.find("{*}redirect")
            title = el.findtext("{*}title") or ""
            raw = el.findtext("{*}revision/{*}text") or ""
            el.clear()
            if (ns is not None and ns.text != "0") or redirect is not None:
                continue
            text = _clean(raw)
            if len(text) >= MIN_CHARS:
                articles.append(Article(title, text))
    return articles


def _cache_file() -> Path:
    root = Path(os.environ.get("QF_HOME", Path.home() / ".cache" / "quantfoundry"))
    return root / "corpus" / "wiki-excerpt-v2.json"


@lru_cache(maxsize=1)
def articles() -> tuple[Article, ...]:
    """All prose articles of the excerpt (parsed once, then cached on disk)."""
    cache = _cache_file()
    if cache.exists():
        data = json.loads(cache.read_text())
    else:
        data = [a.__dict__ for a in _parse(excerpt_path())]
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(cache)
    return tuple(Article(**d) for d in data)


def _is_eval(title: str) -> bool:
    h = int.from_bytes(hashlib.sha256(title.encode()).digest()[:8], "big")
    return h / 2**64 < EVAL_FRACTION


def calibration_articles() -> list[Article]:
    return [a for a in articles() if not _is_eval(a.title)]


def evaluation_articles() -> list[Article]:
    return [a for a in articles() if _is_eval(a.title)]
