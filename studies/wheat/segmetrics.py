"""Binary segmentation scores computed from class *probabilities*.

A pixel is predicted positive when the softmax probability of the positive class is at least
``threshold`` (0.5: for two classes the same as the argmax of the probabilities). Thresholding raw
logits at 0.5 instead (as some published code does) is a different and wrong rule: a logit of
0.3 for the positive class can still be its most probable class.

Counts are accumulated over every labelled pixel of a split (micro average), then::

    precision = TP / (TP + FP)      recall = TP / (TP + FN)
    F1 = 2 TP / (2 TP + FP + FN)    IoU = TP / (TP + FP + FN)

A score whose denominator is zero is defined as 0 (no positive predicted and none present gives
F1 = IoU = 0: the class was never found).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["Confusion", "positive_probability", "confusion"]


@dataclass
class Confusion:
    """Pixel counts of a binary segmentation (positive = the class of interest)."""

    tp: int = 0
    """True positives."""
    fp: int = 0
    """False positives."""
    fn: int = 0
    """False negatives."""
    tn: int = 0
    """True negatives."""

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(
            self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn
        )

    @staticmethod
    def _ratio(num: int, den: int) -> float:
        return num / den if den else 0.0

    @property
    def precision(self) -> float:
        return self._ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return self._ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        return self._ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def iou(self) -> float:
        return self._ratio(self.tp, self.tp + self.fp + self.fn)

    @property
    def accuracy(self) -> float:
        return self._ratio(self.tp + self.tn, self.tp + self.fp + self.fn + self.tn)

    def scores(self) -> dict[str, float]:
        """F1, IoU, precision, recall and pixel accuracy."""
        return {
            "f1": self.f1,
            "iou": self.iou,
            "precision": self.precision,
            "recall": self.recall,
            "accuracy": self.accuracy,
        }


def positive_probability(logits: Tensor, positive: int = 1) -> Tensor:
    """Softmax probability of class ``positive`` from logits (B, K, H, W) -> (B, H, W)."""
    if logits.dim() < 2 or not 0 <= positive < logits.shape[1]:
        raise ValueError(
            f"positive class {positive} needs logits (B, K>{positive}, ...), got {tuple(logits.shape)}"
        )
    return logits.float().softmax(dim=1)[:, positive]


def confusion(
    prob: Tensor, target: Tensor, *, ignore_index: int = -1, threshold: float = 0.5
) -> Confusion:
    """Counts of ``prob >= threshold`` against ``target == 1`` on labelled pixels.

    Args:
        prob: probabilities of the positive class, any shape, values in [0, 1].
        target: labels of the same shape (1 = positive, other values = negative).
        ignore_index: label of pixels left out.
        threshold: decision threshold on the probability.
    """
    if prob.shape != target.shape:
        raise ValueError(
            f"probabilities {tuple(prob.shape)} and targets {tuple(target.shape)} differ in shape"
        )
    if prob.numel() and (float(prob.min()) < 0.0 or float(prob.max()) > 1.0):
        raise ValueError(
            "confusion() takes probabilities in [0, 1], got values in "
            f"[{float(prob.min()):.3g}, {float(prob.max()):.3g}] (apply a softmax to logits first)"
        )
    keep = target != ignore_index
    pred = (prob >= threshold)[keep]
    true = (target == 1)[keep]
    tp = int((pred & true).sum())
    fp = int((pred & ~true).sum())
    fn = int((~pred & true).sum())
    return Confusion(tp, fp, fn, int(keep.sum()) - tp - fp - fn)
