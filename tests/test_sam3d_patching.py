"""The one patch helper (worker/backends/sam3d/patching.py): what a scope changes is undone
when it ends, however it ends; an instance's patch leaves its class and other instances alone;
a process-wide patch refuses a name upstream does not have."""

from __future__ import annotations

import logging
import types

import pytest

from worker.backends.sam3d import patching
from worker.backends.sam3d.patching import Patch


class Guidance:
    def inner_forward(self) -> str:
        return "upstream"


def test_a_scope_patches_one_instance_and_undoes_everything_even_on_error():
    module = types.ModuleType("upstream_module")
    module.broadcast = lambda: "upstream"
    mine, other = Guidance(), Guidance()
    with (
        pytest.raises(RuntimeError),
        patching.scoped(
            [
                Patch(mine, "inner_forward", lambda: "paired", "cfg_pairs"),
                Patch(module, "broadcast", lambda: "gathered", "gathered_broadcasts"),
            ]
        ) as applied,
    ):
        assert len(applied) == 2
        assert mine.inner_forward() == "paired" and other.inner_forward() == "upstream"
        assert module.broadcast() == "gathered"
        raise RuntimeError("a job failed inside")
    assert "inner_forward" not in vars(mine)  # the class's method shows through again
    assert mine.inner_forward() == "upstream" and module.broadcast() == "upstream"


def test_a_class_patch_is_restored_to_the_classs_own():
    own = Guidance.__dict__["inner_forward"]
    with patching.scoped(
        [Patch(Guidance, "inner_forward", lambda self: "rows", "row_group_norms")]
    ):
        assert Guidance().inner_forward() == "rows"
    assert Guidance.__dict__["inner_forward"] is own


def test_process_wide_patches_are_logged_and_refuse_a_missing_name(caplog):
    module = types.ModuleType("attention_module")
    module.ATTN = "sdpa"
    with caplog.at_level(logging.INFO, logger="sam3d.worker"):
        patching.process_wide(
            [
                Patch(module, "ATTN", "flash_attn", "varlen_attention"),
                Patch(module, "flash_attn", object(), "varlen_attention", create=True),
            ]
        )
    assert module.ATTN == "flash_attn" and hasattr(module, "flash_attn")
    assert sum("process-wide patch" in r.getMessage() for r in caplog.records) == 2
    with pytest.raises(AttributeError, match="no such attribute"):
        patching.process_wide([Patch(module, "renamed_upstream", 1, "varlen_attention")])
