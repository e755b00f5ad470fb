"""Augmentation of the train split: text perturbations, image transforms, and (in `models.gan`)
feature-space GAN samples of the rare class.

The families used to make training variants and the families used to build the held-out
evaluation slice live in separate modules that never import each other:

- `adfilter.augment.text`: textattack recipes and spammers' obfuscations (training);
- `adfilter.augment.images`: the torchvision.transforms.v2 pipeline (training, and on the fly);
- `adfilter.augment.heldout`: text and image families kept out of training entirely, used
  only for the `obfuscated_ads_heldout` evaluation slice.

Nothing heavy is imported here: textattack and torchvision load when a module is used.
"""

from __future__ import annotations

from typing import Final

ORIGINAL: Final = "original"
TEXT_ATTACK: Final = "text_attack"
OBFUSCATION: Final = "obfuscation"
IMAGE_TRANSFORM: Final = "image_transform"
GAN: Final = "gan"
HELDOUT: Final = "heldout_obfuscation"
# Every value of the `source` array of data/augmented/train.npz.
SOURCES: Final = (ORIGINAL, TEXT_ATTACK, OBFUSCATION, IMAGE_TRANSFORM, GAN)
# The sources a params.yaml `augment.mix` may weight.
ADDED_SOURCES: Final = SOURCES[1:]
