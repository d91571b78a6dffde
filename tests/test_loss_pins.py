"""Pinned loss values: the first three steps of each method on a fixed tiny model, batch and seed.

Every loss term of every step is pinned (rel 1e-4), so a change that moves any method's numbers, even
one term at the start of training, fails here and has to be made on purpose (with new pins). After a
deliberate change, `python tests/test_loss_pins.py` prints the new table.
"""

import math

import pytest
import torch

from MLCL import MLCL
from model import build_model
from supervised import Supervised
from tests.conftest import make_method
from tests.test_unimatch_step import make_batch
from UCCL import UCCL
from unimatch import UniMatch
from util.config import defaults
from util.losses import build_labeled_criterion

STEPS = 3
NCLASS, SIZE, BATCH = 3, 33, 2  # 33 = 4 * 9 - 3: the stride-4 grid is every 4th pixel

TINY_MODEL = {
    "nclass": NCLASS,
    "backbone": "resnet18",
    "backbone_width": 8,
    "head_channels": 16,
    "dilations": [1, 2, 3],
    "conf_thresh": 0.4,  # a fresh 3-class net is 35-48% sure: some pixels pass, some do not
}

# The released code's choices, as docs/DIFFERENCES.md lists them.
UCCL_RELEASED = {"sbu": "released", "ckr": "released", "feature": "decoder", "similarity": "negative",
                 "weak_view": "forward"}  # fmt: skip
MLCL_RELEASED = {"fka_feature": "decoder", "p2p_weight": 0.0, "proto_pairing": "positional",
                 "anchor_selection": "released", "proto_denominator": "strong", "ema_update": "released",
                 "sai_feature": "decoder", "sai_strength": "released"}  # fmt: skip
MLCL_TINY = {"anchor_thresh": 0.38, "num_anchors": 3, "num_strong": 5}  # selections that fit a 9 x 9 grid

CASES = {
    "unimatch": (UniMatch, {}),
    "supervised": (Supervised, {}),
    # OHEM with the (min_kept)-th smallest true-class probability above ohem_thresh: that value decides
    "supervised_ohem": (Supervised, {"criterion": "OHEM", "ohem_thresh": 0.3, "ohem_min_kept": 1000}),
    "UCCL": (UCCL, {"uccl": {"uncertain_thresh": 0.4}}),
    "UCCL_released": (UCCL, {"uccl": UCCL_RELEASED}),
    "MLCL": (MLCL, {"mlcl": MLCL_TINY}),
    "MLCL_released": (MLCL, {"mlcl": {**MLCL_TINY, **MLCL_RELEASED}}),
}


def config(sections: dict) -> dict:
    cfg = {**defaults(), **TINY_MODEL}
    for name, values in sections.items():
        cfg[name] = {**cfg[name], **values} if isinstance(values, dict) else values
    return cfg


def tiny_method(cls, cfg):
    """The method on a tiny DeepLabV3+ built from seed 0."""
    torch.manual_seed(0)
    model = build_model(cfg)
    return make_method(cls, model, cfg, build_labeled_criterion(cfg)), model


def batch(step: int) -> dict:
    """A fixed random batch per step: labels with an ignored pixel, 5 padded rows, rectangular boxes."""
    return make_batch(BATCH, SIZE, SIZE, NCLASS, seed=100 + step, padded_rows=5, rectangles=True)


def run_steps(name: str) -> list[dict[str, float]]:
    """The loss terms of the first STEPS steps, with a plain SGD step in between."""
    cls, sections = CASES[name]
    method, model = tiny_method(cls, config(sections))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    method.total_iters = STEPS
    values = []
    for step in range(STEPS):
        method.iteration = step
        losses, _ = method.step(batch(step))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        values.append({k: v.item() for k, v in losses.items()})
    return values


# Made by `python tests/test_loss_pins.py` (values to 8 significant digits).
PINS = {
    "MLCL": [
        {
            "x": 0.55481428,
            "s1": 0.021767711,
            "s2": 0.020049216,
            "fp": 0.070627443,
            "p2p": 0.060222108,
            "proto": 0.0040995241,
            "noise": 2.7273441e-09,
            "mask": 1.7387974e-09,
        },
        {
            "x": 0.55254316,
            "s1": 0.014747,
            "s2": 0.01293301,
            "fp": 0.026229348,
            "p2p": 0.05410964,
            "proto": 0.0049281265,
            "noise": 5.4295396e-07,
            "mask": 4.419997e-07,
        },
        {
            "x": 0.55810905,
            "s1": 0.0097360229,
            "s2": 0.017928459,
            "fp": 0.059424207,
            "p2p": 0.051304277,
            "proto": 0.003611549,
            "noise": 1.8491181e-05,
            "mask": 1.3399125e-05,
        },
    ],
    "MLCL_released": [
        {
            "x": 0.55481428,
            "s1": 0.021767711,
            "s2": 0.020049216,
            "fp": 0.070627443,
            "proto": 0.0088682622,
            "noise": 2.2452509e-09,
            "mask": 1.8848636e-09,
        },
        {
            "x": 0.55214065,
            "s1": 0.026831023,
            "s2": 0.027965572,
            "fp": 0.05946492,
            "proto": 0.0080855275,
            "noise": 5.8415748e-07,
            "mask": 5.1811202e-07,
        },
        {
            "x": 0.56179029,
            "s1": 0.023229633,
            "s2": 0.019539718,
            "fp": 0.072992563,
            "proto": 0.0083903326,
            "noise": 1.5426082e-05,
            "mask": 1.3419958e-05,
        },
    ],
    "UCCL": [
        {
            "x": 0.55481428,
            "s1": 0.021767711,
            "s2": 0.020049216,
            "fp": 0.070627443,
            "sbu": 0.016093412,
            "ckr": 0.0073439032,
        },
        {
            "x": 0.55502146,
            "s1": 0.033215906,
            "s2": 0.02763417,
            "fp": 0.06764783,
            "sbu": 0.016916215,
            "ckr": 0.0087633729,
        },
        {
            "x": 0.55948627,
            "s1": 0.010208242,
            "s2": 0.0096603967,
            "fp": 0.025488017,
            "sbu": 0.0170132,
            "ckr": 0.0058555114,
        },
    ],
    "UCCL_released": [
        {
            "x": 0.55481428,
            "s1": 0.021767711,
            "s2": 0.020049216,
            "fp": 0.070627443,
            "sbu": 0.01248133,
            "ckr": 0.0064043012,
        },
        {
            "x": 0.55506581,
            "s1": 0.031511292,
            "s2": 0.026672808,
            "fp": 0.064935282,
            "sbu": 0.012468121,
            "ckr": 0.0062540886,
        },
        {
            "x": 0.55974925,
            "s1": 0.012092994,
            "s2": 0.01021879,
            "fp": 0.028672136,
            "sbu": 0.012295811,
            "ckr": 0.0053702043,
        },
    ],
    "supervised": [
        {"x": 1.1194558},
        {"x": 1.107675},
        {"x": 1.1256611},
    ],
    "supervised_ohem": [
        {"x": 1.3018895},
        {"x": 1.2441156},
        {"x": 1.2378056},
    ],
    "unimatch": [
        {"x": 0.55481428, "s1": 0.021767711, "s2": 0.020049216, "fp": 0.070627443},
        {"x": 0.55503017, "s1": 0.031775892, "s2": 0.026966929, "fp": 0.064852804},
        {"x": 0.55979317, "s1": 0.01003335, "s2": 0.0094769914, "fp": 0.024017969},
    ],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_first_steps_loss_values_are_pinned(name):
    torch.set_num_threads(1)
    got = run_steps(name)
    for step, (terms, pinned) in enumerate(zip(got, PINS[name])):
        assert list(terms) == list(pinned), f"{name} step {step}: terms {list(terms)}"
        for term, value in pinned.items():
            assert math.isfinite(terms[term])
            assert terms[term] == pytest.approx(value, rel=1e-4, abs=1e-12), f"{name} step {step} {term}"


if __name__ == "__main__":
    torch.set_num_threads(1)
    print("PINS = {")
    for name in sorted(CASES):
        print(f'    "{name}": [')
        for terms in run_steps(name):
            print("        {" + ", ".join(f'"{k}": {v:.8g}' for k, v in terms.items()) + "},")
        print("    ],")
    print("}")
