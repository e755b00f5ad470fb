"""The multimodal ad/spam net: EfficientNet image tokens, ALBERT text tokens, handcrafted tokens.

`MultimodalNet.forward` goes from preprocessed tensors to both heads and the score, with the
arguments in this fixed order (`INPUT_NAMES`; B = batch):

    token_ids  int64   [B, L]        WordPiece ids of the normalised text, 0 = padding
    image      float32 [B, 3, S, S]  RGB in [0, 1] (`image_small` / 255, NCHW); the ImageNet
                                     mean/std normalisation happens inside the net
    tfidf      float32 [B, D_tfidf]
    sent_emb   float32 [B, 384]
    sift_bow   float32 [B, D_sift]
    hsv        float32 [B, D_hsv]
    qr         float32 [B, 1]
    has_text   bool    [B]
    has_image  bool    [B]

and returns `(ad_logit, sensitivity, score)`, each float32 [B]: `ad_logit` is the ad head's
logit after Platt scaling (`scale * raw + bias`, fitted on val after training), `p_ad = sigmoid(ad_logit)`,
`sensitivity` in [0, 1], `score = clip(w_ad * p_ad + w_sens * sensitivity, 0, 1)`.

A missing modality is handled by masks only: its tokens (backbone tokens and its handcrafted
tokens) are masked out of every attention and of the pooling, so whatever its input tensor
holds has no effect. Every data-dependent choice is a tensor operation, so `torch.jit.trace`
gives a graph that is right for any batch size and any mix of modalities.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import timm
import torch
from torch import Tensor, nn

INPUT_NAMES: Final = (
    "token_ids", "image", "tfidf", "sent_emb", "sift_bow", "hsv", "qr", "has_text", "has_image"
)
OUTPUT_NAMES: Final = ("ad_logit", "sensitivity", "score")

# Handcrafted feature blocks, each one token, and the modality whose presence makes it valid.
HANDCRAFTED: Final = {
    "tfidf": "text", "sent_emb": "text", "sift_bow": "image", "hsv": "image", "qr": "image"
}


class NetConfigError(ValueError):
    """Sizes or names that cannot build the net."""


# --------------------------------------------------------------------------- input helpers


def prepare_image(image_small: Tensor) -> Tensor:
    """`image_small` (uint8 [B, S, S, 3], as the featurizer writes it) -> the net's `image`."""
    return image_small.permute(0, 3, 1, 2).to(torch.float32).div(255.0)


def net_inputs(
    arrays: Mapping[str, Tensor | np.ndarray], device: torch.device | str | None = None
) -> tuple[Tensor, ...]:
    """The forward's positional arguments from featurizer arrays (npz keys, `image_small`)."""
    missing = [k for k in (*INPUT_NAMES[:1], "image_small", *INPUT_NAMES[2:]) if k not in arrays]
    if missing:
        raise KeyError(
            f"feature arrays lack {missing}; expected the featurize stage's keys "
            f"(token_ids, image_small, {', '.join(HANDCRAFTED)}, has_text, has_image)"
        )

    def tensor(name: str) -> Tensor:
        value = arrays[name]
        t = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
        return t.to(device) if device is not None else t

    return (
        tensor("token_ids").long(),
        prepare_image(tensor("image_small")),
        *(tensor(name).float() for name in HANDCRAFTED),
        tensor("has_text").bool(),
        tensor("has_image").bool(),
    )


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# --------------------------------------------------------------------------- building blocks


class MaskedAttention(nn.Module):
    """Residual multi-head attention + LayerNorm whose keys may be masked out.

    A row whose keys are all masked (a post without the other modality) would give NaN from
    softmax; for such rows every key is unmasked for the computation and the attention output
    is replaced by zeros afterwards, so the query passes through the residual unchanged.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(dim)

    def forward(self, query: Tensor, keys: Tensor, key_valid: Tensor) -> Tensor:
        any_valid = key_valid.any(dim=1, keepdim=True)
        padding = ~key_valid & any_valid
        out, _ = self.attn(query, keys, keys, key_padding_mask=padding, need_weights=False)
        out = torch.where(any_valid.unsqueeze(-1), out, torch.zeros_like(out))
        return self.norm(query + self.drop(out))


class FeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float, expansion: int = 4) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, expansion * dim), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(expansion * dim, dim), nn.Dropout(dropout),
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.net(x))


class FeatureToken(nn.Module):
    """One handcrafted feature block -> one token (Linear + LayerNorm + GELU).

    The norm comes after the projection: a LayerNorm over the raw block would rescale each
    post's row by its own spread, so one large column (a margin in the tfidf block) would
    squash the rest and lose its own magnitude. Projected first, every column keeps its
    scale, and the norm still gives blocks as different as a histogram and a margin tokens
    of the same size.
    """

    def __init__(self, width: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, dim)
        self.norm = nn.LayerNorm(dim)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.proj(x)))


class VisionBranch(nn.Module):
    """A timm EfficientNet's last feature map as tokens, projected to `dim`.

    The backbone runs only on the rows that have an image (gathered by index, scattered back
    into zeros): blank stand-ins would otherwise enter BatchNorm's batch statistics during
    training, and skipping them halves the image cost of a mixed batch. An empty selection
    is valid, so a batch without any image needs no special case.
    """

    def __init__(self, backbone: str, image_size: int, dim: int, pretrained: bool) -> None:
        super().__init__()
        if not timm.is_model(backbone):
            known = ", ".join(timm.list_models("*efficientnet*"))
            raise NetConfigError(
                f"model.vision.backbone '{backbone}' is not a timm model; EfficientNets timm "
                f"knows: {known}"
            )
        try:
            self.backbone = timm.create_model(
                backbone, pretrained=pretrained, num_classes=0, global_pool=""
            )
        except Exception as exc:  # hub errors come in many types
            if not pretrained:
                raise
            raise NetConfigError(
                f"model.vision.pretrained: could not load weights for '{backbone}' ({exc}); "
                f"set pretrained: false in params.yaml or provide the hub cache"
            ) from exc
        cfg = self.backbone.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            was_training = self.backbone.training
            self.backbone.eval()
            fmap = self.backbone.forward_features(torch.zeros(1, 3, image_size, image_size))
            self.backbone.train(was_training)
        channels, self.num_tokens = fmap.shape[1], fmap.shape[2] * fmap.shape[3]
        self.proj = nn.Sequential(nn.Linear(channels, dim), nn.LayerNorm(dim))
        self.pos = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.dim = dim

    def forward(self, image: Tensor, has_image: Tensor) -> Tensor:
        # BatchNorm cannot train on a single value per channel (one image, 1x1 feature map), so
        # a batch with one image lends the backbone a blank row whose output is dropped below.
        need = (has_image.long().sum() == 1).long()
        lent = (~has_image) & (torch.cumsum((~has_image).long(), 0) <= need)
        rows = torch.nonzero(has_image | lent, as_tuple=False).squeeze(1)
        x = (image.index_select(0, rows) - self.mean) / self.std
        fmap = self.backbone.forward_features(x)
        tokens = self.proj(fmap.flatten(2).transpose(1, 2)) + self.pos
        keep = has_image.index_select(0, rows).view(-1, 1, 1)
        tokens = torch.where(keep, tokens, torch.zeros_like(tokens))
        out = tokens.new_zeros((image.shape[0], self.num_tokens, self.dim))
        return out.index_copy(0, rows, tokens)


class TextBranch(nn.Module):
    """An ALBERT encoder over `token_ids`; its token states projected to `dim`.

    Like the image branch it runs only on the rows that have text, which saves the encoder's
    cost for image-only posts.
    """

    def __init__(
        self,
        dim: int,
        max_seq_tokens: int,
        vocab_size: int,
        embedding_size: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        intermediate_size: int,
        pretrained: str = "",
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        from transformers import AlbertConfig, AlbertModel

        if config is not None:
            # A saved encoder config rebuilds a trained net exactly, without its pretrained source.
            self.encoder = AlbertModel(
                AlbertConfig.from_dict({**config, "torchscript": True}), add_pooling_layer=False
            )
        elif pretrained:
            # Never reach a model hub at run time; a name must already be in the local cache.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            self.encoder = AlbertModel.from_pretrained(
                pretrained, torchscript=True, add_pooling_layer=False, local_files_only=True
            )
            if self.encoder.config.vocab_size < vocab_size:
                raise NetConfigError(
                    f"model.text.pretrained '{pretrained}' has a vocabulary of "
                    f"{self.encoder.config.vocab_size} ids but the featurizer's token_ids go up "
                    f"to {vocab_size}; use a checkpoint trained on the featurizer's WordPiece "
                    f"vocabulary or pretrained: \"\""
                )
        else:
            if hidden_size % num_heads:
                raise NetConfigError(
                    f"model.text.hidden_size {hidden_size} is not a multiple of "
                    f"model.text.num_heads {num_heads}"
                )
            config = AlbertConfig(
                vocab_size=vocab_size,
                embedding_size=embedding_size,
                hidden_size=hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                intermediate_size=intermediate_size,
                max_position_embeddings=max(max_seq_tokens, 8),
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                torchscript=True,  # tuple outputs, so torch.jit.trace works
            )
            self.encoder = AlbertModel(config, add_pooling_layer=False)
        self.proj = nn.Sequential(nn.Linear(self.encoder.config.hidden_size, dim), nn.LayerNorm(dim))

    def forward(self, token_ids: Tensor, text_valid: Tensor, has_text: Tensor) -> Tensor:
        # Only rows with text go through ALBERT (gathered, then scattered back into zeros).
        # ALBERT cannot take an empty batch, so a batch without text lends it one blank row.
        need = (has_text.long().sum() == 0).long()
        lent = (~has_text) & (torch.cumsum((~has_text).long(), 0) <= need)
        rows = torch.nonzero(has_text | lent, as_tuple=False).squeeze(1)
        valid = text_valid.index_select(0, rows)
        # A row with every key masked (the lent row, or text that tokenised to nothing) lets
        # its first position through, so attention stays finite; its tokens are masked later.
        first = torch.zeros_like(valid)
        first[:, 0] = True
        empty = ~valid.any(dim=1, keepdim=True)
        attention_mask = (valid | (empty & first)).long()
        states = self.encoder(input_ids=token_ids.index_select(0, rows),
                              attention_mask=attention_mask)[0]
        tokens = self.proj(states)
        keep = has_text.index_select(0, rows).view(-1, 1, 1)
        tokens = torch.where(keep, tokens, torch.zeros_like(tokens))
        out = tokens.new_zeros((token_ids.shape[0], token_ids.shape[1], tokens.shape[-1]))
        return out.index_copy(0, rows, tokens)


def _head(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.LayerNorm(2 * dim), nn.Dropout(dropout), nn.Linear(2 * dim, dim), nn.GELU(),
        nn.Dropout(dropout), nn.Linear(dim, 1),
    )


# --------------------------------------------------------------------------- the net


class MultimodalNet(nn.Module):
    """Cross-attention fusion of image, text and handcrafted tokens; ad and sensitivity heads.

    Text tokens attend to image tokens and image tokens to text tokens (in parallel, residual +
    LayerNorm), then `fusion_layers` joint self-attention blocks run over a learned summary
    token, both token sets and one token per handcrafted block. The pooled vector (summary
    token and the masked mean of all valid tokens) feeds the two heads.
    """

    def __init__(
        self,
        feature_dims: Mapping[str, int],
        image_size: int,
        max_seq_tokens: int,
        feature_dim: int = 128,
        num_heads: int = 4,
        fusion_layers: int = 1,
        dropout: float = 0.1,
        vision_backbone: str = "efficientnet_b0",
        vision_pretrained: bool = False,
        text_pretrained: str = "",
        text_vocab_size: int = 30522,
        text_embedding_size: int = 128,
        text_hidden_size: int = 256,
        text_num_layers: int = 4,
        text_num_heads: int = 4,
        text_intermediate_size: int = 1024,
        text_config: Mapping[str, Any] | None = None,
        score_weight_ad: float = 0.85,
        score_weight_sensitivity: float = 0.15,
    ) -> None:
        super().__init__()
        missing = [k for k in HANDCRAFTED if k not in feature_dims]
        if missing:
            raise NetConfigError(
                f"feature_dims lack {missing} (from artifacts/featurizer/meta.json); "
                f"re-run the featurize stage"
            )
        if feature_dim % num_heads:
            raise NetConfigError(
                f"model.feature_dim {feature_dim} is not a multiple of model.num_heads {num_heads}"
            )
        self.feature_dims = {k: int(feature_dims[k]) for k in HANDCRAFTED}
        self.score_weight_ad = float(score_weight_ad)
        self.score_weight_sensitivity = float(score_weight_sensitivity)

        self.vision = VisionBranch(vision_backbone, image_size, feature_dim, vision_pretrained)
        self.text = TextBranch(
            feature_dim, max_seq_tokens, text_vocab_size, text_embedding_size, text_hidden_size,
            text_num_layers, text_num_heads, text_intermediate_size, text_pretrained, text_config,
        )
        self.handcrafted = nn.ModuleDict(
            {k: FeatureToken(w, feature_dim) for k, w in self.feature_dims.items()}
        )
        # Token types: 0 summary, 1 text, 2 image, 3.. one per handcrafted block.
        self.type_embedding = nn.Parameter(torch.zeros(3 + len(HANDCRAFTED), feature_dim))
        nn.init.trunc_normal_(self.type_embedding, std=0.02)
        self.summary = nn.Parameter(torch.zeros(1, 1, feature_dim))
        nn.init.trunc_normal_(self.summary, std=0.02)

        self.text_to_image = MaskedAttention(feature_dim, num_heads, dropout)
        self.image_to_text = MaskedAttention(feature_dim, num_heads, dropout)
        self.text_ff = FeedForward(feature_dim, dropout)
        self.image_ff = FeedForward(feature_dim, dropout)
        self.joint = nn.ModuleList(
            nn.ModuleList([MaskedAttention(feature_dim, num_heads, dropout),
                           FeedForward(feature_dim, dropout)])
            for _ in range(fusion_layers)
        )
        self.ad_head = _head(feature_dim, dropout)
        self.sensitivity_head = _head(feature_dim, dropout)
        # Platt scaling of the ad head, fitted on the validation split after training
        # (models/calibration.py): ad_logit = scale * raw + bias. Identity while training;
        # buffers, so they travel in the state dict, the checkpoint and the TorchScript graph.
        self.register_buffer("ad_logit_scale", torch.ones(()))
        self.register_buffer("ad_logit_bias", torch.zeros(()))

    def set_calibration(self, scale: float, bias: float) -> None:
        """Platt scaling of the ad head; (1, 0) is the raw head."""
        self.ad_logit_scale.fill_(float(scale))
        self.ad_logit_bias.fill_(float(bias))

    def forward(
        self,
        token_ids: Tensor,
        image: Tensor,
        tfidf: Tensor,
        sent_emb: Tensor,
        sift_bow: Tensor,
        hsv: Tensor,
        qr: Tensor,
        has_text: Tensor,
        has_image: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        has_text = has_text.bool()
        has_image = has_image.bool()
        text_valid = (token_ids != 0) & has_text.unsqueeze(1)
        text = self.text(token_ids, text_valid, has_text) + self.type_embedding[1]
        img = self.vision(image, has_image) + self.type_embedding[2]
        image_valid = has_image.unsqueeze(1).expand(-1, img.shape[1])

        # Both directions read the tokens as they were, not each other's update.
        text, img = (
            self.text_ff(self.text_to_image(text, img, image_valid)),
            self.image_ff(self.image_to_text(img, text, text_valid)),
        )

        blocks = {"tfidf": tfidf, "sent_emb": sent_emb, "sift_bow": sift_bow, "hsv": hsv, "qr": qr}
        modality = {"text": has_text, "image": has_image}
        hand = torch.stack(
            [self.handcrafted[k](blocks[k]) + self.type_embedding[3 + i]
             for i, k in enumerate(HANDCRAFTED)],
            dim=1,
        )
        hand_valid = torch.stack([modality[m] for m in HANDCRAFTED.values()], dim=1)

        summary = self.summary.expand(token_ids.shape[0], -1, -1) + self.type_embedding[0]
        tokens = torch.cat([summary, text, img, hand], dim=1)
        valid = torch.cat([torch.ones_like(has_text).unsqueeze(1), text_valid, image_valid,
                           hand_valid], dim=1)
        for attention, feed_forward in self.joint:
            tokens = feed_forward(attention(tokens, tokens, valid))

        weights = valid.unsqueeze(-1).to(tokens.dtype)
        mean = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        pooled = torch.cat([tokens[:, 0], mean], dim=-1)

        ad_logit = self.ad_head(pooled).squeeze(-1) * self.ad_logit_scale + self.ad_logit_bias
        sensitivity = torch.sigmoid(self.sensitivity_head(pooled).squeeze(-1))
        score = (
            self.score_weight_ad * torch.sigmoid(ad_logit)
            + self.score_weight_sensitivity * sensitivity
        ).clamp(0.0, 1.0)
        return ad_logit, sensitivity, score
