"""YAML configs: defaults, command-line overrides and validation.

A config is a flat YAML file (as in UniMatch) plus one section per method (`uccl:`, `mlcl:`, ...).
Every key is declared in SCHEMA below with its type and default, so a typo or a wrong type stops the
run before anything is written, with a message that names the key and the file.
"""

import difflib
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import yaml

from model.weights import pretrained_problem
from util.losses.ctt import MIN_TEMPERATURE


class ConfigError(ValueError):
    """A config key is unknown, of the wrong type, out of range, or names a path that does not exist."""


class ConfigLoader(yaml.SafeLoader):
    """YAML's safe loader, stricter and closer to Python: a key given twice is an error naming it and its
    lines (PyYAML keeps the last one silently), and `1e-3`, `5E4` are numbers (YAML 1.1 wants `1.0e-3`)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(
                    f"{key_node.start_mark.name}: key '{key}' appears twice, at lines {seen[key]} and {line}"
                )
            seen[key] = line
        return super().construct_mapping(node, deep)


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(stream):
    return yaml.load(stream, Loader=ConfigLoader)


@dataclass(frozen=True)
class Key:
    types: tuple  # accepted Python types; int is accepted where float is
    default: Any = None
    choices: tuple | None = None
    optional: bool = False  # None is a valid value
    item_type: type | None = None  # element type for lists
    length: int | None = None  # exact list length
    low: float | None = None  # inclusive bounds of a number (of each item, for a list)
    high: float | None = None
    above: float | None = None  # exclusive lower bound (lr > 0)
    min_length: int = 0  # fewest items of a list
    help: str = ""


def _k(types, default=None, **kw):
    return Key(types if isinstance(types, tuple) else (types,), default, **kw)


SCHEMA: dict[str, Any] = {
    # --- data ---
    "dataset": _k(str, help="pascal | cityscapes | coco | demo | any name for a custom dataset"),
    "data_root": _k(str, help="folder the split files' paths are relative to"),
    "nclass": _k(int, low=1, high=254, help="classes; 255 is the ignore label"),
    "crop_size": _k(int, low=1),
    "labeled_id_path": _k(str, optional=True),
    "unlabeled_id_path": _k(str, optional=True),
    "val_id_path": _k(str),
    "allow_outside_data_root": _k(bool, False, help="let split files name paths outside data_root"),
    "mix_partner": _k(
        str,
        "same_image",
        choices=("same_image", "other_image"),
        help="CutMix partner: another augmentation of the same image (UniMatch as released) or another image",
    ),
    # --- model ---
    "backbone": _k(str, "resnet101", choices=("resnet18", "resnet34", "resnet50", "resnet101")),
    "deep_stem": _k(bool, False),
    "output_stride": _k(int, 16, choices=(8, 16)),
    "dilations": _k(list, [6, 12, 18], item_type=int, length=3),
    "pretrained": _k(str, None, optional=True, help="backbone weights: a file, or torchvision[:TAG]"),
    "classes": _k(
        str, None, optional=True, help="file of class names [and R G B]; default <data_root>/classes.txt"
    ),
    "backbone_width": _k(int, 64, low=1, help="ResNet base width; only 64 fits pretrained weights"),
    "head_channels": _k(int, 256, low=1),
    # --- optimisation ---
    "epochs": _k(int, low=1),
    "max_iters": _k(int, None, optional=True, low=1, help="stop after this many iterations (not epochs)"),
    "batch_size": _k(int, low=1, help="per process, for the labeled and the unlabeled loader each"),
    "lr": _k(float, above=0.0),
    "lr_multi": _k(float, 10.0, above=0.0, help="lr factor of the head (everything but the backbone)"),
    "momentum": _k(float, 0.9, low=0, high=1),
    "weight_decay": _k(float, 1e-4, low=0),
    "poly_power": _k(float, 0.9, low=0),
    "criterion": _k(str, "CELoss", choices=("CELoss", "OHEM")),
    "ohem_thresh": _k(float, 0.7, low=0, high=1),
    "ohem_min_kept": _k(int, 200000, low=0),
    "conf_thresh": _k(float, 0.95, low=0, high=1),
    # --- runtime ---
    "amp": _k(
        str,
        "auto",
        choices=("auto", "none", "bf16", "fp16"),
        help="autocast; auto: bf16 on GPUs that have it, fp16 with a GradScaler on older GPUs, none on a CPU",
    ),
    "channels_last": _k(
        bool, True, help="channels-last memory format for the networks (faster convolutions)"
    ),
    "compile": _k(bool, False, help="torch.compile the networks: the first steps compile (minutes)"),
    "seed": _k(int, 0),
    "deterministic": _k(bool, False, help="deterministic kernels (slower); bit-exact resume on the CPU"),
    "num_workers": _k(int, 2, low=0),
    "check_data": _k(
        str,
        "headers",
        choices=("headers", "full", "off"),
        help="before training, read every labeled and val file (and a sample of unlabeled images): "
        "headers and sizes (and the val masks' values), or full decodes and every mask's values",
    ),
    "pseudo_label_quality": _k(
        bool,
        True,
        help="when the unlabeled split lists masks, measure the pseudo-labels the unlabeled losses train on "
        "against them (logged; never used for training)",
    ),
    "eval_interval": _k(int, 0, low=0, help="evaluate every N iterations; 0 = at the end of every epoch"),
    "save_interval": _k(int, 0, low=0, help="write latest.pth every N iterations; 0 = only at evaluations"),
    "log_interval": _k(int, 20, low=1),
    "tb_images": _k(int, 4, low=0, help="validation pictures in TensorBoard at each evaluation, per network"),
    "max_nonfinite_steps": _k(
        int, 5, low=1, help="stop after this many optimizer steps in a row with a NaN/Inf loss or gradient"
    ),
    # --- evaluation ---
    "eval_mode": _k(str, "original", choices=("original", "center_crop", "sliding_window")),
    "eval_flip": _k(bool, False),
    "eval_scales": _k(list, [1.0], item_type=float, above=0.0, min_length=1),
    # --- demo data (used when dataset is 'demo': generated in data_root on first use) ---
    "demo": {
        "num_train": _k(int, 1000),
        "num_val": _k(int, 100),
        "size": _k(int, 64),
        "labeled_fraction": _k(float, 0.02),
        "max_rotation": _k(float, 0.0, help="shapes turn by up to this many degrees"),
        "seed": _k(int, 0),
    },
    # --- UniMatch's step (unimatch.py; UCCL and MLCL run it too) ---
    "unimatch": {
        "fp_labeled": _k(
            bool,
            True,
            help="decode a feature-perturbed copy of the labeled images too, as released (default): it "
            "reaches no loss but joins the decoder's BN batch statistics; false is faster and measured lower",
        ),
    },
    # --- UCCL (UCCL.py); paper by default, docs/DIFFERENCES.md lists the released code's switches ---
    "uccl": {
        "sbu_weight": _k(float, 0.015, low=0.0, help="SBU loss weight (each of the two views gets half)"),
        "ckr_weight": _k(float, 0.02, low=0.0, help="CKR loss weight (each of the two views gets half)"),
        "uncertain_thresh": _k(
            float,
            0.95,
            low=0.0,
            high=1.0,
            help="SBU: uncertain = weak or strong confidence <= this (sbu: paper)",
        ),
        "sbu": _k(str, "paper", choices=("paper", "released")),
        "ckr": _k(str, "paper", choices=("paper", "released")),
        "feature": _k(
            str, "encoder", choices=("encoder", "decoder"), help="encoder output (ASPP) or decoder feature"
        ),
        "similarity": _k(
            str, "positive", choices=("positive", "negative"), help="SBU weights grow with +cos or with -cos"
        ),
        "weak_view": _k(
            str,
            "pasted",
            choices=("pasted", "forward"),
            help="weak view of the CutMixed content: pasted from existing passes, or its own forward",
        ),
    },
    # --- MLCL (MLCL.py). Defaults: the paper's method, published values. The released
    # code's behaviour is one switch away: see docs/DIFFERENCES.md for the full list. ---
    "mlcl": {
        "fka_feature": _k(
            str,
            "encoder",
            choices=("encoder", "decoder"),
            help="features FKA aligns: encoder output (ASPP, paper) or decoder feature F (released)",
        ),
        "p2p_weight": _k(
            float,
            0.1,
            low=0.0,
            help="point-to-point alignment weight (released feat_ali_weight; 0 = released)",
        ),
        "proto_weight": _k(float, 0.01, low=0.0, help="prototype compactness weight (released feat_nearest)"),
        "anchor_thresh": _k(
            float, 0.95, low=0.0, high=1.0, help="weak confidence above which a pixel can be an anchor"
        ),
        "num_anchors": _k(int, 16, low=1, help="anchors per class: the weak pixels most similar to it"),
        "num_strong": _k(int, 256, low=1, help="strong samples per class: the pixels least similar to it"),
        "momentum": _k(float, 0.99, low=0.0, high=1.0, help="EMA momentum of the prototype memory"),
        "proto_pairing": _k(
            str, "class", choices=("class", "positional"), help="anchor/strong pairing (positional: released)"
        ),
        "anchor_selection": _k(
            str, "topk", choices=("topk", "released"), help="released: top-1 twice, the n-th never taken"
        ),
        "proto_denominator": _k(
            str,
            "anchors",
            choices=("anchors", "strong"),
            help="divide by anchors, or strong samples (released)",
        ),
        "ema_update": _k(
            str,
            "every_class",
            choices=("every_class", "released"),
            help="released: skip later classes once one starts, per-rank steps averaged with zeros",
        ),
        "sai_feature": _k(
            str,
            "encoder",
            choices=("encoder", "decoder"),
            help="perturb the encoder output and decode (paper) or F and classify (released)",
        ),
        "sai_bn_update": _k(
            bool,
            False,
            help="encoder-level SAI: the perturbed features also update the decoder's BN running statistics",
        ),
        "sai_noise": _k(bool, True, help="noise injection (released F-Noise)"),
        "sai_mask": _k(bool, True, help="feature masking (released F-Drop)"),
        "sai_strength": _k(
            str,
            "single",
            choices=("single", "released"),
            help="released: the masking strength is rescaled twice when noise also runs",
        ),
        "sai_weight": _k(
            float, 0.01, low=0.0, help="final SAI weight of the ramp w exp(-10(1-t/T)^2) (unsupervised_w)"
        ),
        "sai_warm_up": _k(int, 0, low=0, help="SAI starts at this iteration (released warm_up, in epochs)"),
    },
    # --- DUEB (DUEB.py): two branches on CPCL's intersection/union pseudo-labels, plus an aleatoric and an
    # energy loss. Paper by default but for the energy term; the released code's choices are switches
    # (docs/DIFFERENCES.md). With both terms off it is CPCL. The weights are the released ones (VOC;
    # Cityscapes: lambda_u 5). ---
    "dueb": {
        # `off` is YAML's false, so 'off' and 'false' both turn a term off
        "aleatoric": _k(
            (str, bool),
            "paper",
            choices=("paper", "released", False),
            help="per-pixel, reparameterised, variance head trained (paper); batch means, sample(), head "
            "frozen at its random init (released); off",
        ),
        # The default is the released term: the free-energy reading of the paper's figure has no lower
        # bound (with the CE it sums to -z_y) and makes the logits diverge (docs/DIFFERENCES.md).
        "energy": _k(
            (str, bool),
            "released",
            choices=("paper", "released", False),
            help="logsumexp over pixels of the target-class probabilities (released, default); per-pixel "
            "free energy of the logits (paper figure's reading, unbounded); off",
        ),
        "count_ignored": _k(
            bool, False, help="ignored pixels count in the unsupervised cross-entropy mean (released: true)"
        ),
        "lambda_u": _k(float, 1.0, low=0.0, help="weight of the two unsupervised cross-entropies"),
        "weight_labeled": _k(float, 0.5, low=0.0, help="weight of each branch's E and AL on labeled images"),
        "weight_unlabeled": _k(
            float, 1.0, low=0.0, help="weight of each branch's E and AL on the CutMixed unlabeled images"
        ),
        "mc_samples": _k(int, 10, low=1, help="Monte-Carlo logit samples T of the aleatoric loss"),
        "cutmix": _k(
            str,
            "released",
            choices=("released", "unimatch"),
            help="released: three boxes covering 25-50% of every image, pasted from another image; unimatch: "
            "UniMatch's one box on half the images, the partner per mix_partner",
        ),
        "student_view": _k(
            str,
            "weak",
            choices=("weak", "strong"),
            help="the students see CutMixed weak views (released: CutMix the only perturbation) or "
            "UniMatch's colour-jittered strong views",
        ),
    },
    # --- CTT (CTT.py). Defaults: every term of the method with the released code's values; `preset` and
    # the switches below reproduce the paper's figure and the released code (docs/DIFFERENCES.md). ---
    "ctt": {
        "preset": _k(
            str,
            "default",
            choices=("default", "paper", "released"),
            help="terms: default = CT + HC + LC + unreliable negatives, paper = CT + HC + LC, "
            "released = CT only (the contrastive terms are not computed)",
        ),
        "ct_thresh": _k(
            float, 0.968, low=0.0, high=1.0, help="CT weight = fraction of pixels this confident (global)"
        ),
        "mix": _k(str, "classmix", choices=("classmix", "none"), help="none: the released DeepLabV3+ script"),
        "teacher_mode": _k(
            str,
            "eval",
            choices=("eval", "train"),
            help="teachers' forwards in eval mode (BN statistics averaged) or train mode (released)",
        ),
        "ema_decay": _k(float, 0.99, low=0.0, high=1.0, help="teacher EMA: alpha_t = min(1 - 1/(t+1), this)"),
        "pretrained_b": _k(
            str, None, optional=True, help="backbone weights of student B (null: the same as 'pretrained')"
        ),
        "deploy": _k(
            list,
            ["teacher_a", "teacher_b"],
            item_type=str,
            help="networks best.pth may hold (the best-scoring one at each evaluation)",
        ),
        "hc_weight": _k(float, 0.1, low=0.0, help="HC weight (not in the paper's text or the release)"),
        "lc_weight": _k(float, 0.1, low=0.0, help="LC weight (not in the paper's text or the release)"),
        "neg_weight": _k(float, 0.1, low=0.0, help="unreliable-negatives weight (preset default only)"),
        "hc_temperature": _k(float, 0.1, low=MIN_TEMPERATURE),
        "lc_temperature": _k(float, 0.5, low=MIN_TEMPERATURE),
        "neg_temperature": _k(float, 0.5, low=MIN_TEMPERATURE),
        "contrast_thresh": _k(
            float,
            0.75,
            low=0.0,
            high=1.0,
            help="gamma: mixed pseudo-labels this confident give HC anchors; less confident ones LC anchors",
        ),
        "contrast_start": _k(
            str,
            "filled",
            choices=("filled", "banks_full"),
            help="contrast with the entries banks hold so far, or only once every class of both is full",
        ),
        "anchors": _k(
            int, 1024, low=1, help="anchors per term and student, drawn at random, shared among the classes"
        ),
        "bank_size": _k(int, 256, low=1, help="memory-bank entries per class (per network)"),
        "bank_thresh": _k(float, 0.95, low=0.0, help="teacher confidence a labeled pixel needs for the bank"),
        "bank_confidence": _k(
            str, "softmax", choices=("softmax", "logit"), help="logit: the released test on raw logits"
        ),
        "bank_per_step": _k(
            int, None, optional=True, low=1, help="entries per class, rank and step (null: batch_size)"
        ),
        "lc_pairing": _k(
            str,
            "same_content",
            choices=("same_content", "same_position"),
            help="LC pairs pixels showing the same source pixel in both students' mixed images, or the same "
            "position whatever it shows (released)",
        ),
        "lc_peer_confident": _k(
            bool, True, help="LC anchors need a peer at least gamma sure and surer than the student"
        ),
        "neg_queue_size": _k(int, 256, low=1, help="negative-queue entries per class (per network)"),
        "neg_per_step": _k(int, 16, low=1, help="negatives per class, rank and step, drawn at random"),
        "unreliable_start": _k(
            float,
            0.2,
            low=0.0,
            high=1.0,
            help="share of highest-entropy pixels counted unreliable at the start, falling linearly to 0",
        ),
        "neg_skip_top": _k(int, 3, low=1, help="an unreliable pixel is no negative of its top classes"),
    },
    # --- CISC-R (CISCR.py): the released constants; docs/DIFFERENCES.md lists the switches ---
    "ciscr": {
        "mode": _k(
            str,
            "staged",
            choices=("staged", "online"),
            help="staged: the paper's six stages, one command; online: one UniMatch loop (not in the paper)",
        ),
        "min_class_area": _k(
            float, 0.03, low=0.0, high=1.0, help="a class counts for an image (crop) covering this fraction"
        ),
        "exclude_background": _k(bool, False, help="class 0 is never the shared class (VOC)"),
        "shared_classes": _k(int, 1, low=1, help="classes per pair that make the regions m_u, m_q"),
        "max_recrops": _k(int, 10, low=1, help="partner crops tried for one showing a shared class"),
        "allow_self_pair": _k(bool, False, help="a labeled image may be its own partner (released)"),
        "consistency_weight": _k(float, 1.0, low=0.0, help="stage 1: weight of the cross-image BCE terms"),
        "loss_denominator": _k(
            str,
            "valid",
            choices=("valid", "all"),
            help="rectified CE: mean over not-padding pixels, or over all pixels (released)",
        ),
        "reliable_fraction": _k(float, 0.5, above=0.0, high=1.0, help="unlabeled images retrained on first"),
        "query_keep_fraction": _k(
            float, 0.5, above=0.0, high=1.0, help="labeled images kept in each class's query list"
        ),
        "tta_scales": _k(list, [0.5, 0.75, 1.0, 1.5, 2.0], item_type=float, above=0.0, min_length=1),
        "tta_flip": _k(bool, True, help="pseudo-labels also from the flipped image"),
        "label_batch_size": _k(
            int, 8, low=1, help="images per forward when pseudo-labelling and ranking (those of one size)"
        ),
        "teacher_checkpoint": _k(
            str, "best", choices=("best", "latest"), help="each stage's teacher: its best-val or last weights"
        ),
        "stage_epochs": _k(
            list,
            None,
            optional=True,
            item_type=int,
            length=3,
            low=1,
            help="staged: epochs of stages 1, 4, 6, each of the stage's own data (default: epochs for each)",
        ),
        "stage_lr": _k(
            list,
            None,
            optional=True,
            item_type=float,
            length=3,
            above=0.0,
            help="staged: learning rates of stages 1, 4, 6 (default: lr for each)",
        ),
        "ema_decay": _k(float, 0.99, low=0.0, high=1.0, help="online: the EMA teacher's decay"),
    },
}


def defaults(schema=SCHEMA) -> dict:
    return {
        name: defaults(spec) if isinstance(spec, dict) else _copy(spec.default)
        for name, spec in schema.items()
    }


def _copy(value):
    return list(value) if isinstance(value, list) else value


def _type_ok(value, spec: Key) -> bool:
    if value is None:
        return spec.optional
    if isinstance(value, bool) and bool not in spec.types:
        return False  # YAML `true` must not pass as an int
    if isinstance(value, int) and float in spec.types:
        return True
    return isinstance(value, spec.types)


def _type_name(spec: Key) -> str:
    name = " or ".join(t.__name__ for t in spec.types)
    if spec.item_type is not None:
        name += f" of {spec.item_type.__name__}"
    return name + (" or null" if spec.optional else "")


def validate(cfg: dict, source: str, schema=SCHEMA, prefix: str = "") -> dict:
    """Check every key of `cfg` against `schema`; fill in defaults; return the merged dict.

    Missing keys without a default (None and not optional) are errors. Raises ConfigError naming the key
    and `source` (the config file).
    """
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: section '{prefix.rstrip('.') or '<top>'}' must be a mapping")
    out = {}
    for name, value in cfg.items():
        full = prefix + str(name)
        if name not in schema:
            close = difflib.get_close_matches(str(name), list(schema), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown config key '{full}'{hint}")
        spec = schema[name]
        if isinstance(spec, dict):
            out[name] = validate(value if value is not None else {}, source, spec, full + ".")
            continue
        if not _type_ok(value, spec):
            raise ConfigError(
                f"{source}: key '{full}' must be {_type_name(spec)}, got {type(value).__name__} {value!r}"
            )
        if isinstance(value, list):
            if spec.length is not None and len(value) != spec.length:
                raise ConfigError(f"{source}: key '{full}' must have {spec.length} items, got {value!r}")
            item_types = (int, float) if spec.item_type is float else (spec.item_type,)
            if spec.item_type is not None and not all(
                isinstance(v, item_types) and not isinstance(v, bool) for v in value
            ):
                raise ConfigError(f"{source}: key '{full}' must be a list of {spec.item_type.__name__}")
        _check_bounds(value, spec, full, source)
        if spec.choices is not None and value not in spec.choices:
            raise ConfigError(f"{source}: key '{full}' must be one of {list(spec.choices)}, got {value!r}")
        out[name] = float(value) if float in spec.types and isinstance(value, int) else value
    for name, spec in schema.items():
        if name in out:
            continue
        if isinstance(spec, dict):
            out[name] = validate({}, source, spec, prefix + name + ".")
        elif spec.default is None and not spec.optional:
            raise ConfigError(f"{source}: required key '{prefix}{name}' is missing")
        else:
            out[name] = _copy(spec.default)
    return out


def _check_bounds(value, spec: Key, full: str, source: str) -> None:
    """The schema's bounds, for a number or for each item of a list."""
    if isinstance(value, list) and len(value) < spec.min_length:
        raise ConfigError(f"{source}: key '{full}' needs at least {spec.min_length} item(s), got {value!r}")
    items = value if isinstance(value, list) else [value]
    for item in items:
        if item is None or isinstance(item, (str, bool)):
            continue
        # YAML reads `.inf` and a literal beyond float's range (`1e400`) as infinity: never a usable value
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{source}: key '{full}' must be a finite number, got {value!r}")
        if spec.above is not None and not item > spec.above:
            raise ConfigError(f"{source}: key '{full}' must be > {spec.above:g}, got {value!r}")
        if (spec.low is not None and item < spec.low) or (spec.high is not None and item > spec.high):
            low = "-inf" if spec.low is None else spec.low
            high = "inf" if spec.high is None else spec.high
            raise ConfigError(f"{source}: key '{full}' must lie in [{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class Change:
    """A key whose value differs between two configs; `key` is dotted inside sections ('ctt.hc_weight')."""

    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


def config_changes(old: dict, new: dict, prefix: str = "") -> list[Change]:
    """The keys whose values differ from `old` to `new`, section by section, in `new`'s order. Keys that only
    one of them has (a config written before a key existed) are left out."""
    changes = []
    for key, value in new.items():
        if key not in old:
            continue
        if isinstance(value, dict) and isinstance(old[key], dict):
            changes += config_changes(old[key], value, f"{prefix}{key}.")
        elif old[key] != value:
            changes.append(Change(prefix + str(key), old[key], value))
    return changes


def parse_override(text: str) -> tuple[list[str], Any]:
    """'uccl.sbu_weight=0.5' -> (['uccl', 'sbu_weight'], 0.5); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"command-line override '{text}' must look like key=value")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml(raw) if raw != "" else None
    except yaml.YAMLError as err:
        raise ConfigError(f"command-line override '{text}': value is not valid YAML ({err})") from err
    return key.strip().split("."), value


def load_config(path: str, overrides: list[str] = ()) -> dict:
    """Read a YAML config, apply `key=value` overrides, validate it and check the paths it names."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            raw = load_yaml(f) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command-line override '{text}': '{k}' is not a section")
        node[keys[-1]] = value
    source = path + (" (with command-line overrides)" if overrides else "")
    cfg = validate(raw, source)
    check_values(cfg, source)
    return cfg


def check_values(cfg: dict, source: str) -> None:
    """Relations between keys, which the schema's per-key bounds cannot express."""
    if cfg["deep_stem"] and cfg["backbone"] in ("resnet18", "resnet34"):
        raise ConfigError(f"{source}: key 'deep_stem' is only available for resnet50/resnet101")
    if cfg["crop_size"] < cfg["output_stride"]:
        raise ConfigError(
            f"{source}: key 'crop_size' must be at least output_stride ({cfg['output_stride']}), got "
            f"{cfg['crop_size']}: a smaller crop is less than one pixel of the encoder's output"
        )


def check_paths(cfg: dict, source: str, need_unlabeled: bool) -> None:
    """Paths must exist before training starts (the demo dataset is generated before this check)."""
    required = [
        ("data_root", os.path.isdir),
        ("labeled_id_path", os.path.isfile),
        ("val_id_path", os.path.isfile),
    ]
    if need_unlabeled:
        required.append(("unlabeled_id_path", os.path.isfile))
    for key, exists in required:
        value = cfg[key]
        if value is None:
            raise ConfigError(
                f"{source}: key '{key}' is required (set it in the config or on the command line)"
            )
        if not exists(value):
            raise ConfigError(f"{source}: key '{key}' names a path that does not exist: {value}")
    problem = pretrained_problem(cfg["pretrained"], cfg["backbone"], cfg["deep_stem"])
    if problem is not None:
        raise ConfigError(f"{source}: {problem}")
    if cfg["classes"] is not None and not os.path.isfile(cfg["classes"]):
        raise ConfigError(f"{source}: key 'classes' names a file that does not exist: {cfg['classes']}")


if __name__ == "__main__":
    # python -m util.config configs/pascal.yaml [key=value ...]: the resolved config, every default included
    import sys

    if len(sys.argv) < 2:
        sys.exit("usage: python -m util.config CONFIG [key=value ...]")
    try:
        print(yaml.safe_dump(load_config(sys.argv[1], sys.argv[2:]), sort_keys=False), end="")
    except ConfigError as err:
        sys.exit(f"error: {err}")
