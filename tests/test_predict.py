"""`segprompt predict`: inputs (nested folders, globs, odd sizes, grayscale / RGBA / 16-bit, corrupt
and truncated files), outputs (paths, formats, no overwrite without --force), batching, and the
byte-for-byte match with `eval --save-preds`."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
import torch
from conftest import write_recipe

from segprompt.cli import main
from segprompt.distributed import resolve_device
from segprompt.errors import SegpromptError
from segprompt.evaluation.evaluate import evaluate_checkpoint
from segprompt.evaluation.inference import save_prediction
from segprompt.serve.predict import discover, predict
from segprompt.training.launch import train


@pytest.fixture(scope="module")
def run(tmp_path_factory, synthetic_root):
    """A tiny trained run whose classifier is replaced by a random one with no bias, so that its
    predictions vary with the input (a 2-iteration model predicts one class everywhere) and a
    preprocessing difference would show."""
    tmp = tmp_path_factory.mktemp("predict")
    run = train(write_recipe(tmp / "tiny.yaml", synthetic_root), ["schedule.iters=2", "evaluation.interval=0"],
                out=tmp / "run")
    best = run / "checkpoints" / "best.pt"
    state = torch.load(best, weights_only=True)
    w = state["model"]["decode_head.conv_seg.weight"]
    state["model"]["decode_head.conv_seg.weight"] = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    state["model"]["decode_head.conv_seg.bias"].zero_()
    torch.save(state, best)
    return run


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random RGB image (blocks, so the network sees structure), h x w x 3 uint8."""
    small = np.random.default_rng(seed).integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _write(path, image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


def _read(path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def mixed(tmp_path):
    """A folder of every colour layout, odd sizes, nested paths, a corrupt and a truncated file; and
    beside it, the 8-bit RGB image each layout is meant to be read as (``twins/``)."""
    src, twins = tmp_path / "imgs", tmp_path / "twins"
    gray = _rgb(37, 53, 1)[..., 0]
    rgba = np.dstack([_rgb(41, 70, 2), np.full((41, 70), 7, np.uint8)])  # alpha is dropped, not blended
    deep16 = _rgb(29, 31, 3).astype(np.uint16) * 257 + 100  # 16-bit: its high byte is the 8-bit image
    _write(src / "top.jpg", _rgb(48, 64, 4))
    _write(src / "gray.png", gray)
    _write(src / "a" / "rgba.png", rgba)
    _write(src / "a" / "b" / "deep16.png", deep16)
    _write(src / "a" / "b" / "gray16.tif", deep16[..., 0])
    _write(src / "tiny.bmp", _rgb(5, 7, 5))
    (src / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    _write(tmp_path / "whole.jpg", _rgb(40, 40, 6))
    (src / "cut.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:-300])  # decodes, but cut short
    (src / "notes.txt").write_text("not an image")
    _write(src / ".hidden.png", _rgb(8, 8, 7))
    _write(twins / "gray.png", np.dstack([gray] * 3))
    _write(twins / "a" / "rgba.png", rgba[..., :3])
    _write(twins / "a" / "b" / "deep16.png", (deep16 >> 8).astype(np.uint8))
    _write(twins / "a" / "b" / "gray16.png", np.dstack([(deep16[..., 0] >> 8).astype(np.uint8)] * 3))
    return src, twins


def test_predict_reproduces_eval_save_preds_byte_for_byte(run, synthetic_root, tmp_path):
    rescale = ["data.test.scale=[80,80]"]  # the test pipeline resizes 64 -> 80; predictions come back at 64
    evaluate_checkpoint(run, save_preds=tmp_path / "eval", overrides=rescale)
    result = predict(run, [synthetic_root / "img_dir" / "val"], tmp_path / "pred", overrides=rescale,
                     show_progress=False)
    assert result.images == 7 and result.checkpoint == run / "checkpoints" / "best.pt" and not result.skipped
    ours, theirs = _files(tmp_path / "pred"), _files(tmp_path / "eval")
    assert sorted(ours) == sorted(theirs) and len(ours) == 14
    assert all(ours[name] == theirs[name] for name in ours)
    classes = {int(c) for name in ours if not name.endswith("_overlay.png") for c in np.unique(
        _read(tmp_path / "pred" / name))}
    assert len(classes) > 1  # the predictions depend on the image: the comparison means something


def test_slide_mode_with_tta_batched_matches_eval(run, synthetic_root, tmp_path):
    window = ["evaluation.crop_size=[32,32]", "evaluation.stride=[24,24]", "evaluation.tta_scales=[0.75,1.25]"]
    evaluate_checkpoint(run, save_preds=tmp_path / "eval", mode="slide", tta=True, overrides=window)
    predict(run, [synthetic_root / "img_dir" / "val"], tmp_path / "pred", mode="slide", tta=True, overrides=window,
            batch=4, show_progress=False)
    assert _files(tmp_path / "pred") == _files(tmp_path / "eval")


def test_folder_of_every_layout_nested_odd_sizes_and_bad_files(run, mixed, tmp_path):
    src, twins = mixed
    out = tmp_path / "out"
    result = predict(run, [src], out, formats=["index", "color", "overlay"], show_progress=False)
    assert result.images == 6
    assert sorted(str(p) for p, _ in result.skipped) == [str(src / "bad.png"), str(src / "cut.jpg")]
    assert "truncated JPEG" in dict(result.skipped)[src / "cut.jpg"]
    for rel, (h, w) in {"top": (48, 64), "gray": (37, 53), "a/rgba": (41, 70), "a/b/deep16": (29, 31),
                        "a/b/gray16": (29, 31), "tiny": (5, 7)}.items():
        index, color, overlay = (_read(out / f"{rel}{suffix}.png") for suffix in ("", "_color", "_overlay"))
        assert index.shape == (h, w) and index.dtype == np.uint8 and index.max() < 4
        assert color.shape == overlay.shape == (h, w, 3)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["a", *(f"{s}{x}.png" for s in ("top", "gray", "tiny") for x in ("", "_color", "_overlay"))])
    # each layout is read as its 8-bit RGB twin: gray -> 3 channels, alpha dropped, 16-bit -> high byte
    predict(run, [twins], tmp_path / "twins_out", formats=["index"], show_progress=False)
    for rel in ("gray", "a/rgba", "a/b/deep16", "a/b/gray16"):
        assert (out / f"{rel}.png").read_bytes() == (tmp_path / "twins_out" / f"{rel}.png").read_bytes(), rel


def test_batches_of_mixed_sizes_and_workers_give_the_batch_1_result(run, mixed, tmp_path):
    src, _ = mixed
    for i in range(3):  # the size of top.jpg: batched with one another and with it
        _write(src / "same" / f"x{i}.png", _rgb(48, 64, 10 + i))
    _write(src / "same" / "x3.png", _rgb(60, 80, 13))  # 48 x 64 after the test pipeline too, but output at 60 x 80
    one = predict(run, [src], tmp_path / "b1", show_progress=False)
    many = predict(run, [src], tmp_path / "b4", batch=4, overrides=["runtime.num_workers=2"], show_progress=False)
    assert one.images == many.images == 10 and len(many.skipped) == 2
    assert _read(tmp_path / "b4" / "same" / "x3.png").shape == (60, 80)
    assert _files(tmp_path / "b1") == _files(tmp_path / "b4")


def test_strict_stops_at_the_unreadable_image(run, mixed, tmp_path):
    src, _ = mixed
    with pytest.raises(SegpromptError, match=r"cannot read image '.*bad\.png'.*drop --strict"):
        predict(run, [src], tmp_path / "out", strict=True, show_progress=False)


def test_existing_outputs_are_never_overwritten_without_force(run, mixed, tmp_path):
    src, _ = mixed
    out = src / "preds"  # inside the input folder: earlier predictions are not read as inputs
    first = predict(run, [src], out, formats=["index"], show_progress=False)
    (out / "top.png").write_bytes(b"mine")
    with pytest.raises(SegpromptError, match=r"6 output file\(s\) already exist in .*--force"):
        predict(run, [src], out, formats=["index"], show_progress=False)
    assert (out / "top.png").read_bytes() == b"mine"
    again = predict(run, [src], out, formats=["index"], force=True, show_progress=False)
    assert again.images == first.images == 6 and (out / "top.png").read_bytes() != b"mine"


def test_inputs_files_globs_and_collisions(mixed, tmp_path):
    src, _ = mixed
    by_glob = discover([str(src / "**" / "*.png")])
    assert [str(i.rel) for i in by_glob] == ["a/b/deep16", "a/rgba", "bad", "gray"]
    files = discover([src / "top.jpg", src / "a" / "rgba.png", src / "notes.txt"])
    assert [str(i.rel) for i in files] == ["notes", "rgba", "top"]  # named files are read whatever their extension
    _write(src / "top.png", _rgb(8, 8, 9))
    with pytest.raises(SegpromptError, match=r"'.*top\.jpg' and '.*top\.png' would both be written as 'top'"):
        discover([src])
    with pytest.raises(SegpromptError, match="does not exist"):
        discover([tmp_path / "nowhere"])
    with pytest.raises(SegpromptError, match="matches no image"):
        discover([str(tmp_path / "*.webp")])


def test_a_checkpoint_alone_carries_its_recipe(run, synthetic_root, tmp_path):
    val = synthetic_root / "img_dir" / "val"
    moved = tmp_path / "elsewhere" / "model.pt"
    moved.parent.mkdir()
    shutil.copy(run / "checkpoints" / "best.pt", moved)
    predict(run, [val], tmp_path / "from_run", show_progress=False)
    predict(moved, [val], tmp_path / "from_file", show_progress=False)
    assert _files(tmp_path / "from_file") == _files(tmp_path / "from_run")
    state = torch.load(moved, weights_only=True)
    del state["config"]
    torch.save(state, moved)
    with pytest.raises(SegpromptError, match="holds no recipe and is not in a run directory; pass the run directory"):
        predict(moved, [val], tmp_path / "x", show_progress=False)
    with pytest.raises(SegpromptError, match="is a recipe, which holds no trained weights"):
        predict(run / "config.yaml", [val], tmp_path / "x", show_progress=False)


def test_index_pngs_are_16_bit_beyond_256_classes(tmp_path):
    pred = np.array([[0, 255], [256, 299]])
    palette = [[i % 256, 0, 0] for i in range(300)]
    index, color = save_prediction(tmp_path, "p", pred, np.zeros((2, 2, 3), np.uint8), palette,
                                   formats=("index", "color"), num_classes=300)
    assert _read(index).dtype == np.uint16 and _read(index).tolist() == pred.tolist()
    assert _read(color)[..., 2].tolist() == [[0, 255], [0, 43]]  # BGR on disk: red is the last channel


def test_devices_and_cli(run, synthetic_root, tmp_path, capsys):
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(SegpromptError, match="--device 'gpu' is not one of"):
        resolve_device("gpu", key="--device")
    if not torch.cuda.is_available():
        with pytest.raises(SegpromptError, match="--device is 'cuda:1' but no CUDA device is visible"):
            resolve_device("cuda:1", key="--device")
    val = synthetic_root / "img_dir" / "val"
    with pytest.raises(SystemExit) as e:
        main(["predict", str(run), str(val), "--out", str(tmp_path / "o"), "--format", "index,color",
              "--device", "cpu", "--batch", "3"])
    out = capsys.readouterr()
    assert e.value.code in (0, None), out.err
    assert "predicted 7 image(s)" in out.out and "wrote 14 file(s)" in out.out
    assert len(list((tmp_path / "o").glob("*_color.png"))) == 7
    with pytest.raises(SystemExit) as e:
        main(["predict", str(run), str(val), "--out", str(tmp_path / "o2"), "--format", "mask"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --format mask: choose from index, color, overlay")


@pytest.mark.slow
def test_deployed_text_guided_run_predicts_without_the_clip_file(tmp_path, synthetic_root):
    from test_stdc_pipeline import SMALL

    from segprompt.models.text.clip_text import CLIPTextEncoder

    torch.manual_seed(0)
    clip = tmp_path / "RN50.pt"
    torch.save(CLIPTextEncoder("RN50").state_dict(), clip)
    run = train("recipes/stdc/camvid_stdc1_stage2.yaml", [f"data.root={synthetic_root}", *SMALL,
                f"model.backbone.text.clip_weights={clip}", "model.backbone.text.n_ctx=3"], out=tmp_path / "run")
    clip.unlink()  # the deployed model holds the text embeddings: no CLIP file needed
    val = synthetic_root / "img_dir" / "val"
    evaluate_checkpoint(run, checkpoint="deployed", save_preds=tmp_path / "eval")
    predict(run / "checkpoints" / "deployed.pt", [val], tmp_path / "pred", show_progress=False)
    assert _files(tmp_path / "pred") == _files(tmp_path / "eval") and len(_files(tmp_path / "eval")) == 14


def test_cli_lists_each_skipped_image_and_the_count(run, mixed, tmp_path, capsys):
    src, _ = mixed
    with pytest.raises(SystemExit) as e:
        main(["predict", str(run), str(src), "--out", str(tmp_path / "o"), "--format", "index"])
    out = capsys.readouterr()
    assert e.value.code in (0, None), out.err
    assert "predicted 6 image(s)" in out.out and "wrote 6 file(s)" in out.out
    lines = out.err.strip().splitlines()
    assert lines[0].startswith(f"skipped: cannot read image '{src / 'bad.png'}'")
    assert lines[1].startswith(f"skipped: cannot read image '{src / 'cut.jpg'}': truncated JPEG")
    assert lines[2] == "skipped 2 unreadable image(s); --strict makes that an error"


def test_legend_names_the_classes_present_beside_colour_and_overlay_images(run, tmp_path):
    from segprompt.evaluation.inference import with_legend

    img = tmp_path / "in" / "a.png"
    _write(img, _rgb(40, 48, 1))
    plain = predict(run, [img], tmp_path / "plain", formats=["index", "color", "overlay"], show_progress=False)
    legend = predict(run, [img], tmp_path / "legend", formats=["index", "color", "overlay"], legend=True,
                     show_progress=False)
    assert [p.name for p in legend.files] == [p.name for p in plain.files]
    pred = _read(tmp_path / "legend" / "a.png")
    assert (pred == _read(tmp_path / "plain" / "a.png")).all()  # the class ids do not change
    for name in ("a_color.png", "a_overlay.png"):
        with_, without = _read(tmp_path / "legend" / name), _read(tmp_path / "plain" / name)
        assert with_.shape[1] > without.shape[1] and (with_[:40, :48] == without).all()  # the image, then the panel
    # one swatch per class present, in its palette colour, most pixels first
    palette = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
    pred = np.zeros((40, 48), np.int64)
    pred[:, 30:] = 2
    panel = with_legend(np.zeros((40, 48, 3), np.uint8), pred, ["sky", "tree", "road"], palette)[:, 48:]
    assert (panel[4 + 6, 4 + 6] == palette[0]).all() and (panel[20 + 6, 4 + 6] == palette[2]).all()
    assert not (panel == palette[1]).all(-1).any()  # 'tree' is absent from the prediction
