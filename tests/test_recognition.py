"""The recognition appendix (SPM paper, Table 9): local torchvision datasets, the classifier, the
vector SPM (Fig. 6) and a training run end to end."""

from __future__ import annotations

import json
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
import torchvision
import yaml

from segprompt.build import build_model, dataset_meta
from segprompt.config import load_recipe
from segprompt.data.recognition import (
    RecognitionDataset,
    class_frequency,
    open_torchvision,
    recognition_meta,
)
from segprompt.errors import SegpromptError
from segprompt.measure.params import breakdown
from segprompt.training.launch import train
from segprompt.tuning.spm_layers import SPMVector

K = 5


def _exists(path, md5=None):
    return os.path.isfile(path)


@pytest.fixture()
def no_md5(monkeypatch):
    """Our fake files cannot match torchvision's MD5 sums of the real ones; check presence only."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", _exists)
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", _exists)


def _fake_cifar100(root, n_train=25, n_test=10, as_archive=False):
    rng = np.random.default_rng(0)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        labels = (np.arange(n) % K).tolist()
        data = rng.integers(0, 255, (n, 3072), dtype=np.uint8)
        for i, c in enumerate(labels):  # class c: a bright band at rows 6c..6c+5 (learnable)
            img = data[i].reshape(3, 32, 32)
            img[:, 6 * c:6 * c + 6] = 250
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(K)]}, f)
    if as_archive:
        with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
            tar.add(folder, arcname="cifar-100-python")
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
    return root


def test_missing_files_name_the_archive_and_where_it_is_published(tmp_path):
    with pytest.raises(SegpromptError, match=r"cifar-100-python/train.*cifar-100-python\.tar\.gz.*toronto"):
        open_torchvision("cifar100", tmp_path, "train")
    with pytest.raises(SegpromptError, match=r"train_32x32\.mat.*stanford"):
        open_torchvision("svhn", tmp_path, "train")
    with pytest.raises(SegpromptError, match=r"food-101.*ethz"):
        open_torchvision("food101", tmp_path, "test")
    with pytest.raises(SegpromptError, match="splits train, test, not 'val'"):
        open_torchvision("cifar100", tmp_path, "val")


def test_corrupt_cifar_is_reported_with_the_archive_to_fetch_again(tmp_path):
    _fake_cifar100(tmp_path)  # real torchvision MD5 check: fake files fail it
    with pytest.raises(SegpromptError, match="integrity check.*cifar-100-python.tar.gz"):
        open_torchvision("cifar100", tmp_path, "train")


def test_cifar_archive_is_extracted_and_read_by_torchvision(tmp_path, no_md5):
    _fake_cifar100(tmp_path, as_archive=True)
    meta = recognition_meta("cifar100", tmp_path)
    assert meta.classes == [f"class{i}" for i in range(K)] and meta.splits == {"train": 25, "test": 10}
    ds = RecognitionDataset("cifar100", tmp_path, "train", meta, train=True, crop_size=(16, 16))
    a, b = ds[(3, 123)], ds[(3, 123)]
    assert a["img"].shape == (3, 16, 16) and a["img"].dtype == torch.uint8
    assert torch.equal(a["img"], b["img"]), "one seed, one augmentation"
    assert int(a["label"]) == 3 % K
    assert np.allclose(class_frequency(ds.labels, K), 1 / K)


def test_svhn_and_food101_read_from_local_files(tmp_path, no_md5):
    import scipy.io
    from PIL import Image

    svhn = tmp_path / "svhn"
    svhn.mkdir()
    for split, n in (("train", 6), ("test", 3)):
        y = np.array([[10], [1], [2], [3], [4], [5]][:n], dtype=np.uint8)  # SVHN stores digit 0 as 10
        scipy.io.savemat(svhn / f"{split}_32x32.mat", {"X": np.zeros((32, 32, 3, n), np.uint8), "y": y})
    meta = recognition_meta("svhn", svhn)
    assert meta.num_classes == 10 and meta.splits == {"train": 6, "test": 3}
    ds = RecognitionDataset("svhn", svhn, "train", meta, train=False, test_size=(8, 8))
    assert ds.labels.tolist() == [0, 1, 2, 3, 4, 5] and ds[0]["img"].shape == (3, 8, 8)

    food = tmp_path / "food" / "food-101"
    for cls in ("apple_pie", "baby_back_ribs"):
        (food / "images" / cls).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (20, 12), (200, 10, 10)).save(food / "images" / cls / f"{i}.jpg")
    (food / "meta").mkdir()
    for split in ("train", "test"):
        (food / "meta" / f"{split}.json").write_text(json.dumps(
            {c: [f"{c}/{i}" for i in range(2)] for c in ("apple_pie", "baby_back_ribs")}))
    meta = recognition_meta("food101", tmp_path / "food")
    assert meta.classes == ["apple_pie", "baby_back_ribs"] and meta.splits == {"train": 4, "test": 4}


def test_vector_spm_shapes_and_shared_recurrence():
    spm = SPMVector(32, K, channels=16, recurrent=3)
    feat, vec = torch.randn(2, 32, 4, 4), torch.full((2, K), 1 / K)
    out, v, interim = spm(feat, vec)
    assert out.shape == feat.shape and v.shape == (2, K) and len(interim) == 3
    assert torch.allclose(v.sum(1), torch.ones(2))
    assert all(t.shape == (2, K) for t in interim)
    assert torch.equal(out, feat), "the zero-initialised prompt output passes features through unchanged"
    n = sum(p.numel() for p in spm.parameters())
    assert n == sum(p.numel() for p in SPMVector(32, K, channels=16, recurrent=1).parameters())


def _recipe(tmp_path, root, tuning):
    d = {
        "model": {"backbone": {"name": "vit", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4,
                               "num_heads": 2, "out_indices": [3], "stage_starts": [0, 1, 2, 3]},
                  "decode_head": {"name": "linear_cls"}},
        "tuning": tuning,
        "data": {"dataset": "cifar100", "root": str(root), "train_split": "train", "val_split": "test",
                 "batch_size": 8, "train": {"crop_size": [32, 32]}, "test": {"scale": [32, 32]}},
        "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.0},
        "schedule": {"iters": 4, "warmup_iters": 0},
        "evaluation": {"interval": 4, "metric": "top1"},
        "checkpoint": {"interval": 4},
        "runtime": {"seed": 0, "device": "cpu", "num_workers": 0, "log_interval": 2},
    }
    path = tmp_path / "rec.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_spm_recognition_trains_only_prompts_and_head_end_to_end(tmp_path, no_md5):
    root = _fake_cifar100(tmp_path / "data")
    recipe = _recipe(tmp_path, root, {"name": "spm", "stages": [1, 2, 3, 4], "channels": 16})
    cfg = load_recipe(recipe)
    model = build_model(cfg, dataset_meta(cfg))
    chain = model.backbone.stage_hook
    assert sorted(chain.spms) == ["1", "2", "3", "4"] and all(isinstance(s, SPMVector) for s in chain.spms.values())
    assert torch.allclose(chain.prior, torch.full((K,), 1 / K)), "P0 = class frequencies of the training split"
    frozen = {n: p.clone() for n, p in model.backbone.named_parameters() if not n.startswith("stage_hook")}
    losses = model(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    assert set(losses) == {"loss_cls", "loss_spm1", "loss_spm2", "loss_spm3", "loss_spm4"}
    sum(losses.values()).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (not n.startswith("backbone.") or n.startswith("backbone.stage_hook")), n
    assert all(torch.equal(p, frozen[n]) for n, p in model.backbone.named_parameters() if n in frozen)

    run = train(recipe, [], out=tmp_path / "run")
    result = json.loads((run / "eval.json").read_text())
    assert result["images"] == 10 and 0.0 <= result["top1"] <= 100.0
    assert result["top1"] == result["aAcc"]


def test_table9_parameter_groups_of_the_classifier(tmp_path):
    """Head-tuning trains only the LayerNorm + linear head; SPM adds four vector SPMs."""
    cfg = load_recipe(_recipe(tmp_path, tmp_path, {"name": "head"}), ["data.num_classes=5"])
    b = breakdown(cfg, K, "paper")
    assert b.trainable == 2 * 32 + 32 * K + K and b.groups["backbone"]["trainable"] == 0
    cfg = load_recipe(_recipe(tmp_path, tmp_path, {"name": "spm", "channels": 16}))
    b = breakdown(cfg, K, "paper")
    expected = sum(p.numel() for _ in range(4) for p in SPMVector(32, K, channels=16).parameters())
    assert b.groups["prompt"]["trainable"] == expected
