"""Pictures of predictions: the input image, the coloured ground truth and the coloured prediction."""

import numpy as np
import torch

from dataset.transforms import IMAGENET_MEAN, IMAGENET_STD


def side_by_side(
    img: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor, colours: np.ndarray
) -> np.ndarray:
    """img (3, H, W) normalised, mask and pred (H, W) class indices (255 = ignore) -> uint8 (H, 3W, 3)."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    image = ((img.cpu().float() * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    truth = colours[mask.cpu().numpy().astype(np.uint8)]
    prediction = colours[pred.cpu().numpy().astype(np.uint8)]
    return np.concatenate([image, truth, prediction], axis=1)
