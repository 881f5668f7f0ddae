"""The text a browser would show of an HTML page, in one left-to-right pass in the manner of a
browser's tokenizer: every construct is found with one forward search from where it starts, and one
left open at the end of the file (a tag, comment or ``<script>`` without its end) swallows the rest,
as in a browser, so the work is linear in the page's length whatever it holds. (``html.parser``
rescans an unfinished construct from each ``<``: quadratic on ``"<a" * 100000``, and an
AssertionError on ``"<!["``.)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from html import unescape

_HIDDEN = frozenset({"script", "style", "head", "noscript", "template", "svg"})
_BLOCK = frozenset({"p", "div", "br", "li", "ul", "ol", "tr", "table", "section", "article", "pre", "blockquote",
                    "h1", "h2", "h3", "h4", "h5", "h6", "hr", "header", "footer", "title", "dd", "dt"})
_RAW = frozenset({"script", "style"})  # their content is not markup: it ends at </script, </style
# A start or end tag: its name, then attributes, where a quoted value may hold ">"; possessive
# quantifiers never backtrack, so a match costs at most one pass to the end of the text.
_TAG = re.compile(r"""</?([A-Za-z][^\s/>]*+)(?:[^>"'=]++|=\s*+(?:"[^"]*+"|'[^']*+')?+|["'])*+>""")
_RAW_END = {name: re.compile(rf"</{name}[\s/>]", re.IGNORECASE) for name in _RAW}


def _letter(ch: str) -> bool:
    return ch.isascii() and ch.isalpha()


def _html_pieces(html: str) -> Iterator[str]:
    """The visible text of ``html`` in pieces, entities decoded, a line break at each block element."""
    pos, hidden, n = 0, 0, len(html)
    while pos < n:
        lt = html.find("<", pos)
        if lt < 0:
            lt = n
        if lt > pos and not hidden:
            yield unescape(html[pos:lt])
        if lt >= n:
            return
        nxt = html[lt + 1:lt + 2]
        letter = _letter(html[lt + 2:lt + 3] if nxt == "/" else nxt)
        if html.startswith("<!--", lt):  # a comment: to the next "-->" ("<!-->" is an empty one)
            end = html.find("-->", lt + 2)
            pos = n if end < 0 else end + 3
        elif nxt in ("!", "?") or (nxt == "/" and not letter):
            end = html.find(">", lt + 2)  # a doctype, CDATA, processing instruction, bogus comment: to ">"
            pos = n if end < 0 else end + 1
        elif letter:
            tag = _TAG.match(html, lt)
            if tag is None:  # a tag still open at the end of the file: the rest is inside it
                return
            pos = tag.end()
            name, closing = tag.group(1).lower(), nxt == "/"
            if name in _HIDDEN:
                if closing:
                    hidden = max(hidden - 1, 0)
                elif not tag.group().endswith("/>"):
                    hidden += 1
            elif name in _BLOCK and not hidden:
                yield "\n"
            if name in _RAW and not closing and not tag.group().endswith("/>"):
                end = _RAW_END[name].search(html, pos)  # raw text: no markup inside, up to its end tag
                pos = n if end is None else end.start()
        else:  # "<" before a space, a digit, "=": text
            if not hidden:
                yield "<"
            pos = lt + 1


def html_visible_text(html: str) -> str:
    """The text a browser would show: no script/style/head, line breaks at block elements,
    entities decoded, runs of white space as one space; linear time in ``len(html)``."""
    lines = (" ".join(line.split()) for line in "".join(_html_pieces(html)).splitlines())
    out, blank = [], False
    for line in lines:
        if line or not blank:
            out.append(line)
        blank = not line
    return "\n".join(out).strip("\n")
