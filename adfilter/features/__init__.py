"""Features of a post, shared by training and serving: `FeaturePipeline` and `normalize_text`.

Imported lazily, so `import adfilter.features` stays light (no sklearn, OpenCV or torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adfilter.features.pipeline import FeaturePipeline
    from adfilter.features.textnorm import normalize_text

__all__ = ["FeaturePipeline", "normalize_text"]


def __getattr__(name: str) -> Any:
    if name == "FeaturePipeline":
        from adfilter.features.pipeline import FeaturePipeline

        return FeaturePipeline
    if name == "normalize_text":
        from adfilter.features.textnorm import normalize_text

        return normalize_text
    raise AttributeError(f"module 'adfilter.features' has no attribute '{name}'")
