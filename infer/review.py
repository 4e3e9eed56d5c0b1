"""Review outputs a pathologist looks at: IDC heatmap mosaic PNG (mosaic.py), QuPath GeoJSON (geojson.py) and a
cohort report.html (report.py); this module wires the per-patient ones into the engine."""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

from .geojson import *  # noqa: F403 - the review API in one place, as before the split
from .geojson import GeoJsonSink
from .mosaic import *  # noqa: F403
from .mosaic import DEFAULT_REVIEW_SCALE, MosaicSink
from .report import *  # noqa: F403

if TYPE_CHECKING:
    from .engine import SinkFactory


def review_sink_factories(scale: float = DEFAULT_REVIEW_SCALE, geojson_scale: float | None = None) -> list[SinkFactory]:
    """The per-patient review sinks for engine.RunSettings.sink_factories."""
    return [partial(MosaicSink, scale=scale), partial(GeoJsonSink, geojson_scale=geojson_scale)]
