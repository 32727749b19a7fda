"""What bench and composed share: shapes, synthetic batches, the A B B A pair order, timing
summaries, saved-activation bytes, the shared config's validation and the machine header."""

from __future__ import annotations

import accelerate
import peft
import pytest
import torch
import transformers

from sparselora import __version__
from sparselora.config import ConfigError
from sparselora.perf.common import (
    MeasureConfig,
    Timing,
    hardware_header,
    pair_schedule,
    parse_shape,
    saved_activation_bytes,
    synthetic_batch,
    torch_threads,
)

A, B = "lora", "sparselora"


def test_pair_schedule_is_a_b_b_a_over_warmup_and_timed_pairs():
    assert pair_schedule(1, 4) == [
        (False, (A, B)),
        (True, (B, A)),
        (True, (A, B)),
        (True, (B, A)),
        (True, (A, B)),
    ]
    assert pair_schedule(0, 2) == [(True, (A, B)), (True, (B, A))]
    flat = [method for _, order in pair_schedule(2, 2) for method in order]
    assert flat == [A, B, B, A, A, B, B, A]


def test_timing_of_hand_written_seconds():
    timing = Timing.of([0.5, 0.25, 2.0, 1.0])
    assert (timing.median_s, timing.min_s, timing.max_s) == (0.75, 0.25, 2.0)
    assert Timing.of([3.0, 1.0, 2.0]) == Timing(2.0, 1.0, 3.0)


def test_named_and_custom_shapes():
    assert (parse_shape("math").seq_len, parse_shape("math").out_tokens) == (512, 128)
    assert (parse_shape("commonsense").seq_len, parse_shape("commonsense").out_tokens) == (512, 3)
    assert (parse_shape("code").seq_len, parse_shape("chat").seq_len) == (1024, 2048)
    custom = parse_shape("256,64")
    assert (custom.name, custom.seq_len, custom.out_tokens) == ("256,64", 256, 64)


@pytest.mark.parametrize("bad", ["huge", "512", "8,8", "10,0", "a,b"])
def test_bad_shape_is_a_clear_error(bad):
    with pytest.raises(ConfigError, match="shape"):
        parse_shape(bad)
    with pytest.raises(ConfigError, match="shape"):
        MeasureConfig(shapes=[bad])


def test_synthetic_batch_labels_the_last_out_tokens():
    shape = parse_shape("40,6")
    batch = synthetic_batch(97, 4, shape, "left", seed=3)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape == (4, 40)
    assert torch.equal(labels[:, -6:], ids[:, -6:])
    assert (labels[:, :-6] == -100).all()
    real = mask.sum(dim=1)
    assert (real >= 7).all() and (real <= 40).all() and (real < 40).any()
    for row, length in enumerate(real.tolist()):  # left padding: pads first, then real tokens
        assert (mask[row, 40 - length :] == 1).all() and (ids[row, : 40 - length] == 0).all()
    unpadded = synthetic_batch(97, 4, shape, "none", seed=3)
    assert unpadded["attention_mask"].all()


def test_saved_activation_bytes_counts_distinct_non_parameter_storages():
    linear = torch.nn.Linear(10, 20, bias=False)
    x = torch.randn(5, 10)
    with saved_activation_bytes(linear) as seen:
        y = linear(x)  # saves x (5*10 floats) for the weight gradient
        z = y.exp()  # saves its output (5*20 floats)
        z.sin()  # saves z again: the same storage counts once
    assert sum(seen.values()) == 4 * (5 * 10 + 5 * 20)
    linear.weight.requires_grad_(False)
    with saved_activation_bytes(linear) as seen:
        linear(x.requires_grad_())  # saves only the (frozen) weight: a parameter, not counted
    assert sum(seen.values()) == 0


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"batch_size": True}, "batch_size must be an integer"),
        ({"threads": 0}, "threads must be an integer >= 1"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"lora_targets": ["qkv"]}, r"lora_targets = \['qkv'\] is not allowed; choose from"),
        ({"dtype": "float8"}, r"dtype = 'float8' is not allowed; choose from \['auto', 'float32'"),
        ({"device": "tpu"}, r"device = 'tpu' is not allowed; choose from \['auto', 'cpu', 'cuda'"),
        ({"estimator": "pca"}, r"estimator = 'pca' is not allowed; choose from \['svd'"),
        ({"attn_implementation": "flash"}, r"attn_implementation = 'flash' .* \['sdpa', 'eager'"),
        ({"shapes": []}, "shapes is empty"),
    ],
)
def test_bad_values_name_the_field_and_what_is_allowed(fields, message):
    with pytest.raises(ConfigError, match=message):
        MeasureConfig(**fields)


def test_estimator_override_or_the_configs_own(tmp_path):
    assert MeasureConfig(estimator="config").sparse_config().estimator == "whitened_svd"
    assert MeasureConfig(estimator="svd").sparse_config().estimator == "svd"
    assert MeasureConfig(sparselora="llama3-8b-csr").sparse_config().preset == "llama3-8b-csr"
    path = tmp_path / "sparse.yaml"
    path.write_text("ffn_sparsity: 0.5\nestimator: svd\n")
    config = MeasureConfig(sparselora=str(path)).sparse_config()
    assert (config.ffn_sparsity, config.estimator) == ({"all": 0.5}, "svd")
    with pytest.raises(ConfigError, match="unknown preset"):
        MeasureConfig(sparselora="no-such-preset").sparse_config()


def test_torch_threads_applies_inside_and_restores():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_hardware_header_names_the_machine_and_versions():
    header = hardware_header(torch.device("cpu"))
    assert header["torch"] == torch.__version__
    assert header["transformers"] == transformers.__version__
    assert header["peft"] == peft.__version__
    assert header["accelerate"] == accelerate.__version__
    assert header["sparselora"] == __version__
    assert header["device"] == "cpu" and header["gpu"] is None and header["cuda"] is None
    assert header["cpu"] and header["threads"] == torch.get_num_threads()
    assert header["date"][:2] == "20" and header["date"].endswith("+00:00")
