"""The replay's traffic time constants: they mirror the services' settings and follow the compression."""

from __future__ import annotations

import pytest
from diffmesh.replay.time_constants import TRAFFIC_CONSTANTS, TrafficConstant, compress
from diffmesh_coordinator.settings import CoordinatorSettings
from diffmesh_worker.settings import WorkerSettings
from pydantic_settings import BaseSettings

SETTINGS: dict[str, type[BaseSettings]] = {
    "DIFFMESH_COORDINATOR_": CoordinatorSettings,
    "DIFFMESH_WORKER_": WorkerSettings,
}


@pytest.mark.parametrize("constant", TRAFFIC_CONSTANTS, ids=lambda c: c.env)
def test_each_constant_is_a_service_setting_with_that_default(constant: TrafficConstant) -> None:
    prefix = next(p for p in SETTINGS if constant.env.startswith(p))
    field = SETTINGS[prefix].model_fields[constant.env.removeprefix(prefix).lower()]
    assert field.default == constant.default_s


def test_constants_are_divided_by_the_compression() -> None:
    constants = compress(250.0)
    assert constants.env == {
        "DIFFMESH_COORDINATOR_HALF_LIFE_SECONDS": "14.4",
        "DIFFMESH_COORDINATOR_PREFETCH_BUCKET_SECONDS": "14.4",
        "DIFFMESH_WORKER_POPULARITY_HALF_LIFE_SECONDS": "2.4",
        "DIFFMESH_WORKER_EVICTION_HORIZON_SECONDS": "1.2",
    }
    assert [r["replay_s"] for r in constants.rows] == [14.4, 14.4, 2.4, 1.2]
    assert "HALF_LIFE_SECONDS 3600 -> 14.4 s" in constants.describe()


def test_a_value_given_with_env_is_kept() -> None:
    constants = compress(250.0, {"DIFFMESH_COORDINATOR_HALF_LIFE_SECONDS": "60"})
    assert "DIFFMESH_COORDINATOR_HALF_LIFE_SECONDS" not in constants.env
    row = constants.rows[0]
    assert (row["replay_s"], row["source"]) == (60.0, "--env")
    with pytest.raises(ValueError, match="HALF_LIFE"):
        compress(250.0, {"DIFFMESH_COORDINATOR_HALF_LIFE_SECONDS": "soon"})
    with pytest.raises(ValueError):
        compress(0.0)
