"""`sparselora calibrate` on a tiny local model: exact reuse of the dense prefix, per-example
losses, reproducibility, resuming from the cache, and a preset `train` accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from sparselora.cli.app import main
from sparselora.config import ConfigError, SparseLoRAConfig, get_preset
from sparselora.recipes import calibrate as calibrate_module
from sparselora.recipes.calibrate import (
    CalibrateConfig,
    Prober,
    _Cache,
    calibrate,
    example_sums,
    micro_batches,
    resumed_at,
)
from sparselora.recipes.loading import load_tokenizer
from sparselora.recipes.run_config import RunConfig
from sparselora.recipes.train import train
from tests.conftest import make_batch, save_tiny_llama, tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random LLaMA (4 layers) with SmolLM2's tokenizer, saved as a local model."""
    path = tmp_path_factory.mktemp("tiny-calibrate")
    save_tiny_llama(path, layers=4, hidden=64)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = [
        {"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a} + {b} = {a + b}. The answer is {a + b}"}
        for a, b in [(i, 3 * i + 2) for i in range(72)]
    ]  # fmt: skip
    path = tmp_path_factory.mktemp("calibrate-data") / "math.json"
    path.write_text(json.dumps(rows))
    return path


def tiny_run(tiny_dir, data_file, *extra: str) -> RunConfig:
    return RunConfig.load(
        None,
        [f"model.name={tiny_dir}", f"data.train={data_file}", "data.eval=null",
         "data.max_length=64", "sparselora.preset=null", "sparselora.calibration_tokens=1",
         "training.batch_size=4", *extra],
    )  # fmt: skip


def options(tmp_path, name: str = "cal", **kwargs) -> CalibrateConfig:
    values = dict(
        min_examples=8, max_examples=24, sweep_examples=8, chunk=4, loss_budget=2.0, out=str(tmp_path / name / "p.yaml"),
        cache_dir=str(tmp_path / name / "cache"), ffn_levels=[0.5, 0.9], attn_levels=[0.5],
    )  # fmt: skip
    return CalibrateConfig(**{**values, **kwargs})


def test_example_sums_match_cross_entropy_per_example():
    torch.manual_seed(0)
    labels = torch.tensor([[5, 6, -100, 7], [-100, 1, 2, -100]])
    full = torch.randn(2, 4, 11)
    expected = [
        F.cross_entropy(full[b, :-1], labels[b, 1:], ignore_index=-100, reduction="sum")
        for b in range(2)
    ]
    assert torch.allclose(example_sums(full, labels), torch.stack(expected))
    read = labels[:, 1:] != -100
    flat = full[:, :-1][read]  # the labelled-logits layout: (N, V), row-major (batch, position)
    assert torch.allclose(example_sums(flat, labels), torch.stack(expected))


@pytest.mark.parametrize("index", [1, 2])
def test_a_forward_resumed_at_a_layer_equals_the_full_forward(index):
    model = tiny_llama(layers=3).eval()
    batch = make_batch(padding="right")
    layers = model.model.layers
    originals = list(layers)
    seen = {}

    def grab(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]

    hook = layers[index].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        full = model(**batch).logits
    hook.remove()
    with resumed_at(layers, index, seen["h"], as_tuple=False), torch.no_grad():
        assert all(type(layers[i]).__name__ == "_Skipped" for i in range(index))
        resumed = model(**batch).logits
    assert torch.allclose(resumed, full, atol=1e-5)
    assert list(layers) == originals  # every layer is back


def make_prober(tiny_dir, data_file, tmp_path, reuse: bool) -> Prober:
    from sparselora.recipes.data import Collator
    from sparselora.recipes.train import load_examples

    run = tiny_run(tiny_dir, data_file)
    model = LlamaForCausalLM.from_pretrained(tiny_dir).eval()
    tokenizer = load_tokenizer(str(tiny_dir))
    collator = Collator(tokenizer.pad_token_id)
    examples = load_examples(run.data.train, tokenizer, run, None)[:16]
    chunks = [micro_batches(examples[i : i + 4], collator) for i in range(0, 16, 4)]
    base = SparseLoRAConfig(estimator="svd", sparse_in_eval=True)
    prober = Prober(
        model, base, None, chunks, _Cache(None), options(tmp_path, min_examples=16, max_examples=16)
    )
    assert prober.reuse  # a LLaMA resumes exactly
    prober.reuse = reuse
    return prober


def test_reusing_the_dense_prefix_gives_the_same_changes(tiny_dir, data_file, tmp_path):
    reused = make_prober(tiny_dir, data_file, tmp_path, reuse=True)
    whole = make_prober(tiny_dir, data_file, tmp_path, reuse=False)
    probes = [
        {"ffn_sparsity": {"2": 0.9}},
        {"ffn_sparsity": {"2": 0.5}},
        {"attn_sparsity": {"2": 0.5}},
        {"attn_sparsity": {"1": 0.5}, "ffn_sparsity": {"3": 0.5}},
    ]
    for probe in probes:
        a, b = reused.measure(probe, None), whole.measure(probe, None)
        assert a.examples == b.examples == 16
        assert a.percent == pytest.approx(b.percent, abs=1e-4)
        assert a.percent != 0.0  # the probe changes the loss: the comparison means something
    # three probes at layer 2 share one dense prefix: 2 + 3 * 2 + (1 + 3) layers against 16
    assert reused.layer_passes < whole.layer_passes - 3 * 16


def test_calibrate_is_reproducible_and_writes_a_preset_train_accepts(tiny_dir, data_file, tmp_path):
    run = tiny_run(tiny_dir, data_file)
    first = calibrate(run, options(tmp_path, "a", full_grid=True))
    second = calibrate(run, options(tmp_path, "b", full_grid=True))  # its own, empty cache
    assert [(o.group, o.sparsity, o.change) for o in first.options] == [
        (o.group, o.sparsity, o.change) for o in second.options
    ]
    assert first.config == second.config
    assert first.search.fits and first.speedup > 1.0
    assert len(first.options) == 4 * 2 + 4  # every layer: FFN at 0.5, 0.9 and attention at 0.5

    loaded = SparseLoRAConfig.load(first.paths["preset"])
    assert loaded == first.config  # the YAML round trips
    assert get_preset(first.paths["preset"]).ffn_sparsity == first.config.ffn_sparsity
    report = (tmp_path / "a" / "p-report" / "report.md").read_text()
    assert "## One-layer sensitivity" in report and "## Chosen preset" in report
    assert (tmp_path / "a" / "p-report" / "frontier.png").stat().st_size > 1000

    config = tiny_run(
        tiny_dir, data_file, f"sparselora.preset={first.paths['preset']}",
        f"training.output_dir={tmp_path / 'run'}", "training.max_steps=2",
        "logging.tensorboard=false",
    )  # fmt: skip
    summary = train(config)
    assert summary["steps"] == 2 and summary["flops_saved"] > 0


def test_lower_levels_are_measured_only_where_the_top_is_clearly_over(
    tiny_dir, data_file, tmp_path
):
    run = tiny_run(tiny_dir, data_file)
    full = calibrate(run, options(tmp_path, "grid", full_grid=True))
    tops = {o.group: o for o in full.options if o.sparsity == 0.9 and o.block == "ffn"}
    # how far each top's interval lies from zero: it is clearly over a budget below that
    distance = {g: max(o.change.lower, -o.change.upper) for g, o in tops.items()}
    ranked = sorted(distance.values())
    budget = (ranked[-2] + ranked[-1]) / 2  # only the farthest top is clearly over it
    assert budget > 0
    lean = calibrate(run, options(tmp_path, "grid", loss_budget=budget))  # from the cache
    measured_low = {o.group for o in lean.options if o.block == "ffn" and o.sparsity == 0.5}
    over = {g for g, d in distance.items() if d > budget}
    assert len(over) == 1 and measured_low == over
    assert {(b, layer) for b, layer, s, why in lean.skipped if b == "ffn"} == set(tops) - over


def test_an_interrupted_sweep_resumes_from_its_cache(tiny_dir, data_file, tmp_path, monkeypatch):
    run = tiny_run(tiny_dir, data_file)
    uninterrupted = calibrate(run, options(tmp_path, "full"))

    calls = {"n": 0}
    original = Prober._sums

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        if calls.get("stop") and calls["n"] > calls["stop"]:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Prober, "_sums", counting)
    calls["stop"] = 12
    with pytest.raises(KeyboardInterrupt):
        calibrate(run, options(tmp_path, "cut"))
    calls.update(n=0, stop=None)
    resumed = calibrate(run, options(tmp_path, "cut"))
    after_resume = calls["n"]
    calls["n"] = 0
    calibrate(run, options(tmp_path, "fresh"))
    assert after_resume < calls["n"] - 8  # the measured chunks were not measured again
    assert [(o.group, o.sparsity, o.change) for o in resumed.options] == [
        (o.group, o.sparsity, o.change) for o in uninterrupted.options
    ]
    assert resumed.config == uninterrupted.config

    calls["n"] = 0  # a second budget: the sweep comes from the cache
    calibrate(run, options(tmp_path, "cut", loss_budget=1.0))
    assert calls["n"] <= 3 * 6  # at most new combinations (6 chunks each), no one-layer probe


def test_validate_fine_tunes_both_and_reports_the_gap(tiny_dir, data_file, tmp_path):
    run = tiny_run(tiny_dir, data_file, f"data.eval={data_file}", "data.max_eval_examples=8")
    result = calibrate(run, options(tmp_path, "val", validate_steps=2, attn_levels=[]))
    validation = result.validation
    assert sorted(validation["gap_pct"]) == [1, 2]
    for step, gap in validation["gap_pct"].items():
        lora, sparse = validation["lora"][step], validation["sparselora"][step]
        assert gap == pytest.approx(100 * (sparse - lora) / lora)
    assert "## Validation: 2 fine-tuning steps each" in Path(result.paths["report"]).read_text()
    with pytest.raises(ConfigError, match="data.eval"):
        calibrate(tiny_run(tiny_dir, data_file), options(tmp_path, "v2", validate_steps=2))


def test_calibrate_command_line(tiny_dir, data_file, tmp_path, capsys):
    out = tmp_path / "cli" / "preset.yaml"
    code = main(
        ["calibrate", f"model.name={tiny_dir}", "data.eval=null", "data.max_length=64",
         "sparselora.preset=null", "sparselora.estimator=svd", "--data", str(data_file),
         "--min-examples", "8", "--max-examples", "16", "--chunk", "8", "--ffn-levels", "0.9",
         "--attn-levels", "", "--out", str(out), "--cache-dir", str(tmp_path / "cli-cache")]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert f"preset written to {out}" in printed and "predicted speedup" in printed
    loaded = SparseLoRAConfig.load(out)
    assert loaded.estimator == "svd" and loaded.attn_sparsity == {}


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"loss_budget": 1.0, "target_speedup": 1.5}, "not both"),
        ({"loss_budget": 0.0}, "loss_budget"),
        ({"target_speedup": 0.9}, "target_speedup"),
        ({"ffn_levels": [0.5, 1.0]}, "ffn_levels"),
        ({"ffn_levels": [], "attn_levels": []}, "nothing to measure"),
        ({"min_examples": 32, "max_examples": 16}, "max_examples"),
        ({"sweep_examples": 1}, "sweep_examples"),
        ({"sweep_examples": 80}, "sweep_examples"),
    ],
)
def test_bad_options_name_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        CalibrateConfig(**bad)


def test_too_little_data_is_a_clear_error(tiny_dir, tmp_path):
    rows = [{"instruction": f"{i}?", "input": "", "output": str(i)} for i in range(40)]
    path = tmp_path / "small.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(ConfigError, match="at least 16 training examples beyond the 32"):
        calibrate(tiny_run(tiny_dir, path), options(tmp_path, min_examples=16))


def test_a_missing_preset_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="preset file .* does not exist"):
        get_preset(str(tmp_path / "nope.yaml"))


def test_the_budget_defaults_and_targets():
    assert CalibrateConfig().budget == calibrate_module.DEFAULT_BUDGET
    assert CalibrateConfig(target_speedup=1.3).budget is None
