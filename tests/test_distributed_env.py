"""opensloth.distributed.read_dist_env: errors name the variables the user set, and a stray WORLD_SIZE in a plain
process fails at once instead of waiting for peers that never come (issue 15)."""

from __future__ import annotations

import re

import pytest

from opensloth.distributed import DistEnv, DistributedEnvironmentError, read_dist_env


@pytest.mark.parametrize(("env", "want"), [
    ({}, DistEnv(0, 0, 1, 1, False)),
    ({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, DistEnv(1, 1, 2, 2, True)),
    ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, DistEnv(3, 1, 4, 2, True)),
    ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}, DistEnv(0, 0, 1, 1, True)),
    ({"LOCAL_RANK": "0"}, DistEnv(0, 0, 1, 1, True)),
])
def test_valid_launches(env, want):
    assert read_dist_env(env) == want


@pytest.mark.parametrize(("env", "match"), [
    ({"LOCAL_RANK": "1"}, r"LOCAL_RANK=1 is set but WORLD_SIZE is not.*unset LOCAL_RANK$"),
    ({"RANK": "2", "LOCAL_RANK": "1"}, r"RANK=2, LOCAL_RANK=1 is set but WORLD_SIZE is not.*unset RANK and LOCAL_RANK"),
    ({"WORLD_SIZE": "2"}, r"WORLD_SIZE=2 is set but RANK and LOCAL_RANK are not.*--nproc_per_node=2"),
    ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}, r"would wait forever for 3 other"),
])
def test_stray_variables_are_named(env, match):
    with pytest.raises(DistributedEnvironmentError, match=match):
        read_dist_env(env)
    # the message never blames a variable the user did not set
    with pytest.raises(DistributedEnvironmentError) as exc:
        read_dist_env(env)
    unset = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"} - set(env)
    assert not any(re.search(rf"(?<![A-Z_]){name}=", str(exc.value)) for name in unset)
