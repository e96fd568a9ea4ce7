"""Tissue detection: segmentation (saturation, pen marks, artefacts, holes), external masks, GeoJSON.

Public surface::

    SegmentationParams                      every threshold, documented (one CLI option each)
    segment_slide(slide, params)            -> TissueMask
    segment_image(rgb, mpp, params, sx, sy) -> TissueMask (numpy in; for tests and custom readers)
    load_tissue_mask(path, slide, params)   -> TissueMask from GeoJSON or a mask image (--tissue-mask)
    find_mask_file(spec, slide_id)          -> the per-slide file of a --tissue-mask folder
    write_geojson(path, contours, pen), read_geojson_contours(path)
"""

from mstar_extract.tissue.contours import TissueContour
from mstar_extract.tissue.external import find_mask_file, load_tissue_mask
from mstar_extract.tissue.geojson import contours_to_geojson, read_geojson_contours, write_geojson
from mstar_extract.tissue.params import SegmentationParams
from mstar_extract.tissue.result import TissueMask
from mstar_extract.tissue.segment import segment_image, segment_slide

__all__ = [
    "SegmentationParams", "TissueContour", "TissueMask", "segment_image", "segment_slide", "load_tissue_mask",
    "find_mask_file", "contours_to_geojson", "read_geojson_contours", "write_geojson",
]
