from model.semseg.deeplabv3plus import DeepLabV3Plus

# The config keys the network is built from besides backbone and nclass, with the values build_model takes
# for a config that lacks them (the config of a checkpoint written before the key existed).
ARCHITECTURE_DEFAULTS = {
    "deep_stem": False,
    "output_stride": 16,
    "dilations": [6, 12, 18],
    "backbone_width": 64,
    "head_channels": 256,
}
ARCHITECTURE_KEYS = ("backbone", "nclass", *ARCHITECTURE_DEFAULTS)


def build_model(cfg: dict) -> DeepLabV3Plus:
    """Build DeepLabV3+ from the (already validated) config dict."""
    arch = {**ARCHITECTURE_DEFAULTS, **cfg}
    return DeepLabV3Plus(
        backbone=cfg["backbone"],
        nclass=cfg["nclass"],
        deep_stem=arch["deep_stem"],
        output_stride=arch["output_stride"],
        dilations=tuple(arch["dilations"]),
        pretrained=cfg.get("pretrained"),
        width=arch["backbone_width"],
        head_channels=arch["head_channels"],
    )
