"""Speed options give the same training: channels_last and torch.compile against the plain engine, the
fused SGD against the per-tensor loop, ASPP's trimmed dilated kernels against whole ones, amp 'auto', and
the forward passes of UniMatch's step."""

import pytest
import torch
from torch import nn

from tests.two_students import TwoStudents
from tools.passes import count_passes
from unimatch import UniMatch
from util.config import defaults, load_config
from util.engine import Method, Networks, Trainer
from util.engine.device import amp_dtype
from util.engine.trainer import build_optimizer
from util.losses import cross_entropy


def losses_of_steps(method_cls, config_path, steps, **overrides):
    cfg = load_config(config_path, [f"{k}={v}" for k, v in overrides.items()])
    trainer = Trainer(method_cls, cfg, save_path=None)
    for net in trainer.trained_wrapped:
        net.train()
    losses = []
    for batch in trainer.batches(epoch=0):
        losses.append(trainer.train_step(batch)[0])
        trainer.iteration += 1
        if len(losses) == steps:
            return losses, trainer


# dilation, map size, the kernel that runs (a 3x3 kernel with dilation d on an h x w map)
TRIMS = [(12, (9, 9), (1, 1)), (6, (5, 9), (1, 3)), (6, (9, 5), (3, 1)), (6, (9, 9), (3, 3)),
         (2, (4, 4), (3, 3))]  # fmt: skip


@pytest.mark.parametrize("dilation, size, kernel", TRIMS)
def test_dilated_kernel_leaves_out_taps_that_see_only_padding(monkeypatch, dilation, size, kernel):
    """The trimmed kernel gives the whole kernel's output and gradients (input and weight) on maps no
    larger than the dilation in one or both directions, and runs the whole kernel otherwise."""
    import torch.nn.functional as F

    from model.semseg.deeplabv3plus import AtrousConv2d

    torch.manual_seed(0)
    conv = AtrousConv2d(6, 4, dilation)
    x = torch.randn(2, 6, *size, requires_grad=True)
    conv2d, kernels = F.conv2d, []
    monkeypatch.setattr(F, "conv2d", lambda x, w, *a: kernels.append(tuple(w.shape[-2:])) or conv2d(x, w, *a))
    results = []
    for skip in (True, False):
        conv.skip_padding_taps = skip
        out = conv(x)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        results.append((out, *torch.autograd.grad((out * weights).sum(), [x, conv.weight])))
    assert kernels == [kernel, (3, 3)]
    for trimmed, whole in zip(*results):
        torch.testing.assert_close(trimmed, whole)


def test_channels_last_gives_the_same_losses(tiny_config):
    torch.set_num_threads(1)
    plain, _ = losses_of_steps(UniMatch, tiny_config, 3, channels_last=False)
    fast, trainer = losses_of_steps(UniMatch, tiny_config, 3, channels_last=True)
    model = trainer.model_without_ddp
    channels_last = [
        conv.weight.is_contiguous(memory_format=torch.channels_last)
        for conv in (model.backbone.conv1, model.backbone.layer2[0].conv2, model.fuse[0][0])
    ]
    # on a CPU, layer3, layer4 and the ASPP keep the standard format (small maps, large weights)
    standard = [
        conv.weight.is_contiguous() for conv in (model.backbone.layer4[0].conv2, model.aspp.project[0])
    ]
    assert all(channels_last) and all(standard)
    assert fast == pytest.approx(plain, rel=1e-4)


class TinyConv(Method):
    """Labeled cross-entropy and the weak view's own argmax as its pseudo-label, from one forward of a
    two-conv network: one graph, small enough for torch.compile to build in seconds."""

    def networks(self) -> Networks:
        k = self.cfg["nclass"]
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, k, 1))
        return Networks(trained={"model": net})

    def step(self, batch):
        img_x, mask_x = batch["labeled"]
        img_u = batch["unlabeled"][0]
        logits_x, logits_u = self.model(torch.cat((img_x, img_u))).chunk(2)
        pseudo_label = logits_u.detach().argmax(dim=1)
        return {"x": cross_entropy(logits_x, mask_x), "u": cross_entropy(logits_u, pseudo_label)}, {}


def test_compile_gives_the_same_losses_and_plain_checkpoints(tiny_config):
    torch.set_num_threads(1)
    plain, _ = losses_of_steps(TinyConv, tiny_config, 3, compile=False)
    try:
        compiled, trainer = losses_of_steps(TinyConv, tiny_config, 3, compile=True)
    except torch._dynamo.exc.BackendCompilerFailed as err:  # inductor builds C++ kernels on a CPU
        pytest.skip(f"torch.compile's inductor backend cannot build kernels here: {err}")
    assert type(trainer.method.model).__name__ == "OptimizedModule"  # the step really ran compiled
    assert compiled == pytest.approx(plain, rel=1e-4)
    # checkpoints hold the plain network's weights, which load into a network that was never compiled
    weights = trainer.training_state.state_dict()["networks"]["model"]
    assert not any(key.startswith("_orig_mod") for key in weights)


def test_fused_sgd_takes_the_same_steps():
    torch.manual_seed(0)
    cfg = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4}
    params = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(7))]
    copies = [nn.Parameter(p.detach().clone()) for p in params]
    fused = build_optimizer([{"params": params}], cfg)
    plain = torch.optim.SGD([{"params": copies}], **cfg)
    assert fused.defaults["fused"]  # a CPU has the fused kernel since torch 2.4
    for step in range(3):
        for group, lr in ((fused, 0.1 / (step + 1)), (plain, 0.1 / (step + 1))):
            group.param_groups[0]["lr"] = lr  # the engine sets the poly lr before every step
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, copies, grads):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    for p, q in zip(params, copies):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_amp_auto(monkeypatch):
    assert amp_dtype("auto", torch.device("cpu")) is None
    assert amp_dtype("fp16", torch.device("cpu")) is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert amp_dtype("auto", torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert amp_dtype("auto", torch.device("cuda")) is torch.float16


@pytest.mark.parametrize("fp_labeled, head_rows", [(False, 12), (True, 14)])
def test_unimatch_forward_passes_all_reach_a_loss(fp_labeled, head_rows):
    """Batch 2: mix (2 rows), labeled + weak + the weak's perturbed copy (6), two strong views (4); the
    released pass adds the labeled images' perturbed copy (2 rows), which reaches no loss."""
    torch.set_num_threads(1)
    cfg = {**defaults(), "nclass": 3, "batch_size": 2, "unimatch": {"fp_labeled": fp_labeled}}
    count = count_passes(UniMatch, cfg, size=33)
    assert (count.passes, count.backbone_rows, count.rows) == (3, 10, head_rows)
    assert count.reaching == 12


def test_two_students_count_every_network():
    torch.set_num_threads(1)
    cfg = {**defaults(), "nclass": 3, "batch_size": 2}
    count = count_passes(TwoStudents, cfg, size=33)
    # two teachers label the weak images (no gradient), two students predict labeled + weak images
    assert (count.passes, count.rows, count.reaching) == (4, 12, 12)
