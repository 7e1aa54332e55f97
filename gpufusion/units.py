"""Length units: the NGFF space-unit vocabulary, accepted abbreviations, conversions.

OME-Zarr (NGFF 0.4/0.5) names a spatial axis' unit with a UDUNITS-2 length name such as
``"micrometer"``; :data:`NGFF_SPACE_UNITS` lists them with their size in metres. The
abbreviations of :data:`UNIT_ALIASES` (``um``, ``µm``, ``nm``, ...) are accepted wherever
a unit is given and turned into the NGFF name. Light on purpose: no heavy imports.
"""

from __future__ import annotations

import math

from .errors import InputError

__all__ = ["NGFF_SPACE_UNITS", "UNIT_ALIASES", "convert_length", "ngff_unit"]

#: NGFF space units (UDUNITS-2 length names) -> metres per unit.
NGFF_SPACE_UNITS: dict[str, float] = {
    "angstrom": 1e-10,
    "attometer": 1e-18,
    "centimeter": 1e-2,
    "decimeter": 1e-1,
    "exameter": 1e18,
    "femtometer": 1e-15,
    "foot": 0.3048,
    "gigameter": 1e9,
    "hectometer": 1e2,
    "inch": 0.0254,
    "kilometer": 1e3,
    "megameter": 1e6,
    "meter": 1.0,
    "micrometer": 1e-6,
    "mile": 1609.344,
    "millimeter": 1e-3,
    "nanometer": 1e-9,
    "parsec": 3.0856775814913673e16,
    "petameter": 1e15,
    "picometer": 1e-12,
    "terameter": 1e12,
    "yard": 0.9144,
    "yoctometer": 1e-24,
    "yottameter": 1e24,
    "zeptometer": 1e-21,
    "zettameter": 1e21,
}

#: Abbreviations and spellings accepted for an NGFF unit.
UNIT_ALIASES: dict[str, str] = {
    "um": "micrometer",
    "µm": "micrometer",
    "μm": "micrometer",
    "micron": "micrometer",
    "microns": "micrometer",
    "micrometre": "micrometer",
    "nm": "nanometer",
    "nanometre": "nanometer",
    "mm": "millimeter",
    "millimetre": "millimeter",
    "cm": "centimeter",
    "m": "meter",
    "metre": "meter",
    "pm": "picometer",
    "Å": "angstrom",
}


def ngff_unit(unit: str, what: str = "unit") -> str:
    """The NGFF name of a length unit: an NGFF name, or one of :data:`UNIT_ALIASES`.

    Raises
    ------
    InputError
        One line naming ``what`` (e.g. ``--unit``) and listing the NGFF vocabulary.

    Examples
    --------
    >>> ngff_unit("nm"), ngff_unit("Micrometer"), ngff_unit("µm")
    ('nanometer', 'micrometer', 'micrometer')
    """
    text = str(unit).strip()
    name = UNIT_ALIASES.get(text, UNIT_ALIASES.get(text.lower(), text.lower()))
    if name not in NGFF_SPACE_UNITS:
        raise InputError(
            f"{what} {unit!r} is not an NGFF space unit; use one of "
            f"{', '.join(NGFF_SPACE_UNITS)} (or um, nm, mm, cm, m)"
        )
    return name


def convert_length(value: float, unit: str, to: str) -> float:
    """``value`` in ``unit`` expressed in ``to`` (both NGFF names or abbreviations).

    Examples
    --------
    >>> convert_length(240, "nm", "micrometer"), convert_length(0.25, "mm", "um")
    (0.24, 250.0)
    """
    factor = NGFF_SPACE_UNITS[ngff_unit(unit)] / NGFF_SPACE_UNITS[ngff_unit(to)]
    result = float(value) * factor
    # a factor of exact powers of ten: keep 240 nm -> 0.24 um free of binary round-off noise
    return float(f"{result:.15g}") if math.isfinite(result) else result
