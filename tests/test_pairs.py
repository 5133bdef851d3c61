"""Sentence pairs end to end: GLUE pair layouts and delimited files read as pairs, a tiny pair model built
(token_type_ids into its mobile slice), served through three real tiers on 127.0.0.1 by Classify's `pairs`,
the Open Inference Protocol's two BYTES inputs, `tierserve classify --pair` and the demo; and a pair sent to
a single-text model (or the reverse) is INVALID_ARGUMENT with a message."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from shared.client import TierClient
from shared.contract.manifest import TIERS, load_manifest
from shared.contract.text import TOKEN_TYPE_IDS, TextEncoder
from shared.data.text import DEFAULT_SST2, Columns, load_splits, read_table
from shared.errors import BuildInputError
from shared.tools.cli import main
from shared.tools.processes import TierCluster, running_tiers
from shared.wire.rpc import pb2
from tests.tiny_model import make_pair_dataset

GLUE = DEFAULT_SST2.parent


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pair_dataset(tmp_path_factory.mktemp("pair_data"))


@pytest.fixture(scope="module")
def pair_artifacts(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, pair_data: Path) -> Path:
    from shared.builder.build import BuildConfig, build

    config = BuildConfig(backbone=str(tiny_checkpoint), data=str(pair_data), profile="tiny", split_points=(1, 2, 3),
                         max_length=48, policy="p_tar", p_tar=(0.8, 0.8))
    return build(config, tmp_path_factory.mktemp("pair_build") / "model")


@pytest.fixture(scope="module")
def pair_cluster(pair_artifacts: Path) -> Iterator[TierCluster]:
    with running_tiers(pair_artifacts) as started:
        yield started


@pytest.fixture(scope="module")
def pair_client(pair_cluster: TierCluster) -> Iterator[TierClient]:
    with TierClient(pair_cluster.entry_address, timeout=30) as started:
        yield started


def dev_pairs(pair_data: Path, n: int | None = None) -> list[tuple[str, str]]:
    dev = read_table(pair_data / "dev.tsv")
    assert dev.second_texts is not None
    return list(zip(dev.texts, dev.second_texts, strict=True))[:n]


def code(exc: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return exc.value.code()  # type: ignore[attr-defined,no-any-return]


@pytest.mark.skipif(not (GLUE / "mrpc").is_dir() or not (GLUE / "rte").is_dir(), reason="no ../shared/data")
def test_glue_pair_layouts_are_read_unchanged() -> None:
    mrpc_train, mrpc_dev = load_splits(GLUE / "mrpc")  # a byte-order mark, "Quality", "#1 String", "#2 String"
    assert mrpc_train.second_texts is not None and mrpc_dev.second_texts is not None
    assert (len(mrpc_train), len(mrpc_dev)) == (3667, 408)
    assert mrpc_train.label_names == ["0", "1"]
    assert mrpc_train.texts[0].startswith("Amrozi accused his brother")
    assert mrpc_train.second_texts[0].startswith("Referring to him as only \" the witness \"")  # quotes kept
    rte_train, rte_dev = load_splits(GLUE / "rte")
    assert rte_train.second_texts is not None and (len(rte_train), len(rte_dev)) == (2490, 277)
    assert rte_train.label_names == ["entailment", "not_entailment"]
    assert rte_train.second_texts[0] == "Weapons of Mass Destruction Found in Iraq."


def test_headerless_csv_pairs_by_position_with_real_quoting(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    rows = [["1", 'He said "yes",\tthen left', "He agreed", "x"], ["0", "Cats\tsleep", 'Dogs "bark"', "y"]] * 3
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    data = read_table(path, columns=Columns(text=("1",), second_text=("2",), label="0", header=False))
    assert data.texts[:2] == ['He said "yes",\tthen left', "Cats\tsleep"]
    assert data.second_texts is not None and data.second_texts[:2] == ["He agreed", 'Dogs "bark"']
    single = read_table(path, columns=Columns(text=("1", "2"), label="0", header=False))
    assert single.second_texts is None and single.texts[0] == 'He said "yes",\tthen left He agreed'


def test_pair_column_mistakes_are_clear_errors(tmp_path: Path, pair_data: Path) -> None:
    with pytest.raises(BuildInputError, match="--second-text-column needs --text-column"):
        read_table(pair_data / "train.tsv", columns=Columns(second_text=("sentence2",)))
    with pytest.raises(BuildInputError, match="in both texts of the pair"):
        read_table(pair_data / "train.tsv", columns=Columns(text=("sentence1",), second_text=("sentence1",)))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "train.tsv").write_text((pair_data / "train.tsv").read_text())
    (mixed / "dev.tsv").write_text("sentence\tlabel\ngood film\tentailment\n")
    with pytest.raises(BuildInputError, match="the splits hold different inputs"):
        load_splits(mixed)


def test_pair_model_records_its_input_and_its_mobile_slice_takes_token_types(pair_artifacts: Path) -> None:
    manifest = load_manifest(pair_artifacts)
    assert manifest.text_pairs
    assert manifest.slice("mobile").inputs == ["input_ids", "attention_mask", TOKEN_TYPE_IDS]
    session = ort.InferenceSession(str(pair_artifacts / "mobile.onnx"), providers=["CPUExecutionProvider"])
    assert TOKEN_TYPE_IDS in [i.name for i in session.get_inputs()]
    report = json.loads((pair_artifacts / "report.json").read_text())
    assert report["exits"][-1]["accuracy"] > 0.6  # learned from the second text; chance is 0.5
    assert report["max_logit_difference"] <= 1e-4


def test_token_types_reach_the_model(pair_artifacts: Path, pair_data: Path) -> None:
    """The same tokens with the second text's segment set to 0 give other logits: token_type_ids are used."""
    manifest = load_manifest(pair_artifacts)
    encoded = TextEncoder.for_manifest(manifest, pair_artifacts).encode(*zip(*dev_pairs(pair_data, 8), strict=True))
    assert encoded.tensors[TOKEN_TYPE_IDS].max() == 1
    session = ort.InferenceSession(str(pair_artifacts / "mobile.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], encoded.tensors)[0]
    zeros = np.zeros_like(encoded.tensors[TOKEN_TYPE_IDS])
    flat = session.run(["logits"], {**encoded.tensors, TOKEN_TYPE_IDS: zeros})[0]
    assert not np.allclose(logits, flat, atol=1e-4)


def test_served_pairs_answer_like_the_builder_report(pair_artifacts: Path, pair_data: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo.json"
    status = main(["demo", "--artifacts", str(pair_artifacts), "--latency-samples", "20", "--out", str(out)])
    printed = capsys.readouterr().out
    assert status == 0, printed
    results = json.loads(out.read_text())
    report = json.loads((pair_artifacts / "report.json").read_text())
    assert results["samples"] == 300 and results["builder_report"]["comparable"]
    assert results["accuracy"] == pytest.approx(report["system_accuracy"], abs=1e-12)
    for tier, e in zip(TIERS, report["exits"], strict=True):
        assert results["exits"][tier]["fraction"] == pytest.approx(e["exit_fraction"], abs=1e-12)
    assert results["single_pass_agrees"]


def test_pairs_and_texts_sent_to_the_wrong_model_are_invalid(
        pair_client: TierClient, pair_data: Path, client: TierClient) -> None:
    pairs = dev_pairs(pair_data, 4)
    answers = pair_client.classify_pairs(pairs)
    assert len(answers) == 4 and {a.label for a in answers} <= {"entailment", "not_entailment"}
    with pytest.raises(grpc.RpcError) as texts_to_pairs:
        pair_client.classify([first for first, _ in pairs])
    assert code(texts_to_pairs) == grpc.StatusCode.INVALID_ARGUMENT
    assert "classifies sentence pairs" in texts_to_pairs.value.details()  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as pairs_to_texts:
        client.classify_pairs(pairs)  # the single-text tiny model
    assert code(pairs_to_texts) == grpc.StatusCode.INVALID_ARGUMENT
    assert "classifies single texts" in pairs_to_texts.value.details()  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as both:
        pair_client._classify(pb2.ClassifyRequest(texts=["a"], pairs=[pb2.TextPair(first="a", second="b")]))
    assert code(both) == grpc.StatusCode.INVALID_ARGUMENT
    assert "holds both texts and pairs: send one kind" in both.value.details()  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as empty:
        pair_client.classify_pairs([pairs[0], (pairs[1][0], " ")])
    assert code(empty) == grpc.StatusCode.INVALID_ARGUMENT
    assert "pair 1's second text is empty" in empty.value.details()  # type: ignore[attr-defined]
    again = pair_client.classify_pairs(pairs)  # the tier still serves, answers unchanged
    assert [(a.label, list(a.probabilities)) for a in again] == [(a.label, list(a.probabilities)) for a in answers]


def _bytes_input(name: str, texts: list[str]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [len(texts)], "BYTES")
    return tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))


def test_open_inference_protocol_takes_two_bytes_inputs(pair_cluster: TierCluster, pair_client: TierClient,
                                                        pair_data: Path) -> None:
    pairs = dev_pairs(pair_data, 10)
    triton = grpcclient.InferenceServerClient(url=pair_cluster.entry_address)
    try:
        metadata = triton.get_model_metadata("tierserve")
        assert [i.name for i in metadata.inputs] == ["texts", "second_texts"]
        config = triton.get_model_config("tierserve").config
        assert [i.name for i in config.input] == ["texts", "second_texts"]
        result = triton.infer("tierserve", [_bytes_input("second_texts", [b for _, b in pairs]),
                                            _bytes_input("texts", [a for a, _ in pairs])])  # any order
        answers = pair_client.classify_pairs(pairs)
        np.testing.assert_array_equal(result.as_numpy("label_index"), [a.label_index for a in answers])
        assert [x.decode() for x in result.as_numpy("exit_tier")] == [a.tier for a in answers]
        with pytest.raises(InferenceServerException, match="the inputs 'texts' and 'second_texts'"):
            triton.infer("tierserve", [_bytes_input("texts", [a for a, _ in pairs])])
        with pytest.raises(InferenceServerException, match="different numbers of texts"):
            triton.infer("tierserve", [_bytes_input("texts", ["a b"]), _bytes_input("second_texts", ["c", "d"])])
    finally:
        triton.close()


def test_classify_command_takes_pairs(pair_cluster: TierCluster, pair_client: TierClient, pair_data: Path,
                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pairs = dev_pairs(pair_data, 3)
    listing = tmp_path / "pairs.tsv"
    listing.write_text("".join(f"{a}\t{b}\n" for a, b in pairs[1:]))
    status = main(["classify", "--address", pair_cluster.entry_address, "--json", "--pair", *pairs[0],
                   "--pair-file", str(listing)])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    rows = [json.loads(line) for line in printed.out.splitlines()]
    answers = pair_client.classify_pairs(pairs)
    assert [(r["first"], r["second"]) for r in rows] == pairs
    assert [r["label"] for r in rows] == [a.label for a in answers]
    (tmp_path / "bad.tsv").write_text("no tab here\n")
    assert main(["classify", "--address", pair_cluster.entry_address, "--pair-file", str(tmp_path / "bad.tsv")]) == 2
    assert "line 1 has no tab" in capsys.readouterr().err
