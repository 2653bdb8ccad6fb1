"""examples/edit.py under the output-folder policy: an output folder never holds the inputs; unreadable images are
one line."""

import importlib.util
import struct
import zlib

import numpy as np
import PIL.Image
import pytest
from conftest import ROOT, call_main, tiny_class_pipeline


@pytest.fixture(scope="module")
def edit():
    spec = importlib.util.spec_from_file_location("enat_edit_example", ROOT / "examples" / "edit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "class"
    tiny_class_pipeline().save_pretrained(folder)
    return folder


def png_header_only(path, width, height):
    """A PNG that declares `width` x `height` pixels (its header is all a reader sees before refusing it)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_an_output_folder_never_holds_the_inputs(edit, model, tmp_path):
    out = tmp_path / "out"
    common = ["--model", model, "--class-labels", 1, "--steps", 2, "--output-dir", out]
    assert call_main(edit.main, "inpaint", *common, "--image", model / "..", "--box", 0, 0, 4, 4)[0] == 1  # a folder
    PIL.Image.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)).save(tmp_path / "in.png")
    code, stderr = call_main(edit.main, "inpaint", *common, "--image", tmp_path / "in.png", "--box", 0, 0, 4, 4)
    assert code == 0, stderr
    before = (out / "before.png").read_bytes()
    # editing the previous run's output into the same folder would replace the input it reads
    code, stderr = call_main(edit.main, "outpaint", *common, "--image", out / "before.png", "--pad", 2, 0, 2, 0,
                             "--overwrite")  # fmt: skip
    assert code == 1 and f"--output-dir {out} contains the input {out / 'before.png'}" in stderr
    assert (out / "before.png").read_bytes() == before
    code, stderr = call_main(edit.main, "inpaint", *common[:-1], tmp_path / "other", "--image", tmp_path / "in.png",
                             "--mask", tmp_path / "other" / "mask.png")  # fmt: skip
    assert code == 1 and "cannot be read as an image" in stderr  # a missing mask: one line, nothing written
    assert not (tmp_path / "other").exists()


def test_an_image_too_large_to_decode_is_one_line(edit, model, tmp_path):
    png_header_only(tmp_path / "huge.png", 16000, 16000)
    code, stderr = call_main(edit.main, "img2img", "--model", model, "--image", tmp_path / "huge.png",
                             "--class-labels", 1, "--output-dir", tmp_path / "out")  # fmt: skip
    assert code == 1 and "--image" in stderr and "too large to decode safely" in stderr
    assert "Traceback" not in stderr and not (tmp_path / "out").exists()
