"""Every bad input to the loader gets an InputError that says what is wrong and what to do."""

import json
import shutil

import numpy as np
import pytest
import tifffile

from napari_morphomol.errors import InputError
from napari_morphomol.io.he_image import read_pyramid
from napari_morphomol.io.sample import load_sample, open_he_image, read_experiment
from napari_morphomol.registration.formats import read_alignment_csv


def write_he(path, image, pixel_size_um=0.2737, levels=2):
    metadata = {"axes": "YXS"}
    if pixel_size_um is not None:
        metadata.update(PhysicalSizeX=pixel_size_um, PhysicalSizeY=pixel_size_um)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        photometric = "rgb" if image.ndim == 3 else "minisblack"
        if image.ndim == 2:
            metadata["axes"] = "YX"
        tw.write(image, subifds=levels - 1, tile=(256, 256), photometric=photometric, metadata=metadata)
        for i in range(1, levels):
            step = 2**i
            tw.write(image[::step, ::step], subfiletype=1, tile=(256, 256), photometric=photometric)
    return path


@pytest.fixture
def rgb_image():
    return (np.random.default_rng(1).random((600, 500, 3)) * 255).astype(np.uint8)


def test_he_image_pyramid_and_pixel_size(tmp_path, rgb_image):
    path = write_he(tmp_path / "he.ome.tif", rgb_image)
    element, pixel_size = open_he_image(path)
    assert pixel_size == pytest.approx(0.2737)
    assert list(element.children) == ["scale0", "scale1"]
    scale0 = element["scale0"]["image"]
    assert scale0.dims == ("c", "y", "x") and scale0.shape == (3, 600, 500)
    np.testing.assert_array_equal(scale0[:, 10:20, 30:40].values, rgb_image[10:20, 30:40].transpose(2, 0, 1))
    assert element["scale1"]["image"].shape == (3, 300, 250)


def test_he_without_pixel_size_asks_for_it(tmp_path, rgb_image):
    path = write_he(tmp_path / "he.ome.tif", rgb_image, pixel_size_um=None)
    with pytest.raises(InputError, match="--he-pixel-size-um"):
        open_he_image(path)
    _, pixel_size = open_he_image(path, he_pixel_size_um=0.5)
    assert pixel_size == 0.5


def test_he_not_rgb(tmp_path):
    gray = np.zeros((300, 300), dtype=np.uint8)
    path = write_he(tmp_path / "gray.ome.tif", gray)
    with pytest.raises(InputError, match="not an RGB H&E image"):
        open_he_image(path)


def test_he_16_bit_refused(tmp_path):
    path = write_he(tmp_path / "he16.ome.tif", np.zeros((300, 300, 3), dtype=np.uint16))
    with pytest.raises(InputError, match="8-bit"):
        open_he_image(path)


def test_he_unreadable_and_truncated(tmp_path, rgb_image):
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"this is not a tiff")
    with pytest.raises(InputError, match="cannot read"):
        read_pyramid(junk)
    path = write_he(tmp_path / "he.ome.tif", rgb_image, levels=1)
    data = path.read_bytes()
    cut = tmp_path / "cut.ome.tif"
    # half a file: the header survives, the tiles (and IFDs) do not
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError):
        open_he_image(cut)
    with pytest.raises(InputError, match="not found"):
        read_pyramid(tmp_path / "missing.tif")


@pytest.mark.parametrize(
    "content, message",
    [
        ("1,0,0\n0,1,0\n", "not a 3 x 3"),
        ("1,0,0,0\n0,1,0,0\n0,0,1,0\n", "not a 3 x 3"),
        ("1,0,0\n0,1,0\n1,1,1\n", "not a 3 x 3"),
        ("a,b,c\nd,e,f\ng,h,i\n", "expected numbers"),
        ("0,0,5\n0,0,5\n0,0,1\n", "singular"),
        ("", "not a 3 x 3"),
    ],
)
def test_alignment_csv_not_affine(tmp_path, content, message):
    path = tmp_path / "he_imagealignment.csv"
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        read_alignment_csv(path)


def test_alignment_csv_reads_xenium_matrix(tmp_path):
    matrix = np.array([[1.2, 0.1, 30.5], [-0.1, 1.2, -12.0], [0, 0, 1]])
    path = tmp_path / "he_imagealignment.csv"
    np.savetxt(path, matrix, delimiter=",")
    np.testing.assert_allclose(read_alignment_csv(path), matrix)


def test_not_a_xenium_folder(tmp_path):
    with pytest.raises(InputError, match="no experiment.xenium"):
        read_experiment(tmp_path)
    nested = tmp_path / "output-XETG"
    nested.mkdir()
    (nested / "experiment.xenium").write_text("{}")
    with pytest.raises(InputError, match="Did you mean"):
        read_experiment(tmp_path)
    with pytest.raises(InputError, match="not found"):
        read_experiment(tmp_path / "nope")


@pytest.mark.parametrize("version", ["3.0.0", "xenium-beta", "", None])
def test_unparseable_version(tmp_path, version):
    (tmp_path / "experiment.xenium").write_text(json.dumps({"pixel_size": 0.2125, "analysis_sw_version": version}))
    with pytest.raises(InputError, match="analysis_sw_version"):
        read_experiment(tmp_path)


def test_experiment_not_json(tmp_path):
    (tmp_path / "experiment.xenium").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_experiment(tmp_path)


def test_load_needs_something_and_alignment_needs_both(tmp_path):
    with pytest.raises(InputError, match="give a Xenium folder"):
        load_sample()
    csv = tmp_path / "a.csv"
    np.savetxt(csv, np.eye(3), delimiter=",")
    with pytest.raises(InputError, match="give both"):
        load_sample(he_path=tmp_path / "he.tif", alignment_csv=csv)


def test_bundle_errors(synthetic_sample, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(synthetic_sample.xenium_dir, bundle)
    (bundle / "transcripts.parquet").unlink()
    with pytest.raises(InputError, match="no transcripts.parquet"):
        load_sample(bundle)
    original = (synthetic_sample.xenium_dir / "transcripts.parquet").read_bytes()
    (bundle / "transcripts.parquet").write_bytes(original[: len(original) // 3])
    with pytest.raises(InputError, match="unreadable, truncated"):
        load_sample(bundle)
