"""Who decides a post: the fastText gate, or the deep TorchScript model.

The gate reads text only. Its thresholds come from the bundle's `gate.json`, calibrated by the
export stage on the validation split's text-only posts so that the cascade loses at most
`gate.max_recall_loss` of the deep model's recall there and blocks no clean post the deep model
alone would allow:

    the post has an image        -> deep
    no text                      -> deep   (nothing for the gate to read)
    p_gate <= low                -> allow  (confidently clean text)
    p_gate >= high               -> block  (confidently an ad; only with `gate.block: true`,
                                               otherwise `high` is 2.0 and the gate never blocks)
    otherwise                    -> deep

Why every image post goes to the deep model: the `hidden_image_ad` slice is exactly clean text
with an ad image, which a text gate cannot see; the thresholds in `gate.json` were calibrated
on text-only posts (its `scope`), so they promise nothing about posts with an image; and the
bundle carries no cheap image model calibrated like the gate. The cheap image signals (the QR
flag, HSV and SIFT histograms) are computed by the featurizer and read by the deep model,
where they were trained to count; a QR code alone is no proof of an ad (menus, tickets), so
blocking on it would add false kills. So an image post costs a deep-model call, and text-only
posts, the bulk of the traffic, mostly do not.
"""

from __future__ import annotations

from typing import Final

import numpy as np

ALLOW: Final = "allow"
BLOCK: Final = "block"
DEEP: Final = "deep"

STAGE_GATE: Final = "gate"
STAGE_DEEP: Final = "deep"


def route(
    p_gate: np.ndarray,
    has_text: np.ndarray,
    has_image: np.ndarray,
    low: float,
    high: float,
) -> list[str]:
    """ALLOW, BLOCK or DEEP for each post (see the module docstring)."""
    p = np.asarray(p_gate, dtype=np.float64)
    text = np.asarray(has_text, dtype=bool)
    image = np.asarray(has_image, dtype=bool)
    if not p.shape == text.shape == image.shape:
        raise ValueError(
            f"route: p_gate {p.shape}, has_text {text.shape} and has_image {image.shape} must "
            f"have one value per post"
        )
    out = np.full(p.shape, DEEP, dtype=object)
    gated = text & ~image
    allow = gated & (p <= low)
    block = gated & (p >= high)
    out[allow] = ALLOW
    out[block] = BLOCK
    return [str(x) for x in out]


def deep_decision(score: float, threshold: float) -> str:
    """The deep model blocks when its score is above the deployed threshold."""
    return BLOCK if score > threshold else ALLOW
