"""CLIP: the offline BPE tokenizer, the contrastive losses and the zero-shot classifier.

    nmjax.clip.tokenize(texts, context_length=77) -> int32 (N, context_length)
    nmjax.clip.contrastive_loss(image_features, text_features, logit_scale) -> scalar
    nmjax.clip.siglip_loss(image_features, text_features, logit_scale, logit_bias) -> scalar

The zero-shot classifier (class_weights, predict, accuracy, the prompt templates) is
nmjax.clip.zeroshot; the tokenizer's internals are nmjax.clip.tokenizer's.
"""

from nmjax.clip.loss import contrastive_loss, siglip_loss
from nmjax.clip.tokenizer import tokenize

__all__ = ["contrastive_loss", "siglip_loss", "tokenize"]
