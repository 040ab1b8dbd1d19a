"""Checkpoint files: lossless round trips, clear errors for damaged or mismatched checkpoints."""
import copy
import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from isofast import checkpoint as ck
from isofast.models.mlp import TimeMLP


def _adam_state(model: nn.Module) -> dict:
    """Adam state after 3 steps of a copy of ``model`` (the model itself is left as it is)."""
    model = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 2), torch.randint(0, 10, (5,))).square().mean().backward()
        opt.step()
    return opt.state_dict()


def _assert_same(a, b, path="root"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.cpu(), b.cpu()), path
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b and type(a) is type(b), path


def _same_weights(a: dict, b: dict) -> None:
    """safetensors files hold tensors by name (sorted), so compare as mappings."""
    assert sorted(a) == sorted(b)
    _assert_same({k: a[k] for k in sorted(a)}, {k: b[k] for k in sorted(b)})


def test_flatten_round_trip_keeps_types_keys_and_tensors():
    obj = {
        "optimizer": _adam_state(TimeMLP(hidden=8, emb_dim=8)),
        "tuple": (1, 2.5, "x", None, True),
        "int_keys": {3: torch.arange(4), 7: [torch.ones(2, 3, dtype=torch.bfloat16)]},
        "np": np.arange(5, dtype=np.uint32),
        "scalar": torch.tensor(2.0),
        "big": 2**64 - 1,
    }
    tree, tensors = ck.flatten_state(obj)
    json.dumps(tree)  # the structure is pure JSON
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    _assert_same(obj, ck.unflatten_state(json.loads(json.dumps(tree)), tensors))


def test_flatten_refuses_unknown_objects():
    with pytest.raises(TypeError, match=r"at a\.b"):
        ck.flatten_state({"a": {"b": object()}})


def _save(root, step, model, ema=None, **kw):
    state = {"optimizer": _adam_state(model), "rng": ck.capture_rng({"g": torch.Generator().manual_seed(step)})}
    return ck.save_checkpoint(root, step, model.state_dict(), ema, state, {"note": "x"}, **kw), state


def test_checkpoint_round_trip(tmp_path):
    model = TimeMLP(hidden=16, emb_dim=8)
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    path, state = _save(tmp_path, 12, model, ema)
    assert path.name == "step_0000012"
    assert (tmp_path / "latest").read_text().strip() == "step_0000012"
    loaded = ck.load_checkpoint(tmp_path)  # via the latest pointer
    assert loaded.step == 12 and loaded.meta["note"] == "x" and loaded.path == path
    _same_weights(model.state_dict(), loaded.model)
    _same_weights(ema, loaded.ema)
    _assert_same(state, loaded.state)
    # a run folder with checkpoints/latest resolves too
    assert ck.resolve_checkpoint(tmp_path.parent / tmp_path.name) == path


def test_restore_rng_replays_every_stream():
    g = torch.Generator().manual_seed(5)
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    state = ck.capture_rng({"g": g})
    first = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=g))
    tree, tensors = ck.flatten_state(state)  # through the on-disk encoding
    ck.restore_rng(ck.unflatten_state(json.loads(json.dumps(tree)), tensors), {"g": g})
    second = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(2, generator=g))
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert first[2] == second[2] and torch.equal(first[3], second[3])


def test_keeps_the_last_k_and_never_the_incomplete(tmp_path):
    model = TimeMLP(hidden=8, emb_dim=8)
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, keep=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_0000003", "step_0000004"]
    # a directory without state.json (a save killed midway) is not a checkpoint, and is cleaned up later
    (tmp_path / "step_0000005").mkdir()
    (tmp_path / "step_0000005" / "model.safetensors").write_bytes(b"half")
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_0000003", "step_0000004"]
    with pytest.raises(ck.CheckpointError, match=r"step_0000005.*incomplete.*state\.json"):
        ck.load_checkpoint(tmp_path / "step_0000005")
    _save(tmp_path, 6, model, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_0000004", "step_0000006"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "json"])
@pytest.mark.parametrize("name", ["model.safetensors", "ema.safetensors", "state.safetensors"])
def test_damaged_file_is_named_and_previous_checkpoint_survives(tmp_path, damage, name):
    model = TimeMLP(hidden=8, emb_dim=8)
    _save(tmp_path, 1, model, model.state_dict())
    newest, _ = _save(tmp_path, 2, model, model.state_dict())
    target = newest / ("state.json" if damage == "json" else name)
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        target.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip":
        data[-3] ^= 0x40  # inside tensor data: only the checksum can notice
        target.write_bytes(bytes(data))
    else:
        target.write_bytes(bytes(data[: len(data) - 20]))
    with pytest.raises(ck.CheckpointError, match=str(target).replace(".", r"\.")):
        ck.load_checkpoint(tmp_path)
    previous = ck.load_checkpoint(tmp_path / "step_0000001")
    _same_weights(model.state_dict(), previous.model)


def test_unverified_load_still_catches_a_truncated_safetensors_header(tmp_path):
    model = TimeMLP(hidden=8, emb_dim=8)
    path, _ = _save(tmp_path, 1, model)
    (path / "model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(ck.CheckpointError, match="model.safetensors"):
        ck.load_checkpoint(path, verify=False)


def test_checkpoint_of_another_config_names_keys_and_shapes(tmp_path):
    path, _ = _save(tmp_path, 1, TimeMLP(hidden=16, emb_dim=8, n_layers=3))
    other = TimeMLP(hidden=32, emb_dim=8, n_layers=2)
    loaded = ck.load_checkpoint(path)
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_state_dict_checked(other, loaded.model, path / "model.safetensors")
    msg = str(info.value)
    assert "model.safetensors" in msg and "another model config" in msg
    assert "layers.0.weight: checkpoint (16, 2) vs model (32, 2)" in msg
    assert "unexpected keys: layers.2.bias, layers.2.weight, time_proj.2.weight" in msg


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ck.CheckpointError, match="no checkpoint at"):
        ck.load_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("../../etc\n")
    with pytest.raises(ck.CheckpointError, match="does not name a checkpoint"):
        ck.load_checkpoint(tmp_path)


@pytest.mark.parametrize("edit", ["step", "adam_beta", "rng"])
def test_an_edited_state_json_is_refused(tmp_path, edit):
    model = TimeMLP(hidden=8, emb_dim=8)
    path, _ = _save(tmp_path, 3, model)
    record = json.loads((path / "state.json").read_text())
    if edit == "step":
        record["step"] = 4
    elif edit == "adam_beta":
        record["state"]["optimizer"]["param_groups"][0]["betas"]["__tuple__"][0] = 0.5
    else:
        record["state"]["rng"]["python"]["__tuple__"][0] = 2
    (path / "state.json").write_text(json.dumps(record, indent=1))
    with pytest.raises(ck.CheckpointError, match=r"state\.json was edited or is damaged.*checksum"):
        ck.load_checkpoint(path)
    with pytest.raises(ck.CheckpointError, match=r"state\.json was edited or is damaged.*checksum"):
        ck.checkpoint_meta(path)


def test_a_version_1_record_without_its_checksum_loads_with_a_warning(tmp_path):
    model = TimeMLP(hidden=8, emb_dim=8)
    path, _ = _save(tmp_path, 3, model)
    record = json.loads((path / "state.json").read_text())
    del record["record_sha256"]
    (path / "state.json").write_text(json.dumps({**record, "version": 2}))
    with pytest.raises(ck.CheckpointError, match="was edited or is damaged"):
        ck.load_checkpoint(path)  # version 2 needs its checksum
    (path / "state.json").write_text(json.dumps({**record, "version": 1}))  # as isofast wrote before
    with pytest.warns(RuntimeWarning, match="older isofast.*not checksummed"):
        loaded = ck.load_checkpoint(path)
    _same_weights(model.state_dict(), loaded.model)
