"""Tumour annotations as polygons: ASAP XML (Camelyon16) and QuPath GeoJSON, read and write.

Coordinates are level-0 pixels ``(x, y)``. A :class:`Polygon` is either a tumour region or an
exclusion (a non-tumour hole cut out of tumour, Camelyon16's group ``_2`` / ``Exclusion``).

Class mapping when reading:

- ASAP: ``PartOfGroup`` ``Tumor``/``Tumour``/``_0``/``_1`` -> tumour; ``_2``/``Exclusion``/
  ``Normal`` -> exclusion; other groups are ignored.
- GeoJSON: ``properties.classification.name`` (or ``properties.classification`` as a string)
  mapped with the same names; other classes are ignored; an annotation without a
  classification counts as tumour
  (QuPath exports of hand-drawn tumour outlines are often unclassified). Polygon holes
  (interior rings) are exclusions; ``MultiPolygon`` is split into polygons.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from histodd_fed.atomic import atomic_write_text
from histodd_fed.errors import InputError

TUMOUR_NAMES = {"tumor", "tumour", "_0", "_1", "metastasis", "metastases"}
EXCLUSION_NAMES = {"_2", "exclusion", "normal", "non-tumor", "non-tumour"}
ANNOTATION_SUFFIXES = (".xml", ".geojson", ".json")


@dataclass
class Polygon:
    """A closed polygon in level-0 pixels; ``points`` is (K, 2) float ``(x, y)`` without repeat."""

    points: np.ndarray
    label: str = "tumour"  # "tumour" | "exclusion"
    holes: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.points = _clean_ring(self.points)
        self.holes = [_clean_ring(h) for h in self.holes]
        if self.label not in ("tumour", "exclusion"):
            raise ValueError(f"polygon label must be tumour or exclusion, got {self.label!r}")


def _clean_ring(points) -> np.ndarray:
    a = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(a) > 1 and np.allclose(a[0], a[-1]):
        a = a[:-1]
    return a


def _classify(name: str | None, default: str | None) -> str | None:
    if name is None or name == "":
        return default
    n = name.strip().lower()
    if n in TUMOUR_NAMES:
        return "tumour"
    if n in EXCLUSION_NAMES:
        return "exclusion"
    return None


# --------------------------------------------------------------------------- ASAP XML
def write_asap_xml(path: str | Path, polygons: Sequence[Polygon]) -> Path:
    """Write polygons as Camelyon16-style ASAP XML (tumour -> group ``Tumor``, exclusion -> ``_2``)."""
    root = ET.Element("ASAP_Annotations")
    anns = ET.SubElement(root, "Annotations")
    k = 0
    for poly in polygons:
        rings = [(poly.points, poly.label)] + [(h, "exclusion") for h in poly.holes]
        for ring, label in rings:
            group = "Tumor" if label == "tumour" else "_2"
            colour = "#F4FA58" if label == "tumour" else "#64FE2E"
            a = ET.SubElement(anns, "Annotation", Name=f"Annotation {k}", Type="Polygon",
                              PartOfGroup=group, Color=colour)
            coords = ET.SubElement(a, "Coordinates")
            for i, (x, y) in enumerate(ring):
                ET.SubElement(coords, "Coordinate", Order=str(i), X=f"{x:.2f}", Y=f"{y:.2f}")
            k += 1
    groups = ET.SubElement(root, "AnnotationGroups")
    for name, colour in (("Tumor", "#FF0000"), ("_2", "#00FF00")):
        g = ET.SubElement(groups, "Group", Name=name, PartOfGroup="None", Color=colour)
        ET.SubElement(g, "Attributes")
    ET.indent(root, space="\t")
    text = '<?xml version="1.0"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
    return atomic_write_text(path, text)


def read_asap_xml(path: str | Path) -> list[Polygon]:
    """Read an ASAP XML file (Camelyon16 format) into polygons (see module doc for groups)."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise InputError(f"{path}: unreadable ASAP XML ({exc})") from exc
    if root.tag != "ASAP_Annotations":
        raise InputError(f"{path}: not ASAP XML (root element {root.tag!r})")
    out: list[Polygon] = []
    for a in root.iter("Annotation"):
        label = _classify(a.get("PartOfGroup"), default=None)
        if label is None or a.get("Type", "Polygon") not in ("Polygon", "Spline", "Rectangle"):
            continue
        pts = []
        for c in a.iter("Coordinate"):
            try:
                pts.append((int(c.get("Order", len(pts))), float(c.get("X").replace(",", ".")),
                            float(c.get("Y").replace(",", "."))))
            except (TypeError, ValueError) as exc:
                raise InputError(f"{path}: bad Coordinate in {a.get('Name')!r} ({exc})") from exc
        if len(pts) < 3:
            continue
        pts.sort(key=lambda t: t[0])
        out.append(Polygon(np.array([(x, y) for _, x, y in pts]), label=label))
    return out


# --------------------------------------------------------------------------- GeoJSON
def write_geojson(path: str | Path, polygons: Sequence[Polygon]) -> Path:
    """Write polygons as a QuPath GeoJSON FeatureCollection (classification ``Tumor``/``Exclusion``)."""
    feats = []
    for poly in polygons:
        rings = [poly.points] + list(poly.holes)
        coords = [[[round(float(x), 2), round(float(y), 2)] for x, y in np.vstack([r, r[:1]])] for r in rings]
        name, colour = ("Tumor", [200, 0, 0]) if poly.label == "tumour" else ("Exclusion", [0, 200, 0])
        feats.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": coords},
            "properties": {"objectType": "annotation", "classification": {"name": name, "color": colour}},
        })
    return atomic_write_text(path, json.dumps({"type": "FeatureCollection", "features": feats}, indent=1) + "\n")


def _feature_class(props: dict) -> str | None:
    c = props.get("classification")
    if isinstance(c, dict):
        return c.get("name")
    if isinstance(c, str):
        return c
    return None


def read_geojson(path: str | Path) -> list[Polygon]:
    """Read a QuPath GeoJSON (FeatureCollection, a Feature, or a list of Features)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable GeoJSON ({exc})") from exc
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        feats = doc.get("features", [])
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        feats = [doc]
    elif isinstance(doc, list):
        feats = doc
    else:
        raise InputError(f"{path}: not GeoJSON (expected a FeatureCollection, Feature or list of Features)")
    out: list[Polygon] = []
    try:
        for f in feats:
            label = _classify(_feature_class(f.get("properties") or {}), default="tumour")
            if label is None:
                continue
            geom = f.get("geometry") or {}
            kind = geom.get("type")
            if kind == "Polygon":
                polys = [geom["coordinates"]]
            elif kind == "MultiPolygon":
                polys = geom["coordinates"]
            else:
                continue
            for rings in polys:
                if not rings or len(rings[0]) < 3:
                    continue
                out.append(Polygon(np.asarray(rings[0], dtype=np.float64), label=label,
                                   holes=[np.asarray(r, dtype=np.float64) for r in rings[1:] if len(r) >= 3]))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(f"{path}: malformed GeoJSON feature ({exc})") from exc
    return out


# --------------------------------------------------------------------------- generic
def read_annotations(path: str | Path) -> list[Polygon]:
    """Read ``.xml`` (ASAP) or ``.geojson``/``.json`` (QuPath) by suffix."""
    path = Path(path)
    if path.suffix.lower() == ".xml":
        return read_asap_xml(path)
    if path.suffix.lower() in (".geojson", ".json"):
        return read_geojson(path)
    raise InputError(f"{path}: unknown annotation format (expected .xml or .geojson)")


def find_annotation_file(slide_id: str, dirs: Iterable[Path]) -> Path | None:
    """The first ``<dir>/<slide_id>.{xml,geojson,json}`` that exists, in the order of ``dirs``."""
    for d in dirs:
        if d is None:
            continue
        for suffix in ANNOTATION_SUFFIXES:
            p = Path(d) / f"{slide_id}{suffix}"
            if p.is_file():
                return p
    return None


def rasterise(polygons: Sequence[Polygon], size: tuple[int, int], downsample: float) -> np.ndarray:
    """A bool (H, W) mask of ``size=(W, H)``: inside tumour polygons and outside exclusions.

    Polygons are in level-0 pixels; the mask pixel ``(i, j)`` covers level-0
    ``[j*downsample, (j+1)*downsample)`` horizontally.
    """
    from PIL import Image, ImageDraw

    img = Image.new("L", (int(size[0]), int(size[1])), 0)
    draw = ImageDraw.Draw(img)

    def ring(pts: np.ndarray) -> list[tuple[float, float]]:
        q = pts / downsample - 0.5  # PIL samples pixel centres at integer coordinates
        return [(float(x), float(y)) for x, y in q]

    for label in ("tumour", "exclusion"):
        for p in polygons:
            if len(p.points) < 3:
                continue
            if p.label == label:
                draw.polygon(ring(p.points), fill=1 if label == "tumour" else 0)
            if label == "exclusion":
                for h in p.holes:
                    draw.polygon(ring(h), fill=0)
    return np.asarray(img, dtype=bool)
