"""PAD, the Patch-Aligned Dataset (method.md §4): records, pluggable stages and the builder.

    from fam.pad import build_pad, list_images, GroundTruthProvider, read_pad
    gt = GroundTruthProvider("scenes/pad.jsonl")
    build_pad(list_images("scenes"), gt, gt, gt, "out/pad.jsonl")

Model-based stages (:class:`HFGroundingDinoDetector`, :class:`HFSamSegmenter`) import
transformers only when constructed.
"""
from fam.pad.pipeline import PadStats, build_pad, filter_regions, list_images, mask_iou, stats_path
from fam.pad.detect import HFGroundingDinoDetector, HFSamSegmenter, batched_nms, box_iou, nms
from fam.pad.protocols import Detection, Detector, ImageMeta, Segmenter, Tagger
from fam.pad.taggers import (STOP_WORDS, CaptionNounTagger, GroundTruthProvider, ListTagger,
                             extract_noun_phrases)
from fam.pad.records import (
    PadRecord,
    PadRegion,
    iter_pad,
    pad_line,
    parse_pad_record,
    read_pad,
    region_mask,
    write_pad,
)

__all__ = [
    "PadStats", "build_pad", "filter_regions", "list_images", "mask_iou", "stats_path",
    "STOP_WORDS", "CaptionNounTagger", "Detection", "Detector", "GroundTruthProvider",
    "HFGroundingDinoDetector", "HFSamSegmenter", "ImageMeta", "ListTagger", "Segmenter",
    "Tagger", "batched_nms", "box_iou", "extract_noun_phrases", "nms",
    "PadRecord", "PadRegion", "iter_pad", "pad_line", "parse_pad_record", "read_pad",
    "region_mask", "write_pad",
]
