"""``pet-fast finetune`` on the shipped MiniLM-L6 and dataset (a few steps), and its inputs."""
import json

import pytest

import pet_fast
from pet_fast import cli, finetune


def test_shipped_dataset_is_balanced_enough_and_disjoint():
    train = finetune.read_examples(finetune.DEFAULT_TRAIN)
    test = finetune.read_examples(finetune.DEFAULT_TEST)
    assert len(train) >= 300 and len(test) >= 100
    assert {l for _, l in train} == {l for _, l in test} == {"0", "1"}
    assert not {t for t, _ in train} & {t for t, _ in test}


def test_read_csv_and_errors(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,label\ngood,pos\nbad,neg\nfine,pos\nawful,neg\n")
    assert finetune.read_examples(p)[1] == ("bad", "neg")
    (tmp_path / "bad.csv").write_text("sentence,y\na,1\n")
    with pytest.raises(ValueError, match="text"):
        finetune.read_examples(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="csv or .jsonl"):
        finetune.read_examples(tmp_path / "d.txt")


def test_finetune_minilm_reports_and_saves(tmp_path, capsys):
    try:
        model_path = finetune.default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    out = tmp_path / "task"
    rc = cli.main(["finetune", "--method", "adapter", "--steps", "12", "--batch-size", "16", "--threads", "1",
                   "--output", str(out), "--json", str(tmp_path / "r.json"), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    for line in ("trainable params", "checkpoint size", "time per step", "held-out accuracy"):
        assert line in text
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["model"] == str(model_path) and r["steps"] == 12
    assert 0 < r["trainable_fraction"] < 0.02 and r["checkpoint_fraction"] < 0.02
    assert r["eval_accuracy"] >= r["majority_baseline"] + 0.15  # well above chance after 12 steps
    # the saved task loads onto a fresh MiniLM
    from transformers import AutoModelForSequenceClassification

    fresh = AutoModelForSequenceClassification.from_pretrained(str(model_path), num_labels=2, local_files_only=True)
    assert pet_fast.load(fresh, out) == "task"


def test_every_method_has_a_config():
    for method, cls in (("adapter", pet_fast.AdapterConfig), ("side", pet_fast.SideConfig),
                        ("mask", pet_fast.MaskConfig), ("prefix", pet_fast.PrefixConfig)):
        assert isinstance(finetune._method_config(method, ()), cls)


def test_finetune_fusion_trains_two_adapters_then_fuses(tmp_path):
    """method="fusion" without given adapters trains two on halves of the data, then the fusion."""
    try:
        finetune.default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    r = finetune.finetune(method="fusion", steps=2, batch_size=8, threads=1, progress=False,
                          output=str(tmp_path / "fused"))
    assert r["method"] == "fusion" and r["steps"] == 2
    assert 0 < r["trainable_fraction"] < 0.2  # three d x d projections per fusion layer
    assert (tmp_path / "fused").is_dir()
    # the adapters it trained are saved beside it: the fusion loads onto a fresh model that has them
    assert r["saved_adapters"] == [str(tmp_path / "fused-adapter0"), str(tmp_path / "fused-adapter1")]
    from transformers import AutoModelForSequenceClassification

    fresh = AutoModelForSequenceClassification.from_pretrained(str(finetune.default_model_path()), num_labels=2,
                                                               local_files_only=True)
    for i, path in enumerate(r["saved_adapters"]):
        pet_fast.load(fresh, path, name=f"adapter{i}")
    assert pet_fast.load(fresh, str(tmp_path / "fused")) == "task"


@pytest.mark.parametrize("argv,message", [
    (["finetune", "--batch-size", "0"], "--batch-size: expected a positive integer, got 0"),
    (["finetune", "--steps", "-3"], "--steps: expected a positive integer, got -3"),
    (["finetune", "--max-length", "0"], "--max-length: expected a positive integer"),
    (["finetune", "--epochs", "nan"], "--epochs: expected a positive number"),
    (["finetune", "--lr=-1e-3"], "--lr: expected a positive number"),
    (["demo", "--steps", "-1"], "--steps: expected a positive integer"),
    (["bench", "--steps", "0"], "--steps: expected a positive integer"),
    (["bench", "--step", "--ops"], "argument --ops: not allowed with argument --step"),
])
def test_cli_refuses_bad_numbers_before_running(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_reports_bad_paths_without_a_traceback(tmp_path, capsys):
    """Paths that do not exist, and an output folder save would refuse, stop before any model is loaded or
    trained (the trained task must not be lost at the end): a one-line error, exit code 2."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.md").write_text("mine")
    (tmp_path / "bad.json").write_text("{not json")
    cases = [
        (["finetune", "--model", str(tmp_path / "nope")], "is not a folder"),
        (["finetune", "--data", str(tmp_path / "missing.csv")], "data '" + str(tmp_path / "missing.csv") + "' is not a file"),
        (["finetune", "--output", str(tmp_path / "out")], "is not a pet_fast checkpoint folder"),
        (["bench", "--compare", str(tmp_path / "missing.json"), str(tmp_path / "bad.json")], "missing.json"),
        (["bench", "--compare", str(tmp_path / "bad.json"), str(tmp_path / "bad.json")], "Expecting property name"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith(f"pet-fast {argv[0]}: error: ") and message in err and "Traceback" not in err, err
    assert (tmp_path / "out" / "notes.md").read_text() == "mine"


def test_finetune_checks_its_arguments_before_loading():
    for kwargs, message in [(dict(steps=0), "steps must be a positive int"), (dict(batch_size=2.5), "batch_size"),
                            (dict(epochs=0), "epochs must be a positive number"), (dict(lr=float("inf")), "lr")]:
        with pytest.raises(ValueError, match=message):
            finetune.finetune(model_path="/nonexistent-model", **kwargs)  # (the numbers are checked first)
    with pytest.raises(ValueError, match="adapters .* are for method 'fusion', not 'mask'"):
        finetune.finetune(method="mask", adapters=["somewhere"])
    with pytest.raises(ValueError, match="adapter '/nonexistent-adapter' is not a folder"):
        finetune.finetune(method="fusion", adapters=["/nonexistent-adapter"])


def test_finetune_names_a_model_folder_without_a_tokenizer(tmp_path):
    import transformers as tf

    tf.BertForSequenceClassification(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=37, vocab_size=61)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="has no tokenizer files"):
        finetune.finetune(model_path=str(tmp_path), steps=1)
