from model.semseg.deeplabv3plus import DeepLabV3Plus


def build_model(cfg: dict) -> DeepLabV3Plus:
    """Build DeepLabV3+ from the (already validated) config dict."""
    return DeepLabV3Plus(
        backbone=cfg["backbone"],
        nclass=cfg["nclass"],
        deep_stem=cfg.get("deep_stem", False),
        output_stride=cfg.get("output_stride", 16),
        dilations=tuple(cfg.get("dilations", (6, 12, 18))),
        pretrained=cfg.get("pretrained"),
        width=cfg.get("backbone_width", 64),
        head_channels=cfg.get("head_channels", 256),
    )
