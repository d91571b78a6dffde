"""Supervised-only baseline: the labeled images alone, with the same model, schedule and iterations.

    torchrun --nproc_per_node=4 supervised.py --config configs/pascal.yaml \
        --labeled-id-path splits/pascal/366/labeled.txt --unlabeled-id-path splits/pascal/366/unlabeled.txt \
        --save-path runs/supervised_366

The unlabeled split only sets the epoch length (one epoch = as many iterations as a semi-supervised
method makes), so both train for the same number of iterations; its images are never loaded.
"""

from util.engine import Method, main


class Supervised(Method):
    """Supervised-only baseline: cross-entropy (or OHEM) on the labeled batch."""

    uses_unlabeled = False

    def step(self, batch: dict) -> tuple[dict, dict]:
        img_x, mask_x = batch["labeled"]
        pred_x = self.model(img_x)
        return {"x": self.criterion_l(pred_x, mask_x)}, {}


METHOD = Supervised

if __name__ == "__main__":
    main(Supervised)
