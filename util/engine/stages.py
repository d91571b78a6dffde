"""Bookkeeping of a pipeline of stages (CISC-R's six): which stages finished, what each recorded, the seconds
each took over the runs it took, and where every rank stops on a signal between units of work.

`save_path/stages.json` holds {"config": the config the pipeline started with, "done": {stage: record},
"spent": {stage: seconds spent in runs that were stopped before it finished}}. A finished stage is never
redone. The training stages' evaluations are combined into `save_path/evals.jsonl` at the end, so that the
pipeline reads like any single run (tools/compare.py).
"""

import json
import logging
import os
import time

from util.dist import DistInfo, barrier
from util.engine.stop import GracefulStop, StopRequested
from util.files import write_atomic

logger = logging.getLogger("semiseg")


class StageBook:
    """stages.json of one pipeline: `run(name, work)` runs a stage unless it finished and records it."""

    def __init__(self, root: str, cfg: dict, dist: DistInfo, stop: GracefulStop):
        self.path = os.path.join(root, "stages.json")
        self.cfg, self.dist, self.stop = cfg, dist, stop
        self.manifest = {"config": cfg, "done": {}, "spent": {}}

    @property
    def done(self) -> dict[str, dict]:
        """{stage: its record}, in the order the stages finished."""
        return self.manifest["done"]

    def read(self) -> None:
        """Load stages.json when there is one; a config that differs from the one it started with is a
        warning (the finished stages stay as they are)."""
        if not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            self.manifest = json.load(f)
        self.manifest.setdefault("spent", {})
        started = self.manifest["config"]
        changed = sorted(k for k in self.cfg if started.get(k, self.cfg[k]) != self.cfg[k])
        if changed:
            logger.warning(
                f"the config differs from the one {self.path} was started with, in {', '.join(changed)}: "
                "finished stages are kept as they are"
            )

    def write(self) -> None:
        if self.dist.is_main:
            write_atomic(self.path, json.dumps(self.manifest, indent=1))

    def run(self, name: str, work) -> None:
        """Run `work()` unless stage `name` finished; then record what it returns, with the seconds it took
        over the runs it took (rank 0 writes, atomically, once every rank is through it). A stop inside it
        keeps the seconds spent."""
        if name in self.done:
            return
        self.stop_here(lambda: f"before {name}")
        started, spent = time.monotonic(), self.manifest["spent"].get(name, 0.0)
        try:
            record = work()
        except StopRequested:
            self.manifest["spent"][name] = round(spent + time.monotonic() - started, 1)
            self.write()
            raise
        barrier()  # every rank is through it before rank 0 records it
        record["seconds"] = round(spent + time.monotonic() - started, 1)
        self.manifest["spent"].pop(name, None)
        self.done[name] = record
        self.write()
        logger.info(f"{name} done: {record}")

    def stop_here(self, where) -> None:
        """Called by every rank at the same point (a collective): stop every rank (StopRequested) when any
        was asked to. `where()` says where, for the message."""
        if self.stop.agree(self.dist.device):
            raise StopRequested(
                f"stopped by {self.stop.describe()} {where()}; run the same command to continue"
            )


def combined_evals(
    stage_records: dict[str, list[dict]],
    seconds: dict[str, float],
    pseudo_labels: dict[str, dict] | None = None,
) -> list[dict]:
    """The training stages' evaluations (`stage_records`: each training stage's evals.jsonl records, in stage
    order) as one run's: iterations counted from the start of the first, `total_iters` their sum,
    `train_seconds` summed over the training stages before, `wall_seconds` counted from the start of the
    pipeline with every stage before (the ones that do not train too) at its duration in `seconds` (every
    stage, in pipeline order). Keys a stage's records lack stay out. Only the last training stage's network
    is the run's result: only its records are `deploy` candidates. `pseudo_labels`: {training stage:
    {stream: quality}} of the written pseudo-labels a stage trains on, its records' `pseudo_labels` (as a
    single run's records carry what its unlabeled losses trained on) unless they have their own."""
    order, last, pseudo_labels = list(seconds), list(stage_records)[-1], pseudo_labels or {}
    total = sum(records[-1]["total_iters"] for records in stage_records.values())
    iterations, train_seconds, combined = 0, 0.0, []
    for stage, records in stage_records.items():
        wall_before = sum(seconds[earlier] for earlier in order[: order.index(stage)])
        for record in records:
            row = {**record, "iteration": iterations + record["iteration"], "total_iters": total}
            row.update(network=f"{stage}/{record['network']}", stage=stage)
            row["deploy"] = stage == last and record.get("deploy", True)
            if pseudo_labels.get(stage) and "pseudo_labels" not in record:
                row["pseudo_labels"] = pseudo_labels[stage]
            if "train_seconds" in record:
                row["train_seconds"] = train_seconds + record["train_seconds"]
            if "wall_seconds" in record:
                row["wall_seconds"] = wall_before + record["wall_seconds"]
            combined.append(row)
        iterations += records[-1]["total_iters"]
        train_seconds += records[-1].get("train_seconds", 0.0)
    return combined


def combine_stage_evals(
    root: str,
    training_stages: list[str],
    seconds: dict[str, float],
    pseudo_labels: dict[str, dict] | None = None,
) -> str:
    """root/evals.jsonl from the training stages' own (combined_evals); `seconds`: every stage's duration, in
    pipeline order; `pseudo_labels` as combined_evals takes them. Returns the path."""
    stage_records = {}
    for stage in training_stages:
        with open(os.path.join(root, stage, "evals.jsonl")) as f:
            stage_records[stage] = [json.loads(line) for line in f if line.strip()]
    path = os.path.join(root, "evals.jsonl")
    write_atomic(
        path, "".join(json.dumps(row) + "\n" for row in combined_evals(stage_records, seconds, pseudo_labels))
    )
    return path
