"""What broke or misled a new user in the second hour (issue 32): bad files in a folder, resize
models on large images, ambiguous TIFF planes, compare's epochs."""

from __future__ import annotations

import logging
import struct

import numpy as np
import pytest
import tifffile

from cellseg.files import ImageFileError, open_image
from cellseg.inference import check_shrink
from cellseg.samples import sample_path
from helpers import predict_cfg

pytestmark = pytest.mark.e2e  # whole commands: make test-quick leaves them out


def bad_files(folder):
    """Every way a file in a folder of images can be unreadable."""
    good = sample_path().read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 3])
    (folder / "empty.tif").write_bytes(b"")
    (folder / "a folder.png").mkdir()
    header = b"II*\x00" + struct.pack("<I", 8) + b"\x00\x00"  # a header, no pages
    (folder / "junk.tif").write_bytes(header + bytes(range(256)) * 8)
    tifffile.imwrite(folder / "odd.tif", np.zeros((64, 64), np.uint8), compression="zlib")
    raw = bytearray((folder / "odd.tif").read_bytes())
    tag = raw.find(struct.pack("<HHI", 259, 3, 1))  # the Compression tag: SHORT, one value
    assert tag > 0
    raw[tag + 8 : tag + 10] = struct.pack("<H", 0x8034)  # a compression no codec knows
    (folder / "odd.tif").write_bytes(bytes(raw))
    return {"truncated", "empty", "a folder", "junk", "odd"}


def test_every_unreadable_file_is_skipped_and_named_and_the_tables_written(
        trained, tmp_path, caplog):
    from cellseg.predict import predict

    ckpt, root = trained
    folder = tmp_path / "in"
    folder.mkdir()
    good = sorted(root.glob("*/images/*.png"))[:2]
    for p in good:
        (folder / p.name).write_bytes(p.read_bytes())
    broken = bad_files(folder)
    with caplog.at_level(logging.WARNING):
        summary = predict(predict_cfg(ckpt, folder, tmp_path / "out"))
    assert (summary["images"], summary["failed"]) == (2, len(broken))
    for name in broken:
        assert any("skipped: " in r.message and name in r.message for r in caplog.records), name
    assert (tmp_path / "out/measurements.csv").is_file()
    assert (tmp_path / "out/summary.csv").is_file()


@pytest.mark.parametrize("planes", [3, 4])
def test_three_or_four_planes_stored_as_rgb_planes_ask_for_axes(tmp_path, planes):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.arange(planes * 64 * 64, dtype=np.uint16).reshape(planes, 64, 64))
    with pytest.raises(ImageFileError, match=r"pass axes=ZYX \(planes\), axes=CYX"):
        open_image(path)
    image = open_image(path, "ZYX")
    assert image.planes_shape == {"Z": planes}
    colour = tmp_path / "colour.tif"
    tifffile.imwrite(colour, np.zeros((64, 64, 3), np.uint8))  # interleaved: a real RGB image
    assert open_image(colour).rgb


def test_a_resize_model_refuses_to_shrink_a_large_field_and_warns_below(caplog):
    with pytest.raises(ImageFileError, match=r"shrink this 3000x3000 image 47 times"):
        check_shrink(3000, 3000, 64, 20.0)
    with caplog.at_level(logging.WARNING):
        check_shrink(1024, 1024, 64, 20.0)  # a DSB 1024x1024 field: 16 times, warned
    assert "use a native-resolution model" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_shrink(256, 320, 64, 20.0)
    assert caplog.text == ""


def test_compare_draws_validation_at_its_epochs(cfg_factory):
    from pathlib import Path

    from cellseg.compare import run_info
    from cellseg.train import train

    cfg = cfg_factory("trainer.max_epochs=4", "trainer.check_val_every_n_epoch=2")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    (run / ".hydra").mkdir(exist_ok=True)
    from omegaconf import OmegaConf

    OmegaConf.save(cfg, run / ".hydra/config.yaml")
    OmegaConf.save(OmegaConf.create([]), run / ".hydra/overrides.yaml")
    curves = run_info(run)["curves"]
    assert [epoch for epoch, _ in curves["val/loss"]] == [2, 4]
    assert [epoch for epoch, _ in curves["train/loss"]] == [1, 2, 3, 4]


def test_a_bug_keeps_its_traceback_and_a_user_error_is_one_line(caplog):
    from cellseg.cli import one_line_errors
    from cellseg.errors import UserError

    def bug():
        return {}["mode"]  # a KeyError inside cellseg: a bug, not a message

    with caplog.at_level(logging.ERROR), pytest.raises(KeyError):
        one_line_errors(bug)()
    assert "unexpected KeyError (a bug: please report it" in caplog.text
    caplog.clear()

    def refusal():
        raise UserError("data.root=/x does not exist; point data.root at your dataset")

    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_:
        one_line_errors(refusal)()
    assert exit_.value.code == 1
    (record,) = caplog.records
    assert record.getMessage().startswith("data.root=/x does not exist; point data.root")
