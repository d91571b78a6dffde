"""What a run reports: the text log (setup_logging), TensorBoard (curves, histograms, pictures, the config)
and evals.jsonl.

Only rank 0 writes. TensorBoard gets, at each evaluation, image | ground truth | prediction for the first
`tb_images` validation images of every evaluated network, and at each logged step the loss terms, the
method's statistics (a statistic with more than one value, such as the pseudo-labels' confidences, becomes a
histogram), the learning rate and the count of skipped steps.
"""

import logging
import os
import sys
from dataclasses import asdict

import yaml

from dataset.classes import dataset_classes
from util.metrics import format_iou_table
from util.pseudo_labels import Quality
from util.visualise import side_by_side

logger = logging.getLogger("semiseg")


def setup_logging(save_path: str | None, is_main: bool) -> None:
    """The text log: rank 0 writes to stdout and save_path/train.log; the other ranks only their warnings."""
    logger.handlers.clear()
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    fmt = logging.Formatter("[%(asctime)s] %(message)s", "%H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)]
    if save_path is not None and is_main:
        handlers.append(logging.FileHandler(os.path.join(save_path, "train.log")))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)


class Logbook:
    def __init__(self, cfg: dict, saver, is_main: bool):
        self.cfg, self.saver, self.is_main = cfg, saver, is_main
        self.classes = dataset_classes(cfg)  # a bad classes file stops the run here, before training
        self.writer = None

    def open(self, save_path: str | None, iteration: int) -> None:
        if not self.is_main or save_path is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops the points a resumed run is about to draw again
        self.writer = SummaryWriter(save_path, purge_step=iteration or None)
        text = yaml.safe_dump(self.cfg, sort_keys=False)
        self.writer.add_text("config", "    " + text.replace("\n", "\n    "), iteration)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def picture_collector(self, pictures: list):
        """An `on_prediction` callback for util.metrics.evaluate that keeps the first tb_images pictures."""
        if self.writer is None or self.cfg["tb_images"] == 0:
            return None

        def collect(img, mask, pred, ids):
            if len(pictures) < self.cfg["tb_images"]:
                pictures.append(side_by_side(img[0], mask[0], pred[0], self.classes.palette))

        return collect

    def step(
        self,
        iteration: int,
        loss: float,
        terms: dict,
        stats: dict,
        histograms: dict,
        extra: dict,
        pseudo_labels: dict[str, Quality] | None = None,
    ) -> None:
        """One logged step; `pseudo_labels`: the quality of each pseudo-label stream since the last log
        step (text log and TensorBoard's pseudo/<stream>/accuracy, miou, used)."""
        if pseudo_labels and self.is_main:
            logger.info(
                f"iter {iteration}: pseudo-labels "
                + " | ".join(f"{name}: {quality}" for name, quality in pseudo_labels.items())
            )
        if self.writer is None:
            return
        self.writer.add_scalar("train/loss", loss, iteration)
        for name, value in {**terms, **stats, **extra}.items():
            self.writer.add_scalar(f"train/{name}", value, iteration)
        for name, values in histograms.items():
            self.writer.add_histogram(f"train/{name}", values.float().cpu(), iteration)
        for name, quality in (pseudo_labels or {}).items():
            for field, value in asdict(quality).items():
                self.writer.add_scalar(f"pseudo/{name}/{field}", value, iteration)

    def evaluation(self, iteration: int, total_iters: int, results: dict, deployed: str, best: tuple,
                   timing: dict, deployable: tuple, pictures: dict,
                   pseudo_labels: dict[str, Quality] | None = None) -> None:  # fmt: skip
        """Text log, TensorBoard and evals.jsonl for one evaluation of every evaluated network. `timing`:
        seconds_per_iter, train_seconds and wall_seconds (since iteration 0); `pseudo_labels`: the quality
        of each pseudo-label stream since the last evaluation."""
        if pseudo_labels:
            logger.info(
                f"iter {iteration}: pseudo-labels since the last evaluation: "
                + " | ".join(f"{name}: {quality}" for name, quality in pseudo_labels.items())
            )
        names, several = self.classes.names, len(results) > 1
        for name, result in results.items():
            label = f" {name}" if several else ""
            note = f" (best {best[0]:.2f} at iter {best[1]})" if name == deployed else ""
            logger.info(
                f"iter {iteration}/{total_iters}:{label} val mIoU {result['miou']:.2f}{note}\n"
                + format_iou_table(result["iou"], names)
            )
            if self.writer is not None:
                prefix = f"eval_{name}" if several else "eval"
                self.writer.add_scalar(f"{prefix}/mIoU", result["miou"], iteration)
                for cls, iou in zip(names, result["iou"]):
                    self.writer.add_scalar(f"{prefix}_class/{cls}", iou, iteration)
                for i, picture in enumerate(pictures.get(name, [])):
                    self.writer.add_image(f"{prefix}_images/{i}", picture, iteration, dataformats="HWC")
        if self.writer is not None and several:
            self.writer.add_scalar("eval/mIoU", results[deployed]["miou"], iteration)
        quality = {name: asdict(q) for name, q in (pseudo_labels or {}).items()}
        rows = [
            {"iteration": iteration, "network": name, "miou": r["miou"], "iou": list(r["iou"]),
             **timing, "total_iters": total_iters, "deploy": name in deployable,
             **({"pseudo_labels": quality} if quality else {})}
            for name, r in results.items()
        ]  # fmt: skip
        self.saver.append_evals(rows, iteration)
