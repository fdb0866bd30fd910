"""The mesh-wide policy switch and the default FUSED overlay id shared by coordinator and instance manager."""

from __future__ import annotations

import hashlib

import pytest
from diffmesh.pipeline_key import canonical_key, fused_id, fused_id_of_key
from diffmesh.policy_mode import PolicyMode, from_proto, policy_mode, to_proto
from diffmesh.v1 import plan_pb2


def test_policy_mode_reads_diffmesh_policy() -> None:
    assert policy_mode({}) is PolicyMode.DIFFMESH
    assert policy_mode({"DIFFMESH_POLICY": ""}) is PolicyMode.DIFFMESH
    assert policy_mode({"DIFFMESH_POLICY": " LRU "}) is PolicyMode.LRU
    assert policy_mode({"DIFFMESH_POLICY": "diffmesh"}) == "diffmesh"
    with pytest.raises(ValueError, match=r"DIFFMESH_POLICY.*'fifo'"):
        policy_mode({"DIFFMESH_POLICY": "fifo"})


def test_policy_mode_converts_at_the_grpc_edge() -> None:
    assert to_proto(PolicyMode.LRU) == plan_pb2.POLICY_MODE_LRU
    assert to_proto(PolicyMode.DIFFMESH) == plan_pb2.POLICY_MODE_DIFFMESH
    for mode in PolicyMode:
        assert from_proto(to_proto(mode)) is mode
    assert from_proto(plan_pb2.POLICY_MODE_UNSPECIFIED) is PolicyMode.DIFFMESH


def test_fused_id_hashes_the_canonical_key_of_base_and_loras() -> None:
    key = canonical_key("base", [("b", 0.5), ("a", 1.0)])
    expected = "fused-" + hashlib.sha256(key.encode()).hexdigest()[:20]
    assert fused_id("base", [("a", 1.0), ("b", 0.5)]) == expected
    assert fused_id("base", [("b", 0.504), ("a", 1.0)]) == expected  # scales rounded like the key
    assert fused_id_of_key(canonical_key("base", [("a", 1.0), ("b", 0.5)], ["cn"])) == expected  # ControlNets aside
    assert fused_id_of_key(canonical_key("base")) == ""
