"""The composed step-time benchmark on a tiny random LLaMA shape: layer kinds from a preset, the
parts really run sparse, the head's labelled-logits path is exact, the composition arithmetic,
the output files, the whole-model validation end to end, and clear errors."""

from __future__ import annotations

import contextlib
import csv
import json

import pytest
import torch
import yaml
from conftest import tiny_llama

from sparselora.config import ConfigError, SparseLoRAConfig, get_preset
from sparselora.engine.flops import PAPER_MODELS, ModelShape
from sparselora.engine.state import output_positions
from sparselora.perf.bench import parse_shape
from sparselora.perf.composed import (
    PART_COLUMNS,
    ComposedConfig,
    LayerKind,
    PartsModel,
    layer_kinds,
    layer_spec,
    main,
    parts_config,
    summarize,
)

# A 6-layer tiny model: dense 0-1, FFN-only 2, FFN + attention 3-4, dense last layer 5.
SPARSE = {"ffn_sparsity": {"2-4": 0.75}, "attn_sparsity": {"3-4": 0.5}, "estimator_rank": 4}
KINDS = {
    LayerKind(None, None, False): [0, 1],
    LayerKind(0.75, None, False): [2],
    LayerKind(0.75, 0.5, False): [3, 4],
    LayerKind(None, None, True): [5],
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_llama(layers=6).config.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sparse_yaml(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "sparse.yaml"
    path.write_text(yaml.safe_dump(SPARSE))
    return path


@pytest.fixture(scope="module")
def composed_run(tiny_dir, sparse_yaml, tmp_path_factory):
    out = tmp_path_factory.mktemp("composed")
    argv = [
        "--model", str(tiny_dir), "--config", str(sparse_yaml), "--shapes", "32,8",
        "--batch-size", "2", "--warmup", "1", "--steps", "3", "--lora-rank", "4",
        "--device", "cpu", "--dtype", "float32", "--threads", "1", "--validate",
        "--output-dir", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    return out


def parts_model(tiny_dir, attn_impl="sdpa", fields=SPARSE) -> PartsModel:
    config = ComposedConfig(
        model=str(tiny_dir), batch_size=2, shapes=["32,8"], lora_rank=4, device="cpu",
        dtype="float32", attn_implementation=attn_impl,
    )  # fmt: skip
    sparse = SparseLoRAConfig(**fields, estimator="svd")
    return PartsModel(config, sparse, config.model_shape(), torch.device("cpu"), torch.float32)


def test_kinds_of_llama3_8b_math10k():
    kinds = layer_kinds(get_preset("llama3-8b-math10k"), 32)
    assert list(kinds.items()) == [
        (LayerKind(None, None, False), [0, 1, 2]),
        (LayerKind(0.99, None, False), [*range(3, 14), 20, 24, 30]),
        (LayerKind(0.99, 0.75, False), [*range(14, 20), 21, 22, 23, *range(25, 30)]),
        (LayerKind(None, None, True), [31]),
    ]
    specs = [layer_spec(layers) for layers in kinds.values()]
    assert specs == ["0-2", "3-13,20,24,30", "14-19,21-23,25-29", "31"]
    labels = [kind.label for kind in kinds]
    assert labels == ["dense", "FFN 0.99", "FFN 0.99 + attn 0.75", "dense, last layer"]

    # Without the last-layer saving, layer 31 is an ordinary dense layer.
    no_skip = SparseLoRAConfig.from_preset("llama3-8b-math10k", skip_unread_last_layer=False)
    assert layer_kinds(no_skip, 32)[LayerKind(None, None, False)] == [0, 1, 2, 31]
    assert len(layer_kinds(no_skip, 32)) == 3


def test_parts_config_puts_each_kind_on_its_parts_layer():
    preset = get_preset("llama3-8b-math10k")
    config = parts_config(preset, list(layer_kinds(preset, 32)))
    assert config.layer_sparsity(4) == ({1: 0.99, 2: 0.99}, {2: 0.75})
    assert config.ffn_criterion == preset.ffn_criterion
    assert config.estimator_rank == preset.estimator_rank
    assert config.skip_unread_last_layer and config.labelled_logits


def test_layer_spec():
    assert layer_spec([5, 0, 1, 2, 7, 8]) == "0-2,5,7-8"
    assert layer_spec([31]) == "31"
    assert layer_spec([]) == ""


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_sparse_parts_run_sparse_and_dense_parts_do_not(tiny_dir, attn_impl):
    model = parts_model(tiny_dir, attn_impl)
    assert dict(model.kinds) == KINDS
    parts = model.parts(parse_shape("32,8"))
    assert [p.part for p in parts] == ["inputs"] + ["layer"] * 4 + ["lm_head", "optimizer"]
    assert [p.count for p in parts] == [1, 2, 1, 2, 1, 1, 1]
    model.check_sparse_path(parts)  # raises if a sparse part ran dense or a dense one changed

    layer_parts = [p for p in parts if p.part == "layer"]
    with torch.no_grad():
        _, ffn_only = layer_parts[1].forward()
        _, both = layer_parts[2].forward()
    assert set(ffn_only) == {"gate_proj", "up_proj", "down_proj"}
    assert len(ffn_only["gate_proj"]) == 24  # 75% of 96 FFN channels removed
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"} <= set(both)

    # Last layer: positions no loss reads keep only the residual (q, o and FFN skipped); read
    # positions compute what the dense layer computes.
    last = layer_parts[3]
    x = last.x  # (B, L, H)
    with torch.no_grad():
        sparse_out, _ = last.forward()
        with model.handle.dense():
            dense_out, _ = last.forward()
    labels = torch.full((2, 32), -100)
    labels[:, -8:] = 1
    read = output_positions(labels)
    assert torch.equal(sparse_out[~read], x[~read])
    torch.testing.assert_close(sparse_out[read], dense_out[read], rtol=1e-5, atol=1e-5)

    model.handle.disable()  # the sparse parts now run dense: the check must notice
    with pytest.raises(RuntimeError, match="did not run as its kind says"):
        model.check_sparse_path(parts)
    model.remove()


def test_a_sparse_last_layer_skips_its_ffn_and_passes_the_check(tiny_dir):
    """FFN sparsity on the last layer (as in the SmolLM2 preset): its context tokens skip the
    FFN, so it chooses no FFN channels, and that is what the check must expect."""
    model = parts_model(tiny_dir, fields={"ffn_sparsity": {"4-5": 0.75}, "estimator_rank": 4})
    assert LayerKind(0.75, None, True) in model.kinds
    model.check_sparse_path(model.parts(parse_shape("32,8")))
    model.remove()


def test_head_with_labelled_logits_is_exact(tiny_dir):
    """The SparseLoRA head part (labelled positions only) gives the LoRA head's loss and input
    gradient: the part times a saving, not a different computation."""
    model = parts_model(tiny_dir)
    labels = torch.full((2, 32), -100)
    labels[:, -8:] = torch.randint(0, 97, (2, 8))
    hidden = torch.randn(2, 32, 64, requires_grad=True)
    losses, grads, head_rows = {}, {}, {}
    head = model.model.lm_head
    for method in ("lora", "sparselora"):
        hidden.grad = None
        hook = head.register_forward_hook(
            lambda module, args, out, method=method: head_rows.update({method: args[0].shape})
        )
        with model.handle.dense() if method == "lora" else contextlib.nullcontext():
            losses[method] = model.head_loss(hidden, labels)
        hook.remove()
        losses[method].backward()
        grads[method] = hidden.grad.clone()
    torch.testing.assert_close(losses["sparselora"], losses["lora"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["sparselora"], grads["lora"], rtol=1e-5, atol=1e-7)
    assert grads["lora"][:, :-9].abs().sum() == 0  # context positions feed no logit
    assert head_rows == {"lora": (2, 32, 64), "sparselora": (2 * 8, 64)}
    model.remove()


def test_optimizer_part_covers_the_full_models_adapters(tiny_dir):
    model = parts_model(tiny_dir)
    model.parts(parse_shape("32,8"))
    shape = ModelShape.from_config(tiny_llama(layers=6).config)
    dims = shape.projections()
    per_layer = sum(4 * (dims[p][0] + dims[p][1]) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert model.lora_parameters == 6 * per_layer  # six layers, although the parts model has 4
    model.remove()


def test_composition_by_hand():
    def part(count, lora, sparse, estimator=0.0):
        return {
            "count": count,
            "lora_median_s": lora,
            "sparselora_median_s": sparse,
            "sparselora_estimator_s": estimator,
        }

    parts = [
        part(1, 0.001, 0.001),  # inputs
        part(3, 1.0, 1.0),  # dense layers
        part(14, 1.0, 0.5, 0.01),  # FFN-only layers
        part(14, 1.0, 0.4, 0.02),  # FFN + attention layers
        part(1, 1.0, 0.8),  # last layer
        part(1, 2.0, 0.5),  # LM head + loss
        part(1, 0.3, 0.3),  # optimizer
    ]
    lora = 0.001 + 3 + 14 + 14 + 1 + 2 + 0.3
    sparse = 0.001 + 3 + 7 + 5.6 + 0.8 + 0.5 + 0.3
    row = summarize(parts, {"lora": 3e12, "sparselora": 1.5e12}, tokens=512)
    assert row["lora_step_s"] == pytest.approx(lora)
    assert row["sparselora_step_s"] == pytest.approx(sparse)
    assert row["speedup"] == pytest.approx(lora / sparse)
    assert row["predicted_speedup"] == pytest.approx(2.0)
    assert row["fraction_of_predicted"] == pytest.approx(lora / sparse / 2.0)
    assert row["estimator_s"] == pytest.approx(14 * 0.01 + 14 * 0.02)
    assert row["estimator_share"] == pytest.approx(0.42 / sparse)
    assert row["lora_tokens_per_s"] == pytest.approx(512 / lora)
    assert row["sparselora_tokens_per_s"] == pytest.approx(512 / sparse)
    assert row["lora_tflops"] == pytest.approx(3.0)
    assert row["measured_lora_step_s"] is None and row["lora_composed_over_measured"] is None

    measured = {"lora_median_s": 30.0, "sparselora_median_s": 20.0, "speedup": 1.5}
    row = summarize(parts, {"lora": 3e12, "sparselora": 1.5e12}, 512, measured)
    assert row["measured_speedup"] == 1.5
    assert row["lora_composed_over_measured"] == pytest.approx(lora / 30.0)
    assert row["sparselora_composed_over_measured"] == pytest.approx(sparse / 20.0)


def test_writes_json_csv_and_markdown(composed_run):
    results = json.loads((composed_run / "composed.json").read_text())
    header, rows, parts = results["header"], results["rows"], results["parts"]
    assert header["torch"] == torch.__version__ and header["device"] == "cpu"
    assert header["threads"] == 1 and header["dtype"] == "float32"
    assert header["model_shape"]["num_layers"] == 6
    assert [k["layers"] for k in header["layer_kinds"]] == ["0-1", "2", "3-4", "5"]
    assert header["sparselora_config"]["ffn_sparsity"] == {"2-4": 0.75}
    assert header["composed_config"]["validate"] is True
    assert [p["part"] for p in parts] == ["inputs"] + ["layer"] * 4 + ["lm_head", "optimizer"]
    assert [p["layers"] for p in parts if p["part"] == "layer"] == ["0-1", "2", "3-4", "5"]

    with (composed_run / "composed.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == 1
    assert float(csv_rows[0]["speedup"]) == pytest.approx(rows[0]["speedup"])
    with (composed_run / "composed_parts.csv").open() as f:
        reader = csv.DictReader(f)
        part_rows = list(reader)
    assert reader.fieldnames == PART_COLUMNS
    assert [r["label"] for r in part_rows] == [p["label"] for p in parts]

    markdown = (composed_run / "composed.md").read_text()
    assert "| 32,8 (32, 8) | 2 |" in markdown
    assert "| layer: FFN 0.75 + attn 0.5 | 3-4 | 2 |" in markdown
    assert "composed/measured SparseLoRA" in markdown


def test_composed_rows_are_the_sums_of_the_parts(composed_run):
    results = json.loads((composed_run / "composed.json").read_text())
    (row,) = results["rows"]
    parts = results["parts"]
    for method in ("lora", "sparselora"):
        total = sum(p["count"] * p[f"{method}_median_s"] for p in parts)
        assert row[f"{method}_step_s"] == pytest.approx(total)
        for p in parts:
            assert len(p[f"{method}_times"]) == 3
            assert 0 < p[f"{method}_min_s"] <= p[f"{method}_median_s"] <= p[f"{method}_max_s"]
    assert row["speedup"] == pytest.approx(row["lora_step_s"] / row["sparselora_step_s"])
    assert row["predicted_speedup"] > 1.0
    assert 0 < row["estimator_share"] < 1
    assert row["tokens"] == 64


def test_validation_reports_composed_over_measured(composed_run):
    (row,) = json.loads((composed_run / "composed.json").read_text())["rows"]
    for method in ("lora", "sparselora"):
        measured = row[f"measured_{method}_step_s"]
        assert measured > 0
        assert row[f"{method}_composed_over_measured"] == pytest.approx(
            row[f"{method}_step_s"] / measured
        )
    assert row["measured_speedup"] == pytest.approx(
        row["measured_lora_step_s"] / row["measured_sparselora_step_s"]
    )


def test_defaults_are_the_llama3_8b_math_table():
    config = ComposedConfig()
    assert (config.model, config.sparselora, config.shapes) == (
        "llama3-8b",
        "llama3-8b-math10k",
        ["math"],
    )
    assert (config.batch_size, config.warmup_steps, config.steps) == (1, 1, 5)
    assert config.model_shape() == PAPER_MODELS["meta-llama/Meta-Llama-3-8B"]
    assert ComposedConfig(model="smollm2-135m-instruct").model_shape().hidden == 576


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match="model = 'no-such-model'.*llama3-8b"):
        ComposedConfig(model="no-such-model")
    with pytest.raises(ConfigError, match="padding"):
        ComposedConfig(padding=["left"])
    with pytest.raises(ConfigError, match="random_weights"):
        ComposedConfig(random_weights=False)
    with pytest.raises(ConfigError, match="steps"):
        ComposedConfig(steps=0)
    with pytest.raises(ConfigError, match="shape"):
        ComposedConfig(shapes=["huge"])


def test_cli_bad_preset_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--preset", "no-such-preset"])
    assert exit_info.value.code == 2
    assert "unknown preset 'no-such-preset'" in capsys.readouterr().err
