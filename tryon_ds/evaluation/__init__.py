"""Try-on quality on a test split, two ways: the field's protocol (field.py: SSIM, LPIPS, FID and KID against the
reference set, as the published tables compute them) and ours in the garment region (quality.py: PSNR and SSIM
against two baselines, and each super-resolution UNet alone against bilinear upsampling); run.py is an
evaluation run over shards or a folder of results, as tools/evaluate.py starts it."""
from .field import FieldMetrics, ReferenceSet, markdown, summarise
from .quality import (METHODS, QualityTable, format_table, garment_region, mean_colour_fill, psnr, size_name,
                      sr_methods, tryon_candidates)

__all__ = ["FieldMetrics", "METHODS", "QualityTable", "ReferenceSet", "format_table", "garment_region", "markdown",
           "mean_colour_fill", "psnr", "size_name", "sr_methods", "summarise", "tryon_candidates"]
