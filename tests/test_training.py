"""End-to-end runs of the entry scripts on a tiny generated demo dataset, each a real process."""

import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = """
dataset: demo
data_root: {root}/demo
nclass: 6
crop_size: 32
labeled_id_path: {root}/demo/splits/labeled.txt
unlabeled_id_path: {root}/demo/splits/unlabeled.txt
val_id_path: {root}/demo/splits/val.txt
demo: {{num_train: 24, num_val: 4, size: 32, labeled_fraction: 0.25, seed: 0}}
backbone: resnet18
backbone_width: 8
head_channels: 16
dilations: [1, 2, 3]
epochs: 1
max_iters: 6
batch_size: 2
lr: 0.01
lr_multi: 1.0
conf_thresh: 0.5
eval_interval: 3
save_interval: 2
num_workers: 0
deterministic: true
log_interval: 1
"""


def run(args, expect=0, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != expect:
        raise AssertionError(
            f"{args} exited {proc.returncode}, expected {expect}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout + proc.stderr


def weights(path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state)


def test_crashed_run_resumes_to_identical_weights(tiny_config, tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    script = [sys.executable, "tests/run_training.py", "unimatch", "--config", tiny_config]
    run([*script, "--save-path", str(straight)])
    # Killed before iteration 6 (the last checkpoint is from iteration 4), then restarted as it was.
    run([*script, "--save-path", str(crashed), "--crash-at", "5"], expect=17)
    assert torch.load(crashed / "latest.pth", weights_only=True)["iteration"] == 4
    log = run([*script, "--save-path", str(crashed)])
    assert "resumed from" in log and "at iteration 4/6" in log
    a, b = weights(straight / "latest.pth"), weights(crashed / "latest.pth")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run ended with different weights"


def test_two_process_gloo_run_keeps_ranks_identical(tiny_config, tmp_path):
    dump = tmp_path / "dump"
    run([
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "tests/run_training.py", "unimatch", "--config", tiny_config, "--save-path", str(tmp_path / "ddp"),
        "--dump-weights", str(dump), "max_iters=4",
    ])  # fmt: skip
    r0, r1 = (
        torch.load(dump / "rank0.pt", weights_only=True),
        torch.load(dump / "rank1.pt", weights_only=True),
    )
    start = weights(tmp_path / "ddp" / "latest.pth")
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "ranks diverged"
    assert all(torch.equal(r0[k], start[k]) for k in r0)
    assert any(not torch.equal(r0[k], torch.zeros_like(r0[k])) for k in r0)


def test_entry_scripts_train_and_eval_scores_checkpoint(tiny_config, tmp_path):
    save = tmp_path / "sup"
    log = run([sys.executable, "supervised.py", "--config", tiny_config, "--save-path", str(save)])
    assert "best val mIoU" in log
    for name in ("best.pth", "latest.pth", "config.yaml", "train.log"):
        assert (save / name).is_file(), name
    best = torch.load(save / "best.pth", weights_only=True)
    vis = tmp_path / "vis"
    out = run([
        sys.executable, "eval.py", "--config", tiny_config, "--checkpoint", str(save / "best.pth"),
        "--save-vis", str(vis),
    ])  # fmt: skip
    assert (
        f"mIoU {best['miou']:8.2f}".replace("  ", " ") in " ".join(out.split())
        or f"{best['miou']:.2f}" in out
    )
    assert len(list(vis.rglob("*.png"))) == 4  # under the split's relative paths
    # Sliding window with flip also runs on the same checkpoint.
    run([sys.executable, "eval.py", "--config", tiny_config, "--checkpoint", str(save / "latest.pth"),
         "--mode", "sliding_window", "--flip", "crop_size=16"])  # fmt: skip


def test_bad_inputs_stop_with_a_message(tiny_config, tmp_path):
    save = tmp_path / "run"
    train = [sys.executable, "supervised.py", "--config", tiny_config, "--save-path", str(save)]
    out = run([*train, "lr_mult=1"], expect=2)
    assert "unknown config key 'lr_mult' (did you mean 'lr_multi'?)" in out
    out = run([*train, "labeled_id_path=nowhere.txt"], expect=2)
    assert "key 'labeled_id_path' names a path that does not exist: nowhere.txt" in out
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    out = run([*train, f"labeled_id_path={empty}"], expect=2)
    assert str(empty) in out and "empty" in out
    # A bare state dict of another architecture is refused by eval.py with the tensors that do not fit
    # (best.pth holds its config, which the model is built from).
    run([*train, "max_iters=3"])
    bare = tmp_path / "bare.pth"
    torch.save(torch.load(save / "best.pth", weights_only=True)["model"], bare)
    out = run([sys.executable, "eval.py", "--config", tiny_config, "--checkpoint", str(bare),
               "backbone_width=16"], expect=2)  # fmt: skip
    assert "does not fit this model" in out and "size mismatch for backbone.conv1.weight" in out
    # A mask with a value outside the classes stops training with the file's name; best.pth survives.
    before = (save / "best.pth").read_bytes()
    from PIL import Image

    val_line = open(tmp_path / "demo" / "splits" / "val.txt").readline().split()
    mask_path = tmp_path / "demo" / val_line[1]
    Image.new("L", Image.open(mask_path).size, 9).save(mask_path)
    out = run(
        [sys.executable, "eval.py", "--config", tiny_config, "--checkpoint", str(save / "best.pth")], expect=1
    )
    assert str(mask_path) in out and "9" in out
    assert (save / "best.pth").read_bytes() == before


def test_bf16_autocast_trains_with_finite_weights(tiny_config, tmp_path):
    save = tmp_path / "bf16"
    run(
        [
            sys.executable,
            "unimatch.py",
            "--config",
            tiny_config,
            "--save-path",
            str(save),
            "amp=bf16",
            "max_iters=2",
        ]
    )
    state = torch.load(save / "latest.pth", weights_only=True)
    assert state["iteration"] == 2 and state["cfg"]["amp"] == "bf16"
    # Weights stay float32 (autocast only changes the compute dtype) and finite.
    assert all(
        v.dtype == torch.float32 and torch.isfinite(v).all()
        for v in state["model"].values()
        if v.is_floating_point()
    )
