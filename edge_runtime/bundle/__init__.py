"""Model bundles, the trainer <-> node contract: ``format`` (file names, format version, reading and verifying),
``writer`` (the trainer's side), ``signing`` (Ed25519 over the manifest), ``store`` (a directory of signed versions:
the registry's, or a node's state directory).

The names below are re-exported so that ``edge_runtime.bundle.load_manifest`` and the like keep working.
"""
from .format import (FORMAT_VERSION, MANIFEST, REQUIRED_FILES, BundleArrays, check_member_name, check_version_name,
                     load_manifest, read_arrays, sha256_file)
from .writer import attribute_csr, check_out_dir, new_model_version, stage_arrays, write_bundle

__all__ = ["FORMAT_VERSION", "MANIFEST", "REQUIRED_FILES", "BundleArrays", "attribute_csr", "check_member_name",
           "check_out_dir", "check_version_name", "load_manifest", "new_model_version", "read_arrays", "sha256_file",
           "stage_arrays", "write_bundle"]
