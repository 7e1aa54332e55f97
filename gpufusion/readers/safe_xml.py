"""Parse XML metadata from files the user gives, refusing entities, naming what is wrong.

Metadata XML (OME-XML, BigStitcher ``dataset.xml``, CZI metadata) never needs entity
declarations, so every ``<!ENTITY ...>`` is refused before it can expand: no billion-laughs
amplification, no external entity is ever resolved. A document type declaration without
entities (``<!DOCTYPE OME>``) is accepted; an external DTD is never fetched.

A rejection names its cause in one line: entity declarations, external entities, an empty
document, a truncated one (the text ends before the document is complete: a file cut off
while copying), or malformed XML at a line and column.

Elements are built by :class:`xml.etree.ElementTree.TreeBuilder`, with namespaces written
``{uri}tag`` as :func:`xml.etree.ElementTree.fromstring` writes them; comments and
processing instructions are dropped as it drops them.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from xml.parsers import expat

from ..errors import InputError

__all__ = ["parse_xml"]

#: expat errors that mean "the text ended before the document was complete".
_TRUNCATED = frozenset({
    expat.errors.codes[expat.errors.XML_ERROR_NO_ELEMENTS],
    expat.errors.codes[expat.errors.XML_ERROR_UNCLOSED_TOKEN],
    expat.errors.codes[expat.errors.XML_ERROR_PARTIAL_CHAR],
    expat.errors.codes[expat.errors.XML_ERROR_UNCLOSED_CDATA_SECTION],
})


class _Refused(Exception):
    """Raised from an expat handler to stop parsing; carries the message."""


def _name(raw: str) -> str:
    """expat's ``uri}local`` (namespace separator ``}``) -> ElementTree's ``{uri}local``."""
    return "{" + raw if "}" in raw else raw


def parse_xml(data: str | bytes, source: object, kind: str = "XML") -> ET.Element:
    """Parse ``data`` into an element tree; refuse entity declarations.

    Parameters
    ----------
    data : str or bytes
        The XML text (bytes are decoded as their XML declaration says, UTF-8 by default).
    source : object
        What the text came from (a path), the first part of every message.
    kind : str
        What the text is, for messages (``"XML"``, ``"OME-XML"``).

    Returns
    -------
    xml.etree.ElementTree.Element
        The root element.

    Raises
    ------
    InputError
        One line naming ``source`` and the cause: ``entity declarations are not allowed``,
        ``external entities are refused``, an empty document, a ``truncated`` one, or
        ``malformed`` XML at a line and column.

    Examples
    --------
    >>> parse_xml("<a><b x='1'/></a>", "a.xml").find("b").get("x")
    '1'
    >>> parse_xml("<a><b></a>", "a.xml")
    Traceback (most recent call last):
    ...
    gpufusion.errors.InputError: a.xml: malformed XML at line 1, column 9 (mismatched tag)
    >>> parse_xml("<!DOCTYPE a [<!ENTITY e 'x'>]><a>&e;</a>", "f")
    Traceback (most recent call last):
    ...
    gpufusion.errors.InputError: f: XML entity declarations are not allowed (<!ENTITY e> at line 1)
    """
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate(namespace_separator="}")
    parser.buffer_text = True

    def start(tag: str, attrs: dict[str, str]) -> None:
        builder.start(_name(tag), {_name(k): v for k, v in attrs.items()})

    def entity(name: str, is_parameter: int, _value: str | None, _base: str | None,
               system_id: str | None, public_id: str | None, _notation: str | None) -> None:
        label = f"<!ENTITY {'% ' if is_parameter else ''}{name}"
        line = parser.CurrentLineNumber
        if system_id is not None or public_id is not None:
            target = system_id if system_id is not None else public_id
            raise _Refused(f"{kind} external entities are refused ({label} SYSTEM "
                           f"{target!r}> at line {line})")
        raise _Refused(f"{kind} entity declarations are not allowed ({label}> at line {line})")

    parser.StartElementHandler = start
    parser.EndElementHandler = lambda tag: builder.end(_name(tag))
    parser.CharacterDataHandler = builder.data
    parser.EntityDeclHandler = entity
    try:
        parser.Parse(data, True)
        return builder.close()
    except _Refused as exc:
        raise InputError(f"{source}: {exc}") from None
    except expat.ExpatError as exc:
        reason = expat.ErrorString(exc.code)
        where = f"line {exc.lineno}, column {exc.offset + 1}"
        if not (data.strip() if isinstance(data, str) else data.strip()):
            raise InputError(f"{source}: empty {kind} (no root element)") from None
        if exc.code in _TRUNCATED:
            text = data if isinstance(data, str) else data.decode("utf-8", "replace")
            end = f"line {text.count(chr(10)) + 1}, column {len(text.rsplit(chr(10), 1)[-1])}"
            raise InputError(f"{source}: truncated {kind}: the text ends (at {end}) before "
                             "the document is complete") from None
        raise InputError(f"{source}: malformed {kind} at {where} ({reason})") from None
