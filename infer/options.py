"""Command-line options shared by idc-infer and idc-tile, and the quality-control defaults they show.

Light on purpose (click only): the commands import it at start-up, and `idc-infer --help` must not load
OpenCV or numpy. The defaults are tuned on real patches (the measurements are in idc_infer.quality).
"""

from __future__ import annotations

import click

DEFAULT_MIN_TISSUE = 0.05  # share of tissue pixels below which a patch or slide tile is background (glass)
DEFAULT_MIN_SHARPNESS = 100.0  # variance of the Laplacian below which a tissue patch is blurred


def slide_options(function):
    """--mpp, --patch-mpp and --min-tissue: how slides are read and tiled, the same in both commands."""
    decorators = [
        click.option(
            "--mpp",
            type=click.FloatRange(0.01, 100.0),
            default=None,
            help="Slides: microns per pixel of the full-resolution scan (overrides what the files record; "
            "e.g. 0.25 for most 40x scans).",
        ),
        click.option(
            "--patch-mpp",
            type=click.FloatRange(0.01, 100.0),
            default=None,
            help="Slides: microns per pixel of the model's training patches, the scale tiles are cut at "
            "[default: the model's contract; 4.0 for the public set].",
        ),
        click.option(
            "--min-tissue",
            type=click.FloatRange(0.0, 1.0),
            default=DEFAULT_MIN_TISSUE,
            show_default=True,
            help="Share of tissue pixels below which a patch or slide tile is background (glass): not scored, "
            "and not written by idc-tile.",
        ),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function
