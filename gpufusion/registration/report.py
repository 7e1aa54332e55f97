"""Registration outputs: positions CSV, edge-table CSV, and a picture of the layout.

* :func:`write_positions_csv` -- ``file,x,y[,z]`` in pixels (x along columns), the format
  :func:`gpufusion.readers.read_positions` reads, so the file is direct ``fuse`` input;
* :func:`write_edges_csv` -- one row per candidate pair (shift, NCC, weight, residual,
  status);
* :func:`write_report` -- the tiles at their registered positions with every edge drawn
  between tile centres, coloured by its residual (dropped edges dashed grey, tiles without
  a reliable edge in red): ``.html`` (inline SVG, summary and edge table; no dependency),
  ``.svg``, or ``.png`` (drawn with Pillow, which imageio already requires).
"""

from __future__ import annotations

import csv
import html
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:
    from .register import RegistrationResult

__all__ = ["REPORT_SUFFIXES", "edges_path_for", "summary_record", "write_edges_csv",
           "write_positions_csv", "write_report"]

REPORT_SUFFIXES = (".html", ".htm", ".svg", ".png")
_AXES = ("x", "y", "z")


def _fmt(v: float) -> str:
    return "nan" if not np.isfinite(v) else f"{v:.4f}"


def write_positions_csv(path: str | Path, positions: np.ndarray,
                        files: Sequence[str | Path] | Sequence[Sequence[str | Path]],
                        channel_names: Sequence[str] | None = None,
                        pixel_size: Sequence[float] | None = None,
                        unit: str | None = None) -> Path:
    """Write tile positions as ``file,x,y[,z]`` (pixels; positions given in index order).

    With ``pixel_size`` (index order; ``unit`` default micrometre) the first line is the
    comment ``# pixel_size (x, y[, z]): ... UNIT``
    (:func:`gpufusion.readers.positions.pixel_size_comment`), which the positions reader
    reads back, so fusing the CSV keeps the input's pixel size.

    With ``channel_names``, ``files[c]`` lists channel ``c``'s file of every tile and the
    CSV gets a ``channel`` column: one row per channel and tile, grouped by channel, every
    channel of a tile at the tile's position (the format :func:`gpufusion.readers.read_positions`
    reads back into one channel each).

    Files inside the CSV's folder are written relative to it (the CSV stays valid when the
    folder moves with its tiles), others with their absolute path.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> d = Path(tempfile.mkdtemp())
    >>> p = write_positions_csv(d / "pos.csv", np.array([[0.0, 0.0], [2.5, 90.25]]),
    ...                         [d / "a.tif", d / "b.tif"])
    >>> print(p.read_text().strip())
    file,x,y
    a.tif,0.0000,0.0000
    b.tif,90.2500,2.5000
    >>> p = write_positions_csv(d / "pos2.csv", np.array([[0.0, 0.0], [2.5, 90.25]]),
    ...                         [[d / "a.tif", d / "b.tif"], [d / "a1.tif", d / "b1.tif"]],
    ...                         ["DAPI", "GFP"])
    >>> print(p.read_text().strip())
    file,x,y,channel
    a.tif,0.0000,0.0000,DAPI
    b.tif,90.2500,2.5000,DAPI
    a1.tif,0.0000,0.0000,GFP
    b1.tif,90.2500,2.5000,GFP
    >>> p = write_positions_csv(d / "pos3.csv", np.array([[0.0, 0.0]]), [d / "a.tif"],
    ...                         pixel_size=(0.2405, 0.2405), unit="micrometer")
    >>> print(p.read_text().strip())
    # pixel_size (x, y): 0.2405 0.2405 micrometer
    file,x,y
    a.tif,0.0000,0.0000
    """
    out = Path(path)
    pos = np.asarray(positions, dtype=np.float64)
    per_channel = [list(files)] if channel_names is None else [list(f) for f in files]
    if channel_names is not None and len(per_channel) != len(channel_names):
        raise InputError(f"{out}: {len(per_channel)} file lists for {len(channel_names)} "
                         "channels")
    for names in per_channel:
        if len(names) != len(pos):
            raise InputError(f"{out}: {len(names)} file names for {len(pos)} positions")
    ndim = pos.shape[1]
    base = out.resolve().parent
    with open(out, "w", newline="", encoding="utf-8") as fh:
        if pixel_size is not None:
            from ..readers.positions import pixel_size_comment

            fh.write(pixel_size_comment(tuple(pixel_size), unit) + "\n")
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["file", *_AXES[:ndim], *(["channel"] if channel_names else [])])
        for c, names in enumerate(per_channel):
            extra = [channel_names[c]] if channel_names else []
            for f, p in zip(names, pos, strict=True):
                w.writerow([_relative(f, base), *(_fmt(v) for v in p[::-1]), *extra])
    return out


def _relative(f: str | Path, base: Path) -> str:
    """``f`` relative to ``base`` when it lies inside it, else unchanged (absolute)."""
    p = Path(f)
    if not p.is_absolute():
        return str(f)
    try:
        return p.relative_to(base).as_posix()
    except ValueError:  # outside the folder (or on another drive)
        return str(p)


def edges_path_for(positions_path: str | Path) -> Path:
    """The edge table's path beside a positions CSV: ``name.csv`` -> ``name.edges.csv``.

    Examples
    --------
    >>> edges_path_for("out/positions.csv").as_posix()
    'out/positions.edges.csv'
    """
    return tagged_sibling(positions_path, "edges")


def tagged_sibling(path: str | Path, tag: str) -> Path:
    """``path``'s sibling named ``stem.tag.csv`` (the edge and gains tables' naming).

    >>> tagged_sibling("out/report.html", "gains").as_posix()
    'out/report.gains.csv'
    """
    p = Path(path)
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    return p.with_name(f"{stem}.{tag}.csv")


def write_edges_csv(path: str | Path, result: RegistrationResult) -> Path:
    """Write the edge table: ``i,j,file_i,file_j``, nominal offset, shift, NCC, weight,
    residual (pixels; axes x, y[, z]) and status.

    Examples
    --------
    >>> import tempfile
    >>> from gpufusion.synthetic import make_mosaic
    >>> from gpufusion.registration import register_mosaic
    >>> syn = make_mosaic((1, 2), (64, 64), overlap=0.25, stage_error=2, seed=0)
    >>> result = register_mosaic(syn.mosaic(syn.stage_positions), max_shift=5,
    ...                          backend="numpy")
    >>> path = write_edges_csv(Path(tempfile.mkdtemp()) / "pos.edges.csv", result)
    >>> path.read_text().splitlines()[0]
    'i,j,file_i,file_j,nominal_x,nominal_y,shift_x,shift_y,ncc,weight,residual,status'
    """
    out = Path(path)
    e = result.edges
    ndim = e.nominal.shape[1] if len(e) else result.positions.shape[1]
    ax = _AXES[:ndim]
    base = out.resolve().parent
    names = [_relative(n, base) for n in result.names]
    with open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["i", "j", "file_i", "file_j", *(f"nominal_{a}" for a in ax),
                    *(f"shift_{a}" for a in ax), "ncc", "weight", "residual", "status"])
        for k in range(len(e)):
            i, j = (int(v) for v in e.pairs[k])
            w.writerow([i, j, names[i], names[j], *(_fmt(v) for v in e.nominal[k][::-1]),
                        *(_fmt(v) for v in e.shift[k][::-1]), _fmt(e.ncc[k]),
                        _fmt(e.weight[k]), _fmt(e.residual[k]), e.status[k]])
    return out


def summary_lines(result: RegistrationResult) -> list[str]:
    """Human-readable summary of a registration."""
    n = len(result.positions)
    counts = result.edges.counts()
    kept = counts.get("kept", 0)
    dropped = ", ".join(f"{v} {k}" for k, v in counts.items() if k != "kept") or "none"
    corr = result.corrections - result.corrections.mean(axis=0)
    lines = [
        f"registered {n} tiles from {len(result.edges)} overlapping pairs "
        f"({kept} kept; dropped: {dropped}) on {result.backend} in "
        f"{result.seconds.get('total', float('nan')):.2f} s",
        f"corrections (global offset removed): rms {np.sqrt(np.mean(corr**2)):.2f} px, "
        f"max {np.abs(corr).max(initial=0):.2f} px",
    ]
    if kept:
        res = result.edges.residual[result.edges.kept]
        lines.append(f"residuals of kept edges: rms {np.sqrt(np.mean(res**2)):.3f} px, "
                     f"max {res.max():.3f} px")
    if np.isfinite(result.mean_ncc_before) or np.isfinite(result.mean_ncc_after):
        lines.append(f"mean overlap NCC: {result.mean_ncc_before:.3f} before, "
                     f"{result.mean_ncc_after:.3f} after")
    if len(result.unregistered):
        lines.append(f"tiles without a reliable edge: {len(result.unregistered)}")
    sec = result.seconds
    if "pairwise" in sec:  # per stage; reading the tiles is part of the pairwise stage
        lines.append(f"time: pairwise {sec['pairwise']:.2f} s (reading tiles "
                     f"{sec.get('read', 0.0):.2f} s), solve {sec.get('solve', 0.0):.2f} s, "
                     f"quality {sec.get('quality', 0.0):.2f} s")
    lines.extend(f"note: {text}" for text in getattr(result, "advice", ()))
    return lines


def summary_record(result: RegistrationResult) -> dict:
    """The registration summary as JSON values, for the output's provenance record.

    Keys: ``tiles``, ``pairs``, ``kept``, ``dropped`` (count per reason), ``residual_rms_px``
    and ``residual_max_px`` (kept pairs; None without any), ``mean_ncc_before``,
    ``mean_ncc_after`` (None when not measured), ``unregistered_tiles``, ``backend``,
    ``advice`` (the summary's ``note:`` lines, in words) and ``seconds`` (per stage).

    Examples
    --------
    >>> from gpufusion.synthetic import make_mosaic
    >>> from gpufusion.registration import register_mosaic
    >>> syn = make_mosaic((1, 2), (64, 64), overlap=0.25, stage_error=2, seed=0)
    >>> record = summary_record(register_mosaic(syn.mosaic(syn.stage_positions), max_shift=5,
    ...                                         backend="numpy"))
    >>> record["tiles"], record["pairs"], record["kept"], record["advice"]
    (2, 1, 1, [])
    >>> sorted(record["seconds"])
    ['pairwise', 'quality', 'read', 'solve', 'total']
    """
    edges = result.edges
    counts = edges.counts()
    residual = edges.residual[edges.kept] if counts.get("kept", 0) else np.zeros(0)

    def number(value: float) -> float | None:
        return round(float(value), 6) if np.isfinite(value) else None

    return {
        "tiles": int(len(result.positions)),
        "pairs": int(len(edges)),
        "kept": int(counts.get("kept", 0)),
        "dropped": {str(k): int(v) for k, v in counts.items() if k != "kept"},
        "residual_rms_px": number(np.sqrt(np.mean(residual**2))) if residual.size else None,
        "residual_max_px": number(residual.max()) if residual.size else None,
        "mean_ncc_before": number(result.mean_ncc_before),
        "mean_ncc_after": number(result.mean_ncc_after),
        "unregistered_tiles": int(len(result.unregistered)),
        "backend": str(result.backend),
        "advice": [str(a) for a in result.advice],
        "seconds": {str(k): round(float(v), 3) for k, v in result.seconds.items()},
    }


# ----------------------------------------------------------------------------------------
# The picture


def write_report(path: str | Path, result: RegistrationResult) -> Path:
    """Draw the registered layout, edges coloured by residual, as HTML, SVG or PNG.

    The format follows the suffix (:data:`REPORT_SUFFIXES`); 3D layouts are drawn in their
    (y, x) projection.

    Examples
    --------
    >>> import tempfile
    >>> from gpufusion.synthetic import make_mosaic
    >>> from gpufusion.registration import register_mosaic
    >>> syn = make_mosaic((2, 2), (64, 64), overlap=0.25, stage_error=2, seed=0)
    >>> result = register_mosaic(syn.mosaic(syn.stage_positions), max_shift=5,
    ...                          backend="numpy")
    >>> page = write_report(Path(tempfile.mkdtemp()) / "report.html", result)
    >>> "<svg" in page.read_text()
    True
    """
    out = Path(path)
    suffix = out.suffix.lower()
    if suffix not in REPORT_SUFFIXES:
        raise InputError(f"{out}: report must end in {', '.join(REPORT_SUFFIXES)}")
    scene = _Scene(result)
    if suffix == ".png":
        scene.png(out)
    elif suffix == ".svg":
        out.write_text(scene.svg(), encoding="utf-8")
    else:
        out.write_text(_html(result, scene.svg()), encoding="utf-8")
    return out


def _colour(value: float, vmax: float) -> tuple[int, int, int]:
    """Green (0) - yellow - red (>= vmax) for a residual."""
    t = float(np.clip(value / vmax, 0.0, 1.0)) if np.isfinite(value) else 1.0
    if t < 0.5:
        return int(round(40 + 430 * t)), 170, 60
    return 235, int(round(170 - 300 * (t - 0.5))), 60


class _Scene:
    """Tiles and edges in picture coordinates (y, x of the layout; scaled to fit)."""

    def __init__(self, result: RegistrationResult, size: int = 900) -> None:
        pos = result.positions[:, -2:]
        shapes = result.mosaic.tile_shapes[:, -2:].astype(np.float64)
        lo = pos.min(axis=0)
        extent = (pos + shapes).max(axis=0) - lo
        self.scale = (size - 40) / max(float(extent.max()), 1.0)
        self.margin = 20.0
        self.caption = summary_lines(result)  # drawn below the legend
        self.width = max(int(extent[1] * self.scale + 2 * self.margin), 640)
        self.legend_y = int(extent[0] * self.scale + 2 * self.margin) + 16
        self.height = self.legend_y + 24 + 15 * len(self.caption)
        self.boxes = (pos - lo) * self.scale + self.margin  # (n, 2) top-left (y, x)
        self.sizes = shapes * self.scale
        self.centres = self.boxes + self.sizes / 2
        self.flagged = set(int(k) for k in np.concatenate([result.unregistered,
                                                           result.detached]))
        self.edges = result.edges
        self.vmax = result.max_residual  # red: the rejection threshold
        self.names = [str(k) for k in range(len(pos))]

    def svg(self) -> str:
        parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" '
                 f'height="{self.height}" viewBox="0 0 {self.width} {self.height}" '
                 'font-family="sans-serif" font-size="11">',
                 f'<rect width="{self.width}" height="{self.height}" fill="white"/>']
        for k, ((y, x), (h, w)) in enumerate(zip(self.boxes, self.sizes, strict=True)):
            fill = "#f6c9c9" if k in self.flagged else "#e8e8e8"
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" '
                         f'fill="{fill}" fill-opacity="0.55" stroke="#777" stroke-width="0.8"/>')
        for k in range(len(self.edges)):
            (y0, x0), (y1, x1) = self.centres[self.edges.pairs[k]]
            kept = self.edges.status[k] == "kept"
            r, g, b = _colour(self.edges.residual[k], self.vmax) if kept else (150, 150, 150)
            dash = "" if kept else ' stroke-dasharray="4,3"'
            tip = (f"{self.edges.pairs[k][0]}-{self.edges.pairs[k][1]}: "
                   f"{self.edges.status[k]}, NCC {self.edges.ncc[k]:.3f}, "
                   f"residual {self.edges.residual[k]:.3f} px")
            parts.append(f'<line x1="{x0:.1f}" y1="{y0:.1f}" x2="{x1:.1f}" y2="{y1:.1f}" '
                         f'stroke="rgb({r},{g},{b})" stroke-width="{3 if kept else 1.5}"'
                         f'{dash}><title>{html.escape(tip)}</title></line>')
        for k, (y, x) in enumerate(self.centres):
            parts.append(f'<text x="{x + 5:.1f}" y="{y + 12:.1f}" fill="#333">{k}</text>')
        parts.append(self._legend_svg())
        for q, line in enumerate(self.caption):
            parts.append(f'<text x="20" y="{self.legend_y + 34 + 15 * q}" fill="#333">'
                         f"{html.escape(line)}</text>")
        parts.append("</svg>")
        return "\n".join(parts)

    def _legend_svg(self) -> str:
        y = self.legend_y
        items = []
        for q in range(11):
            r, g, b = _colour(q / 10 * self.vmax, self.vmax)
            items.append(f'<rect x="{20 + 14 * q}" y="{y}" width="14" height="10" '
                         f'fill="rgb({r},{g},{b})"/>')
        items.append(f'<text x="{20 + 14 * 11 + 6}" y="{y + 9}">residual 0 - '
                     f'{self.vmax:.2f} px; dashed: dropped; red tiles: no reliable edge'
                     '</text>')
        return "\n".join(items)

    def png(self, out: Path) -> None:
        try:
            from PIL import Image, ImageDraw
        except ImportError:  # pragma: no cover - Pillow comes with imageio
            raise InputError(f"{out}: PNG reports need Pillow; write .html or .svg") from None
        img = Image.new("RGB", (self.width, self.height), "white")
        draw = ImageDraw.Draw(img, "RGBA")
        for k, ((y, x), (h, w)) in enumerate(zip(self.boxes, self.sizes, strict=True)):
            fill = (246, 201, 201, 140) if k in self.flagged else (232, 232, 232, 140)
            draw.rectangle([x, y, x + w, y + h], fill=fill, outline=(119, 119, 119))
        for k in range(len(self.edges)):
            (y0, x0), (y1, x1) = self.centres[self.edges.pairs[k]]
            kept = self.edges.status[k] == "kept"
            if kept:
                draw.line([x0, y0, x1, y1], fill=_colour(self.edges.residual[k], self.vmax),
                          width=3)
                continue
            length = float(np.hypot(x1 - x0, y1 - y0))
            for t0 in np.arange(0.0, length, 7.0):  # dashed: 4 px on, 3 px off
                a, b = t0 / max(length, 1e-9), min(t0 + 4.0, length) / max(length, 1e-9)
                draw.line([x0 + a * (x1 - x0), y0 + a * (y1 - y0), x0 + b * (x1 - x0),
                           y0 + b * (y1 - y0)], fill=(120, 120, 120), width=2)
        for k, (y, x) in enumerate(self.centres):
            draw.text((x + 5, y + 2), str(k), fill=(51, 51, 51))
        y = self.legend_y
        for q in range(11):
            draw.rectangle([20 + 14 * q, y, 34 + 14 * q, y + 10],
                           fill=_colour(q / 10 * self.vmax, self.vmax))
        draw.text((20 + 14 * 11 + 6, y - 1), f"residual 0 - {self.vmax:.2f} px; dashed: dropped;"
                  " red tiles: no reliable edge", fill=(51, 51, 51))
        for q, line in enumerate(self.caption):
            draw.text((20, y + 24 + 15 * q), line, fill=(51, 51, 51))
        img.save(out, format="PNG")


def _html(result: RegistrationResult, svg: str) -> str:
    e = result.edges
    ndim = result.positions.shape[1]
    ax = _AXES[:ndim]
    head = "".join(f"<th>{h}</th>" for h in ["pair", *(f"shift {a}" for a in ax), "NCC",
                                             "residual (px)", "status"])
    rows = []
    for k in range(len(e)):
        i, j = (int(v) for v in e.pairs[k])
        cells = [f"{i}-{j}", *(_fmt(v) for v in e.shift[k][::-1]), _fmt(e.ncc[k]),
                 _fmt(e.residual[k]), e.status[k]]
        cls = "" if e.status[k] == "kept" else ' class="dropped"'
        rows.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
                    + "</tr>")
    names = "".join(f"<li>{k}: {html.escape(n)}</li>" for k, n in enumerate(result.names))
    summary = "".join(f"<p>{html.escape(line)}</p>" for line in summary_lines(result))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>gpufusion registration report</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}tr.dropped{{color:#999}}
</style></head><body>
<h1>Registration report</h1>
{summary}
<p>Mean overlap NCC: for every pair of tiles whose footprints overlap before or after
registration (diagonal neighbours included), the Pearson correlation of the pixels both
tiles cover, the second tile linearly interpolated at the sub-pixel offset; averaged over
the pairs. It needs no reference: misplaced tiles correlate less.</p>
{svg}
<h2>Edges</h2>
<table><tr>{head}</tr>
{"".join(rows)}
</table>
<h2>Tiles</h2><ol start="0" style="list-style:none">{names}</ol>
</body></html>
"""
