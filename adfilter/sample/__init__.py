"""The embedded multimodal sample: real SMS texts, real photographs, rendered ad and clean images.

`build_sample` makes the whole sample (used by the `ingest` stage); the loaders and renderers
are a library of their own, for anything else that needs realistic posts (a traffic
simulator, tests).
"""

from adfilter.sample.backgrounds import load_backgrounds, load_documents, make_background
from adfilter.sample.build import build_sample, plan_sample, render_post_image
from adfilter.sample.categories import CATEGORIES, SENSITIVITY, sensitivity_of, text_category
from adfilter.sample.render import (
    AD_STYLES,
    CLEAN_KINDS,
    HARD_NEGATIVE_KINDS,
    qr_image,
    qr_payload,
    render_ad_image,
    render_clean_image,
)
from adfilter.sample.sms import load_sms_corpus

__all__ = [
    "AD_STYLES",
    "CATEGORIES",
    "CLEAN_KINDS",
    "HARD_NEGATIVE_KINDS",
    "SENSITIVITY",
    "build_sample",
    "load_backgrounds",
    "load_documents",
    "load_sms_corpus",
    "make_background",
    "plan_sample",
    "qr_image",
    "qr_payload",
    "render_ad_image",
    "render_clean_image",
    "render_post_image",
    "sensitivity_of",
    "text_category",
]
