"""The logical-axis resolver and the born-sharded state."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from dsjax.config import Config, ModelConfig, TrainConfig
from dsjax.mesh import make_mesh
from dsjax.optim import make_optimizer
from dsjax.precision import NoOpLossScale
from dsjax.sharding import LOGICAL_RULES, constrain, describe, resolve
from dsjax.state import create_train_state


def mesh(data=1, fsdp=1, tensor=1):
    return make_mesh(
        {"data": data, "pipeline": 1, "fsdp": fsdp, "tensor": tensor}, jax.devices()[: data * fsdp * tensor]
    )


def test_rules_map_params_to_fsdp_and_tensor():
    m = mesh(fsdp=4, tensor=2)
    assert resolve(("embed", "mlp"), (64, 128), m) == P("fsdp", "tensor")
    assert resolve(("mlp", "embed"), (128, 64), m) == P("tensor", "fsdp")
    assert resolve(("layers", "embed", "heads", "head_dim"), (2, 64, 4, 16), m) == P(None, "fsdp", "tensor")
    assert resolve(("norm",), (64,), m) == P()


def test_batch_uses_data_and_fsdp_together():
    assert resolve(("act_batch", "act_seq"), (16, 8), mesh(data=2, fsdp=4)) == P(("data", "fsdp"))
    assert resolve(("act_batch", "act_seq"), (16, 8), mesh(data=8)) == P("data")


def test_axis_of_size_one_is_dropped():
    assert resolve(("embed", "mlp"), (64, 128), mesh(fsdp=8)) == P("fsdp")
    assert resolve(("embed", "mlp"), (64, 128), mesh(data=8)) == P()


def test_axis_that_does_not_divide_is_dropped():
    m = mesh(data=2, fsdp=4)
    assert resolve(("embed",), (6,), m) == P()  # 6 % 4 != 0: replicated rather than padded
    assert resolve(("act_batch",), (2,), m) == P("data")  # data divides 2, data x fsdp does not
    assert resolve(("act_batch",), (4,), m) == P("data")  # 4 % (2 * 4) != 0: fsdp is dropped


def test_an_axis_is_used_once_per_spec():
    m = mesh(fsdp=4, tensor=2)
    rules = {**LOGICAL_RULES, "a": ("tensor",), "b": ("tensor", "fsdp")}
    assert resolve(("a", "b"), (8, 8), m, rules) == P("tensor", "fsdp")


def test_unknown_logical_name_and_rank_mismatch_are_errors():
    m = mesh(fsdp=8)
    with pytest.raises(KeyError, match="no entry"):
        resolve(("embedding",), (64,), m)
    with pytest.raises(ValueError, match="do not match"):
        resolve(("embed",), (64, 2), m)


def test_constrain_is_identity_without_a_mesh():
    x = jax.numpy.ones((4, 3))
    assert constrain(x, ("act_batch", None), None) is x


def test_state_is_born_sharded_and_optimizer_state_follows_params():
    m = mesh(fsdp=4, tensor=2)
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=256, max_seq_len=32)
    _, state, _ = create_train_state(
        Config(model=cfg, train=TrainConfig(seq_len=32)), make_optimizer(TrainConfig()), NoOpLossScale(), m
    )
    wq = state.params["blocks"]["wq"].get_value()
    assert wq.sharding.spec == P(None, "fsdp", "tensor")
    assert wq.addressable_shards[0].data.shape == (2, 8, 2, 8)  # (L, D/4, N/2, H): only a shard per device
    mu = state.opt_state[1][0].mu["blocks"]["wq"].get_value()
    assert mu.sharding.spec == wq.sharding.spec
    rows = {path: spec for path, _, spec in describe(state.params, m)}
    assert rows["embed"] == "P('tensor', 'fsdp')"
    assert rows["blocks.attn_norm"] == "P()"
