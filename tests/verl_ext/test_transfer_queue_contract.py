"""The TransferQueue behaviours the trainer and worker rely on, pinned against the real TransferQueue.

Each test names the crash it guards (all three were found by running verl's loop): a handle kept from
before a write does not list the new field; a fixed-width field comes back jagged; 3-D position ids of
equal-length samples come back nested along the wrong axis.
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from vlcal_verl.testing.ray_local import private_ray
from vlcal_verl.verl_ext.nested import dense_rows, nested_rows, position_ids_misnested, renest_position_ids

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tq():
    with private_ray(num_cpus=4):
        import transfer_queue

        transfer_queue.init()
        yield transfer_queue


def _rows4(lengths, base=0):
    return [torch.arange(4 * n).reshape(4, n) + base + 100 * i for i, n in enumerate(lengths)]


def test_put_returns_the_handle_that_lists_the_new_field(tq):
    from vlcal_verl.verl_ext.trainer import put_fields

    keys = ["h0", "h1"]
    first = tq.kv_batch_put(
        keys=keys, partition_id="t", fields=TensorDict({"x": torch.ones(2, 3)}, batch_size=2)
    )
    first.extra_info["temperature"] = 0.7
    first.tags[1]["is_padding"] = True
    assert "span" not in first.fields
    after = put_fields(first, TensorDict({"span": torch.tensor([[1, 3], [-1, -1]])}, batch_size=2))
    assert set(after.fields) >= {"x", "span"} and "span" not in first.fields
    assert after.extra_info == {"temperature": 0.7} and after.tags[1] == {"is_padding": True}


def test_fixed_width_field_comes_back_jagged_and_dense_rows_restores_it(tq):
    keys = ["s0", "s1", "s2"]
    spans = torch.tensor([[1, 3], [-1, -1], [0, 7]])
    tq.kv_batch_put(keys=keys, partition_id="t", fields=TensorDict({"span": spans}, batch_size=3))
    got = tq.kv_batch_get(keys=keys, partition_id="t", select_fields=["span"])["span"]
    assert got.is_nested  # what broke `spans[:, 0]` and the TAR span mask
    assert torch.equal(dense_rows(got), spans)


@pytest.mark.parametrize("lengths", [(5, 5, 5), (3, 6, 2)])
def test_position_ids_round_trip(tq, lengths):
    keys = [f"p{len(set(lengths))}_{i}" for i in range(len(lengths))]
    rows = _rows4(lengths)
    fields = TensorDict(
        {"position_ids": nested_rows(rows), "input_ids": nested_rows([r[0] for r in rows])},
        batch_size=len(rows),
    )
    tq.kv_batch_put(keys=keys, partition_id="t", fields=fields)
    data = tq.kv_batch_get(keys=keys, partition_id="t", select_fields=["position_ids", "input_ids"])
    equal = len(set(lengths)) == 1
    # equal lengths: TransferQueue nests [4, n] rows along the constant 4 (ragged index 1)
    assert position_ids_misnested(data["position_ids"]) == equal
    assert renest_position_ids(data) == equal
    pos = data["position_ids"]
    assert pos._ragged_idx == 2 and pos.offsets().diff().tolist() == list(lengths)
    assert all(torch.equal(a, b) for a, b in zip(pos.unbind(), rows, strict=True))
    assert not renest_position_ids(data)  # idempotent
