"""Bundle format and verification."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from edge_runtime import bundle, scoring
from edge_runtime.errors import BundleError
from edge_runtime.serving.model import Model


@pytest.fixture
def copy(tiny_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    return dst


def rewrite_manifest(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


# with the native kernel here the trainer also evaluates the native encoder (what a node serves)
NATIVE_PATH = {"native_int8"} if scoring.native_kernel() is not None else set()


def test_manifest_contents(tiny_manifest, tiny_bundle):
    m = tiny_manifest
    assert m["format_version"] == bundle.FORMAT_VERSION
    for key in ("model_version", "created_at", "training_config", "dataset", "metrics", "files"):
        assert key in m
    assert m["dataset"]["fingerprint"].startswith("sha256:")
    files = set(m["files"])
    assert set(bundle.REQUIRED_FILES) <= files and "encoder.onnx" in files and "item_attr_indptr.npy" in files
    for name, meta in m["files"].items():
        assert meta["sha256"] == bundle.sha256_file(tiny_bundle / name)
        assert meta["bytes"] == (tiny_bundle / name).stat().st_size
    n, d = m["model"]["num_items"], m["model"]["dim"]
    assert np.load(tiny_bundle / "items.i8.npy").shape == (n, d)
    assert np.load(tiny_bundle / "items.i8.npy").dtype == np.int8
    assert np.load(tiny_bundle / "items.scale.npy").shape == (n,)
    test = m["metrics"]["test"]
    assert set(test) == {"pytorch_fp32", "onnx_fp32", "onnx_int8"} | NATIVE_PATH
    assert test["onnx_fp32"]["NDCG@10"] == pytest.approx(test["pytorch_fp32"]["NDCG@10"], rel=1e-3)
    assert 0.0 < test["pytorch_fp32"]["NDCG@10"] < 1.0
    assert m["metrics"]["top10_overlap_vs_pytorch"]["onnx_fp32"] > 0.99
    assert m["metrics"]["top10_overlap_vs_pytorch"]["onnx_int8"] > 0.8
    assert "encoder.int8.native.npz" in files
    if NATIVE_PATH:   # the same function as the int8 ONNX encoder: the same test metrics, up to an exact tie
        assert test["native_int8"]["NDCG@10"] == pytest.approx(test["onnx_int8"]["NDCG@10"], abs=2e-3)
        assert m["metrics"]["top10_overlap_vs_pytorch"]["native_int8"] > 0.8


def test_altered_file_is_refused_naming_it(copy):
    with open(copy / "encoder.int8.onnx", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(BundleError, match="'encoder.int8.onnx' does not match its sha256"):
        Model(copy)


def test_missing_file_is_refused(copy):
    os.remove(copy / "item_ids.json")
    with pytest.raises(BundleError, match="'item_ids.json' listed in the manifest is missing"):
        bundle.load_manifest(copy)


@pytest.mark.parametrize("name", ["../evil.npy", "/etc/passwd", "a/../../b", "a\\b", ""])
def test_unsafe_member_names_refused(copy, name):
    rewrite_manifest(copy, lambda m: m["files"].__setitem__(name, {"sha256": "0" * 64, "bytes": 1}))
    with pytest.raises(BundleError, match="not allowed"):
        bundle.load_manifest(copy)


def test_symlink_outside_refused(copy, tmp_path):
    outside = tmp_path / "outside.json"
    shutil.copy(copy / "item_ids.json", outside)
    os.remove(copy / "item_ids.json")
    os.symlink(outside, copy / "item_ids.json")
    with pytest.raises(BundleError, match="links outside the bundle"):
        bundle.load_manifest(copy)


def test_unsupported_format_and_missing_required(copy):
    rewrite_manifest(copy, lambda m: m.__setitem__("format_version", 99))
    with pytest.raises(BundleError, match="format_version 99"):
        bundle.load_manifest(copy)
    rewrite_manifest(copy, lambda m: (m.__setitem__("format_version", 1), m["files"].pop("popularity.npy")))
    with pytest.raises(BundleError, match="required file 'popularity.npy'"):
        bundle.load_manifest(copy)
    with pytest.raises(BundleError, match="not a bundle"):
        bundle.load_manifest(copy / "nowhere")


def test_write_bundle_refuses_foreign_directory(tmp_path):
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "x.bin").write_bytes(b"x")
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(BundleError, match="is not a bundle"):
        bundle.write_bundle(foreign, staged, {"model_version": "v"})
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_attribute_index_matches_the_csr_table(tiny_bundle):
    """Model.attr_rows (built from integer codes) lists exactly the items whose CSR attribute list holds the value."""
    import numpy as np

    from edge_runtime.serving.model import Model

    m = Model(tiny_bundle)
    from conftest import attr_values

    vals = attr_values(tiny_bundle)
    ind = m.attr_indptr
    expect: dict[str, list[int]] = {}
    for r in range(m.num_items):
        for v in vals[ind[r]:ind[r + 1]]:
            expect.setdefault(v, []).append(r)
    assert set(m.attr_rows) == set(expect) and len(expect) > 10
    for v, rows in expect.items():
        assert np.array_equal(np.sort(m.attr_rows[v]), np.asarray(rows)), v


def test_legacy_attribute_strings_load_the_same_index(tiny_bundle, tmp_path):
    """Bundles written before item_attr_codes.npy (one JSON string per item-attribute pair) give the same index."""
    import json
    import shutil

    import numpy as np

    from conftest import attr_values
    from edge_runtime.serving.model import Model

    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    (old / "item_attr_values.json").write_text(json.dumps(attr_values(tiny_bundle)))
    (old / "item_attr_codes.npy").unlink()
    (old / "item_attr_names.json").unlink()
    a, b = Model(tiny_bundle), Model(old, verify=False)
    assert set(a.attr_rows) == set(b.attr_rows)
    assert all(np.array_equal(a.attr_rows[v], b.attr_rows[v]) for v in a.attr_rows)
