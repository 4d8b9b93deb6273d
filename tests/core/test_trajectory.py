"""Which config fields a resume checks: every field of the run config is classified exactly once."""

import json

import attrs

from distill.config import RESUMABLE_FIELDS, TRAJECTORY_FIELDS, display_config, parse_config, trajectory_changes
from distill.kinds import REGISTRY


def _leaves(cls, prefix=""):
    attrs.resolve_types(cls)
    for field in attrs.fields(cls):
        path = f"{prefix}{field.name}"
        if attrs.has(field.type):
            yield from _leaves(field.type, f"{path}.")
        else:
            yield path


def test_every_config_field_is_either_trajectory_or_resumable():
    """A new config field fails here until someone decides whether changing it on resume is allowed."""
    listed = TRAJECTORY_FIELDS + RESUMABLE_FIELDS
    for leaf in _leaves(REGISTRY.run_config):
        covering = [p for p in listed if leaf == p or leaf.startswith(f"{p}.")]
        assert len(covering) == 1, f"{leaf} is covered by {covering or 'neither list'}"


def _config(manager, **changes):
    raw = {"output_dir": "out", "seed": 5, "student": {"model": "s"}, "data": {"train": "t.jsonl"},
           "teachers": [{"model": "t"}], **changes}
    return parse_config(raw, manager)


def test_trajectory_changes_names_what_would_change_the_run_and_ignores_the_rest(manager):
    saved = json.loads(json.dumps(display_config(_config(manager))))
    assert trajectory_changes(saved, _config(manager)) == {}
    where = _config(manager, output_dir="elsewhere", eval={"every_steps": 3}, checkpoint={"every_steps": 1, "keep_last": 5},
                    train={"threads": 2, "micro_batch_size": 1}, data={"train": "t.jsonl", "eval": "e.jsonl"})
    assert trajectory_changes(saved, where) == {}
    other = _config(manager, seed=6, train={"adam_betas": [0.9, 0.95]}, teachers=[{"model": "t2"}])
    changes = trajectory_changes(saved, other)
    assert list(changes) == ["seed", "teachers", "train.adam_betas"]
    assert changes["seed"] == (5, 6) and changes["train.adam_betas"] == ([0.9, 0.999], [0.9, 0.95])
    (before,), (after,) = changes["teachers"]
    assert (before["options"]["model"], after["options"]["model"]) == ("t", "t2")
    assert "batch_size" not in after["options"]  # resumable options are left out of the comparison


def test_options_a_plugin_declares_resumable_may_change_and_the_others_may_not(manager):
    remote = {"backend": "fireworks", "base_url": "http://127.0.0.1:8001", "model": "teacher"}
    saved = json.loads(json.dumps(display_config(_config(manager, teachers=[remote]))))
    moved = _config(manager, teachers=[{**remote, "base_url": "http://10.0.0.7:9000", "stream": True, "timeout_s": 5.0}],
                    trainer={"backend": "torch", "device": "cpu"}, sampler={"backend": "hf", "batch_size": 8})
    assert trajectory_changes(saved, moved) == {}  # a server restarted elsewhere, another device, batching
    other_model = _config(manager, teachers=[{**remote, "model": "another-teacher"}])
    assert list(trajectory_changes(saved, other_model)) == ["teachers"]
    precision = _config(manager, teachers=[remote], trainer={"backend": "torch", "precision": "bf16"})
    assert list(trajectory_changes(saved, precision)) == ["trainer"]
